"""Crashes in the middle of the long stages, and two runs at once, on copies of the session's reference run.

Each case rebuilds one output in a copy of the reference run (``run_copy``),
stops the stage at a known point half way through its work (its first shard,
layer or package written; see ``fault_injection/sitecustomize.py``), kills it
with SIGKILL, and reruns: the rebuilt files must equal the reference byte for
byte, and nothing the killed job left may remain or be taken as a result.
"""

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import output_digests
from workflow_copy import Workflow, command_line, descendants, wait_for

pytestmark = pytest.mark.slow
LEFTOVERS = ("**/.*.staging-*", "**/.*.retired-*", "**/.*.tmp", "**/.*.partial")
FAULT_INJECTION = Path(__file__).resolve().parent / "fault_injection"


class Stage:
    def __init__(self, rule, module, target, halfway):
        self.rule, self.module = rule, module
        self.target = target  # the job's output
        self.halfway = halfway  # the file whose opening for writing stops the stage half way (a glob)
        self.folder = str(Path(target).parent)
        self.model = re.search(r"(?:models|results)/([^/]+)/", target)[1]


STAGES = [
    Stage(
        "download",
        "download_demo",
        "resources/models/tiny-b/MANIFEST.json",
        "*/resources/models/.tiny-b.staging-*/.model.safetensors.index.json.*.tmp",  # both shards written
    ),
    Stage(
        "quantize",
        "quantize",
        "results/tiny-b/quantized/rtn-int8/MANIFEST.json",
        "*/results/tiny-b/quantized/.rtn-int8.staging-*/model-00002-of-*.safetensors",  # the first shard written
    ),
    Stage(
        "quantize_gptq",
        "quantize_gptq",
        "results/tiny-a/quantized/gptq-int8/MANIFEST.json",
        "*/results/tiny-a/quantized/.gptq-int8.partial/.layer-001.safetensors.*.tmp",  # layer 0 written
    ),
    Stage(
        "aoti_compile",
        "aoti_compile",
        "results/tiny-a/aoti/rtn-int8/MANIFEST.json",
        "*/results/tiny-a/aoti/.rtn-int8.staging-*/layer.pt2",  # the layer package written, the head not
    ),
]


@pytest.fixture()
def run_copy(reference_run, tmp_path):
    """A copy of the reference run, removed after the test."""
    flow = Workflow.copy_of(reference_run, tmp_path / "copy")
    yield flow
    shutil.rmtree(flow.work)


def stage_digests(work, stage):
    """The digests of the files in the stage's output folder (the rest of a copied run is not rebuilt)."""
    digests = {path: digest for path, digest in output_digests(work).items() if path.startswith(stage.folder + "/")}
    assert digests
    return digests


def paused_at(stage, tmp_path, release=None):
    """The environment that makes ``stage``'s process stop half way (``fault_injection``), and its pid file."""
    marker = tmp_path / "paused"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULT_INJECTION), os.environ.get("PYTHONPATH")])),
        "VACC_TEST_PAUSE_AT": stage.halfway,
        "VACC_TEST_PAUSED": str(marker),
    }
    if release is not None:
        env["VACC_TEST_RELEASE"] = str(release)
    return env, marker


def start_paused(flow, stage, tmp_path, release=None):
    """Start a rebuild of ``stage``'s output; return the Snakemake process and the stage's, stopped half way."""
    env, marker = paused_at(stage, tmp_path, release)
    process = subprocess.Popen(
        flow.command("--force", stage.target), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )

    def stage_paused():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {stage.rule} got half way:\n{process.stdout.read()[-3000:]}")
        return marker.exists() and int(marker.read_text())

    job = wait_for(stage_paused, f"{stage.rule} writing {stage.halfway}")
    assert f"workflow_scripts.stages.{stage.module} " in command_line(job)
    assert f" --model {stage.model} " in command_line(job)
    return process, job


def kill(*pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("stage", STAGES, ids=[stage.rule for stage in STAGES])
def test_a_job_killed_half_way_reruns_to_the_same_bytes(stage, reference_run, run_copy, tmp_path):
    flow = run_copy
    process, job = start_paused(flow, stage, tmp_path)
    kill(job, *descendants(job))
    output = process.communicate(timeout=300)[0]
    assert process.returncode != 0 and f"Error in rule {stage.rule}" in output, output[-3000:]
    assert not (flow.work / stage.target).exists()
    rerun = flow.run(stage.target)
    assert f"rule {stage.rule}:" in rerun or f"checkpoint {stage.rule}:" in rerun
    assert stage_digests(flow.work, stage) == stage_digests(reference_run.work, stage)
    assert not [path for pattern in LEFTOVERS for path in flow.work.glob(pattern)]


def test_gptq_killed_with_snakemake_resumes_from_its_finished_layers(reference_run, run_copy, tmp_path):
    """The whole run dies (node lost): after `--unlock`, the rerun takes layer 0 from its partial file."""
    stage = STAGES[2]
    flow = run_copy
    process, _ = start_paused(flow, stage, tmp_path)
    kill(process.pid, *descendants(process.pid))
    process.communicate()
    locked = flow.run(stage.target, check=False)
    assert "Directory cannot be locked" in locked
    flow.run("--unlock")
    flow.run(stage.target)
    log = (flow.work / "logs" / "tiny-a" / "quantize-gptq-int8.log").read_text()
    assert "layer 0: taken from" in log and "layer 1: taken from" not in log
    assert stage_digests(flow.work, stage) == stage_digests(reference_run.work, stage)


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(reference_run, run_copy, tmp_path):
    stage = STAGES[1]  # any stage: the shortest one that writes more than one file
    flow = run_copy
    release = tmp_path / "release"
    first, _ = start_paused(flow, stage, tmp_path, release)
    second = flow.run("--force", stage.target, check=False)
    assert "Directory cannot be locked" in second
    release.touch()
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    assert stage_digests(flow.work, stage) == stage_digests(reference_run.work, stage)
