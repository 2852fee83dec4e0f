"""`python -m flexio ...` end to end: JSON output, streaming, chat, errors reported once with exit 1."""

import json
import subprocess
import sys

import pytest


def flexio(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "flexio", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_json(smollm2_path):
    r = flexio("generate", "--model", smollm2_path, "-n", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("text", "tokens", "prompt_tokens", "prompt_tok_s", "decode_tok_s"):
        assert key in out
    assert out["tokens"] == [7042, 30, 198, 198, 504, 1797]  # llama.cpp's greedy start for the default prompt
    assert out["text"] == " Paris.\n\nThe United"
    assert out["prompt_tokens"] == 5 and out["decode_tok_s"] > 0
    assert out["decode_io_wait_s"] == 0 and out["decode_steal_s"] >= 0  # all resident: nothing to wait for


def test_generate_streams_text_and_reports_speed(smollm2_path):
    r = flexio("generate", "--model", smollm2_path, "-n", "6", "--budget", "30%", "--show-plan")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris.\n\nThe United")
    assert "tok/s" in r.stderr and "plan: mode=flexinfer" in r.stderr


def test_chat_template(smollm2_path):
    r = flexio("generate", "--model", smollm2_path, "--chat", "--prompt", "Say hi", "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] > 10  # system + user turns of the template


def test_sampling_is_seeded(smollm2_path):
    args = ("generate", "--model", smollm2_path, "-n", "8", "--json", "--temperature", "0.9", "--seed", "3")
    a, b = flexio(*args), flexio(*args)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


@pytest.mark.parametrize("args,message", [
    (("--model", "/nonexistent.gguf"), "neither an existing file nor a known model"),
    (("--budget", "1MB"), "below the minimum"),
    (("--budget", "lots"), "cannot parse size"),
])
def test_errors_are_one_line_and_exit_1(smollm2_path, args, message):
    model = () if "--model" in args else ("--model", smollm2_path)
    r = flexio("generate", *model, *args, "-n", "2")
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr
