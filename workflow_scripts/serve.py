"""Serve a built variant over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions).

Usage: python -m workflow_scripts.serve results/{model}/aoti/{variant} [--host 127.0.0.1] [--port 9000]
       python -m workflow_scripts.serve results/{model}/quantized/{scheme} --batch 4 --context 2048

A compiled package folder is served with the rows and context it was
compiled for; a checkpoint folder (patched or quantized) runs eagerly with
those given. Each request takes a row of its own as soon as one is free; more
wait in a queue (docs/serving.md).
"""

import argparse
import logging
import signal
import socket
import threading
from pathlib import Path

import torch

from workflow_scripts.core.cli import run_cli
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_json
from workflow_scripts.runtime.package import PREFILL_CHUNK
from workflow_scripts.serving.api import create_app, model_card
from workflow_scripts.serving.engine import Engine
from workflow_scripts.serving.text import ChatTemplate
from workflow_scripts.serving.variant import EagerShape, describe, load_variant

LOG = logging.getLogger(__spec__.name)  # run as __main__ by python -m: its own name in the log


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="results/{model}/aoti/{variant}, or a checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port (see --ready-file)")
    parser.add_argument("--served-model-name", help="the model id clients name (default: {model}-{variant})")
    parser.add_argument("--max-queue", type=int, default=256, help="requests that may wait; more get 503")
    parser.add_argument("--ready-file", type=Path, help="written, with the port, once the server accepts requests")
    parser.add_argument(
        "--prefill-chunk", type=int, default=PREFILL_CHUNK, help="prompt tokens fed per step between decode steps"
    )
    eager = parser.add_argument_group("eager checkpoints (a compiled folder has its own)")
    eager.add_argument("--batch", type=int, default=EagerShape.batch, help="rows: requests served at once")
    eager.add_argument("--context", type=int, default=EagerShape.context, help="tokens per row, prompt and answer")
    eager.add_argument("--device", choices=("auto", "cpu", "cuda"), default=EagerShape.device)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.prefill_chunk < 1:
        raise InputError(f"--prefill-chunk is {args.prefill_chunk}; it must be at least 1")
    shape = EagerShape(args.batch, args.context, args.device)
    variant = load_variant(args.folder, shape, args.served_model_name)
    LOG.info("serving %s", describe(variant))
    engine = Engine(variant.runner, variant.stop_token_ids, args.max_queue, args.prefill_chunk)
    listener = bound_socket(args.host, args.port)
    port = listener.getsockname()[1]

    def ready():
        LOG.info("ready: http://%s:%d/v1", args.host, port)
        if args.ready_file is not None:
            atomic_write_json(args.ready_file, {"host": args.host, "port": port, **model_card(variant, engine)})

    app = create_app(variant, engine, ChatTemplate(args.folder), ready)
    serve(app, listener, engine)


def bound_socket(host, port):
    """A listening socket: bound here, so port 0 gives a free port that no other process can take meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        raise InputError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from error
    listener.listen(2048)
    return listener


def serve(app, listener, engine):
    """HTTP on a thread of its own, the engine on this, the main thread (serving/engine.py says why), until SIGINT or
    SIGTERM: then the server stops taking requests, finishes those in flight (5 s at most) and the engine ends."""
    import uvicorn

    # log_config None: uvicorn's loggers (startup, one access line per request) go through run_cli's set-up, in
    # the same format as ours, instead of handlers of uvicorn's own
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="info", timeout_graceful_shutdown=5))

    def http():
        try:
            server.run(sockets=[listener])
        finally:
            engine.stop()

    def stop(signum, frame):
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    thread = threading.Thread(target=http, name="http")
    thread.start()
    engine.serve_forever()
    thread.join()


if __name__ == "__main__":
    run_cli(main)
