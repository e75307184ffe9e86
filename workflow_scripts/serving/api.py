"""The OpenAI-compatible HTTP API over an :class:`~workflow_scripts.serving.engine.Engine`.

``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``,
streamed as server-sent events or answered whole, with OpenAI's error body for
every refusal: 400 for a bad request (malformed JSON, a prompt or
``max_tokens`` that does not fit the variant's context, an unsupported option
or chat role), 404 for an unknown model, 503 when the queue is full.
``ignore_eos`` is vLLM's extension, which benchmarks use to get exactly
``max_tokens`` tokens.

FastAPI on uvicorn: the stack vLLM and most OpenAI-compatible servers use,
maintained, with request validation by pydantic (which mistral-common already
brings) and streaming responses built in.
"""

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from workflow_scripts.core.errors import InputError
from workflow_scripts.serving.engine import QueueFull, Sampling
from workflow_scripts.serving.sweep import Limits
from workflow_scripts.serving.text import TextStream

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to all that fits
# OpenAI's chat roles but developer (its reasoning models' system), tool and function (no tool calls here): the
# three that the models' chat templates know
CHAT_ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status, message, kind="invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self):
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    ignore_eos: bool = False

    def sampling(self, default_max_tokens):
        max_tokens = self.max_tokens or self.max_completion_tokens or default_max_tokens
        return Sampling(max_tokens, self.temperature, self.top_p, self.seed, self.ignore_eos)

    def stop_strings(self):
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]
    echo: Literal[False] = False
    logprobs: None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Literal[False] | None = None


def create_app(variant, engine, chat_template, on_ready=None):
    """The app serving ``variant`` through ``engine`` (which its caller runs): its tokenizer encodes prompts and
    decodes tokens, ``chat_template`` renders chats (a refusal, like any :class:`InputError`, is a 400);
    ``on_ready()`` runs once the app accepts requests."""
    tokenizer = variant.tokenizer

    async def lifespan(app):
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title=f"VACC workflow: {variant.name}", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request, error):
        return error.response()

    @app.exception_handler(InputError)
    async def unservable_request(request, error):
        return ApiError(400, str(error)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error):
        return ApiError(400, validation_message(error.errors())).response()

    @app.get("/health")
    async def health():
        running, waiting = engine.load()
        return {"status": "ok", "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models():
        card = {"object": "model", "created": int(variant.folder.stat().st_mtime), "owned_by": "vacc-mistral-workflow"}
        return {"object": "list", "data": [{**card, **model_card(variant, engine)}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model, variant)
        ids = token_ids(body.prompt, tokenizer)
        budget = engine.runner.context - len(ids)
        return await respond(body, ids, body.sampling(min(COMPLETIONS_DEFAULT_MAX_TOKENS, budget)), False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(body.model, variant)
        check_roles(body.messages)
        text = chat_template.render([message.model_dump() for message in body.messages])
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return await respond(body, ids, body.sampling(engine.runner.context - len(ids)), True)

    async def respond(body, ids, sampling, chat):
        events = submit(engine, ids, sampling)
        stream = TextStream(tokenizer, body.stop_strings())
        answer = Answer(variant.name, chat, len(ids))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                answer.events(events, stream, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        pieces = [item async for item in generate(events, stream)]
        text, reason = "".join(piece for piece, _ in pieces), pieces[-1][1]
        answer.completion_tokens = len(stream.ids)
        if reason.startswith("error"):
            raise ApiError(500, f"generation failed: {reason.removeprefix('error: ')}", kind="server_error")
        return answer.whole(text, reason)

    return app


def model_card(variant, engine):
    """What a client needs to know of the served model: its id, backend and limits (this API's extension of
    OpenAI's model object; the server's ready file holds the same)."""
    return {
        "id": variant.name,
        "backend": variant.backend,
        "max_batch": variant.runner.rows,
        **Limits.of_context(variant.runner.context).record(),
    }


def token_ids(prompt, tokenizer):
    """A prompt's tokens: encoded text (with the special tokens the tokenizer adds), or token ids as given."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt).ids
    vocabulary = tokenizer.get_vocab_size()
    outside = [token for token in prompt if not 0 <= token < vocabulary]
    if outside:
        raise ApiError(400, f"prompt: token ids {outside[:5]} are outside the vocabulary (0 to {vocabulary - 1})")
    return prompt


def check_model(name, variant):
    if name != variant.name:
        raise ApiError(
            404, f"model {name!r} does not exist; this server serves {variant.name!r}", code="model_not_found"
        )


def check_roles(messages):
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise ApiError(
                400,
                f"messages[{index}].role: {message.role!r} is not a role this server takes; it takes "
                + ", ".join(repr(role) for role in CHAT_ROLES),
                code="invalid_value",
                param=f"messages[{index}].role",
            )


def validation_message(errors):
    if any(error.get("type") == "json_invalid" for error in errors):
        return "the request body is not valid JSON"
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc'] if part != 'body') or 'body'}: {error['msg']}"
        for error in errors
    )


class Events:
    """A request in the engine and the queue its events arrive on (from the engine's thread)."""

    def __init__(self):
        self.queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.request = None

    def put(self, token, reason):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (token, reason))
        except RuntimeError:  # the loop has closed: the server is shutting down
            pass


def submit(engine, ids, sampling):
    events = Events()
    try:
        events.request = engine.submit(ids, sampling, events.put)
    except QueueFull as error:
        raise ApiError(503, f"the server is busy: {error}; retry later", kind="server_busy") from error
    return events


async def generate(events, stream):
    """``(text, None)`` as tokens come, then ``(text, finish_reason)``; cancels the request if the client leaves."""
    try:
        while True:
            token, reason = await events.queue.get()
            if token is None:
                yield stream.flush(), reason
                return
            piece = stream.add(token)
            if stream.stopped:
                yield piece, "stop"
                return
            if piece:
                yield piece, None
    finally:
        events.request.cancel()


class Answer:
    """The response bodies of one request, whole or as stream chunks."""

    def __init__(self, model, chat, prompt_tokens):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.completion_tokens = 0

    def usage(self):
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def body(self, choices, chunk=False, **extra):
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def whole(self, text, reason):
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text, "logprobs": None}
        return self.body([{"index": 0, **content, "finish_reason": reason}], usage=self.usage())

    def chunk(self, text, reason, first=False):
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return self.body([choice], chunk=True)

    async def events(self, events, stream, include_usage):
        if self.chat:
            yield sse(self.chunk("", None, first=True))
        async for piece, reason in generate(events, stream):
            self.completion_tokens = len(stream.ids)
            if reason is not None and reason.startswith("error"):
                yield sse({"error": {"message": f"generation failed: {reason}", "type": "server_error"}})
                break
            yield sse(self.chunk(piece, reason))
        if include_usage:
            yield sse(self.body([], chunk=True, usage=self.usage()))
        yield "data: [DONE]\n\n"


def sse(body):
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
