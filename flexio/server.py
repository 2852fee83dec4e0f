"""HTTP requests -> engine generations: the OpenAI- and Ollama-compatible API, as a FastAPI (ASGI) app.

`create_app(engine)` returns the app; `python -m flexio serve` (serve_cmd.py) runs it under uvicorn.

Lifecycle
  The ASGI lifespan starts loading the engine in a task and returns at once, so the server
  listens while the model loads: /health answers 503 {"status": "loading"}, then 200 {"status":
  "ok"}; generation requests get 503 until then. At shutdown uvicorn stops accepting, lets
  in-flight requests finish (cancelling those still running after its graceful timeout), then
  the lifespan closes the engine (arena, io_uring ring, compute thread).

Requests
  Each generation request is admitted or refused with 503 at once: at most `parallel` run and
  `max_queue` wait (the engine serves them in its own order). A request holds nothing across
  requests: its tokens, sampler, stop strings and text decoder are its own. A streamed answer
  is an async generator over the engine's `generate_tokens`; when the client disconnects, or the
  server cancels the request, the generator is closed at once, which ends the generation and
  frees its engine slot. A non-streamed answer is computed in a task watched the same way.

Errors
  Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}}: 400 for a
  request the API refuses (pydantic's validation errors too, naming the field, where FastAPI
  would answer 422), 401 without the API key, 404 for an unknown model or route, 413 for a body
  over `max_body` bytes, 503 while loading, with a full queue or when the engine fails (a
  FlexioError), 500 only for a bug (logged with its traceback). An error after a stream has
  begun ends it with one error event (SSE) or line (NDJSON).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .api_models import (AssistantMessage, ChatChoice, ChatCompletion, ChatMessage, ChatRequest, Completion,
                         CompletionChoice, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                         Health, ModelCard, ModelList, OllamaChatRequest, OllamaChatResponse, OllamaGenerateRequest,
                         OllamaGenerateResponse, OllamaModel, OllamaModelDetails, OllamaOptions, OllamaTags, Sampled,
                         TokenizeRequest, TokenizeResponse, Usage)
from .engine import Engine, EngineMetrics
from .errors import FlexioError, GGUFError, ParameterError
from .fetch import MODELS
from .gguf import type_name
from .sampling import SamplingParams
from .stops import StopBuffer
from .tokenizer import StreamDecoder

log = logging.getLogger("flexio.server")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~250k tokens of text, more than any context flexio runs
QUEUE_PER_SLOT = 4  # default max_queue: this many waiting requests per sequence slot
OPEN_PATHS = frozenset({"/health"})
FORM_TYPES = frozenset({b"", b"application/x-www-form-urlencoded", b"text/plain"})  # answered without the API key (load balancers, orchestrators)

# Sampling when a request leaves a field out: each API's own documented defaults.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None}
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": None}


# --- errors ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 200, with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Json(self.body(), status_code=self.status, headers=self.headers)


def busy(message: str, code: str) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers={"Retry-After": "1"})


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


def engine_failed(err: FlexioError) -> ApiError:
    return ApiError(503, f"the engine failed: {err}", type="server_error", code="engine_error")


def internal(err: BaseException) -> ApiError:
    return ApiError(500, f"internal error ({type(err).__name__}); the server log has the details",
                    type="server_error", code="internal_error")


def _dumps(obj: Any) -> bytes:
    # "replace": a lone surrogate (JSON can carry "\udc80") must not turn an error answer into a 500
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8", "replace")


class Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _dumps(content)


# pydantic's union-member tags in an error's location ("str", "list[str]", "TextPart"), not field names
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _param(loc: tuple) -> str | None:
    """A validation error's location -> the field as a client names it: "messages[0].content"."""
    out = ""
    for x in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif x in _TYPE_TAGS or x[:1].isupper() or any(c in x for c in "[]-("):
            continue
        else:
            out += f".{x}" if out else x
    return out or None


# what a field accepts, said once instead of pydantic's one message per member of its union
FIELD_HINTS = {
    "n": "only 1 is supported (one choice per request)",
    "prompt": "expected a string (or a list of one string)",
    "stop": "expected a string or a list of up to 4 strings",
}


def validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    # the deepest location names the field best: in messages[0].content[0].type, not messages[0].content
    first = max(errors, key=lambda e: len(e["loc"]))
    if first["type"] == "json_invalid":
        why = first.get("ctx", {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON: {why}".rstrip(": "), code="invalid_json")
    param = _param(tuple(first["loc"]))
    msgs = dict.fromkeys(e["msg"] for e in errors if _param(tuple(e["loc"])) == param)
    if param is None:
        return ApiError(400, f"the request body: {' or '.join(msgs)} (expected a JSON object)")
    if param in FIELD_HINTS and first["type"] != "missing":
        msgs = {FIELD_HINTS[param]: None}
    return ApiError(400, f"{param}: {' or '.join(msgs)}", param=param)


def _check_text(text: str, param: str) -> None:
    """JSON can carry lone surrogates ("\\ud800"): no tokenizer takes them."""
    bad = next((i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        raise ApiError(400, f"{param}: expected UTF-8 text, got a lone surrogate {text[bad]!r} at character {bad}",
                       param=param)


# --- middleware: API key and body size, before routing -------------------------------------------------


class Guard:
    """ASGI middleware: 401 without the API key (when one is set), 413 for a body over max_body bytes.

    The body is read here (at most max_body bytes, never more) and replayed to the app, whose later
    receive() calls reach the server's own, so the app still learns when the client disconnects.
    """

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["method"] == "POST" and headers.get(b"content-type", b"").split(b";")[0].strip() in FORM_TYPES:
            # `curl -d '{...}'` labels its JSON a form, other clients send none: every body here is JSON
            # (as llama-server reads it)
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                err = ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than {self.max_body:,} bytes", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await too_large.response()(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await too_large.response()(scope, receive, send)
            chunks.append(chunk)
            more = msg.get("more_body", False)
        replay: dict | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replayed():
            nonlocal replay
            if replay is not None:
                msg, replay = replay, None
                return msg
            return await receive()

        await self.app(scope, replayed, send)


# --- one generation -------------------------------------------------------------------------------------


@dataclass
class Job:
    """One request's generation: its input, then what came of it."""

    ids: list[int]  # prompt token ids
    max_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False
    t_arrival: float = field(default_factory=time.perf_counter)
    generated: int = 0
    finish_reason: str | None = None  # "stop" (end-of-text token or stop string) or "length"
    t_start: float = 0.0
    t_first: float = 0.0  # when the first token came (the prompt pass is done)
    t_end: float = 0.0

    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.ids), completion_tokens=self.generated,
                     total_tokens=len(self.ids) + self.generated)


async def texts(e: Engine, job: Job, halt: Callable[[], bool] = lambda: False) -> AsyncIterator[str]:
    """Job -> the generated text in pieces, cut before the first stop string; sets job.finish_reason.

    Leaving early (a stop string, the consumer closing this generator, or halt() turning true: the
    server is shutting down, an ApiError) closes the engine's token iterator, which ends the
    generation and frees its slot.
    """
    dec, stops = StreamDecoder(e.tokenizer), StopBuffer(job.stops)
    job.t_start = job.t_first = time.perf_counter()
    tokens = e.generate_tokens(job.ids, job.max_tokens, job.sampling, ignore_eos=job.ignore_eos)
    async with aclosing(tokens):
        async for tok in tokens:
            if halt():
                raise shutting_down()
            if job.generated == 0:
                job.t_first = time.perf_counter()
            job.generated += 1
            text = stops.push(dec.push(tok))
            if text:
                yield text
            if stops.stopped:
                break
    if not stops.stopped:
        text = stops.push(dec.flush())
        text += stops.flush()
        if text:
            yield text
    # the engine checks for end-of-text only while generated < max_tokens: all of them means "length"
    job.finish_reason = "stop" if stops.stopped or job.generated < job.max_tokens else "length"
    job.t_end = time.perf_counter()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def unless_disconnected(receive: Callable, work: Coroutine) -> Any:
    """work's result; if the client disconnects first, work is cancelled and ClientGone raised."""
    result: list = []
    failure: list[BaseException] = []

    async def run():
        try:
            result.append(await work)
        except Exception as err:  # handed to the caller: a task group would wrap it in an ExceptionGroup
            failure.append(err)

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass

    async with asyncio.TaskGroup() as tg:
        running, watching = tg.create_task(run()), tg.create_task(watch())
        running.add_done_callback(lambda _: watching.cancel())
        watching.add_done_callback(lambda _: running.cancel())
    if failure:
        raise failure[0]
    if not result:
        raise ClientGone()
    return result[0]


class Ticket:
    """One admitted generation request; release() (idempotent) makes room for another."""

    def __init__(self, served: Served):
        self.served, self.held = served, True
        served.admitted += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.served.admitted -= 1


class Stream(StreamingResponse):
    """A generation streamed to the client.

    Starlette stops iterating when the client disconnects (or the task is cancelled at shutdown);
    closing the body iterator here ends the generation at once, wherever it was suspended, and the
    ticket leaves the queue count.
    """

    def __init__(self, chunks: AsyncIterator[bytes], media_type: str, ticket: Ticket):
        super().__init__(chunks, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (OSError, ClientDisconnect):
            pass  # the client is gone: nobody to tell
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.ticket.release()


def _stream_error(err: Exception) -> dict:
    if isinstance(err, ApiError):
        return err.body()
    if isinstance(err, FlexioError):
        return engine_failed(err).body()
    log.error("a streamed generation failed", exc_info=err)
    return internal(err).body()


# --- the served model --------------------------------------------------------------------------------


def model_file_name(ref: str) -> str:
    """A model reference (path or known name) -> the GGUF file's name, without fetching anything."""
    if ref in MODELS and not os.path.exists(ref):
        return os.path.basename(MODELS[ref].member)
    return os.path.basename(ref)


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Served:
    """The app's state: the engine, whether it is loaded, the queue count and the names of the model."""

    def __init__(self, engine: Engine, *, model_alias: str | None, max_queue: int, max_tokens: int | None,
                 on_load_error: Callable[[BaseException], None] | None):
        self.engine = engine
        self.status, self.error = "loading", None
        self.on_load_error = on_load_error
        self.file_name = model_file_name(engine.model_ref)
        self.model_id = model_alias or self.file_name
        stem = self.file_name.removesuffix(".gguf")
        known = [name for name, m in MODELS.items() if os.path.basename(m.member) == self.file_name]  # "smollm2"
        self.names = {n for n in (model_alias, self.file_name, stem, engine.model_ref, *known) if n}
        self.created = int(time.time())
        self.limit = engine.parallel + max_queue  # admitted generation requests: running + waiting
        self.max_tokens = max_tokens
        self.admitted = 0
        self.rejected = 0  # refused with 503 for a full queue
        self.draining = False  # shutting down: generations end at their next token, new ones are refused

    async def load(self) -> None:
        try:
            await self.engine.open()
        except Exception as err:  # reported, not raised: a failing child would cancel the lifespan's task group
            self.status, self.error = "error", err
            if isinstance(err, FlexioError):
                log.error("loading %s failed: %s", self.engine.model_ref, err)
            else:
                log.error("loading %s failed", self.engine.model_ref, exc_info=err)
            if self.on_load_error is not None:
                self.on_load_error(err)
            return
        self.status = "ok"
        e = self.engine
        log.info("ready: %s, %d sequence(s) of %d tokens (context %d), mode %s", self.model_id, e.parallel,
                 e.n_ctx_seq, e.n_ctx, e.mode.name)

    def check_model(self, name: str | None) -> None:
        if name and name not in self.names and name.removesuffix(":latest") not in self.names:
            raise ApiError(404, f"model {name!r} not found: this server serves {self.model_id!r}", param="model",
                           code="model_not_found")

    def ready(self) -> Engine:
        if self.status == "ok":
            return self.engine
        if self.status == "loading":
            raise busy("the model is loading: try again shortly (GET /health says when it is ready)", "model_loading")
        raise busy(f"the model failed to load: {self.error}", "model_error")

    def drain(self) -> None:
        """Shutdown begins: every generation ends at its next token with a 503 'shutting down' (in its stream
        if one began), so that uvicorn's graceful shutdown finds the connections done."""
        self.draining = True

    def halted(self) -> bool:
        return self.draining

    def admit(self) -> Ticket:
        if self.draining:
            raise shutting_down()
        if self.admitted >= self.limit:
            self.rejected += 1
            raise busy(f"the server is busy: {self.admitted} requests are running or queued, the most it takes "
                       f"(--parallel {self.engine.parallel} + --max-queue {self.limit - self.engine.parallel})",
                       "server_busy")
        return Ticket(self)

    def job(self, ids: list[int], max_tokens: int | None, sampling: SamplingParams, stop: str | list[str] | None,
            ignore_eos: bool, names: dict[str, str]) -> Job:
        """Check the request against the context (400 naming the field) -> its Job.

        names: the engine's parameter names -> this API's field names ("max_tokens" -> "options.num_predict").
        """
        e = self.engine
        n = max(e.n_ctx_seq - len(ids), 0) if max_tokens is None else max_tokens
        try:
            e.check_request(len(ids), n)
        except ParameterError as err:
            raise bad_parameter(err, names) from None
        if self.max_tokens is not None:
            n = min(n, self.max_tokens)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return Job(ids, n, sampling, stops, bool(ignore_eos))


def bad_parameter(err: ParameterError, names: dict[str, str]) -> ApiError:
    param = names.get(err.param, err.param)
    return ApiError(400, str(err), param=param)


def sampling(fields: Sampled | OllamaOptions | None, defaults: dict, names: dict[str, str]) -> SamplingParams:
    """A request's sampling fields, each absent one from the API's defaults -> SamplingParams (400 if refused)."""
    values = {k: getattr(fields, k, None) for k in defaults}
    values = {k: defaults[k] if v is None else v for k, v in values.items()}
    try:
        return SamplingParams(temperature=float(values["temperature"]), top_k=values["top_k"],
                              top_p=float(values["top_p"]), seed=values["seed"])
    except ParameterError as err:
        raise bad_parameter(err, names) from None


def chat_ids(e: Engine, messages: list[dict], param: str = "messages") -> list[int]:
    """Messages -> prompt token ids through the model's chat template (as the engine's prompt_tokens(chat=True)).

    A template that writes BOS itself, for a tokenizer that adds one, would give two: one is kept (as
    llama-server does).
    """
    for i, m in enumerate(messages):
        _check_text(m["content"], f"{param}[{i}].content")
    try:
        text = e.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except GGUFError as err:
        raise ApiError(400, f"{param}: {err}: use a completion endpoint instead", param=param) from None
    except Exception as err:  # the template's raise_exception() or a jinja error: these messages do not fit it
        raise ApiError(400, f"{param}: the model's chat template refused them: {err}", param=param) from None
    ids = e.tokenizer.encode(text, parse_special=True)
    bos = e.tokenizer.bos_id
    if len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos:
        del ids[0]
    return ids


def _content(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "".join(part.text for part in m.content)


def _role(role: str) -> str:
    return "system" if role == "developer" else role  # OpenAI's newer name for the system role


# --- answers: OpenAI ------------------------------------------------------------------------------------


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def completion_events(e: Engine, job: Job, head: dict, include_usage: bool,
                            halt: Callable[[], bool]) -> AsyncIterator[bytes]:
    def chunk(text: str, finish: str | None) -> dict:
        return {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                "usage": None}

    try:
        async for text in texts(e, job, halt):
            yield _sse(chunk(text, None))
        yield _sse(chunk("", job.finish_reason))
        if include_usage:
            yield _sse({**head, "choices": [], "usage": job.usage().model_dump()})
    except Exception as err:
        yield _sse(_stream_error(err))
    yield SSE_DONE


async def chat_events(e: Engine, job: Job, head: dict, include_usage: bool,
                      halt: Callable[[], bool]) -> AsyncIterator[bytes]:
    def chunk(delta: dict, finish: str | None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                "usage": None}

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}, None))
        async for text in texts(e, job, halt):
            yield _sse(chunk({"content": text}, None))
        yield _sse(chunk({}, job.finish_reason))
        if include_usage:
            yield _sse({**head, "choices": [], "usage": job.usage().model_dump()})
    except Exception as err:
        yield _sse(_stream_error(err))
    yield SSE_DONE


async def collect(e: Engine, job: Job, halt: Callable[[], bool]) -> str:
    return "".join([t async for t in texts(e, job, halt)])


# --- answers: Ollama ------------------------------------------------------------------------------------


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


def ollama_done(job: Job) -> dict:
    return {"done": True, "done_reason": job.finish_reason,
            "total_duration": _ns(job.t_end - job.t_arrival), "load_duration": 0,
            "prompt_eval_count": len(job.ids), "prompt_eval_duration": _ns(job.t_first - job.t_start),
            "eval_count": job.generated, "eval_duration": _ns(job.t_end - job.t_first)}


def _ollama_piece(chat: bool, text: str) -> dict:
    return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}


