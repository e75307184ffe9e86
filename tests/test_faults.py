"""Crashes in the middle of the long stages, and two runs at once, on a copy of the default run.

Each case rebuilds one output of the embedded default in a copy of the
reference run (conftest.default_run), kills it with SIGKILL while the stage is
half way (its staging folder or its first layer file is on disk), and reruns:
the rebuilt files must equal the reference byte for byte, and nothing the
killed job left may remain or be taken as a result.
"""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import output_digests
from workflow_copy import Workflow

pytestmark = pytest.mark.workflow
LEFTOVERS = ("**/.*.staging-*", "**/.*.retired-*", "**/.*.tmp", "**/.*.partial")


class Stage:
    def __init__(self, rule, module, target, halfway):
        self.rule, self.module = rule, module
        self.target = target  # the job's output
        self.halfway = halfway  # a glob that matches once the stage has written part of its work
        self.folder = str(Path(target).parent)


STAGES = [
    Stage("download", "demo", "resources/models/demo-ministral/MANIFEST.json",
          "resources/models/.demo-ministral.staging-*/model-*.safetensors"),
    Stage("quantize", "quantize", "results/demo-ministral/quantized/rtn-int8/MANIFEST.json",
          "results/demo-ministral/quantized/.rtn-int8.staging-*/model-*.safetensors"),
    Stage("quantize_gptq", "quantize_gptq", "results/demo-mistral/quantized/gptq-int8/MANIFEST.json",
          "results/demo-mistral/quantized/.gptq-int8.partial/layer-000.safetensors"),
    Stage("aoti_compile", "aoti_compile", "results/demo-mistral/aoti/rtn-int8/MANIFEST.json",
          "results/demo-mistral/aoti/.rtn-int8.staging-*/*.pt2"),
]


def copy_run(reference, root):
    """A second working folder with the reference's outputs and Snakemake records, mtimes kept."""
    flow = Workflow.__new__(Workflow)
    flow.code, flow.work = reference.code, root / "work"
    shutil.copytree(reference.work, flow.work, symlinks=True)
    shutil.copy2(reference.work / "test.yaml", flow.work / "test.yaml")
    return flow


def descendants(pid):
    """Every process below ``pid``."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def command_line(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for(condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


def kill_halfway(flow, stage, *snakemake_args):
    """Start a rebuild of ``stage``'s output; SIGKILL the stage's process (and its children) half way."""
    process = subprocess.Popen(flow.command("--forcerun", stage.rule, *snakemake_args, stage.target),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: list(flow.work.glob(stage.halfway)), f"{stage.rule} writing {stage.halfway}")
    job = next(pid for pid in descendants(process.pid) if f"workflow_scripts.{stage.module} " in command_line(pid))
    for pid in [job, *descendants(job)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = process.communicate(timeout=300)[0]
    return process.returncode, output


@pytest.mark.parametrize("stage", STAGES, ids=[stage.rule for stage in STAGES])
def test_a_job_killed_half_way_reruns_to_the_same_bytes(stage, default_run, tmp_path):
    flow = copy_run(default_run, tmp_path)
    returncode, output = kill_halfway(flow, stage)
    assert returncode != 0 and f"Error in rule {stage.rule}" in output, output[-3000:]
    assert not (flow.work / stage.target).exists()
    rerun = flow.run(stage.target)
    assert f"rule {stage.rule}:" in rerun or f"checkpoint {stage.rule}:" in rerun
    reference = {path: digest for path, digest in output_digests(default_run.work).items()
                 if path.startswith(stage.folder + "/")}
    rebuilt = {path: digest for path, digest in output_digests(flow.work).items()
               if path.startswith(stage.folder + "/")}
    assert rebuilt == reference
    assert not [path for pattern in LEFTOVERS for path in flow.work.glob(pattern)]


def test_gptq_killed_with_snakemake_resumes_from_its_finished_layers(default_run, tmp_path):
    """The whole run dies (node lost): after `--unlock`, the rerun takes layer 0 from its partial file."""
    stage = STAGES[2]
    flow = copy_run(default_run, tmp_path)
    process = subprocess.Popen(flow.command("--forcerun", stage.rule, stage.target),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: list(flow.work.glob(stage.halfway)), "the first GPTQ layer file")
    for pid in [process.pid, *descendants(process.pid)]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    locked = flow.run(stage.target, check=False)
    assert "Directory cannot be locked" in locked
    flow.run("--unlock")
    rerun = flow.run(stage.target)
    assert "incomplete" in rerun.lower()
    log = (flow.work / "logs" / "demo-mistral" / "quantize-gptq-int8.log").read_text()
    assert "layer 0: taken from" in log and "layer 1: taken from" not in log
    reference = output_digests(default_run.work)
    rebuilt = output_digests(flow.work)
    assert {p: d for p, d in rebuilt.items() if p.startswith(stage.folder + "/")} == \
        {p: d for p, d in reference.items() if p.startswith(stage.folder + "/")}


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(default_run, tmp_path):
    stage = STAGES[3]
    flow = copy_run(default_run, tmp_path)
    first = subprocess.Popen(flow.command("--forcerun", stage.rule, stage.target),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: list(flow.work.glob(stage.halfway.replace("*.pt2", "*"))), "the first run's job")
    second = flow.run("--forcerun", stage.rule, stage.target, check=False)
    assert "Directory cannot be locked" in second
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    assert output_digests(flow.work) == output_digests(default_run.work)
