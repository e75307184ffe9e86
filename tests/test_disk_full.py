"""A full disk on each stage's write path: one clear line naming the path and the bytes, nothing half written left
behind, and a rerun (once there is space) that writes exactly the bytes of an undisturbed run.

The workflow test fails a write of each stage in a copy of the session's reference run with the fault-injection
hook (``VACC_TEST_ENOSPC_AT``: an ``OSError(ENOSPC)`` at the file's opening, see
``fault_injection/sitecustomize.py``). The tmpfs tests fill a real, small file system where the test may mount
one (a user and mount namespace, ``unshare -rm``): a real ``write()`` fails there, naming no file. The free-space
checks of the stages that know their output's size (quantize, export) are run in this process with
``shutil.disk_usage`` reporting little space.
"""

import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
from test_faults import FAULT_INJECTION, LEFTOVERS

from workflow_scripts.checkpoint.safetensors_stream import SafetensorsFile
from workflow_scripts.core.errors import DiskFull
from workflow_scripts.core.files import staged_directory
from workflow_scripts.quantization.compressed_tensors_export import export_compressed_tensors, exported_bytes
from workflow_scripts.quantization.gptq_checkpoint import GptqSettings, quantize_gptq
from workflow_scripts.quantization.int8_checkpoint import quantized_bytes, safetensors_bytes, shard_layout, weight_map
from workflow_scripts.quantization.rtn import quantize_checkpoint

from conftest import QUANTIZE_SETTINGS, QUANTIZE_STAGE, TINY_SHAPES, output_digests, stage_env
from workflow_copy import Workflow

EXPORT_STAGE = "workflow_scripts.stages.export_compressed_tensors"
GPTQ_STAGE = "workflow_scripts.stages.quantize_gptq"
Stage = namedtuple("Stage", "rule target output full_at log message")
DiskUsage = namedtuple("DiskUsage", "total used free")

# Each stage of the issue, with the file whose opening for writing finds the disk full: a large file half way
# through the stage's writes where it has one (an earlier file of the same output is then already written).
STAGES = [
    Stage(
        "download",
        "resources/models/tiny-b/MANIFEST.json",
        "resources/models/tiny-b",
        "*/resources/models/.tiny-b.staging-*/.model-00002-of-00002.safetensors.*.tmp",
        "logs/tiny-b/download.log",
        r"no space left on device writing resources/models/tiny-b/model-00002-of-00002\.safetensors: "
        r"\d+ bytes free on its file system",
    ),
    Stage(
        "quantize",
        "results/tiny-c/quantized/rtn-int8/MANIFEST.json",
        "results/tiny-c/quantized/rtn-int8",
        "*/results/tiny-c/quantized/.rtn-int8.staging-*/model-00002-of-00002.safetensors",
        "logs/tiny-c/quantize-rtn-int8.log",
        r"no space left on device writing results/tiny-c/quantized/rtn-int8/model-00002-of-00002\.safetensors: "
        r"\d+ bytes needed, \d+ bytes free on its file system",
    ),
    Stage(
        "quantize_gptq",
        "results/tiny-a/quantized/gptq-int8/MANIFEST.json",
        "results/tiny-a/quantized/gptq-int8",
        "*/results/tiny-a/quantized/.gptq-int8.partial/.layer-001.safetensors.*.tmp",
        "logs/tiny-a/quantize-gptq-int8.log",
        r"no space left on device writing results/tiny-a/quantized/\.gptq-int8\.partial/layer-001\.safetensors: "
        r"more than \d+ bytes needed, \d+ bytes free on its file system",
    ),
    Stage(
        "export_compressed_tensors",
        "results/tiny-a/quantized/rtn-int8-ct/MANIFEST.json",
        "results/tiny-a/quantized/rtn-int8-ct",
        "*/results/tiny-a/quantized/.rtn-int8-ct.staging-*/model-00002-of-00002.safetensors",
        "logs/tiny-a/export-rtn-int8-ct.log",
        r"no space left on device writing results/tiny-a/quantized/rtn-int8-ct/model-00002-of-00002\.safetensors: "
        r"\d+ bytes needed, \d+ bytes free on its file system",
    ),
    Stage(
        "aoti_compile",
        "results/tiny-a/aoti/rtn-int8/MANIFEST.json",
        "results/tiny-a/aoti/rtn-int8",
        "*/results/tiny-a/aoti/.rtn-int8.staging-*/layer.pt2",
        "logs/tiny-a/aoti-rtn-int8.log",
        r"no space left on device writing results/tiny-a/aoti/rtn-int8/layer\.pt2: \d+ bytes free on its file system",
    ),
    Stage(
        "evaluate",
        "results/tiny-c/eval/float.json",
        "results/tiny-c/eval/float.json",
        "*/results/tiny-c/eval/.float.json.*.tmp",
        "logs/tiny-c/evaluate-float.log",
        r"no space left on device writing results/tiny-c/eval/float\.json: \d+ bytes needed, "
        r"\d+ bytes free on its file system",
    ),
]
# What a failed GPTQ run keeps on purpose: its finished layer, which the rerun takes instead of computing it.
KEPT = {"quantize_gptq": ["results/tiny-a/quantized/.gptq-int8.partial/layer-000.safetensors"]}


