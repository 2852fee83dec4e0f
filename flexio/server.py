"""HTTP requests -> engine generations: the OpenAI- and Ollama-compatible API, as a FastAPI (ASGI) app.

`create_app(engine)` returns the app; `python -m flexio serve` (serve_cmd.py) runs it under uvicorn.
The request and response bodies are api_models.py's, the error answers api_errors.py's, and a
generation becomes SSE events, NDJSON lines or one body in api_answers.py.

Lifecycle
  The ASGI lifespan starts loading the engine in a task and returns at once, so the server
  listens while the model loads: /health answers 503 {"status": "loading"}, then 200 {"status":
  "ok"}; generation requests get 503 until then. At shutdown (serve_cmd's uvicorn server calls
  Served.drain) new requests get 503 and every generation ends at its next token; uvicorn waits
  for the connections (cancelling what is left after its graceful timeout), then the lifespan
  closes the engine (arena, io_uring ring, compute thread).

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
  over `max_body` bytes, 503 while loading, with a full queue, while shutting down or when the
  engine fails (a FlexioError), 500 only for a bug (uvicorn logs its traceback). An error after a
  stream has begun ends it with one error event (SSE) or line (NDJSON).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response

from .api_answers import (OLLAMA_DEFAULTS, OPENAI_DEFAULTS, ClientGone, Job, Stream, chat_events, chat_ids, chat_role,
                          collect, completion_events, message_text, now_rfc3339, ollama_done, ollama_lines, sampling,
                          unless_disconnected)
from .api_errors import (ApiError, Json, bad_parameter, busy, check_text, engine_failed, internal, shutting_down,
                         validation_error)
from .api_models import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatRequest, Completion,
                         CompletionChoice, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ErrorResponse,
                         Health, ModelCard, ModelList, OllamaChatRequest, OllamaChatResponse, OllamaGenerateRequest,
                         OllamaGenerateResponse, OllamaModel, OllamaModelDetails, OllamaOptions, OllamaTags,
                         TokenizeRequest, TokenizeResponse)
from .engine import Engine, EngineMetrics
from .errors import FlexioError, ParameterError
from .fetch import MODELS
from .gguf import type_name
from .sampling import SamplingParams

log = logging.getLogger("flexio.server")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: ~250k tokens of text, more than any context flexio runs
QUEUE_PER_SLOT = 4  # default max_queue: this many waiting requests per sequence slot
OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers, orchestrators)
FORM_TYPES = frozenset({b"", b"application/x-www-form-urlencoded", b"text/plain"})  # bodies read as JSON all the same


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


class Ticket:
    """One admitted generation request; release() (idempotent) makes room for another."""

    def __init__(self, served: Served):
        self.served, self.held = served, True
        served.admitted += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.served.admitted -= 1


# --- the served model --------------------------------------------------------------------------------


def model_file_name(ref: str) -> str:
    """A model reference (path or known name) -> the GGUF file's name, without fetching anything."""
    if ref in MODELS and not os.path.exists(ref):
        return os.path.basename(MODELS[ref].member)
    return os.path.basename(ref)


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


