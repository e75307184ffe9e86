"""Continuous batching over a variant's layer graphs (:class:`~workflow_scripts.runtime.package.ModelRunner`).

The runner's cache has ``rows`` rows of ``context`` slots, and every row
keeps its own position: a request takes the lowest free row as soon as one is
free, whatever its lengths, and gives it back when it ends. A new request's
prompt is fed in chunks of at most ``prefill_chunk`` tokens, one chunk per
engine step, between the decode steps of the rows already running, so a long
prompt neither waits for the running requests nor stalls them. A decode step
feeds one token to each running row, each at its own position. Requests
beyond the free rows wait in a first-in, first-out queue; beyond
``max_queue`` waiting ones, :meth:`Engine.submit` refuses.

All model work runs on one thread, :meth:`Engine.serve_forever`'s: a compiled
package is not reentrant, and torch's own threads parallelise each step. The
server runs it on the process's main thread (workflow_scripts/serve.py): torch's
OpenMP threads run a decode step there three times as fast as from a second
thread, once another thread has used them too.
"""

import collections
import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from workflow_scripts.core.errors import InputError
from workflow_scripts.runtime.package import PREFILL_CHUNK

LOG = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than the engine queues."""


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens: ``temperature`` 0 is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(eq=False)
class Request:
    """One request's prompt and state; ``on_event(token_id, finish_reason)`` is called on the engine's thread with
    each new token (``finish_reason`` None), and once more with ``token_id`` None and the reason when it ends
    (``stop``, ``length``, ``cancelled`` or ``error: ...``)."""

    prompt_ids: list[int]
    sampling: Sampling
    on_event: object
    generated: int = 0
    last_token: int = 0
    row: int = 0
    position: int = 0  # the tokens of this request in its row's cache: where the next one goes
    cancelled: bool = False
    done: bool = False
    random: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self):
        seed = self.sampling.seed
        self.random.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def cancel(self):
        self.cancelled = True


def pick_token(logits, sampling, random):
    if sampling.temperature == 0:
        return int(logits.argmax())
    probabilities = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        ordered, order = probabilities.sort(descending=True)
        # keep the smallest set of tokens whose probability reaches top_p (always at least the first)
        keep = ordered.cumsum(0) - ordered < sampling.top_p
        probabilities = torch.zeros_like(probabilities).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probabilities, 1, generator=random))


class Engine:
    """Serves :class:`Request` objects through ``runner`` (a :class:`~workflow_scripts.runtime.package.ModelRunner`:
    its ``rows``, ``context``, ``device``, ``new_cache``, ``prefill`` and ``decode``)."""

    def __init__(self, runner, stop_token_ids, max_queue=256, prefill_chunk=PREFILL_CHUNK):
        self.runner = runner
        self.stop_token_ids = frozenset(stop_token_ids)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.waiting = collections.deque()
        self.rows = [None] * runner.rows
        self.prefilling = collections.deque()  # rows' requests whose prompts are not all in the cache, oldest first
        self.cache = None
        self.wakeup = threading.Condition()
        self.running = True
        self.thread = None
        self.steps = 0

    # called from any thread

    def check(self, prompt_ids, sampling):
        """Raise :class:`InputError` for a request these graphs cannot serve."""
        if not prompt_ids:
            raise InputError("the prompt is empty")
        context = self.runner.context
        if len(prompt_ids) >= context:
            raise InputError(
                f"the prompt has {len(prompt_ids)} tokens; this variant's context is {context} tokens, prompt and"
                " answer together"
            )
        if not 1 <= sampling.max_tokens <= context - len(prompt_ids):
            raise InputError(
                f"max_tokens is {sampling.max_tokens}; a prompt of {len(prompt_ids)} tokens leaves 1 to"
                f" {context - len(prompt_ids)} new tokens in this variant's context of {context}"
            )

    def submit(self, prompt_ids, sampling, on_event):
        """Queue a request (:class:`InputError` if it cannot be served, :class:`QueueFull` if too many wait)."""
        self.check(prompt_ids, sampling)
        request = Request(list(prompt_ids), sampling, on_event)
        with self.wakeup:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this server queues")
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    def load(self):
        """``(running rows, waiting requests)``."""
        with self.wakeup:
            return sum(row is not None for row in self.rows), len(self.waiting)

    def start(self):
        """Serve on a thread of its own (tests; the server runs :meth:`serve_forever` on its main thread)."""
        self.thread = threading.Thread(target=self.serve_forever, name="engine", daemon=True)
        self.thread.start()

    def stop(self):
        """End :meth:`serve_forever` after the step in progress (and its thread, if :meth:`start` made one)."""
        with self.wakeup:
            self.running = False
            self.wakeup.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    # the engine's thread

    def serve_forever(self):
        """Run requests until :meth:`stop`."""
        torch.set_grad_enabled(False)
        while True:
            with self.wakeup:
                while self.running and not self.waiting and not any(self.rows):
                    self.wakeup.wait()
                if not self.running:
                    break
                self.admit()
            try:
                self.advance()
            except Exception as error:  # a failed step ends the requests in it, not the server
                LOG.exception("a batch step failed")
                self.fail_all(f"error: {error}")

    def admit(self):
        """Give each free row to the next waiting request, oldest first."""
        for index, row in enumerate(self.rows):
            if row is not None:
                continue
            while self.waiting and self.waiting[0].cancelled:
                end(self.waiting.popleft(), "cancelled")
            if not self.waiting:
                return
            request = self.waiting.popleft()
            request.row, request.position = index, 0
            self.rows[index] = request
            self.prefilling.append(request)

    def advance(self):
        if self.cache is None:
            self.cache = self.runner.new_cache()
        if self.prefilling:
            self.prefill_chunk_of(self.prefilling[0])
        if any(request is not None and request not in self.prefilling for request in self.rows):
            self.decode()

    def prefill_chunk_of(self, request):
        """Feed the next chunk of ``request``'s prompt; its first token once the whole prompt is in."""
        if request.cancelled:
            self.prefilling.popleft()
            return self.finish(request.row, "cancelled")
        chunk = request.prompt_ids[request.position : request.position + self.prefill_chunk]
        logits = self.runner.prefill(self.cache, request.row, chunk, start=request.position, chunk=len(chunk))
        request.position += len(chunk)
        if request.position == len(request.prompt_ids):
            self.prefilling.popleft()
            self.emit(request.row, pick_token(logits, request.sampling, request.random))

    def decode(self):
        """One token for every running row. The step spans rows ``0..`` up to the last running one, and at least
        the runner's ``min_decode_rows`` of them (:data:`~workflow_scripts.runtime.package.MIN_DECODE_ROWS`); the
        free and prefilling rows among them write into the slot their next token overwrites, at no cost to them."""
        last = max(index for index, request in enumerate(self.rows) if request is not None)
        last = max(last, self.runner.min_decode_rows - 1)
        tokens, positions = [0] * (last + 1), [0] * (last + 1)
        for index, request in enumerate(self.rows[: last + 1]):
            if request is not None:
                tokens[index], positions[index] = request.last_token, request.position
        logits = self.runner.decode(self.cache, tokens, positions)
        self.steps += 1
        for index, request in enumerate(self.rows[: last + 1]):
            if request is not None and request not in self.prefilling:
                request.position += 1
                self.emit(index, pick_token(logits[index], request.sampling, request.random))

    def emit(self, index, token):
        """Hand a row's new token to its request, and free the row when the request ends."""
        request = self.rows[index]
        if request.cancelled:
            return self.finish(index, "cancelled")
        if token in self.stop_token_ids and not request.sampling.ignore_eos:
            return self.finish(index, "stop")
        request.generated += 1
        request.last_token = token
        request.on_event(token, None)
        if request.generated >= request.sampling.max_tokens:
            self.finish(index, "length")

    def finish(self, index, reason):
        request, self.rows[index] = self.rows[index], None
        end(request, reason)

    def fail_all(self, reason):
        for request in [row for row in self.rows if row is not None]:
            if not request.done:
                end(request, reason)
        self.rows = [None] * self.runner.rows
        self.prefilling.clear()
        self.cache = None


def end(request, reason):
    request.done = True
    request.on_event(None, reason)
