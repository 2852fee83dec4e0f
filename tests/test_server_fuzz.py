"""The API fuzzed from its own OpenAPI schema (schemathesis + hypothesis): whatever a client sends, valid or not,
the server answers in time, never with a 5xx, with a status, content type and body its schema documents
(streamed chunks too: SSE events by the schema, NDJSON lines by the pydantic models).

The server generates at most 2 tokens per request (create_app's max_tokens) in a 128-token context, so an
example costs a prompt pass and two tokens at most. FLEXIO_SLOW=1 runs many more examples, and
schemathesis's coverage phase.
"""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)
from server_util import ServerThread

from flexio.api_models import ErrorResponse, OllamaChatResponse, OllamaGenerateResponse
from flexio.engine import Engine
from flexio.server import create_app

SLOW = bool(os.environ.get("FLEXIO_SLOW"))
EXAMPLES = 150 if SLOW else 12  # per operation (11 operations)
TIMEOUT_S = 60  # one request; a hang fails the test


@pytest.fixture(scope="module")
def fuzz_server(smollm2_path):
    s = ServerThread(create_app(Engine(smollm2_path, threads=2, n_ctx=128), max_tokens=2)).start()
    yield s
    s.stop()


class SchemaOnly:
    """The app's schema does not depend on its engine: an app over this one serves it without a model."""

    model_ref, parallel = "model.gguf", 1

    async def open(self): ...

    async def close(self): ...


# Built at import (schemathesis parametrizes at collection); the tests send each case to the real server.
# The coverage phase (boundary values of every field, ~150 cases per operation) runs with FLEXIO_SLOW=1.
schema = schemathesis.openapi.from_dict(create_app(SchemaOnly()).openapi(), config=SchemathesisConfig.from_dict(
    {"phases": {"coverage": {"enabled": SLOW}}}))


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not SLOW,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_no_request_gets_a_5xx_or_an_undocumented_answer(case, fuzz_server):
    r = case.call_and_validate(base_url=fuzz_server.url, timeout=TIMEOUT_S, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance])
    if r.headers.get("content-type", [""])[0].startswith("application/x-ndjson"):  # schemathesis reads no NDJSON
        model = OllamaChatResponse if case.path == "/api/chat" else OllamaGenerateResponse
        lines = [json.loads(line) for line in r.text.splitlines()]
        for line in lines:
            (ErrorResponse if "error" in line else model).model_validate(line)
        assert lines[-1].get("done") or "error" in lines[-1], lines[-1]


def test_the_fuzzer_left_the_server_idle(fuzz_server):
    served = fuzz_server.app.state.served
    assert served.admitted == 0 and fuzz_server.engine.metrics().requests_running == 0
    assert fuzz_server.engine.metrics().requests_total > 0  # some requests were valid enough to generate
