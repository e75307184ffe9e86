"""A server run for the length of a benchmark, on a free port of this host: ours, or the vendor's ``vastgenx``.

The server runs as a child process, so that it and the benchmark client share
no interpreter lock and its memory is its own. Ours binds port 0 itself and
reports the port it got, so two benchmarks on one node never race for a port;
``vastgenx serve`` takes a port number, so it gets one that was free a moment
before, and is ready when its ``/v1/models`` answers.
"""

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from workflow_scripts.core.errors import CheckFailed, StageError
from workflow_scripts.core.files import atomic_write_json, read_json
from workflow_scripts.data.tokenizers import read_tokenizer
from workflow_scripts.serving.bench_client import run_benchmark
from workflow_scripts.serving.sweep import Limits

STOP_GRACE_S = 30
CHILD_MODULES = ("workflow_scripts.serve",)  # our server: its code is this stage's code too (core/code_inputs.py)
MISSING_VASTGENX = (
    "vastgenx, VastAI's serving runtime, is not on PATH: install the VACC runtime on this host, or leave "
    "the vacc-* variants out of bench.variants"
)


class LocalServer:
    """``with OwnServer(...) as server:`` (or another subclass) a running server: ``server.url`` (``.../v1``),
    ``server.model`` (the model id it serves), ``server.limits`` and ``server.record`` (what the benchmark record
    says about it). A subclass gives the ``command()`` that starts it and ``ready()``, which sets those."""

    startup_s = 600

    def __init__(self, output=None):
        self.output = output
        self.process = None

    def __enter__(self):
        self.scratch = tempfile.TemporaryDirectory(prefix="serve-")
        self.process = subprocess.Popen(self.command(), stdout=self.output, stderr=self.output)
        try:
            deadline = time.monotonic() + self.startup_s
            while not self.ready():
                if self.process.poll() is not None:
                    raise StageError(
                        f"{self.name} exited with status {self.process.returncode} before it was ready"
                        " (its log is above)"
                    )
                if time.monotonic() > deadline:
                    raise StageError(f"{self.name} was not ready after {self.startup_s} s")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        """SIGTERM (the server finishes the requests in flight), then SIGKILL after a grace period."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.scratch.cleanup()


class OwnServer(LocalServer):
    """``python -m workflow_scripts.serve folder *arguments`` on loopback."""

    def __init__(self, folder, *arguments, output=None):
        super().__init__(output)
        self.folder, self.arguments = Path(folder), [str(argument) for argument in arguments]
        self.name = f"the server of {self.folder}"

    def command(self):
        (server,) = CHILD_MODULES
        self.ready_file = Path(self.scratch.name) / "ready.json"
        return [sys.executable, "-m", server, str(self.folder), "--host", "127.0.0.1", "--port", "0"] + [
            "--ready-file",
            str(self.ready_file),
            *self.arguments,
        ]

    def ready(self):
        if not self.ready_file.exists():
            return False
        record = json.loads(self.ready_file.read_text())
        self.url = f"http://127.0.0.1:{record['port']}/v1"
        self.model = record["id"]
        self.limits = Limits(record["max_prompt_tokens"], record["max_output_tokens"], record["context_tokens"])
        self.record = {"folder": str(self.folder), "backend": record["backend"], "batch": record["max_batch"]}
        return True


class VastgenxServer(LocalServer):
    """``vastgenx serve --model artifact --port P --batch_size B --llm_devices D``, VastAI's server of a VACC
    build; ``limits`` are those the build was compiled for."""

    startup_s = 1800  # it loads the compiled model onto the dies

    def __init__(self, artifact, batch_size, devices, limits, output=None):
        super().__init__(output)
        self.artifact, self.batch_size, self.devices, self.limits = Path(artifact), batch_size, devices, limits
        self.name = f"vastgenx serve of {self.artifact}"

    def command(self):
        vastgenx = shutil.which("vastgenx")
        if vastgenx is None:
            raise StageError(MISSING_VASTGENX)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        self.record = {"folder": str(self.artifact), "backend": "vastgenx", "batch": self.batch_size}
        return [vastgenx, "serve", "--model", str(self.artifact), "--port", str(port)] + [
            "--batch_size",
            str(self.batch_size),
            "--llm_devices",
            self.devices,
        ]

    def ready(self):
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=5) as response:
                models = json.load(response)["data"]
        except (OSError, ValueError, KeyError):
            return False
        if not models:
            return False
        self.model = models[0]["id"]
        return True


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def vacc_server(folder, options, output=None):
    """The vastgenx server of ``results/{model}/vacc/{dtype}`` (its vacc compile manifest names the artifact);
    ``options``: ``batch_size``, ``devices``, ``max_prompt_tokens``, ``max_output_tokens``."""
    artifact = Path(read_json(Path(folder) / "MANIFEST.json", what="vacc compile manifest")["artifact"])
    limits = Limits(options["max_prompt_tokens"], options["max_output_tokens"])
    return VastgenxServer(artifact, options["batch_size"], options["devices"], limits, output), artifact / "tokenizer"


def benchmark_variant(model, variant, server, tokenizer_folder, settings, output):
    """Start ``server`` (a :class:`LocalServer`), run the sweep of ``settings`` against it, stop it, and write the
    record to ``output``. A request that fails against a server on this host is a fault, not a figure: the stage
    fails, naming the errors, and writes nothing."""
    tokenizer = read_tokenizer(tokenizer_folder)
    with server:
        record = run_benchmark(
            server.url, server.model, tokenizer, server.limits, settings, model=model, variant=variant
        )
        record["server"] = server.record
    failed = [case for case in record["cases"] if case["failed"]]
    if failed:
        errors = sorted({error for case in failed for error in case["errors"]})
        raise CheckFailed(
            f"{sum(case['failed'] for case in failed)} request(s) to {server.name} failed: " + "; ".join(errors[:3])
        )
    atomic_write_json(output, record)
    return record
