"""`lmforge serve`: a checkpoint behind an OpenAI-compatible HTTP API and a chat page.

    POST /v1/chat/completions   the run's chat template (SFT models only), streamed or not
    POST /v1/completions        plain continuation (any model)
    GET  /v1/models             the one model served, with its phase and parameter count
    GET  /health                liveness and the queue's counters
    GET  /                      the chat page (package data: lmforge/web/chat.html)
    GET  /story                 a fresh built-in story and its questions, for the page's story box

Concurrency: one generation at a time, in arrival order. Requests are validated and tokenised in
the web server's event loop (a bad one is answered there, 4xx, and never reaches the model), then
queued for one worker thread that runs `Transformer.generate` with its KV cache. Batching them
would not give each request its own answer: `generate` takes one temperature, top-p, seed and
token budget per batch, and a left-padded batch rounds differently from the same prompt alone, so
a seeded or greedy answer would depend on who else was asking. The models lmforge trains answer
in well under a second on a CPU, so a queue costs little. Text goes back as it is decoded; a
client that leaves mid-answer stops its generation at the next token.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
input (context overflow has code ``context_length_exceeded``), 404 for an unknown model or path,
413 for an oversize body, 429 when the queue is full. A bug is a 500 with a one-line message; its
traceback goes to the server's log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lmforge.chat_format import Turn, render_prompt
from lmforge.generate import LoadedModel, Sampling

log = logging.getLogger("lmforge.serve")

MAX_WAITING = 64  # requests queued behind the one generating; more get 429
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_SEED = 2**63 - 1

# ------------------------------------------------------------------------------ request schemas


class _Strict(BaseModel):
    # Wrong types are refused ("5" is not a number); fields this server does not know are
    # ignored, as other OpenAI-compatible servers do, so that clients sending extras still work.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extensions also accepted by vLLM and llama.cpp's server
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # more overflows the logits
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(union_mode="left_to_right")
    echo: bool = False
    suffix: str | None = None


# ------------------------------------------------------------------------------ errors


class APIError(Exception):
    """An error answered as OpenAI answers it."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)  # fmt: skip

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status)

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param,
                 "code": self.code}  # fmt: skip
        return {"error": error}


_BRANCHES = ("str", "int", "TextPart")
_UNIONS = {
    "stop": "a string or a list of strings",
    "prompt": "a string, a list of one string, or a list of token ids",
    "content": 'a string or a list of text parts ({"type": "text", "text": ...})',
}


def _validation_message(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, in words: which field, what was wrong."""
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    kind = error.get("type", "")
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({reason})")
    if not loc:
        return APIError(400, "the request body must be a JSON object "
                             "(sent with Content-Type: application/json)")  # fmt: skip
    # A union's branches add their type names to the location ("stop.list[str].0"): drop them.
    branch = [p for p in loc if p in _BRANCHES or "[" in p]
    param = ".".join(p for p in loc if p not in branch)
    field_name = param.split(".")[0]
    if kind == "missing":
        return APIError(400, f"'{param}' is required", field_name)
    last = param.split(".")[-1] if branch else ""
    if last in _UNIONS:
        return APIError(400, f"invalid '{param}': it must be {_UNIONS[last]}", field_name)
    message = error.get("msg", "invalid value")
    if "input" in error and isinstance(error["input"], (int, float, str, bool, type(None))):
        shown = json.dumps(error["input"])
        message += f" (got {shown if len(shown) <= 40 else shown[:37] + '...'})"
    return APIError(400, f"invalid '{param}': {message}", field_name)


# ------------------------------------------------------------------------------ the generation


class _Halt(Exception):
    """Raised from `on_token` to end a generation early (stop string, or client gone)."""


class _Text:
    """The decoded answer, released as it becomes final.

    Held back: a trailing U+FFFD (a UTF-8 character split across tokens) and a tail that could be
    the start of a stop string. A stop string ends the answer and is not part of it.
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, final, self.stopped = text[: min(cuts)], True, True
        if not final:
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - self._maybe_stop(text)]
        # Decoding is not always prefix-stable: release what lies past the length already sent.
        new = text[len(self.sent) :]
        if len(text) > len(self.sent):
            self.sent = text
        return new

    def _maybe_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string starts with."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)  # fmt: skip


