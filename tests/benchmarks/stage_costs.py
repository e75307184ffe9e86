"""Wall time, peak host memory and peak GPU memory of every stage of a workflow run, job by job.

Snakemake's own ``benchmark:`` files give time and peak RSS where Snakemake
runs. This script serves where it does not (a lent GPU machine has torch but
no Snakemake): ``plan`` records the jobs' shell commands from a dry run here,
in order; ``run`` executes them there one at a time and writes one JSON line
per job with its wall seconds, the peak RSS of its process and the GPU memory
in use at its peak (sampled through NVML every 0.1 s, less what was in use
before it started).

Usage:
  python tests/benchmarks/stage_costs.py plan --directory DIR --output plan.json -- [snakemake arguments]
  python tests/benchmarks/stage_costs.py run plan.json --output costs.jsonl [--timeout-s 300] [--only RULE ...]
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHELL_COMMAND = re.compile(r"^Shell command: (.*)$")
RULE = re.compile(r"^(?:localrule|rule|checkpoint) (\w+):$")
LOG_REDIRECT = re.compile(r"> (\S+) 2>&1$")


def plan(directory, snakemake_args, output):
    """The dry run's jobs ``[{"rule", "command"}]`` in the order Snakemake would run them."""
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--dry-run", "--printshellcmds", "--forceall", "-d", str(directory)]
        + snakemake_args,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    jobs, rule = [], None
    for line in result.stdout.splitlines():
        if match := RULE.match(line.strip()):
            rule = match.group(1)
        elif match := SHELL_COMMAND.match(line.strip()):
            jobs.append({"rule": rule, "command": match.group(1)})
    Path(output).write_text(json.dumps(jobs, indent=1) + "\n")
    print(f"{len(jobs)} jobs -> {output}")


class GpuMemory:
    """The most GPU memory in use while the block runs, less what was in use when it began (NVML); None
    without a GPU."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.used = lambda: pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        except Exception:  # noqa: BLE001 (no NVML or no GPU: nothing to sample)
            self.used = None
        self.peak = None

    def __enter__(self):
        if self.used is not None:
            self.base = self.used()
            self.peak = self.base
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.used())
            time.sleep(0.1)

    def __exit__(self, *exc):
        if self.used is not None:
            self.running = False
            self.thread.join()

    def peak_bytes(self):
        return None if self.used is None else self.peak - self.base


def run_job(job, timeout_s):
    """Run one job's command; its figures."""
    log = LOG_REDIRECT.search(job["command"])
    if log:
        Path(log.group(1)).parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    with GpuMemory() as gpu:
        process = subprocess.Popen(["bash", "-c", job["command"]], env=env, start_new_session=True)
        deadline = start + timeout_s
        status, usage = 0, None
        while usage is None:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == 0:
                usage = None
                if time.monotonic() > deadline:
                    os.killpg(process.pid, 9)
                time.sleep(0.2)
    return {
        "rule": job["rule"],
        "command": job["command"][:200],
        "returncode": os.waitstatus_to_exitcode(status),
        "seconds": round(time.monotonic() - start, 2),
        # ru_maxrss is in KiB on Linux: the largest process of the job (bash, then python)
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
        "peak_gpu_gb": None if gpu.peak_bytes() is None else round(gpu.peak_bytes() / 1e9, 3),
        "timed_out": time.monotonic() > deadline,
        "log_tail": Path(log.group(1)).read_text(errors="replace")[-1500:]
        if log and Path(log.group(1)).exists()
        else "",
    }


def run(plan_path, output, timeout_s, only):
    jobs = json.loads(Path(plan_path).read_text())
    with open(output, "a") as out:
        for job in jobs:
            if only and job["rule"] not in only:
                continue
            figures = run_job(job, timeout_s)
            out.write(json.dumps(figures) + "\n")
            out.flush()
            print(
                f"{figures['rule']:>16}: rc {figures['returncode']}, {figures['seconds']} s, "
                f"RSS {figures['peak_rss_gb']} GB, GPU {figures['peak_gpu_gb']} GB",
                flush=True,
            )
            if figures["returncode"] != 0:
                print(figures["log_tail"], flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="what", required=True)
    planning = commands.add_parser("plan")
    planning.add_argument("--directory", required=True, type=Path)
    planning.add_argument("--output", required=True, type=Path)
    planning.add_argument("snakemake_args", nargs="*")
    running = commands.add_parser("run")
    running.add_argument("plan", type=Path)
    running.add_argument("--output", required=True, type=Path)
    running.add_argument("--timeout-s", type=float, default=600)
    running.add_argument("--only", nargs="*", default=[])
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if args.what == "plan":
        plan(args.directory, args.snakemake_args, args.output)
    else:
        run(args.plan, args.output, args.timeout_s, set(args.only))


if __name__ == "__main__":
    main()
