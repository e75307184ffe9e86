"""The workflow's own server, started for a while on a free loopback port: what the benchmark stage measures.

It runs ``python -m workflow_scripts.serve`` as a child process, so that the
server and the client do not share an interpreter lock and the server's memory
is its own; the child binds port 0 itself and reports the port it got, so two
benchmarks on one node never race for a port.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workflow_scripts.core.errors import CheckFailed, StageError
from workflow_scripts.core.files import atomic_write_json
from workflow_scripts.serving.benchmark import Limits

STOP_GRACE_S = 30
CHILD_MODULES = ("workflow_scripts.serve",)  # the server: its code is this stage's code too (core/code_inputs.py)


class LocalServer:
    """``with LocalServer(folder, *serve_arguments) as server:`` a running server: ``server.url`` (``.../v1``),
    ``server.model`` (its model id), ``server.limits`` and ``server.shape`` (its batch and lengths)."""

    def __init__(self, folder, *arguments, output=None, startup_s=600, env=None):
        self.folder, self.arguments = Path(folder), [str(argument) for argument in arguments]
        self.output, self.startup_s, self.env = output, startup_s, env
        self.process = None

    def __enter__(self):
        self.scratch = tempfile.TemporaryDirectory(prefix="serve-")
        ready = Path(self.scratch.name) / "ready.json"
        (server,) = CHILD_MODULES
        command = [sys.executable, "-m", server, str(self.folder), "--host", "127.0.0.1"]
        command += ["--port", "0", "--ready-file", str(ready), *self.arguments]
        self.process = subprocess.Popen(command, stdout=self.output, stderr=self.output, env=self.env)
        try:
            self.wait_until_ready(ready)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def wait_until_ready(self, ready):
        deadline = time.monotonic() + self.startup_s
        while not ready.exists():
            if self.process.poll() is not None:
                raise StageError(
                    f"the server of {self.folder} exited with status {self.process.returncode} before it was ready"
                    " (its log is above)"
                )
            if time.monotonic() > deadline:
                raise StageError(f"the server of {self.folder} was not ready after {self.startup_s} s")
            time.sleep(0.1)
        record = json.loads(ready.read_text())
        self.url = f"http://127.0.0.1:{record['port']}/v1"
        self.model = record["model"]
        self.limits = Limits(record["max_prompt_tokens"], record["max_output_tokens"])
        self.shape = {key: record[key] for key in ("backend", "batch", "max_prompt_tokens", "max_output_tokens")}

    def stop(self):
        """SIGTERM (uvicorn finishes the requests in flight), then SIGKILL after a grace period."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.scratch.cleanup()


def benchmark_variant(model, variant, folder, settings, output, serve_arguments=()):
    """Serve ``folder`` on loopback, run the sweep of ``settings`` against it, stop it, and write the record to
    ``output``. A request that fails against our own server on loopback is a fault, not a figure: the stage
    fails, naming the errors, and writes nothing."""
    from workflow_scripts.data.tokenizers import read_tokenizer
    from workflow_scripts.serving.benchmark import run_benchmark

    with LocalServer(folder, *serve_arguments, output=sys.stderr) as server:
        record = run_benchmark(
            server.url, server.model, read_tokenizer(folder), server.limits, settings, model=model, variant=variant
        )
        record["server"] = {"folder": str(folder), **server.shape}
    failed = [case for case in record["cases"] if case["failed"]]
    if failed:
        errors = sorted({error for case in failed for error in case["errors"]})
        raise CheckFailed(
            f"{sum(case['failed'] for case in failed)} request(s) to the local server of {folder} failed: "
            + "; ".join(errors[:3])
        )
    atomic_write_json(output, record)
    return record