@dataclass
class Job:
    """One request's generation: its input, and the events its answer streams back as."""

    prompt: list[int]
    chat: bool
    sampling: Sampling
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event: Any) -> None:
        """From the worker thread: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()


@dataclass
class Counters:
    served: int = 0
    cancelled: int = 0
    failed: int = 0


class Worker:
    """One thread that runs the queued jobs one at a time (see the module docstring)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.counters = Counters()
        self.busy = False
        self.thread = threading.Thread(target=self._loop, name="lmforge-generate", daemon=True)
        self.thread.start()

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= MAX_WAITING:
            raise APIError(429, f"{MAX_WAITING} requests are already waiting for the model; "
                                "retry later", kind="rate_limit_exceeded")  # fmt: skip
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():  # its client left while it waited
                self.counters.cancelled += 1
                job.emit("cancelled")
                continue
            self.busy = True
            try:
                self._generate(job)
            except Exception as e:  # a bug: this request fails, the server goes on
                log.exception("generation failed")
                self.counters.failed += 1
                job.emit("error", f"generation failed ({type(e).__name__}: {e})")
            finally:
                self.busy = False

    def _generate(self, job: Job) -> None:
        text = _Text(self.loaded.tokenizer, job.stops)

        def on_token(row: int, token: int) -> None:
            if job.cancelled.is_set():
                raise _Halt
            if delta := text.add(token):
                job.emit("text", delta)
            if text.stopped:
                raise _Halt

        try:
            with torch.no_grad():
                job.sampling.generate(self.loaded, job.prompt, job.chat, on_token=on_token)
        except _Halt:
            pass
        if job.cancelled.is_set():
            self.counters.cancelled += 1
            job.emit("cancelled")
            return
        if delta := text.finish():
            job.emit("text", delta)
        # Ran out of budget (length), or met a stop token or stop string (stop).
        ended = text.stopped or len(text.ids) < job.sampling.max_new_tokens
        self.counters.served += 1
        job.emit("done", "stop" if ended else "length", len(text.ids))


# ------------------------------------------------------------------------------ the app


@dataclass
class ModelCard:
    """What `/v1/models` and the page show about the model served."""

    name: str
    phase: str
    parameters: int
    summary: str
    context: int
    path: str
    created: int

    @property
    def chat(self) -> bool:
        return self.phase == "sft"

    def as_openai(self) -> dict[str, Any]:
        lmforge = {"phase": self.phase, "parameters": self.parameters, "summary": self.summary,
                   "context": self.context, "chat": self.chat, "path": self.path}  # fmt: skip
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "lmforge", "lmforge": lmforge}  # fmt: skip


def model_name(path: str) -> str:
    """A run's folder name for its checkpoints (runs/tiny-sft/checkpoints/best.pt -> tiny-sft),
    else the file's stem."""
    p = Path(path)
    return p.parent.parent.name if p.parent.name == "checkpoints" else p.stem


def model_card(loaded: LoadedModel, name: str | None = None) -> ModelCard:
    from lmforge.info import count_parameters, model_summary

    cfg = loaded.model.cfg
    created = int(Path(loaded.path).stat().st_mtime) if Path(loaded.path).exists() else 0
    return ModelCard(name or model_name(loaded.path), loaded.phase, count_parameters(cfg),
                     model_summary(cfg), loaded.context, loaded.path, created)  # fmt: skip


def _conversation(messages: list[Message]) -> list[Turn]:
    """OpenAI messages -> turns, as SFT reads chat JSONL (`read_chat`): text stripped, system
    (and developer) messages joined by a blank line before the first user message."""
    system: list[str] = []
    turns: list[Turn] = []
    for message in messages:
        content = message.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        if message.role in ("system", "developer"):
            system.append(content.strip())
        else:
            turns.append(Turn(message.role, content.strip()))
    if not turns or turns[-1].role != "user":
        raise APIError(400, "the last message must be the user's: the model answers it",
                       "messages")  # fmt: skip
    prefix = "\n\n".join(s for s in system if s)
    if prefix:
        first = next(i for i, t in enumerate(turns) if t.role == "user")
        turns[first] = Turn("user", prefix + "\n\n" + turns[first].content)
    return turns


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings "
                            f"(got {len(stops)})", "stop")  # fmt: skip
    if any(s == "" for s in stops):
        raise APIError(400, "'stop' strings must not be empty", "stop")
    return stops


