"""Crashes in the middle of the long stages, and two runs at once, on a copy of a run of the demo models.

Each case rebuilds one output of the demo models in a copy of a reference run
of them (``demo_run``), kills it with SIGKILL while the stage is
half way (its staging folder or its first layer file is on disk), and reruns:
the rebuilt files must equal the reference byte for byte, and nothing the
killed job left may remain or be taken as a result.
"""
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import embedded_default_of, output_digests
from workflow_copy import Workflow, command_line, descendants, wait_for

pytestmark = pytest.mark.workflow
LEFTOVERS = ("**/.*.staging-*", "**/.*.retired-*", "**/.*.tmp", "**/.*.partial")


class Stage:
    def __init__(self, rule, module, target, halfway):
        self.rule, self.module = rule, module
        self.target = target  # the job's output
        self.halfway = halfway  # a glob that matches once the stage has written part of its work
        self.folder = str(Path(target).parent)
        self.model = re.search(r"(?:models|results)/([^/]+)/", target)[1]


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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The outputs of STAGES, built locally from scratch: the demo models' stages run long enough to be killed
    half way."""
    flow = Workflow(tmp_path_factory.mktemp("demo"), embedded_default_of("demo"))
    flow.run(*(stage.target for stage in STAGES))
    return flow


@pytest.fixture()
def run_copy(demo_run, tmp_path):
    """A copy of demo_run, removed after the test."""
    flow = Workflow.copy_of(demo_run, tmp_path)
    yield flow
    shutil.rmtree(flow.work)


def stage_digests(work, stage):
    """The digests of the files in the stage's output folder (the rest of a copied run is not rebuilt)."""
    digests = {path: digest for path, digest in output_digests(work).items() if path.startswith(stage.folder + "/")}
    assert digests
    return digests


def kill_halfway(flow, stage, *snakemake_args):
    """Start a rebuild of ``stage``'s output; SIGKILL the stage's process (and its children) half way."""
    process = subprocess.Popen(flow.command("--force", *snakemake_args, stage.target),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: list(flow.work.glob(stage.halfway)), f"{stage.rule} writing {stage.halfway}")
    job = next(pid for pid in descendants(process.pid) if f"workflow_scripts.{stage.module} " in command_line(pid))
    assert f" --model {stage.model} " in command_line(job)
    for pid in [job, *descendants(job)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = process.communicate(timeout=300)[0]
    return process.returncode, output


@pytest.mark.parametrize("stage", STAGES, ids=[stage.rule for stage in STAGES])
def test_a_job_killed_half_way_reruns_to_the_same_bytes(stage, demo_run, run_copy):
    flow = run_copy
    returncode, output = kill_halfway(flow, stage)
    assert returncode != 0 and f"Error in rule {stage.rule}" in output, output[-3000:]
    assert not (flow.work / stage.target).exists()
    rerun = flow.run(stage.target)
    assert f"rule {stage.rule}:" in rerun or f"checkpoint {stage.rule}:" in rerun
    assert stage_digests(flow.work, stage) == stage_digests(demo_run.work, stage)
    assert not [path for pattern in LEFTOVERS for path in flow.work.glob(pattern)]


def test_gptq_killed_with_snakemake_resumes_from_its_finished_layers(demo_run, run_copy):
    """The whole run dies (node lost): after `--unlock`, the rerun takes layer 0 from its partial file."""
    stage = STAGES[2]
    flow = run_copy
    process = subprocess.Popen(flow.command("--force", stage.target), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(lambda: list(flow.work.glob(stage.halfway)), "the first GPTQ layer file")
    for pid in [process.pid, *descendants(process.pid)]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    locked = flow.run(stage.target, check=False)
    assert "Directory cannot be locked" in locked
    flow.run("--unlock")
    flow.run(stage.target)
    log = (flow.work / "logs" / "demo-mistral" / "quantize-gptq-int8.log").read_text()
    assert "layer 0: taken from" in log and "layer 1: taken from" not in log
    assert stage_digests(flow.work, stage) == stage_digests(demo_run.work, stage)


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(demo_run, run_copy):
    stage = STAGES[3]
    flow = run_copy
    first = subprocess.Popen(flow.command("--force", stage.target),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: list(flow.work.glob(stage.halfway.replace("*.pt2", "*"))), "the first run's job")
    second = flow.run("--force", stage.target, check=False)
    assert "Directory cannot be locked" in second
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    assert stage_digests(flow.work, stage) == stage_digests(demo_run.work, stage)
