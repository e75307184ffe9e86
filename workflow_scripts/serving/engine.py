"""Continuous batching over a variant's fixed-shape prefill and decode graphs.

The graphs take ``batch`` rows at once: prefill fills cache slots
``0..seq_in-1`` from left-padded prompts, and each decode step writes every
row's next key and value into one shared slot. A request joins a running
batch by a prefill of its own row, spliced into the cache; the slots that the
running rows filled before it joined are masked out of its row, and its
positions count its own tokens only. Because the slot is shared, a request
joins only if its ``max_tokens`` fit into the slots left; otherwise it waits
for the batch to drain, when the slots start over. Requests beyond the free
rows wait in a first-in, first-out queue; beyond ``max_queue`` waiting ones,
:meth:`Engine.submit` refuses.

All model work runs on one thread of its own: a compiled package is not
reentrant, and torch's own threads parallelise each step.
"""

import collections
import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from workflow_scripts.core.errors import InputError
from workflow_scripts.serving import output_budget

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
    position: int = 0
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
    """Serves :class:`Request` objects through ``generator``'s graphs (a
    :class:`~workflow_scripts.runtime.package.StaticGenerator`: its ``prefill``, ``decode``, ``batch``,
    ``seq_in``, ``seq_total`` and ``device``)."""

    def __init__(self, generator, stop_token_ids, max_queue=256):
        self.graphs = generator
        self.stop_token_ids = frozenset(stop_token_ids)
        self.max_queue = max_queue
        self.budget = output_budget(generator.seq_in, generator.seq_total)
        self.waiting = collections.deque()
        self.rows = [None] * generator.batch
        self.cache = None
        self.slot = generator.seq_in
        self.wakeup = threading.Condition()
        self.running = False
        self.thread = None
        self.steps = 0

    # called from any thread

    def check(self, prompt_ids, sampling):
        """Raise :class:`InputError` for a request these graphs cannot serve."""
        if not prompt_ids:
            raise InputError("the prompt is empty")
        if len(prompt_ids) > self.graphs.seq_in:
            raise InputError(
                f"the prompt has {len(prompt_ids)} tokens; this variant's compiled prompt length is"
                f" {self.graphs.seq_in} tokens"
            )
        if not 1 <= sampling.max_tokens <= self.budget:
            raise InputError(
                f"max_tokens is {sampling.max_tokens}; this variant's compiled graphs give 1 to {self.budget}"
                " new tokens per request"
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
        self.running = True
        self.thread = threading.Thread(target=self.serve_forever, name="engine", daemon=True)
        self.thread.start()

    def stop(self):
        with self.wakeup:
            self.running = False
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()

    # the engine's thread

    def serve_forever(self):
        torch.set_grad_enabled(False)
        while True:
            with self.wakeup:
                while self.running and not self.waiting and not any(self.rows):
                    self.wakeup.wait()
                if not self.running:
                    break
                joining = self.take_joining()
            try:
                self.advance(joining)
            except Exception as error:  # a failed step ends the requests in it, not the server
                LOG.exception("a batch step failed")
                self.fail_all(joining, f"error: {error}")

    def take_joining(self):
        """The waiting requests that join now, in order, for the free rows and the slots left."""
        if not any(self.rows):
            self.slot = self.graphs.seq_in
        joining = []
        free = self.rows.count(None)
        while self.waiting and len(joining) < free:
            head = self.waiting[0]
            if head.cancelled:
                end(self.waiting.popleft(), "cancelled")
                continue
            if self.slot + head.sampling.max_tokens - 1 > self.graphs.seq_total:
                break  # the head waits for the batch to drain; nothing behind it overtakes it
            joining.append(self.waiting.popleft())
        return joining

    def advance(self, joining):
        if joining:
            self.prefill(joining)
        if any(self.rows):
            self.decode()

    def prefill(self, joining):
        graphs, device = self.graphs, self.graphs.device
        free_rows = [index for index, row in enumerate(self.rows) if row is None]
        input_ids = torch.zeros(graphs.batch, graphs.seq_in, dtype=torch.long, device=device)
        mask = torch.zeros(graphs.batch, graphs.seq_in, dtype=torch.long, device=device)
        mask[:, -1] = 1  # rows without a new prompt read one padding token: never a row with nothing to attend to
        placed = list(zip(free_rows, joining, strict=False))
        for index, request in placed:
            length = len(request.prompt_ids)
            input_ids[index, graphs.seq_in - length :] = torch.as_tensor(request.prompt_ids, device=device)
            mask[index, graphs.seq_in - length :] = 1
        logits, keys, values = graphs.prefill(input_ids, mask)
        self.splice(placed, keys, values, mask)
        for index, request in placed:
            self.rows[index] = request
            request.position = len(request.prompt_ids)
            self.emit(index, pick_token(logits[index], request.sampling, request.random))

    def splice(self, placed, keys, values, prompt_mask):
        """Put the new rows' prompt caches into the running cache."""
        graphs = self.graphs
        if self.cache is None or not any(self.rows):
            cache_mask = torch.zeros(graphs.batch, graphs.seq_total, dtype=torch.long, device=graphs.device)
            cache_mask[:, : graphs.seq_in] = prompt_mask
            self.cache = {"keys": keys, "values": values, "mask": cache_mask}
            return
        for index, _ in placed:
            self.cache["keys"][:, index] = keys[:, index]
            self.cache["values"][:, index] = values[:, index]
            self.cache["mask"][index] = 0
            self.cache["mask"][index, : graphs.seq_in] = prompt_mask[index]

    def decode(self):
        graphs, device = self.graphs, self.graphs.device
        tokens = torch.zeros(graphs.batch, 1, dtype=torch.long)
        positions = torch.zeros(graphs.batch, 1, dtype=torch.long)
        for index, request in enumerate(self.rows):
            if request is not None:
                tokens[index, 0], positions[index, 0] = request.last_token, request.position
        logits, self.cache["keys"], self.cache["values"] = graphs.decode(
            tokens.to(device),
            positions.to(device),
            torch.tensor(self.slot, device=device),
            self.cache["mask"],
            self.cache["keys"],
            self.cache["values"],
        )
        self.cache["mask"][:, self.slot] = 1
        self.slot += 1
        self.steps += 1
        for index, request in enumerate(self.rows):
            if request is not None:
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

    def fail_all(self, joining, reason):
        for request in [row for row in self.rows if row is not None] + joining:
            if not request.done:
                end(request, reason)
        self.rows = [None] * self.graphs.batch
        self.cache = None


def end(request, reason):
    request.done = True
    request.on_event(None, reason)
