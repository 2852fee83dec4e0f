"""Failures -> OpenAI-style error answers: {"error": {"message", "type", "param", "code"}}, param naming the field.

ApiError carries the status; the constructors below are the server's kinds of failure. Pydantic's
validation errors become 400s naming the field as a client writes it ("messages[0].content"),
where FastAPI would answer 422 with its own shape.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response

from .errors import FlexioError, ParameterError


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


def dumps(obj: Any) -> bytes:
    # "replace": a lone surrogate (JSON can carry "\udc80") must not turn an error answer into a 500
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8", "replace")


class Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


def bad_parameter(err: ParameterError, names: dict[str, str]) -> ApiError:
    """An engine ParameterError -> a 400 naming the request's field (names: engine name -> field name)."""
    return ApiError(400, str(err), param=names.get(err.param, err.param))


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


def check_text(text: str, param: str) -> None:
    """JSON can carry lone surrogates ("\\ud800"): no tokenizer takes them."""
    bad = next((i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        raise ApiError(400, f"{param}: expected UTF-8 text, got a lone surrogate {text[bad]!r} at character {bad}",
                       param=param)