def sse(chunk: type[BaseModel]) -> dict:
    """A streamed answer in the schema. Before Open API 3.2 an event stream's `schema` describes one event:
    here its data is a JSON chunk (or an error), or the final [DONE]."""
    data = {"anyOf": [{"const": "[DONE]"}, {
        "type": "string", "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (chunk, ErrorResponse)]}}]}
    return {200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": data}}}},
        "description": "JSON, or with stream=true server-sent events, each a chunk, the last one data: [DONE]"}}


STREAM_CHUNKS = (Completion, ChatCompletionChunk, ErrorResponse)  # models only streams use: the schema needs them
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
        """Stream `events` (the ticket goes with the stream), or wait for the whole text and answer body(text).

        Every check is done and the ticket taken before this: from here the request holds its place until
        its answer ends or the client leaves.
        """
        if stream:
            return Stream(events, media_type, ticket.release)
        try:
            text = await unless_disconnected(request.receive, collect(served.engine, job, served.halted))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        finally:
            ticket.release()
        return Json(body(text))

    # --- OpenAI ---

    @app.post("/v1/completions", response_model=Completion, responses=sse(Completion), tags=["OpenAI"])
    async def completions(req: CompletionRequest, request: Request) -> Response:
        """Continue a prompt (OpenAI's completions)."""
        served.check_model(req.model)
        e = served.ready()
        names = {"max_tokens": "max_tokens", "prompt": "prompt"}
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        params = sampling(req, OPENAI_DEFAULTS, names)
        check_text(prompt, "prompt")
        job = served.job(e.prompt_tokens(prompt), req.max_tokens, params, req.stop, req.ignore_eos, names)
        ticket = served.admit()
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.model_id}
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await answer(request, ticket, job, bool(req.stream), completion_events(e, job, head, usage, served.halted),
                            lambda text: Completion(**head, choices=[CompletionChoice(
                                text=text, finish_reason=job.finish_reason)], usage=job.usage()).model_dump())

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=sse(ChatCompletionChunk),
              tags=["OpenAI"])
    async def chat_completions(req: ChatRequest, request: Request) -> Response:
        """Answer a conversation through the model's chat template (OpenAI's chat completions)."""
        served.check_model(req.model)
        e = served.ready()
        limit = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        names = {"max_tokens": limit, "prompt": "messages"}
        params = sampling(req, OPENAI_DEFAULTS, names)
        messages = [{"role": chat_role(m.role), "content": message_text(m)} for m in req.messages]
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = served.job(chat_ids(e, messages), requested, params, req.stop, req.ignore_eos, names)
        ticket = served.admit()
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
            e = served.engine
            if e is not None and not e.healthy:  # the weight stream failed: every generation would fail
                return Json({"status": "error", "message": str(e.stream.error)}, status_code=503)
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
        check_text(req.content, "content")
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

    def ollama_job(e: Engine, ids: list[int], options: OllamaOptions | None, prompt: str) -> Job:
        o = options or OllamaOptions()
        n = o.num_predict if o.num_predict is not None and o.num_predict >= 0 else None  # < 0: fill the context
        names = {**ollama_names, "prompt": prompt}
        return served.job(ids, n, sampling(o, OLLAMA_DEFAULTS, names), o.stop, False, names)

    @app.post("/api/generate", response_model=OllamaGenerateResponse, responses=NDJSON, tags=["Ollama"])
    async def ollama_generate(req: OllamaGenerateRequest, request: Request) -> Response:
        """Continue a prompt, in the model's chat template unless raw (Ollama's /api/generate)."""
        served.check_model(req.model)
        e = served.ready()
        if not req.prompt:  # Ollama's way to load a model: answer that it is
            return Json({"model": served.model_id, "created_at": now_rfc3339(), "response": "", "done": True,
                         "done_reason": "load"})
        check_text(req.prompt, "prompt")
        if req.raw or not e.tokenizer.vocab.chat_template:
            ids = e.prompt_tokens(req.prompt)
        else:
            check_text(req.system or "", "system")
            msgs = ([{"role": "system", "content": req.system}] if req.system else []) + [
                {"role": "user", "content": req.prompt}]
            ids = chat_ids(e, msgs, param="prompt")
        job = ollama_job(e, ids, req.options, prompt="prompt")
        ticket = served.admit()
        return await answer(request, ticket, job, req.stream, ollama_lines(e, job, served.model_id, False, served.halted),
                            lambda text: {"model": served.model_id, "created_at": now_rfc3339(), "response": text,
                                          **ollama_done(job)}, media_type="application/x-ndjson")

    @app.post("/api/chat", response_model=OllamaChatResponse, responses=NDJSON, tags=["Ollama"])
    async def ollama_chat(req: OllamaChatRequest, request: Request) -> Response:
        """Answer a conversation through the model's chat template (Ollama's /api/chat)."""
        served.check_model(req.model)
        e = served.ready()
        msgs = [{"role": chat_role(m.role), "content": m.content} for m in req.messages]
        job = ollama_job(e, chat_ids(e, msgs), req.options, prompt="messages")
        ticket = served.admit()
        return await answer(request, ticket, job, req.stream, ollama_lines(e, job, served.model_id, True, served.halted),
                            lambda text: {"model": served.model_id, "created_at": now_rfc3339(),
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
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            _, defs = models_json_schema([(m, "serialization") for m in STREAM_CHUNKS],
                                         ref_template="#/components/schemas/{model}")
            for name, definition in defs.get("$defs", {}).items():
                components.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
