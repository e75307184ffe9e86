"""One model of the reference config (every stage, tiny) on a real one-node SLURM cluster, through the
executor plugin and profiles/slurm.

The cluster (tests/slurm_cluster.py) needs Debian's slurmctld, slurmd,
slurm-client and munge, and root. Where they are missing the tests are
skipped with a loud reason; under CI (``CI`` set) they fail instead, since
.ci/run installs those packages.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAKE_HF_TOKEN, files_containing, output_digests, reference_config
from slurm_cluster import DAEMONS, SYSTEM_CONF, TEST_FLAGS, Cluster, pid_of, running, why_unavailable
from workflow_copy import Workflow, processes_running, wait_for

pytestmark = pytest.mark.slow
SUBMITTED = re.compile(
    r"^Job \d+ has been submitted with SLURM jobid (\d+) \(log: (.*/rule_(\w+)/.*)\)\.$", re.MULTILINE
)
FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", re.MULTILINE)
LOCAL_RULES = {"all"}


def require_a_cluster():
    reason = why_unavailable()
    if reason:
        message = f"NO SLURM CLUSTER, the SLURM tests did not run: {reason}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


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


def slurm_run(flow, *args):
    return flow.run(
        "--workflow-profile",
        str(flow.code / "profiles" / "slurm"),
        "--jobs",
        "4",
        *TEST_FLAGS,
        *args,
        env={**os.environ, "HF_TOKEN": FAKE_HF_TOKEN},
    )


# tiny-a alone reaches every stage (tied embeddings, both quantizers, a compiled package) in half the jobs
SLURM_TARGET = "tiny-a"
# the summary covers every target of a run, so it is the one output that differs from the reference's
RUN_WIDE = ("results/summary.md", "results/report/summary.html")


@pytest.fixture(scope="module")
def slurm_flow(cluster, tmp_path_factory):
    flow = Workflow(tmp_path_factory.mktemp("slurm-reference"), {**reference_config(), "targets": [SLURM_TARGET]})
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