async def ollama_lines(e: Engine, job: Job, model: str, chat: bool, halt: Callable[[], bool]) -> AsyncIterator[bytes]:
    try:
        async for text in texts(e, job, halt):
            yield _dumps({"model": model, "created_at": _now_rfc3339(), **_ollama_piece(chat, text), "done": False}) + b"\n"
        yield _dumps({"model": model, "created_at": _now_rfc3339(), **_ollama_piece(chat, ""), **ollama_done(job)}) + b"\n"
    except Exception as err:
        yield _dumps(_stream_error(err)) + b"\n"


# --- metrics --------------------------------------------------------------------------------------------

# EngineMetrics field -> (Prometheus name, type, help). A field added to EngineMetrics later is exported
# too, as flexio_<field> (a counter when its name ends in _total, else a gauge).
ENGINE_METRICS = {
    "parallel": ("flexio_parallel_sequences", "gauge", "sequences generated at once (--parallel)"),
    "n_ctx_seq": ("flexio_sequence_context_tokens", "gauge", "the context of one sequence: n_ctx // parallel"),
    "requests_running": ("flexio_requests_running", "gauge", "generations in the engine's current batch"),
    "requests_waiting": ("flexio_requests_waiting", "gauge", "generations waiting for a free sequence slot"),
    "requests_total": ("flexio_requests_total", "counter", "generations finished (any stop reason)"),
    "prompt_tokens_total": ("flexio_prompt_tokens_total", "counter", "prompt tokens processed"),
    "generated_tokens_total": ("flexio_generated_tokens_total", "counter", "tokens generated"),
    "passes_total": ("flexio_passes_total", "counter", "forward passes over the weights"),
    "batch_size_mean": ("flexio_batch_size_mean", "gauge", "sequences per forward pass, mean since the model loaded"),
    "decode_tok_s": ("flexio_decode_tokens_per_second", "gauge", "tokens generated per second, recent passes"),
    "streamed_bytes_per_pass": ("flexio_streamed_bytes_per_pass", "gauge",
                                "weight bytes one forward pass (one token per sequence) reads from disk"),
    "bytes_read_total": ("flexio_read_bytes_total", "counter", "weight bytes read from disk while generating"),
    "weights_bytes": ("flexio_weights_bytes", "gauge", "memory the weights hold (resident, window, vectors)"),
    "kv_cache_bytes": ("flexio_kv_cache_bytes", "gauge", "memory the KV caches of all sequence slots hold"),
}