def left_beside(work, output):
    """The output and everything named after it beside it (staging folders, temporary and partial files)."""
    output = Path(work) / output
    found = []
    for path in output.parent.iterdir():
        if path.name == output.name or path.name.startswith(f".{output.name}."):
            found += [path] if path.is_file() else [path, *path.rglob("*")]
    return sorted(str(path.relative_to(work)) for path in found if not path.is_dir() or not any(path.iterdir()))


def digests_of(work, output):
    return {path: digest for path, digest in output_digests(work).items() if (path + "/").startswith(output + "/")}


@pytest.fixture(scope="session")
def disk_full_run(reference_run, tmp_path_factory):
    """A copy of the reference run in which every stage of ``STAGES`` is rebuilt with its disk full (one
    Snakemake run, ``--keep-going``: the jobs share no file), then rebuilt again with space; per stage, what
    its log says, what was left, and the digests of its rebuilt output.

    Done once per session, like the reference run: under pytest-xdist the first worker to ask does it and
    records it, the others read the record."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    record = root / "disk-full.json"
    with open(root / "disk-full.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            record.write_text(json.dumps(fill_disks(reference_run, root / "disk-full")))
    return json.loads(record.read_text())


def fill_disks(reference_run, root):
    flow = Workflow.copy_of(reference_run, root / "copy")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULT_INJECTION), os.environ.get("PYTHONPATH")])),
        "VACC_TEST_ENOSPC_AT": os.pathsep.join(stage.full_at for stage in STAGES),
    }
    targets = [stage.target for stage in STAGES]
    failed = flow.run("--force", "--keep-going", *targets, check=False, env=env)
    seen = {stage.rule: {"log": (flow.work / stage.log).read_text()} for stage in STAGES}
    for stage in STAGES:
        seen[stage.rule]["left"] = left_beside(flow.work, stage.output)
    rerun = flow.run(*targets)
    for stage in STAGES:
        seen[stage.rule]["rerun log"] = (flow.work / stage.log).read_text()
        seen[stage.rule]["digests"] = digests_of(flow.work, stage.output)
    leftovers = [str(path) for pattern in LEFTOVERS for path in flow.work.glob(pattern)]
    shutil.rmtree(root)
    return {"failed": failed, "rerun": rerun, "leftovers": leftovers, "stages": seen}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES, ids=[stage.rule for stage in STAGES])
def test_a_stage_that_finds_the_disk_full_says_where_and_its_rerun_writes_the_same_bytes(
    stage, disk_full_run, reference_run
):
    seen = disk_full_run["stages"][stage.rule]
    assert f"Error in rule {stage.rule}:" in disk_full_run["failed"], disk_full_run["failed"][-3000:]
    errors = [line for line in seen["log"].splitlines() if line.startswith("error: ")]
    # the row of docs/faults-and-security.md's table (pytest -s)
    print(f"| {stage.rule} | `{errors[0] if errors else None}` | {', '.join(seen['left']) or 'nothing'} |")
    assert len(errors) == 1 and "Traceback" not in seen["log"], seen["log"][-3000:]
    assert re.fullmatch(f"error: {stage.message}", errors[0]), errors[0]
    assert seen["left"] == KEPT.get(stage.rule, [])
    rerun = disk_full_run["rerun"]
    assert f"rule {stage.rule}:" in rerun or f"checkpoint {stage.rule}:" in rerun
    assert seen["digests"] == digests_of(reference_run.work, stage.output)
    assert seen["digests"]
    assert disk_full_run["leftovers"] == []
    if stage.rule == "quantize_gptq":
        assert "layer 0: taken from" in seen["rerun log"] and "layer 1: taken from" not in seen["rerun log"]


def reporting(free):
    """A ``shutil.disk_usage`` that reports ``free`` bytes free on every file system."""
    return lambda path: DiskUsage(1 << 40, (1 << 40) - free, free)


def shard_sizes(folder):
    return {path.name: path.stat().st_size for path in sorted(Path(folder).glob("model-*.safetensors"))}


def test_quantize_refuses_early_when_its_checkpoint_does_not_fit(patched, tmp_path, monkeypatch):
    source, folder = patched["mistral"], tmp_path / "out" / "rtn-int8"
    mapping = weight_map(source)
    shards = {name: SafetensorsFile(source / name) for name in set(mapping.values())}
    needed = quantized_bytes(source, mapping, shards, QUANTIZE_SETTINGS.modules)
    monkeypatch.setattr(shutil, "disk_usage", reporting(needed - 1))
    with pytest.raises(DiskFull) as refused:
        quantize_checkpoint("mistral", "rtn-int8", source, folder, QUANTIZE_SETTINGS, QUANTIZE_STAGE)
    assert str(refused.value) == (
        f"not enough space on device to write {folder}: {needed} bytes needed, {needed - 1} bytes free on its "
        "file system; nothing was written"
    )
    assert os.listdir(tmp_path / "out") == []
    monkeypatch.setattr(shutil, "disk_usage", reporting(needed))
    quantize_checkpoint("mistral", "rtn-int8", source, folder, QUANTIZE_SETTINGS, QUANTIZE_STAGE)
    # the shards, the bulk of it, are exactly as predicted
    predicted = {
        name: safetensors_bytes(
            shard_layout(shard, [n for n, s in mapping.items() if s == name], QUANTIZE_SETTINGS.modules)[1]
        )
        for name, shard in shards.items()
    }
    assert shard_sizes(folder) == predicted
    written = sum(path.stat().st_size for path in folder.iterdir() if path.is_file() and path.stat().st_nlink == 1)
    assert abs(written - needed) < 0.01 * needed + 16384


def test_the_export_refuses_early_when_it_does_not_fit(quantized, tmp_path, monkeypatch):
    pytest.importorskip("compressed_tensors")
    source, folder = quantized["mistral"], tmp_path / "out" / "rtn-int8-ct"
    mapping = weight_map(source)
    shards = {name: SafetensorsFile(source / name) for name in set(mapping.values())}
    needed = exported_bytes(source, mapping, shards)
    monkeypatch.setattr(shutil, "disk_usage", reporting(needed // 2))
    with pytest.raises(DiskFull, match=rf"^not enough space on device to write {folder}: {needed} bytes needed"):
        export_compressed_tensors("mistral", source, folder, EXPORT_STAGE)
    assert os.listdir(tmp_path / "out") == []
    monkeypatch.setattr(shutil, "disk_usage", reporting(needed))
    export_compressed_tensors("mistral", source, folder, EXPORT_STAGE)
    written = sum(path.stat().st_size for path in folder.iterdir() if path.is_file() and path.stat().st_nlink == 1)
    assert abs(written - needed) < 0.01 * needed + 16384


def test_gptq_refuses_before_its_first_layer_when_its_partials_and_checkpoint_do_not_fit(
    patched, tmp_path, monkeypatch
):
    """The refusal comes before the calibration samples are read (any file stands for one here) and any layer
    is computed; the needed bytes are the checkpoint's and the layers' partial files'."""
    source, folder = patched["mistral"], tmp_path / "out" / "gptq-int8"
    mapping = weight_map(source)
    shards = {name: SafetensorsFile(source / name) for name in set(mapping.values())}
    checkpoint = quantized_bytes(source, mapping, shards, QUANTIZE_SETTINGS.modules)
    settings = GptqSettings.of(
        {
            **QUANTIZE_SETTINGS.record(),
            **{"datasets": ["c4"], "nsamples": 8, "holdout": 4, "block_size": 32, "damp": 0.01},
            **{"act_order": False, "first_token_weight": 1.0, "device": "cpu"},
        }
    )
    monkeypatch.setattr(shutil, "disk_usage", reporting(checkpoint))
    with pytest.raises(DiskFull) as refused:
        quantize_gptq("mistral", source, [source / "config.json"], folder, settings, GPTQ_STAGE)
    assert refused.value.early and refused.value.needed > checkpoint
    assert str(refused.value).startswith(f"not enough space on device to write {folder}: {refused.value.needed} bytes")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_inside_a_staged_folder_names_the_output_and_leaves_nothing(tmp_path):
    folder = tmp_path / "out" / "model"
    with pytest.raises(DiskFull) as full, staged_directory(folder) as staging:
        (staging / "a.bin").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "b.bin"))
    assert str(full.value).startswith(f"no space left on device writing {folder / 'b.bin'}: ")
    assert os.listdir(tmp_path / "out") == []


