"""A request's generation -> its answer: text pieces cut at stop strings, as OpenAI's server-sent events,
Ollama's NDJSON lines, or one body.

`texts()` is the one loop over the engine's tokens; the formatters around it add each API's shape.
Whatever ends a generation early (a stop string, the client gone, the server shutting down) closes
the engine's token iterator, which ends the generation and frees its engine slot. An error after
a stream has begun becomes its last event (SSE) or line (NDJSON).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from .api_errors import ApiError, bad_parameter, check_text, dumps, engine_failed, internal, shutting_down
from .api_models import ChatMessage, OllamaOptions, Sampled, Usage
from .engine import Engine
from .errors import FlexioError, GGUFError, ParameterError
from .sampling import SamplingParams
from .stops import StopBuffer
from .tokenizer import StreamDecoder

log = logging.getLogger("flexio.server")

# Sampling when a request leaves a field out: each API's own documented defaults.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None}
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": None}


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


class Stream(StreamingResponse):
    """A generation streamed to the client.

    Starlette stops iterating when the client disconnects (or the task is cancelled at shutdown);
    closing the body iterator here ends the generation at once, wherever it was suspended; then
    on_close() (the request leaves the queue count).
    """

    def __init__(self, chunks: AsyncIterator[bytes], media_type: str, on_close: Callable[[], None]):
        super().__init__(chunks, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (OSError, ClientDisconnect):
            pass  # the client is gone: nobody to tell
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.on_close()


def _stream_error(err: Exception) -> dict:
    if isinstance(err, ApiError):
        return err.body()
    if isinstance(err, FlexioError):
        return engine_failed(err).body()
    log.error("a streamed generation failed", exc_info=err)
    return internal(err).body()


# --- the prompt and the sampling of a request -------------------------------------------------------------


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
    """Messages -> prompt token ids through the model's chat template (Engine.chat_tokens)."""
    for i, m in enumerate(messages):  # param "prompt": Ollama's /api/generate put the prompt in messages
        check_text(m["content"], f"{param}[{i}].content" if param == "messages" else param)
    try:
        return e.chat_tokens(messages)
    except GGUFError as err:
        raise ApiError(400, f"{param}: {err}: use a completion endpoint instead", param=param) from None
    except ParameterError as err:
        raise ApiError(400, f"{param}: {err}", param=param) from None


def message_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "".join(part.text for part in m.content)


def chat_role(role: str) -> str:
    return "system" if role == "developer" else role  # OpenAI's newer name for the system role


# --- answers: OpenAI ------------------------------------------------------------------------------------


def _sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


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


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


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
            yield dumps({"model": model, "created_at": now_rfc3339(), **_ollama_piece(chat, text), "done": False}) + b"\n"
        yield dumps({"model": model, "created_at": now_rfc3339(), **_ollama_piece(chat, ""), **ollama_done(job)}) + b"\n"
    except Exception as err:
        yield dumps(_stream_error(err)) + b"\n"
