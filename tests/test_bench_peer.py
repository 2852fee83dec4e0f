"""bench-peer: flexio vs llama.cpp (as it is, and with its weight repacking off) on one file."""

from __future__ import annotations

import importlib.util
import json

import pytest

from flexio.cli import main


def test_bench_peer_json(smollm2_path, capsys):
    assert main(["bench-peer", smollm2_path, "--prompt-tokens", "12", "-n", "3", "--reps", "1", "--ctx", "64"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt_tokens"] == 12 and out["decode_tokens"] == 3
    assert out["flexio"]["prefill_tok_s"] > 0 and out["flexio"]["decode_tok_s"] > 0
    if importlib.util.find_spec("llama_cpp") is None:  # flexio alone, and it says why
        assert out["llama_cpp"] is None and "llama-cpp-python" in out["note"]
        return
    for name, ratio in (("llama_cpp", "ratio"), ("llama_cpp_no_repack", "ratio_no_repack")):
        assert out[name]["prefill_tok_s"] > 0 and out[name]["decode_tok_s"] > 0
        # ratios of the unrounded medians; the JSON's rates are rounded to 0.01
        assert out[ratio]["prefill"] == pytest.approx(out["flexio"]["prefill_tok_s"] / out[name]["prefill_tok_s"], rel=0.02)