def test_a_full_disk_that_names_no_file_where_the_output_has_room_is_said_to_be_elsewhere(tmp_path):
    """The hub cache or the compiler's temporary folder may be the full file system: the message does not blame
    the output's."""
    folder = tmp_path / "out" / "model"
    with pytest.raises(DiskFull) as full, staged_directory(folder):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(full.value).startswith(f"no space left on device while writing {folder} (its file system reports ")
    assert str(full.value).endswith(
        "so the full one may be another the stage writes to: a cache, the temporary folder)"
    )


def test_run_cli_says_a_full_disk_in_one_line(tmp_path):
    """An ``OSError(ENOSPC)`` no output helper said (a write outside them): one line naming its file, status 1."""
    script = textwrap.dedent(f"""
        import errno, os
        from workflow_scripts.core.cli import run_cli

        def main(argv):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), {str(tmp_path / "x.bin")!r})

        run_cli(main)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=stage_env())
    assert result.returncode == 1
    assert re.fullmatch(
        rf"error: no space left on device writing {tmp_path}/x\.bin: \d+ bytes free on its file system\n", result.stderr
    ), result.stderr


def mount_namespace_available():
    probe = (
        subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
        if shutil.which("unshare")
        else None
    )
    return probe is not None and probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(
    not mount_namespace_available(), reason="no user and mount namespace here (unshare -rm) to mount a small tmpfs"
)
DEMO_SOURCE = {"demo": "mistral", "seed": 3, "shape": TINY_SHAPES["mistral"]}


def in_small_tmpfs(mount, size, script):
    """Run the shell ``script`` with a tmpfs of ``size`` mounted at ``mount`` (gone when the script ends)."""
    mount.mkdir(parents=True, exist_ok=True)
    command = f"mount -t tmpfs -o size={size} tmpfs {mount} && cd {mount}\n{textwrap.dedent(script)}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, env=stage_env())


@needs_tmpfs
def test_a_download_that_fills_a_real_file_system(tmp_path):
    """The demo download into a 2 MiB tmpfs fails at a write() (a shard is 4 MB): one line naming the shard,
    nothing left; with the tmpfs made larger, the same command writes what it writes on a roomy disk."""
    stage = [sys.executable, "-m", "workflow_scripts.stages.download_demo", "--model", "tiny"]
    stage += ["--source", json.dumps(DEMO_SOURCE), "--manifest"]
    command, log = shlex.join(stage), tmp_path / "full.log"
    result = in_small_tmpfs(
        tmp_path / "small",
        "2m",
        f"""
        {command} models/tiny/MANIFEST.json 2> {log}; echo "status $?"
        echo left; ls -A . models
        mount -o remount,size=64m tmpfs .
        {command} models/tiny/MANIFEST.json 2> /dev/null; echo "status $?"
        cp -r models/tiny {tmp_path / "rerun"}
        """,
    )
    assert result.stdout.splitlines() == ["status 1", "left", ".:", "models", "", "models:", "status 0"], (
        result.stdout + result.stderr
    )
    said = log.read_text().splitlines()[-1]
    assert re.fullmatch(
        r"error: no space left on device writing models/tiny/model-00001-of-00002\.safetensors: "
        r"more than \d+ bytes needed, \d+ bytes free on its file system",
        said,
    ), said
    undisturbed = tmp_path / "undisturbed" / "tiny"
    subprocess.run([*stage, undisturbed / "MANIFEST.json"], check=True, capture_output=True, env=stage_env())
    assert {p.name: p.read_bytes() for p in (tmp_path / "rerun").iterdir()} == {
        p.name: p.read_bytes() for p in undisturbed.iterdir()
    }


@needs_tmpfs
def test_a_write_by_torch_that_fills_a_real_file_system_is_said_as_a_full_disk(tmp_path):
    """torch's archive writer (C++) reports a full disk as an enforce failure (``unexpected pos``), with no
    errno: inside an output folder whose file system is then nearly full, it is said as a full disk."""
    script = """
        import torch
        from workflow_scripts.core.errors import DiskFull
        from workflow_scripts.core.files import staged_directory
        try:
            with staged_directory("out") as staging:
                torch.save({"w": torch.zeros(1 << 20)}, staging / "w.pt")
        except DiskFull as error:
            print(error)
    """
    result = in_small_tmpfs(tmp_path / "small", "1m", f"{sys.executable} -c '{textwrap.dedent(script)}'; ls -A")
    assert result.stdout.splitlines()[0].startswith("no space left on device writing out: "), (
        result.stdout + result.stderr
    )
    assert result.stdout.splitlines()[1:] == [], result.stdout