def _unsupported(body: _Sampling) -> None:
    """Options of OpenAI's API this server does not implement: refused, not silently ignored."""
    if body.n != 1:
        raise APIError(400, f"'n' must be 1: lmforge serve answers with one choice per request "
                            f"(got {body.n}); send several requests instead", "n")  # fmt: skip
    refused = {
        "logprobs": body.logprobs not in (None, False, 0),
        "presence_penalty": body.presence_penalty != 0,
        "frequency_penalty": body.frequency_penalty != 0,
        "tools": getattr(body, "tools", None) not in (None, []),
        "echo": getattr(body, "echo", False),
        "suffix": getattr(body, "suffix", None) is not None,
    }
    for name, asked in refused.items():
        if asked:
            hint = " (use repetition_penalty)" if name.endswith("_penalty") else ""
            raise APIError(400, f"'{name}' is not supported by lmforge serve{hint}", name)


def create_app(loaded: LoadedModel, name: str | None = None) -> FastAPI:
    """The ASGI app serving `loaded`; its worker thread starts now and stops with the app."""
    card = model_card(loaded, name)
    worker = Worker(loaded)
    tok = loaded.tokenizer
    page = resources.files("lmforge").joinpath("web/chat.html").read_text(encoding="utf-8")

    async def lifespan(app: FastAPI):
        yield
        worker.stop()

    # No /docs or /redoc: they load their scripts from a CDN. /openapi.json stays.
    app = FastAPI(title="lmforge serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker, app.state.card = worker, card

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_message(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        what = {404: f"no such path: {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}  # fmt: skip
        return APIError(exc.status_code, what.get(exc.status_code, str(exc.detail))).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(
            500,
            f"internal error in lmforge serve ({type(exc).__name__}); the "
            "server's log has the details",
            kind="server_error",
        ).response()

    app.add_middleware(_BodyLimit)

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != card.name:
            raise APIError(404, f"the model '{requested}' does not exist: this server has "
                                f"'{card.name}' (GET /v1/models)", "model",
                           "model_not_found")  # fmt: skip

    def sampling_for(body: _Sampling, prompt: list[int], max_tokens: int | None) -> Sampling:
        room = card.context - len(prompt)
        if room <= 0:
            raise APIError(400, f"this model's maximum context length is {card.context} tokens; "
                                f"the prompt has {len(prompt)}: shorten it",
                           "messages" if isinstance(body, ChatRequest) else "prompt",
                           "context_length_exceeded")  # fmt: skip
        # The answer stops at the end of the context: past it the window would slide and the
        # model lose the start of the prompt (the story a question is about).
        budget = min(max_tokens or room, room)
        seed = body.seed if body.seed is not None else random.randrange(MAX_SEED)
        # Below 1e-5 the scaled logits could overflow float32: greedy is the limit anyway.
        temperature = body.temperature if body.temperature >= 1e-5 else 0.0
        return Sampling(budget, temperature, body.top_k, body.top_p,
                        body.repetition_penalty, seed)  # fmt: skip

    def chat_prompt(body: ChatRequest) -> list[int]:
        return render_prompt(_conversation(body.messages), tok)

    def completion_prompt(body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [i for i in prompt if not 0 <= i < loaded.vocab_limit]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the model's vocabulary "
                                    f"(0..{loaded.vocab_limit - 1})", "prompt")  # fmt: skip
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request (got {len(prompt)})", "prompt")
            prompt = prompt[0]
        return tok.encode(prompt) or [tok.eot_id]

    async def answer(request: Request, body: _Sampling, chat: bool, prompt: list[int],
                     max_tokens: int | None) -> Any:  # fmt: skip
        sampling = sampling_for(body, prompt, max_tokens)
        job = Job(prompt, chat, sampling, _stops(body.stop), asyncio.get_running_loop())
        worker.submit(job)
        reply = _Reply(card.name, chat, len(prompt))
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(reply.stream(job, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        return JSONResponse(await reply.whole(job, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest) -> Any:
        check_model(body.model)
        _unsupported(body)
        if not card.chat:
            raise APIError(400, f"'{card.name}' is a base model (phase {card.phase}): it has no "
                                "chat template, so it only continues text: use /v1/completions "
                                "(or instruction-tune it with lmforge sft)", "model",
                           "model_not_chat")  # fmt: skip
        prompt = await run_in_threadpool(chat_prompt, body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await answer(request, body, True, prompt, max_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        check_model(body.model)
        _unsupported(body)
        prompt = await run_in_threadpool(completion_prompt, body)
        return await answer(request, body, False, prompt, body.max_tokens)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card.as_openai()]}

    @app.get("/v1/models/{requested:path}")
    async def one_model(requested: str) -> dict[str, Any]:
        check_model(requested)
        return card.as_openai()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        c = worker.counters
        return {"status": "ok", "model": card.name, "phase": card.phase,
                "generating": worker.busy, "waiting": worker.waiting, "served": c.served,
                "cancelled": c.cancelled, "failed": c.failed}  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        # Everything the page needs is inline: the policy forbids loading anything from elsewhere.
        policy = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                  "connect-src 'self'; img-src 'self' data:")  # fmt: skip
        return HTMLResponse(page, headers={"Content-Security-Policy": policy})

    @app.get("/story")
    async def story() -> dict[str, Any]:
        from lmforge.data.stories import generate_stories

        drawn = next(generate_stories(random.randrange(2**31), 1))
        return {"story": drawn.text, "questions": [q for q, _ in drawn.qa]}

    return app


class _BodyLimit:
    """413 for a body whose Content-Length is over MAX_BODY_BYTES (pure ASGI, so that streamed
    responses and disconnects pass through untouched)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length", b"")
            if size.isdigit() and int(size) > MAX_BODY_BYTES:
                error = APIError(413, f"the request body is {int(size):,} bytes; the limit is "
                                      f"{MAX_BODY_BYTES:,}")  # fmt: skip
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Reply:
    """One request's answer in OpenAI's shapes: a whole JSON body, or server-sent events."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else (
            "text_completion")  # fmt: skip
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def _choice(self, text: str | None, finish: str | None, chunk: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text or ""
        elif chunk:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice.update(logprobs=None, finish_reason=finish)
        return choice

    async def whole(self, job: Job, request: Request) -> dict[str, Any]:
        """The whole answer; a client that leaves before it is done cancels the job."""
        parts: list[str] = []

        async def collect() -> tuple[str, int]:
            while True:
                kind, *rest = await job.events.get()
                if kind == "text":
                    parts.append(rest[0])
                elif kind == "done":
                    return rest[0], rest[1]
                elif kind == "error":
                    raise APIError(500, rest[0], kind="server_error")
                else:
                    raise APIError(499, "cancelled")

        async def client_left() -> None:
            # The body has been read, so the next message the server gets is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass

        collecting = asyncio.ensure_future(collect())
        watching = asyncio.ensure_future(client_left())
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not collecting.done():  # the client left: stop its generation
                job.cancelled.set()
                await collecting
        finally:
            watching.cancel()
            if not collecting.done():
                job.cancelled.set()
                collecting.cancel()
        finish, n = collecting.result()
        body = self._envelope([self._choice("".join(parts), finish, chunk=False)], chunk=False)
        body["usage"] = self.usage(n)
        return body

    async def stream(self, job: Job, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: the role first (chat), each piece of text, the finish reason,
        the usage when asked for, then `[DONE]`. A client that leaves cancels the job."""

        def event(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data)}\n\n"

        try:
            if self.chat:
                first = self._choice(None, None, chunk=True)
                first["delta"] = {"role": "assistant", "content": ""}
                yield event(self._envelope([first], chunk=True))
            while True:
                kind, *rest = await job.events.get()
                if kind == "text":
                    yield event(self._envelope([self._choice(rest[0], None, True)], True))
                elif kind == "done":
                    finish, n = rest
                    yield event(self._envelope([self._choice(None, finish, True)], True))
                    if include_usage:
                        yield event({**self._envelope([], True), "usage": self.usage(n)})
                    break
                else:
                    message = rest[0] if kind == "error" else "cancelled"
                    yield event(APIError(500, message, kind="server_error").body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a no-op once the job is done; stops it if the client left


def serve(loaded: LoadedModel, host: str, port: int, name: str | None = None,
          announce: Callable[[str], None] = print) -> None:  # fmt: skip
    """Bind `host:port` (0: any free port), say where, and serve until interrupted."""
    import socket

    import uvicorn

    from lmforge.errors import UserError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another "
                        "--port, or a --host this machine has") from None  # fmt: skip
    app = create_app(loaded, name)
    card: ModelCard = app.state.card
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    announce(f"serving {card.name}: {card.summary}, phase {card.phase} ({card.path})")
    announce(f"chat page: http://{shown}:{bound_port}/   OpenAI API: http://{shown}:{bound_port}/v1"
             f"   ({'chat and ' if card.chat else ''}completions; one request at a time, "
             "queued)")  # fmt: skip
    if not _loopback(bound_host):
        announce(f"warning: listening on {bound_host}, not only this machine: anyone who can "
                 "reach it can use the model (there is no authentication)")  # fmt: skip
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
