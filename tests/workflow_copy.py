"""A private copy of the workflow, run by Snakemake in a subprocess."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from workflow_scripts.data.tokenizers import tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_PARTS = ("Snakefile", "rules", "config", "workflow_scripts", "envs", "profiles")
JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n(?:    .*\n)*?    wildcards: (.+)$", re.MULTILINE)


class Workflow:
    """A private copy of the workflow (so tests may edit its code) and a working folder."""

    # the interpreter that runs Snakemake: this one, or a SLURM test's driver environment (requirements-slurm.txt)
    snakemake_python = sys.executable

    def __init__(self, root, config):
        self.code = root / "workflow"
        self.work = root / "work"
        self.work.mkdir(parents=True)
        self.code.mkdir(parents=True)
        for part in WORKFLOW_PARTS:
            source = REPO / part
            if source.is_dir():
                shutil.copytree(source, self.code / part, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, self.code / part)
        self.write_config(config)

    @classmethod
    def existing(cls, root):
        """The workflow that ``Workflow(root, config)`` made, run before (by another test process)."""
        flow = cls.__new__(cls)
        flow.code, flow.work = root / "workflow", root / "work"
        return flow

    @classmethod
    def copy_of(cls, reference, root):
        """A second working folder with the reference's outputs and Snakemake records, mtimes kept. It runs the
        reference's code folder: the code inputs' paths are part of what Snakemake compares."""
        flow = cls.__new__(cls)
        flow.code, flow.work = reference.code, root / "work"
        shutil.copytree(reference.work, flow.work, symlinks=True)
        return flow

    def write_config(self, config, name="test.yaml"):
        path = self.work / name
        path.write_text(yaml.safe_dump(config))
        return path

    def command(self, *args, config="test.yaml"):
        return [
            self.snakemake_python,
            "-m",
            "snakemake",
            "-s",
            str(self.code / "Snakefile"),
            "--directory",
            str(self.work),
            "--configfile",
            str(self.work / config),
            "--replace-workflow-config",
            "--cores",
            "2",
            *args,
        ]

    def run(self, *args, config="test.yaml", check=True, env=None):
        result = subprocess.run(
            self.command(*args, config=config), check=False, capture_output=True, text=True, env=env
        )
        output = result.stdout + result.stderr
        if check and result.returncode != 0:
            raise AssertionError(f"snakemake {' '.join(args)} failed:\n{output[-5000:]}")
        return output

    def planned(self, *args, **kwargs):
        """The (rule, wildcards) jobs a dry-run would run."""
        return sorted(set(JOB.findall(self.run("--dry-run", *args, **kwargs))))

    def tokenizers(self):
        return sorted(p.name for p in (self.work / "results" / "calibration").iterdir())


def rules_by_model(jobs):
    """``{model: {rule, ...}}`` of a plan's per-model jobs."""
    models = {}
    for rule, model in model_jobs(jobs):
        models.setdefault(model, set()).add(rule)
    return models


REPORTED = {"evaluate", "gate", "plots"}  # what follows any change of a model's outputs
SERVED = {"serve_benchmark", "serving_plot"}  # and, for a model with a compiled package, its serving benchmark


def model_jobs(jobs):
    """The per-model jobs of a plan as (rule, model)."""
    return [
        (rule, wildcards.split(", ")[0].removeprefix("model="))
        for rule, wildcards in jobs
        if wildcards.startswith("model=")
    ]


def downloaded_tokenizer(flow, model):
    """The fingerprint of a downloaded model's tokenizer, which names its calibration shards' folder."""
    manifest = json.loads((flow.work / "resources" / "models" / model / "MANIFEST.json").read_text())
    return tokenizer_fingerprint(manifest, model)


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


def processes_running(fragment):
    """Ids of the processes whose command line contains ``fragment``."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and fragment in command_line(entry.name)
    ]
