"""`flexio serve` over real HTTP: the openai package, raw SSE bytes, Ollama NDJSON, errors, queue, disconnects,
shutdown. One server (SmolLM2, 2 slots of 512 tokens) serves the module; tests that need no model use a stub
engine in Starlette's TestClient. Generations are kept to a few tokens: the suite runs on 2 shared cores."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_util import ServerThread

from flexio.arena import locked_bytes
from flexio.engine import Engine, EngineMetrics
from flexio.errors import GGUFError
from flexio.serve_cmd import GRACEFUL_SHUTDOWN_S
from flexio.server import create_app

KEY = "test-key"
PROMPT = "The capital of France is"
GREEDY6 = " Paris.\n\nThe United"  # flexio's (and llama.cpp's) greedy 6 tokens, as tests/test_cli.py
SUM = "What is 2+2? Answer with a number only."  # greedy chat answer "2 + 2 = 4", then end-of-text (7 tokens)


@pytest.fixture(scope="module")
def srv(smollm2_path):
    engine = Engine(smollm2_path, threads=2, n_ctx=1024, parallel=2)
    s = ServerThread(create_app(engine, api_key=KEY, max_queue=2)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        yield c


def model_id(srv) -> str:
    return srv.app.state.served.model_id


def wait_until(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- OpenAI completions and chat, through the openai package ----------------------------------------------


def test_greedy_completion_is_the_engines(client, srv):
    r = client.completions.create(model=model_id(srv), prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.choices[0].text == GREEDY6
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 6, 11)
    assert r.object == "text_completion" and r.model == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_streamed_completion_gives_the_same_text_and_usage_last(client):
    chunks = list(client.completions.create(model="smollm2", prompt=[PROMPT], max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == GREEDY6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_a_stop_string_over_two_tokens_ends_the_stream_unsent(client):
    # "\n\n" is two "\n" tokens: the first is held back until the second shows it is the stop string
    chunks = list(client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, temperature=0,
                                            stop=["\n\n"], stream=True))
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == " Paris." and not any("\n" in p for p in pieces)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_stop_string_cuts_a_plain_answer(client):
    r = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, temperature=0, stop="s.")
    assert r.choices[0].text == " Pari" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 2  # " Paris" and "." made the stop string


def test_chat_ends_at_end_of_text_with_stop(client):
    kw = dict(model="smollm2", messages=[{"role": "user", "content": SUM}], max_tokens=12, temperature=0)
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "2 + 2 = 4"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 43 and r.usage.completion_tokens == 7  # the end-of-text token is not counted
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "2 + 2 = 4"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_with_text_parts_and_max_completion_tokens_ends_by_length(client):
    r = client.chat.completions.create(
        model="smollm2", max_completion_tokens=2, temperature=0,
        messages=[{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_models_lists_the_served_model(client, srv):
    assert [m.id for m in client.models.list().data] == [model_id(srv)]
    assert client.models.retrieve("smollm2").id == model_id(srv)


# --- errors through the openai package -------------------------------------------------------------------


def test_n_other_than_1_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=1, n=2)
    assert e.value.body["param"] == "n" and "only 1" in e.value.body["message"]


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_a_wrong_api_key_is_a_401(srv):
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{srv.url}/v1/models").status_code == 401  # no key at all
    assert httpx.get(f"{srv.url}/health").status_code == 200  # /health stays open


def test_prompt_and_max_tokens_beyond_the_context_is_a_400_naming_max_tokens(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=600)  # a slot holds 512 tokens
    assert e.value.body["param"] == "max_tokens" and "expected max_tokens <= 507" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=600)
    assert e.value.body["param"] == "max_completion_tokens"


def post(http, path: str, body: dict) -> httpx.Response:
    """POST JSON as json.dumps writes it: ASCII, so a lone surrogate goes as its escape (httpx's json= cannot)."""
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("body,param", [
    ({"prompt": PROMPT, "max_tokens": "5"}, "max_tokens"),  # strict: a string is not a number
    ({"prompt": PROMPT, "max_tokens": 2.0}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2]}, "prompt"),
    ({"prompt": [1]}, "prompt[0]"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": 1}, "prompt"),
])
def test_bad_fields_are_400s_naming_them(http, body, param):
    r = post(http, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"].startswith(param)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}], "max_tokens": 1}, None),  # content may be absent (an empty message)
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "\udcff"}]}, "messages[0].content"),
])
def test_bad_messages_are_400s_naming_them(http, body, param):
    r = post(http, "/v1/chat/completions", body)
    if param is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_unknown_routes_and_methods_are_json_errors(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


# --- raw HTTP: SSE bytes, curl's form content type, the body limit -------------------------------------------


def test_sse_bytes_are_data_lines_ending_with_done(srv):
    r = httpx.post(f"{srv.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
                   json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.content.endswith(b"\n\ndata: [DONE]\n\n")
    events = r.content.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]) == " Paris."


