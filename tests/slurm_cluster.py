"""A one-node SLURM cluster on 127.0.0.1 from Debian's slurmctld, slurmd, slurm-client and munge, with two GPUs
as a generic resource (empty files stand for their devices).

Accounting is off (no slurmdbd), so job states come from ``squeue``, and
``MinJobAge`` keeps finished jobs there for an hour. Every SLURM client
(sbatch, squeue, srun inside a job) reads ``/etc/slurm/slurm.conf``: the
executor plugin strips ``SLURM_CONF`` from a job's environment before its
``srun``, so that path is the only one that works. The cluster writes it only
where it is absent, marks it as its own and removes it when it stops.

A watchdog process stops the cluster when the process that started it is gone,
however that ended (SIGTERM from a CI timeout, Ctrl-C, SIGKILL): a slurm.conf
left pointing at no controller costs every later ``snakemake`` start on the
machine about 9 s, in the SLURM plugin's import-time ``scontrol show config``.
Run as a script (``python slurm_cluster.py ROOT``), this file is that watchdog.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "srun", "scontrol", "sinfo", "scancel")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
# slurmd reads the node's generic resources from beside slurm.conf
GRES_CONF = SYSTEM_CONF.with_name("gres.conf")
# GPUs the scheduler hands out with no device behind them: a job that asks --gpus=1 is accepted and granted
# gres/gpu, and runs on the CPU
GPUS = 2
MARK = "# written by the vacc workflow's tests (tests/slurm_cluster.py)\n"
DAEMONS = ("slurmd", "slurmctld", "munged")
# No accounting: job states come from squeue. Successful jobs keep their SLURM logs, in which the job step
# prints what the job declared.
TEST_FLAGS = (
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "5",
    "--seconds-between-status-checks",
    "5",
    "--slurm-keep-successful-logs",
)


def missing_binaries():
    return [name for name in BINARIES if shutil.which(name) is None]


def why_unavailable():
    """Why a cluster cannot start here, or None."""
    if missing_binaries():
        return f"{', '.join(missing_binaries())} not found: install Debian's {' '.join(PACKAGES)} (.ci/run does)"
    if os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root"
    for conf in (SYSTEM_CONF, GRES_CONF):
        if conf.exists() and not conf.read_text().startswith(MARK):
            return f"{conf} belongs to a real cluster; the tests will not replace it"
    return None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """Daemons under ``root``; ``start()`` waits until the node takes jobs."""

    def __init__(self, root, cpus, memory_mb):
        self.root = Path(root)
        self.cpus, self.node_memory_mb = cpus, memory_mb

    def conf(self):
        root = self.root
        return (
            MARK
            + "\n".join(
                [
                    "ClusterName=vacctest",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={root}/munge.sock",
                    "CredType=cred/munge",
                    f"StateSaveLocation={root}/state",
                    f"SlurmdSpoolDir={root}/spool",
                    f"SlurmctldPidFile={root}/slurmctld.pid",
                    f"SlurmdPidFile={root}/slurmd.pid",
                    f"SlurmctldLogFile={root}/slurmctld.log",
                    f"SlurmdLogFile={root}/slurmd.log",
                    "MpiDefault=none",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "MinJobAge=3600",
                    "ReturnToService=2",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "GresTypes=gpu",
                    f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.node_memory_mb}"
                    f" Gres=gpu:{GPUS} State=UNKNOWN",
                    "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )

    def start(self):
        for folder in ("state", "spool"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        # the watchdog reads its stdin until this process's end of the pipe closes: at stop(), or at this
        # process's death, whatever killed it; its own session keeps it out of a Ctrl-C to this process group
        self.watchdog = subprocess.Popen(
            [sys.executable, __file__, str(self.root)], stdin=subprocess.PIPE, start_new_session=True
        )
        try:
            self.start_daemons()
        except BaseException:
            self.stop()
            raise

    def start_daemons(self):
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.write_text(self.conf())
        root = self.root
        # Slurm 22.05's gpu plugin counts a node's GPUs by their files (a count alone registers 0 and drains the
        # node); empty files stand for them, since nothing opens them
        for index in range(GPUS):
            (root / f"gpu{index}").touch()
        GRES_CONF.write_text(f"{MARK}AutoDetect=off\nNodeName=localhost Name=gpu File={root}/gpu[0-{GPUS - 1}]\n")
        subprocess.run(
            [
                "munged",
                "--force",
                f"--socket={root}/munge.sock",
                f"--pid-file={root}/munged.pid",
                f"--log-file={root}/munged.log",
                f"--seed-file={root}/munge.seed",
            ],
            check=True,
        )
        subprocess.run(["slurmctld"], check=True)
        subprocess.run(["slurmd"], check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], check=False, capture_output=True, text=True
            ).stdout
            if state.strip() == "idle":
                return
            time.sleep(1)
        raise RuntimeError(f"the SLURM node never became idle; logs in {self.root}:\n{self.logs()}")

    def logs(self):
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def jobs(self):
        """``{job id: (name, state)}`` of every job the controller remembers."""
        lines = subprocess.run(
            ["squeue", "-t", "all", "-h", "-o", "%i|%j|%T"], capture_output=True, text=True, check=True
        ).stdout.split()
        return {int(i): (name, state) for i, name, state in (line.split("|") for line in lines)}

    def job_field(self, job_id, field):
        """A ``scontrol --details show job`` field, e.g. ``TimeLimit``, or ``JOB_GRES`` (the generic resources it
        was granted: ``gpu:1``)."""
        shown = subprocess.run(
            ["scontrol", "-d", "-o", "show", "job", str(job_id)], capture_output=True, text=True, check=True
        ).stdout
        return dict(item.split("=", 1) for item in shown.split() if "=" in item)[field]

    def memory_mb(self, job_id):
        """The job's memory request in MB (scontrol writes 2048 MB as 2G)."""
        value = self.job_field(job_id, "MinMemoryNode")
        return round(float(value[:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[value[-1]])

    def wait_for_running(self, rule, timeout=300):
        """The id of the first running job of ``rule`` (the plugin puts the rule in the job's comment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = subprocess.run(
                ["squeue", "-t", "running", "-h", "-o", "%i|%k"], capture_output=True, text=True, check=True
            ).stdout.split()
            for line in lines:
                job_id, comment = line.split("|", 1)
                if comment.startswith(f"rule_{rule}_"):
                    return int(job_id)
            time.sleep(0.5)
        raise TimeoutError(f"no {rule} job ran within {timeout} s")

    def stop(self):
        self.watchdog.stdin.close()
        self.watchdog.wait(timeout=60)


def pid_of(root, daemon):
    try:
        return int((root / f"{daemon}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def running(pid):
    """Alive and not a zombie (a daemon that died unreaped is gone too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def tear_down(root):
    """Cancel the jobs, stop the daemons (waiting for them to exit) and remove slurm.conf if it is the tests'."""
    subprocess.run(["scancel", "--full", "--user", "root"], check=False, capture_output=True, timeout=30)
    pids = [pid for pid in (pid_of(root, daemon) for daemon in DAEMONS) if pid]
    for signal_number in (signal.SIGTERM, signal.SIGKILL):  # slurmd may wait for a job step that never ends
        for pid in filter(running, pids):
            try:
                os.kill(pid, signal_number)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while any(map(running, pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
    for conf in (SYSTEM_CONF, GRES_CONF):
        if conf.exists() and conf.read_text().startswith(MARK):
            conf.unlink()


if __name__ == "__main__":
    sys.stdin.buffer.read()
    tear_down(Path(sys.argv[1]))