def metrics_text(served: Served) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def add(name: str, kind: str, help_: str, value: float) -> None:
        num = int(value) if isinstance(value, bool) else value
        lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {num}"))

    add("flexio_model_loaded", "gauge", "1 once the model is loaded", served.status == "ok")
    add("flexio_server_requests_admitted", "gauge", "generation requests admitted: running or queued",
        served.admitted)
    add("flexio_server_requests_limit", "gauge", "the most generation requests admitted at once "
        "(--parallel + --max-queue)", served.limit)
    add("flexio_server_requests_rejected_total", "counter", "generation requests refused with 503 (queue full)",
        served.rejected)
    if served.status == "ok":
        m = served.engine.metrics()
        for f in dataclasses.fields(EngineMetrics):
            value = getattr(m, f.name)
            if not isinstance(value, (int, float)):
                continue
            kind = "counter" if f.name.endswith("_total") else "gauge"
            name, kind, help_ = ENGINE_METRICS.get(f.name, (f"flexio_{f.name}", kind, f.name.replace("_", " ")))
            add(name, kind, help_, value)
    return "\n".join(lines) + "\n"


# --- the app ----------------------------------------------------------------------------------------------

ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": what} for status, what in (
        (400, "the request is malformed or out of range (the error names the field)"),
        (401, "missing or wrong API key (when the server has one)"),
        (404, "unknown model or route"),
        (413, "the request body is too large"),
        (500, "a bug: the server log has the traceback"),
        (503, "the model is loading, the queue is full, or the engine failed"),
    )
}
SSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
             "description": "JSON, or with stream=true server-sent events ending with data: [DONE]"}}