def test_curl_d_form_content_type_is_read_as_json(srv):
    for content_type in (None, "application/x-www-form-urlencoded"):  # none, and what `curl -d` sends
        headers = {"Authorization": f"Bearer {KEY}"} | ({"Content-Type": content_type} if content_type else {})
        r = httpx.post(f"{srv.url}/tokenize", headers=headers, content=json.dumps({"content": PROMPT}))
        assert r.status_code == 200 and r.json()["tokens"] == [504, 3575, 282, 4649, 314], content_type


def test_a_body_over_1_mib_is_a_413(http):
    r = http.post("/v1/completions", json={"prompt": "x" * (1 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# --- llama-server's tokenizer endpoints, Prometheus metrics --------------------------------------------------


def test_tokenize_detokenize_round_trip(http):
    text = "Hello <|im_start|> wörld 🙂"
    toks = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert 1 in toks  # <|im_start|> is one control token (parse_special, as llama-server)
    assert http.post("/detokenize", json={"tokens": toks}).json() == {"content": text}
    plain = http.post("/tokenize", json={"content": text, "parse_special": False}).json()["tokens"]
    assert 1 not in plain and http.post("/detokenize", json={"tokens": plain}).json()["content"] == text
    r = http.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[0]"


def metrics(http) -> dict[str, float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_parse_and_counters_move(http, srv):
    before = metrics(http)
    for name in ("flexio_requests_running", "flexio_requests_waiting", "flexio_prompt_tokens_total",
                 "flexio_generated_tokens_total", "flexio_decode_tokens_per_second", "flexio_streamed_bytes_per_pass",
                 "flexio_batch_size_mean", "flexio_kv_cache_bytes", "flexio_weights_bytes",
                 "flexio_server_requests_admitted", "flexio_server_requests_rejected_total"):
        assert name in before, name
    assert before["flexio_model_loaded"] == 1 and before["flexio_parallel_sequences"] == 2
    assert before["flexio_kv_cache_bytes"] > 0 and before["flexio_weights_bytes"] > 50e6
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200
    after = metrics(http)
    assert after["flexio_generated_tokens_total"] == before["flexio_generated_tokens_total"] + 2
    assert after["flexio_prompt_tokens_total"] == before["flexio_prompt_tokens_total"] + 5
    assert after["flexio_requests_total"] == before["flexio_requests_total"] + 1


# --- Ollama -----------------------------------------------------------------------------------------------------


def ndjson(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def test_ollama_generate_streams_ndjson_and_answers_whole(http):
    lines = ndjson(http.post("/api/generate", json={"model": "smollm2:latest", "prompt": SUM, "options": {
        "num_predict": 12, "temperature": 0}}))
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    assert "".join(x["response"] for x in lines) == "2 + 2 = 4"  # in the chat template, as Ollama
    last = lines[-1]
    assert last["done_reason"] == "stop" and last["eval_count"] == 7 and last["prompt_eval_count"] == 43
    assert last["total_duration"] >= last["eval_duration"] > 0
    r = http.post("/api/generate", json={"prompt": PROMPT, "raw": True, "stream": False,
                                         "options": {"num_predict": 2, "temperature": 0}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    one = r.json()
    assert one["response"] == " Paris." and one["done"] and one["done_reason"] == "length"
    assert http.post("/api/generate", json={"model": "smollm2"}).json()["done_reason"] == "load"


def test_ollama_chat_streams_ndjson_and_answers_whole(http):
    body = {"messages": [{"role": "user", "content": SUM}], "options": {"num_predict": 3, "temperature": 0}}
    lines = ndjson(http.post("/api/chat", json=body))
    assert "".join(x["message"]["content"] for x in lines) == "2 + "
    assert lines[-1]["done"] and lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 3
    one = http.post("/api/chat", json={**body, "stream": False}).json()
    assert one["message"] == {"role": "assistant", "content": "2 + "} and one["done"]
    r = http.post("/api/chat", json={**body, "options": {"top_p": 2}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "options.top_p"


def test_ollama_tags_lists_the_model(http, srv):
    (m,) = http.get("/api/tags").json()["models"]
    assert m["name"] == model_id(srv) and m["details"]["quantization_level"] == "Q4_1" and m["size"] > 50e6


# --- concurrency: disconnects, the bounded queue ----------------------------------------------------------------


def test_a_client_leaving_mid_stream_frees_its_slot(srv):
    e = srv.engine
    assert wait_until(lambda: e.metrics().requests_running == 0)
    done0, generated0 = e.metrics().requests_total, e.metrics().generated_tokens_total
    with httpx.stream("POST", f"{srv.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
                      json={"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(ln for ln in lines if ln.startswith("data: "))  # the generation runs
        assert e.metrics().requests_running == 1
    # the connection is closed: the server notices, closes the generation, the engine frees the slot
    assert wait_until(lambda: e.metrics().requests_running == 0 and e.metrics().requests_total == done0 + 1, 60)
    assert srv.app.state.served.admitted == 0
    assert e.metrics().generated_tokens_total - generated0 < 400


def test_a_client_leaving_before_a_plain_answer_frees_its_slot(srv):
    e = srv.engine
    done0, generated0 = e.metrics().requests_total, e.metrics().generated_tokens_total
    body = json.dumps({"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert wait_until(lambda: e.metrics().requests_running == 1, 60)  # generating; then the client hangs up
    assert wait_until(lambda: e.metrics().requests_running == 0 and e.metrics().requests_total == done0 + 1, 60)
    assert srv.app.state.served.admitted == 0
    assert e.metrics().generated_tokens_total - generated0 < 400


def test_more_requests_than_slots_and_queue_get_503_never_500(srv):
    """parallel 2 + max_queue 2: with 4 streams admitted (one generating, three waiting for the engine), every
    further request is refused at once with 503 and Retry-After; closing the streams frees everything."""
    served = srv.app.state.served
    rejected0 = served.admitted, served.rejected
    assert rejected0[0] == 0
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        with contextlib.ExitStack() as streams:
            for _ in range(4):  # each returns at its response headers, before its first token
                r = streams.enter_context(c.stream("POST", "/v1/completions", json=body))
                assert r.status_code == 200
            assert served.admitted == 4
            for path, extra in (("/v1/completions", {}), ("/v1/chat/completions", {"messages": [
                    {"role": "user", "content": "hi"}]}), ("/api/generate", {}), ("/api/chat", {"messages": [
                    {"role": "user", "content": "hi"}]})):
                r = c.post(path, json={"prompt": PROMPT, "max_tokens": 1, **extra})
                assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy", r.text
                assert r.headers["retry-after"] == "1"
    assert served.rejected == rejected0[1] + 4
    assert wait_until(lambda: served.admitted == 0 and srv.engine.metrics().requests_running == 0
                      and srv.engine.metrics().requests_waiting == 0)


# --- lifecycle: loading, failing to load, shutting down ----------------------------------------------------------


class StubEngine:
    """Enough of an Engine for the app's lifecycle: open() waits for a gate (and may fail)."""

    model_ref, parallel, n_ctx, n_ctx_seq = "stub.gguf", 1, 8, 8
    mode = types.SimpleNamespace(name="memory")
    healthy = True

    def __init__(self, gate: threading.Event, fail: Exception | None = None):
        self.gate, self.fail, self.closed = gate, fail, False

    async def open(self):
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        if self.fail is not None:
            raise self.fail

    async def close(self):
        self.closed = True

    def metrics(self) -> EngineMetrics:
        return EngineMetrics(*([1] * len(EngineMetrics.__dataclass_fields__)))


def test_health_is_503_while_loading_then_200():
    from starlette.testclient import TestClient

    gate = threading.Event()
    stub = StubEngine(gate)
    with TestClient(create_app(stub)) as c:  # the lifespan returns at once: the server listens while loading
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        assert c.get("/v1/models").json()["data"][0]["id"] == "stub.gguf"
        gate.set()
        assert wait_until(lambda: c.get("/health").status_code == 200, 10)
        assert c.get("/health").json() == {"status": "ok"}
        assert "flexio_requests_total 1" in c.get("/metrics").text
    assert stub.closed


def test_a_model_that_fails_to_load_is_reported():
    from starlette.testclient import TestClient

    gate, failures = threading.Event(), []
    gate.set()
    app = create_app(StubEngine(gate, GGUFError("stub.gguf: not a GGUF file")), on_load_error=failures.append)
    with TestClient(app) as c:
        assert wait_until(lambda: failures, 10)
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "error", "message": "stub.gguf: not a GGUF file"}
        assert c.post("/v1/completions", json={"prompt": "x"}).json()["error"]["code"] == "model_error"


def test_auth_and_body_limit_come_before_routing():
    from starlette.testclient import TestClient

    gate = threading.Event()
    with TestClient(create_app(StubEngine(gate), api_key="k", max_body=100)) as c:
        assert c.get("/nowhere").status_code == 401
        assert c.get("/health").status_code == 503  # open, and loading
        auth = {"Authorization": "Bearer k"}
        assert c.get("/nowhere", headers=auth).status_code == 404
        r = c.post("/v1/completions", headers=auth, content=b"{" + b" " * 200 + b"}")
        assert r.status_code == 413
        gate.set()


def _flexio_threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.name.startswith("flexio")}


def test_shutdown_mid_stream_ends_the_stream_closes_the_engine_and_leaks_nothing(smollm2_path):
    threads0, locked0 = _flexio_threads(), locked_bytes()
    s = ServerThread(create_app(Engine(smollm2_path, threads=2, n_ctx=256))).start()
    got: list[str] = []

    def stream():
        with httpx.stream("POST", f"{s.url}/v1/completions", timeout=300, json={
                "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            got.extend(line for line in r.iter_lines() if line)

    reader = threading.Thread(target=stream)
    reader.start()
    assert wait_until(lambda: got, 120)
    t0 = time.monotonic()
    s.stop(timeout=60)  # as Ctrl-C: the generation ends at its next token, then the engine closes
    reader.join(30)
    assert not reader.is_alive() and time.monotonic() - t0 < GRACEFUL_SHUTDOWN_S, time.monotonic() - t0
    assert got[-1] == "data: [DONE]" and json.loads(got[-2][6:])["error"]["code"] == "shutting_down", got[-3:]
    assert s.engine.stream is None and s.engine.arena is None  # closed
    assert _flexio_threads() == threads0
    assert locked_bytes() == locked0


# --- the command ---------------------------------------------------------------------------------------------


def test_serve_help_says_what_n_ctx_means():
    r = subprocess.run([sys.executable, "-m", "flexio", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "n_ctx // parallel" in " ".join(r.stdout.split())


@pytest.mark.parametrize("args,code,message", [
    (("--parallel", "0"), 2, "parallel: expected 1..64"),
    (("--threads", "999"), 2, "threads: expected 0 (all"),
    (("--max-queue", "-1"), 2, "max_queue: expected an integer >= 0"),
    (("--port", "70000"), 2, "port: expected 0..65535"),
])
def test_serve_refuses_bad_options_before_listening(smollm2_path, capsys, args, code, message):
    from flexio.cli import main

    assert main(["serve", "--model", smollm2_path, *args]) == code
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("flexio serve: error: ")


def test_serve_refuses_a_port_in_use(smollm2_path, capsys):
    from flexio.cli import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", smollm2_path, "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_stops_when_the_model_fails_to_load(capsys):
    from flexio.cli import main

    assert main(["serve", "--model", "/nonexistent.gguf", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "listening on http://127.0.0.1:" in err
    assert err.strip().splitlines()[-1].startswith("flexio serve: error: ") and "neither an existing file" in err


def test_serve_command_end_to_end_and_sigterm(smollm2_path):
    """`python -m flexio serve` on a free port: answers once loaded, and SIGTERM shuts it down cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "flexio", "serve", "--model", smollm2_path, "--port", "0",
                             "--threads", "2", "-c", "256", "--model-alias", "smol"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, FLEXIO_API_KEY=""))
    try:
        line = ""
        while "listening on" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before listening"
        url = line.split("listening on ")[1].split()[0]
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 600)
        r = httpx.post(f"{url}/v1/completions", json={"model": "smol", "prompt": PROMPT, "max_tokens": 2,
                                                      "temperature": 0}, timeout=300)
        assert r.json()["choices"][0]["text"] == " Paris." and r.json()["model"] == "smol"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal once shut down
    assert "Application shutdown complete" in err and "Traceback" not in err, err
