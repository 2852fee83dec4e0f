"""`python -m flexio ...` end to end: JSON output, streaming, chat; every bad input one line on stderr, exit 1 or 2."""

import json
import os
import subprocess
import sys

import pytest


def flexio(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "flexio", *args], capture_output=True, text=True, timeout=timeout,
                          errors="replace")


def one_error_line(stderr: str) -> bool:
    """The error is one line, the last: `flexio CMD: error: ...` (status lines of slow loading steps may precede it)."""
    lines = stderr.strip().splitlines()
    return bool(lines) and " error: " in lines[-1] and all(ln.startswith("flexio: ") for ln in lines[:-1])


def flexio_here(capsys, *args) -> tuple[int, str, str]:
    """`flexio ARGS` in this process (the kernels are already loaded): (exit status, stdout, stderr)."""
    from flexio.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(smollm2_path):
    r = flexio("generate", "--model", smollm2_path, "-n", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("text", "tokens", "prompt_tokens", "prompt_tok_s", "decode_tok_s"):
        assert key in out
    assert out["tokens"] == [7042, 30, 198, 198, 504, 1797]  # llama.cpp's greedy start for the default prompt
    assert out["text"] == " Paris.\n\nThe United"
    assert out["prompt_tokens"] == 5 and out["decode_tok_s"] > 0
    assert out["decode_io_wait_s"] == 0 and out["streamed_bytes_per_token"] == 0  # all resident: nothing to wait for
    assert out["n_ctx"] == 4096 and out["mode"] == "memory" and set(out["load_seconds"]) >= {"model", "kernels", "weights"}


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
    (("--model", "/"), "is a directory, not a GGUF file"),
    (("--budget", "1MB"), "below the minimum"),
    (("--budget", "1TB"), "more than this machine's RAM"),
])
def test_errors_are_one_line_and_exit_1(smollm2_path, capsys, args, message):
    model = () if "--model" in args else ("--model", smollm2_path)
    code, _, err = flexio_here(capsys, "generate", *model, *args, "-n", "2", "--json")
    assert code == 1, err
    assert message in err
    assert one_error_line(err), err


def test_errors_print_no_traceback(smollm2_path):
    r = flexio("generate", "--model", smollm2_path, "--budget", "1MB", "-n", "2")
    assert r.returncode == 1 and "below the minimum" in r.stderr and "Traceback" not in r.stderr, r.stderr


LONG = "word " * 40  # 40+ tokens


# Usage errors: each names the parameter and its allowed range, exit status 2 (as argparse's own).
@pytest.mark.parametrize("args,message", [
    (("--window", "0"), "window: expected an integer >= 1"),
    (("--budget", "30%", "--window", "0"), "window: expected an integer >= 1"),
    (("--temperature", "-1"), "temperature: expected a number >= 0"),
    (("--top-p", "0"), "top_p: expected a number in (0, 1]"),
    (("--top-p", "2"), "top_p: expected a number in (0, 1]"),
    (("--top-k", "-1"), "top_k: expected an integer >= 0"),
    (("--ctx", "-5"), "n_ctx: expected 0 (the model's own context) or a positive number"),
    (("--threads", "999"), "threads: expected 0 (all"),
    (("--threads", "-1"), "threads: expected 0 (all"),
    (("-n", "-1"), "max_tokens: expected an integer >= 0"),
    (("--prompt", ""), "expected at least one token, got an empty prompt"),
    (("--ctx", "8", "--prompt", LONG), "do not fit the context of 8 tokens"),
    (("--ctx", "16", "-n", "100"), "expected max_tokens <= 11"),
    (("--budget", "lots"), "budget: cannot parse size 'lots'"),
    (("--budget", "150%"), "budget: expected a percentage in [0, 100]"),
])
def test_usage_errors_name_the_parameter_and_exit_2(smollm2_path, capsys, args, message):
    code, _, err = flexio_here(capsys, "generate", "--model", smollm2_path, "--json", *args)
    assert code == 2, err
    assert message in err
    assert one_error_line(err), err


def test_invalid_utf8_prompt_is_a_usage_error(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "flexio", "generate", "--model", smollm2_path, "--prompt", b"caf\xe9 au lait"],
                       capture_output=True, timeout=300)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2 and "prompt: expected UTF-8 text" in err and "0xe9" in err, err
    assert "Traceback" not in err and one_error_line(err), err


def test_a_fifo_as_the_model_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    r = flexio("generate", "--model", str(fifo), "-n", "2", timeout=60)
    assert r.returncode == 1 and "is a fifo (named pipe), not a GGUF file" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,check", [
    (("--threads", "0"), lambda out: out["threads"] == os.cpu_count()),  # 0 = all cores (as --help says)
    (("--ctx", "0"), lambda out: out["n_ctx"] == 8192),  # 0 = the model's own context (llama.cpp's -c 0)
    (("--ignore-eos", "--prompt", "Hi", "--chat", "-n", "40"), lambda out: out["generated_tokens"] == 40),
])
def test_llama_cpp_conventions(smollm2_path, capsys, args, check):
    code, out, err = flexio_here(capsys, "generate", "--model", smollm2_path, "-n", "2", "--json", *args)
    assert code == 0, err
    out = json.loads(out)
    assert check(out), out


def test_without_ignore_eos_the_chat_reply_ends(smollm2_path, capsys):
    code, out, err = flexio_here(capsys, "generate", "--model", smollm2_path, "--prompt", "Hi", "--chat", "-n", "40",
                                 "--json")
    out = json.loads(out)
    assert out["stop_reason"] == "eos" and out["generated_tokens"] < 40, out


@pytest.mark.slow  # compiles every kernel from scratch: a minute or two on 2 cores
def test_first_run_says_it_is_compiling(smollm2_path, tmp_path):
    """With an empty kernel cache the wait is announced on stderr, and the kernels are cached where the
    next run finds them (the flexio cache, not the package's directory)."""
    env = dict(os.environ, NUMBA_CACHE_DIR="", FLEXIO_CACHE=str(tmp_path), FLEXIO_SMOLLM2=smollm2_path)
    env.pop("NUMBA_CACHE_DIR")
    cmd = [sys.executable, "-m", "flexio", "generate", "--model", smollm2_path, "-n", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "loading kernels (the first run compiles them" in first.stderr
    assert f"cached in {tmp_path / 'numba'}" in first.stderr
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(tmp_path / "numba") for f in fs)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0 and "loading kernels" not in second.stderr, second.stderr
