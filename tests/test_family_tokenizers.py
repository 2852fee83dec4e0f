"""Each family's tokenizer, at its real size, against llama.cpp's: ids, end-of-generation tokens, chat template.

The vocabularies are the ones synth writes (bench/vocab.py, built from SmolLM2's): llama 3's 128k
byte-level BPE ('llama-bpe'), qwen3's 151k ('qwen2'), Mistral Tekken's pre-tokenizer on the same
BPE, gemma3's 262k SentencePiece without a space prefix, phi3's and Mistral's 32k SentencePiece.
Each is written to a tokenizer-only GGUF that llama.cpp loads with vocab_only.
"""

from __future__ import annotations

import ctypes
import time

import pytest
from gguf import GGUFWriter

from flexio.gguf import read_metadata
from flexio.tokenizer import Tokenizer
from flexio_bench.vocab import REAL_SIZE, family_vocab

STRINGS = [
    "Hello world, the capital of France is Paris.",
    "  leading spaces and   runs\n\nof newlines\r\n\ttabs",
    "I'm don't we'll they've YOU'RE 12345678 3.14159 1,000,000",
    "héllo wörld — naïve café Ärger ÉCOLE",
    "日本語のテキストと中文 한국어 🎉👍🏽 👨‍👩‍👧",
    "def f(x):\n    return x**2  # comment\n",
    "CamelCaseWord HTTPServer iPhone McDonald's",
]
SPECIAL = {
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
    "tekken": "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
    "qwen3": "<|im_start|>user\nHi there<|im_end|>\n<think>\n</think>",
    "gemma3": "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nHi there<|end|>\n<|assistant|>\n",
    "mistral": "[INST] Hi there[/INST]",
}
CHAT = {  # one user message, generation prompt added
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen3": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "gemma3": "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nHi there<|end|>\n<|assistant|>\n",
    "mistral": "<s>[INST] Hi there[/INST]",
}
EOG = {  # the texts of the end-of-generation tokens llama.cpp finds in each vocabulary
    "llama3": {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"},
    "tekken": {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"},
    "qwen3": {"<|endoftext|>", "<|im_end|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"},
    "gemma3": {"<eos>", "<end_of_turn>"},
    "phi3": {"</s>", "<|endoftext|>", "<|end|>"},
    "mistral": {"</s>"},
}


@pytest.fixture(scope="module", params=["llama3", "tekken", "qwen3", "gemma3", "phi3", "mistral"])
def family(request, tmp_path_factory, smollm2_path):
    """(kind, path of a tokenizer-only GGUF, flexio's Tokenizer, seconds its build took)."""
    kind = request.param
    v = family_vocab("llama3" if kind == "tekken" else kind, REAL_SIZE.get(kind, 131072), smollm2_path)
    if kind == "tekken":
        v.pre = "tekken"
    path = str(tmp_path_factory.mktemp("vocab") / f"{kind}.gguf")
    w = GGUFWriter(path, "llama")
    v.write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    md, _ = read_metadata(path)
    t0 = time.perf_counter()
    tok = Tokenizer.from_metadata(md)
    return kind, path, tok, time.perf_counter() - t0


@pytest.fixture(scope="module")
def llama_vocab(family):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[peer])")
    return llama_cpp.Llama(model_path=family[1], vocab_only=True, verbose=False)


def test_real_size_and_build_time(family):
    kind, _, tok, seconds = family
    assert tok.vocab_size == REAL_SIZE.get(kind, 131072)
    # gemma3's 262k SentencePiece vocabulary is rebuilt as ~750k BPE merges: ~1 s on an idle core
    assert seconds < 20, f"{kind}: building the tokenizer took {seconds:.1f} s"
    print(f"\n{kind}: {tok.vocab_size} tokens built in {seconds:.2f} s")


@pytest.mark.peer
def test_ids_match_llama_cpp(family, llama_vocab):
    kind, _, tok, _ = family
    for s in STRINGS:
        assert tok.encode(s) == llama_vocab.tokenize(s.encode(), add_bos=tok.add_bos, special=False), (kind, s)
    s = SPECIAL[kind]
    assert tok.encode(s, parse_special=True) == llama_vocab.tokenize(s.encode(), add_bos=tok.add_bos, special=True)
    assert tok.encode(s) == llama_vocab.tokenize(s.encode(), add_bos=tok.add_bos, special=False)


@pytest.mark.peer
def test_end_of_generation_tokens_match_llama_cpp(family, llama_vocab):
    import llama_cpp

    kind, _, tok, _ = family
    vocab = llama_cpp.llama_model_get_vocab(llama_vocab._model.model)
    eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, ctypes.c_int32(i))}
    assert tok.stop_ids == eog
    assert {tok.vocab.tokens[i] for i in eog} == EOG[kind]


def test_chat_template(family):
    kind, _, tok, _ = family
    if kind == "tekken":
        pytest.skip("the tekken vocabulary here carries llama 3's template")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    assert text == CHAT[kind]
    ids = tok.encode(text, add_bos=False, parse_special=True)
    # every control token of the template is one id (the text between them is ordinary text; an SPM
    # vocabulary with a space prefix adds one to each such fragment, as llama.cpp does)
    for marker in ("<|start_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<start_of_turn>",
                   "<end_of_turn>", "<|user|>", "<|end|>", "<|assistant|>", "[INST]", "[/INST]"):
        if marker in text:
            assert tok.vocab.tokens.index(marker) in ids, (kind, marker)