NDJSON = {200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                "description": "one JSON object per line (stream=true, the default), else one JSON object"}}


def _flexio_version() -> str:
    try:
        return version("flexio")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "0"


def create_app(engine: Engine | Callable[[], Engine], *, model_alias: str | None = None, api_key: str | None = None,
               max_queue: int | None = None, max_tokens: int | None = None, max_body: int = MAX_BODY_BYTES,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """An unopened Engine (or a function making one) -> the app; the app opens and closes the engine.

    max_queue: requests that may wait while `parallel` run (default QUEUE_PER_SLOT * parallel); more get 503.
    max_tokens: the most tokens one request generates (a request asking more is cut to it, finish_reason
    "length", as llama-server's -n); None: the rest of the sequence's context.
    on_load_error: called with the exception if the engine fails to open (serve_cmd stops the server).
    """
    e = engine if isinstance(engine, Engine) or hasattr(engine, "open") else engine()
    for name, value, low in (("max_queue", max_queue, 0), ("max_tokens", max_tokens, 1), ("max_body", max_body, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ParameterError(f"{name}: expected an integer >= {low}, got {value!r}", param=name)
    for name, value in (("model_alias", model_alias), ("api_key", api_key)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ParameterError(f"{name}: expected a non-empty string, got {value!r}", param=name)
    served = Served(e, model_alias=model_alias, max_queue=QUEUE_PER_SLOT * e.parallel if max_queue is None
                    else max_queue, max_tokens=max_tokens, on_load_error=on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            async with asyncio.TaskGroup() as tg:
                loading = tg.create_task(served.load(), name="flexio-load")
                try:
                    yield
                finally:
                    loading.cancel()  # shutting down while loading: open() closes what it had opened
        finally:
            await served.engine.close()

    app = FastAPI(title="flexio", version=_flexio_version(), lifespan=lifespan, default_response_class=Json,
                  responses=ERROR_RESPONSES, redoc_url=None,
                  description="OpenAI- and Ollama-compatible API over a flexio engine.")
    app.state.served = served
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return validation_error(err).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        if err.status_code == 404:
            return ApiError(404, f"no route {request.method} {request.url.path}", code="unknown_url").response()
        code = "method_not_allowed" if err.status_code == 405 else None
        return ApiError(err.status_code, str(err.detail), code=code, headers=err.headers).response()

    @app.exception_handler(ParameterError)
    async def _parameter(request: Request, err: ParameterError):
        return bad_parameter(err, {}).response()

    @app.exception_handler(FlexioError)
    async def _flexio(request: Request, err: FlexioError):
        return engine_failed(err).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):  # Starlette re-raises it after: uvicorn logs the traceback
        return internal(err).response()

    async def answer(request: Request, ticket: Ticket, job: Job, stream: bool, events, body: Callable[[str], dict],
                     media_type: str = "text/event-stream") -> Response:
        """Stream `events` (the ticket goes with the stream), or wait for the whole text and answer body(text)."""
        if stream:
            return Stream(events, media_type, ticket)
        try:
            text = await unless_disconnected(request.receive, collect(served.engine, job, served.halted))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        finally:
            ticket.release()
        return Json(body(text))

    # --- OpenAI ---

    @app.post("/v1/completions", response_model=Completion, responses=SSE, tags=["OpenAI"])
    async def completions(req: CompletionRequest, request: Request) -> Response:
        """Continue a prompt (OpenAI's completions)."""
        served.check_model(req.model)
        e = served.ready()
        names = {"max_tokens": "max_tokens", "prompt": "prompt"}
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        params = sampling(req, OPENAI_DEFAULTS, names)
        ticket = served.admit()
        try:
            _check_text(prompt, "prompt")
            job = served.job(e.prompt_tokens(prompt), req.max_tokens, params, req.stop, req.ignore_eos, names)
        except BaseException:
            ticket.release()
            raise
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.model_id}
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await answer(request, ticket, job, bool(req.stream), completion_events(e, job, head, usage, served.halted),
                            lambda text: Completion(**head, choices=[CompletionChoice(
                                text=text, finish_reason=job.finish_reason)], usage=job.usage()).model_dump())

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=SSE, tags=["OpenAI"])
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        """Answer a conversation through the model's chat template (OpenAI's chat completions)."""
        served.check_model(req.model)
        e = served.ready()
        limit = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        names = {"max_tokens": limit, "prompt": "messages"}
        params = sampling(req, OPENAI_DEFAULTS, names)
        messages = [{"role": _role(m.role), "content": _content(m)} for m in req.messages]
        ticket = served.admit()
        try:
            requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            job = served.job(chat_ids(e, messages), requested, params, req.stop, req.ignore_eos, names)
        except BaseException:
            ticket.release()
            raise
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": served.model_id}
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await answer(request, ticket, job, bool(req.stream), chat_events(e, job, head, usage, served.halted),
                            lambda text: ChatCompletion(**{**head, "object": "chat.completion"}, choices=[ChatChoice(
                                message=AssistantMessage(content=text), finish_reason=job.finish_reason)],
                                usage=job.usage()).model_dump())

    def model_card() -> ModelCard:
        return ModelCard(id=served.model_id, created=served.created)

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"])
    async def models() -> ModelList:
        """The served model (its id: --model-alias, else the GGUF file's name)."""
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model}", response_model=ModelCard, tags=["OpenAI"])
    async def model(model: str) -> ModelCard:
        served.check_model(model)
        return model_card()

    # --- server ---

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["server"])
    async def health() -> Response:
        """200 {"status": "ok"} once the model is loaded; 503 while it loads (or if it failed)."""
        if served.status == "ok":
            return Json({"status": "ok"})
        if served.status == "loading":
            return Json({"status": "loading"}, status_code=503)
        return Json({"status": "error", "message": str(served.error)}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["server"],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        """Prometheus metrics: requests running and queued, tokens, decode rate, bytes streamed, memory."""
        return PlainTextResponse(metrics_text(served), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", response_model=TokenizeResponse, tags=["server"])
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        """Text -> token ids (llama-server's /tokenize)."""
        e = served.ready()
        _check_text(req.content, "content")
        return TokenizeResponse(tokens=e.tokenizer.encode(req.content, add_bos=None if req.add_special else False,
                                                          parse_special=req.parse_special))

    @app.post("/detokenize", response_model=DetokenizeResponse, tags=["server"])
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids -> text, control tokens written out (llama-server's /detokenize)."""
        e = served.ready()
        n = e.tokenizer.vocab_size
        bad = next((i for i, t in enumerate(req.tokens) if t >= n), None)
        if bad is not None:
            raise ApiError(400, f"tokens[{bad}]: expected an id in [0, {n}), got {req.tokens[bad]}",
                           param=f"tokens[{bad}]")
        return DetokenizeResponse(content=e.tokenizer.decode(req.tokens, special=True))

    # --- Ollama ---

    ollama_names = {"max_tokens": "options.num_predict", "temperature": "options.temperature",
                    "top_p": "options.top_p", "top_k": "options.top_k", "seed": "options.seed"}

    def ollama_job(e: Engine, ids: list[int], options: OllamaOptions | None) -> Job:
        o = options or OllamaOptions()
        n = o.num_predict if o.num_predict is not None and o.num_predict >= 0 else None
        return served.job(ids, n, sampling(o, OLLAMA_DEFAULTS, ollama_names), o.stop, False, ollama_names)

    @app.post("/api/generate", response_model=OllamaGenerateResponse, responses=NDJSON, tags=["Ollama"])
    async def ollama_generate(req: OllamaGenerateRequest, request: Request) -> Response:
        """Continue a prompt, in the model's chat template unless raw (Ollama's /api/generate)."""
        served.check_model(req.model)
        e = served.ready()
        if not req.prompt:  # Ollama's way to load a model: answer that it is
            return Json({"model": served.model_id, "created_at": _now_rfc3339(), "response": "", "done": True,
                         "done_reason": "load"})
        names = {**ollama_names, "prompt": "prompt"}
        ticket = served.admit()
        try:
            _check_text(req.prompt, "prompt")
            ids = None
            if not req.raw and e.tokenizer.vocab.chat_template:
                _check_text(req.system or "", "system")
                msgs = ([{"role": "system", "content": req.system}] if req.system else []) + [
                    {"role": "user", "content": req.prompt}]
                ids = chat_ids(e, msgs, param="prompt")
            job = ollama_job(e, ids if ids is not None else e.prompt_tokens(req.prompt), req.options)
        except ParameterError as err:
            ticket.release()
            raise bad_parameter(err, names) from None
        except BaseException:
            ticket.release()
            raise
        return await answer(request, ticket, job, req.stream, ollama_lines(e, job, served.model_id, False, served.halted),
                            lambda text: {"model": served.model_id, "created_at": _now_rfc3339(), "response": text,
                                          **ollama_done(job)}, media_type="application/x-ndjson")

    @app.post("/api/chat", response_model=OllamaChatResponse, responses=NDJSON, tags=["Ollama"])
    async def ollama_chat(req: OllamaChatRequest, request: Request) -> Response:
        """Answer a conversation through the model's chat template (Ollama's /api/chat)."""
        served.check_model(req.model)
        e = served.ready()
        ticket = served.admit()
        try:
            msgs = [{"role": _role(m.role), "content": m.content} for m in req.messages]
            job = ollama_job(e, chat_ids(e, msgs), req.options)
        except ParameterError as err:
            ticket.release()
            raise bad_parameter(err, {**ollama_names, "prompt": "messages"}) from None
        except BaseException:
            ticket.release()
            raise
        return await answer(request, ticket, job, req.stream, ollama_lines(e, job, served.model_id, True, served.halted),
                            lambda text: {"model": served.model_id, "created_at": _now_rfc3339(),
                                          "message": {"role": "assistant", "content": text}, **ollama_done(job)},
                            media_type="application/x-ndjson")

    @app.get("/api/tags", response_model=OllamaTags, tags=["Ollama"])
    async def ollama_tags() -> OllamaTags:
        """The served model (Ollama's model list)."""
        e = served.ready()
        st = os.stat(e.gguf.path)
        types = [t.ggml_type for t in e.gguf.tensors if len(t.shape) > 1]
        quant = type_name(max(set(types), key=types.count)) if types else "unknown"
        return OllamaTags(models=[OllamaModel(
            name=served.model_id, model=served.model_id, size=st.st_size,
            modified_at=datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(),
            details=OllamaModelDetails(family=e.config.arch, quantization_level=quant))])

    def openapi() -> dict:
        """FastAPI's schema, less the 422 answers it documents by default: this API answers 400."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
