"""Tokenizer tests: golden ids from llama.cpp, roundtrips, streaming, specials, chat template, SPM vs a scalar reference."""

from __future__ import annotations

import heapq
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexio.errors import ParameterError, UnsupportedError
from flexio.tokenizer import (
    TT_BYTE,
    TT_CONTROL,
    TT_NORMAL,
    TT_UNKNOWN,
    StreamDecoder,
    Tokenizer,
)

DATA = Path(__file__).parent / "data" / "smollm2-135m-q4_1.json"

# Strings whose tokenization depends on the pre-tokenizer regex details: smollm splits
# every digit on its own (regex "\p{N}" first), then applies the GPT-2 regex.
TRICKY = [
    "12345678",
    "3.14159 and 1,000,000 or 2024-01-31",
    "I'm don't we'll they've she'd it's YOU'RE",
    "a  \n\n b",
    "   leading and trailing   ",
    "tabs\tand\r\nCRLF\n\n\n",
    "héllo wörld — naïve café",
    "日本語のテキストと中文",
    "emoji 🎉👍🏽 family 👨‍👩‍👧",
    "def f(x):\n    return x**2  # comment\n",
    "if (a<=b && c!=d) { return a->b; }",
    "<|im_start|>user not special",
    "x" * 40 + " " + "ab" * 20,
]



@pytest.fixture(scope="session")
def tok(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


# --- gpt2 / SmolLM2 ---------------------------------------------------------------------


def test_reference_prompt_tokens(tok):
    """Golden ids produced by llama.cpp for the reference prompts."""
    ref = json.loads(DATA.read_text())
    assert tok.add_bos is False
    for case in ref["cases"]:
        assert tok.encode(case["prompt"]) == case["prompt_tokens"], case["prompt"]


def test_smollm_splits_digits(tok):
    ids = tok.encode("12345678")
    assert len(ids) == 8
    assert [tok.decode([i]) for i in ids] == list("12345678")


def test_metadata_ids(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_id == 1 and tok.eos_id == 2
    # <|im_end|> (eos), <|endoftext|> and the FIM repo token <reponame> end generation, as
    # llama_vocab_is_eog says for this file
    assert tok.stop_ids == {0, 2, 4}


def test_build_is_fast(smollm2_path):
    import time

    from flexio.gguf import open_gguf

    g = open_gguf(smollm2_path)
    t0 = time.perf_counter()
    Tokenizer.from_gguf(g)
    assert time.perf_counter() - t0 < 1.0


# SmolLM2's vocab has no token for bytes 0x04 0x06 0x13 0x14 0x16 0x1D 0xC0 0xC1 0xF1 0xF2 0xF5-0xFF;
# llama.cpp drops such bytes, so text containing them cannot roundtrip. Lead bytes 0xF1/0xF2 are
# code points U+40000..U+BFFFF (planes 4-11, unassigned); stay below them.
_CHARS = st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_characters="\x04\x06\x13\x14\x16\x1d")
_TEXT = st.text(alphabet=st.one_of(_CHARS, st.sampled_from(list("日本語中文한국어🎉👍🏽\u200d🙂 \n\t0123456789'"))), max_size=80)


def test_missing_bytes_are_dropped_like_llama_cpp(tok):
    # U+40000 is F1 80 80 80: the lead byte has no token and is dropped, the three 0x80 bytes are 'Ģ' (218)
    assert tok.encode("\U00040000") == [218, 218, 218]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_TEXT)
def test_roundtrip_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("s", TRICKY)
def test_roundtrip_tricky(tok, s):
    assert tok.decode(tok.encode(s)) == s


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tok)
    out = [dec.push(i) for i in ids]
    out.append(dec.flush())
    return out


def test_stream_decoder_splits_multibyte(tok):
    s = "🎉 é 中"
    ids = tok.encode(s)
    parts = _stream(tok, ids)
    assert "".join(parts) == tok.decode(ids) == s
    # the emoji's 4 bytes are spread over several byte-level tokens: no piece may contain U+FFFD
    assert len(ids) > len(s.split())
    assert all("\ufffd" not in p for p in parts)


def test_stream_decoder_byte_tokens(tok):
    # Feed each byte of a multi-byte text as its own byte-level token.
    from flexio.tokenizer import _byte_table

    b2u, _ = _byte_table()
    vocab = {t: i for i, t in enumerate(tok.vocab.tokens)}
    text = "añ中🎉"
    ids = [vocab[b2u[b]] for b in text.encode()]
    parts = _stream(tok, ids)
    assert "".join(parts) == text
    assert parts[:3] == ["a", "", "ñ"]  # ñ is 2 bytes: nothing until both arrived


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=40))
def test_stream_equals_decode(tok, s):
    ids = tok.encode(s)
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_stream_flush_incomplete(tok):
    from flexio.tokenizer import _byte_table

    b2u, _ = _byte_table()
    vocab = {t: i for i, t in enumerate(tok.vocab.tokens)}
    dec = StreamDecoder(tok)
    assert dec.push(vocab[b2u[0xE4]]) == ""
    assert dec.flush() == "\ufffd"  # a dangling lead byte becomes U+FFFD, like decode()


def test_special_tokens(tok):
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = tok.encode(text, parse_special=True)
    assert ids[0] == 1 and ids[-1] == 2
    plain = tok.encode(text)
    assert 1 not in plain and 2 not in plain
    assert tok.decode(plain) == text
    # control tokens are hidden by default when decoding, shown with special=True
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, special=True) == text


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    out = tok.apply_chat_template(msgs)
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    no_gen = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert not no_gen.endswith("assistant\n")
    ids = tok.encode(out, parse_special=True)
    assert ids.count(1) == 3  # three <|im_start|>


def test_chat_template_sandboxed():
    md = _spm_metadata(*_toy_spm_vocab())
    md["tokenizer.chat_template"] = "{{ raise_exception('nope') }}"
    t = Tokenizer.from_metadata(md)
    with pytest.raises(Exception, match="nope"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    md["tokenizer.chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    # jinja's sandbox refuses the attribute; the refusal reaches the caller as a clean error
    with pytest.raises(ParameterError, match="unsafe"):
        Tokenizer.from_metadata(md).apply_chat_template([])


def test_unsupported_model():
    with pytest.raises(UnsupportedError, match="'bert'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_unknown_pre_warns(smollm2_path):
    from flexio.gguf import open_gguf

    md = dict(open_gguf(smollm2_path).metadata)
    md["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.warns(UserWarning, match="no-such-pre"):
        t = Tokenizer.from_metadata(md)
    assert t.decode(t.encode("hello 123")) == "hello 123"


@pytest.mark.peer
@pytest.mark.parametrize("s", TRICKY + [json.loads(DATA.read_text())["cases"][0]["prompt"]])
def test_matches_llama_cpp(tok, smollm2_path, s, llama_vocab):
    want = llama_vocab.tokenize(s.encode(), add_bos=False, special=False)
    assert tok.encode(s) == want


_POOL = list("abcXYZ 0123456789\n\t\r'\".,;:!?-_()[]{}<>/\\@#$%^&*+=~`|éüñß日本語中文한국어🎉👍🏽\u200d\u00a0\u3000٣४") + [
    "'s", "'ll", "'RE", "  ", "\n\n", "<|im_start|>", "<|im_end|>", "http://x.y/z?a=1", "1,000.50",
]


@pytest.mark.peer
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_POOL), max_size=25).map("".join), st.booleans())
def test_matches_llama_cpp_random(tok, llama_vocab, s, parse_special):
    assert tok.encode(s, parse_special=parse_special) == llama_vocab.tokenize(
        s.encode(), add_bos=False, special=parse_special
    )


@pytest.fixture(scope="session")
def llama_vocab(smollm2_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install .[peer])")
    return llama_cpp.Llama(model_path=smollm2_path, vocab_only=True, verbose=False)


# --- SPM ("llama" model) on a synthetic vocabulary -----------------------------------------


def _toy_spm_vocab(seed: int = 0, n_merges: int = 300):
    """A small SentencePiece-like vocab: <unk> <s> </s>, 256 byte tokens, chars, then
    pieces grown by merging frequent neighbours of a toy corpus (like BPE training),
    each with a distinct score (higher = merged earlier)."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TT_UNKNOWN, TT_CONTROL, TT_CONTROL] + [TT_BYTE] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    chars = list("▁abcdefghilnorstuyT,.'")
    corpus_words = ["the", "cat", "sat", "on", "a", "hat", "that", "is", "not", "there", "hello", "world",
                    "this", "sister", "listen", "scratch", "Tuesday", "it's", "no,", "done."]
    corpus = "▁" + "▁".join(rng.choice(corpus_words, 400))
    for c in chars:
        tokens.append(c)
        types.append(TT_NORMAL)
        scores.append(-1000.0 - len(tokens))  # chars merge last
    seq = list(corpus)
    vocab = set(tokens)
    for step in range(n_merges):
        counts: dict[tuple[str, str], int] = {}
        for a, b in zip(seq, seq[1:]):
            counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        new = a + b
        out, i = [], 0
        while i < len(seq):
            if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                out.append(new)
                i += 2
            else:
                out.append(seq[i])
                i += 1
        seq = out
        if new not in vocab:
            vocab.add(new)
            tokens.append(new)
            types.append(TT_NORMAL)
            scores.append(-float(step))
    return tokens, np.array(types, np.int32), np.array(scores, np.float32)


def _spm_metadata(tokens, types, scores, add_space_prefix=True):
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": list(tokens),
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def ref_spm_tokenize(tokens, scores, text: str, add_space_prefix=True) -> list[int]:
    """Scalar reference of llama.cpp's llm_tokenizer_spm on one raw fragment.

    Symbols start as single characters; the adjacent pair whose concatenation is a
    token with the highest score is merged (leftmost on ties) until none is left;
    symbols that are not tokens are written as <0xNN> byte tokens.
    """
    if not text:
        return []
    ids = {t: i for i, t in enumerate(tokens)}
    if add_space_prefix:
        text = " " + text
    text = text.replace(" ", "▁")
    sym = list(text)  # None = merged away
    nxt = list(range(1, len(sym))) + [-1]
    prv = list(range(-1, len(sym) - 1))
    heap: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int):
        if left < 0 or right < 0:
            return
        t = sym[left] + sym[right]
        if t in ids:
            heapq.heappush(heap, (-float(scores[ids[t]]), left, right, t))

    for i in range(len(sym) - 1):
        push(i, i + 1)
    while heap:
        _, left, right, t = heapq.heappop(heap)
        if sym[left] is None or sym[right] is None or nxt[left] != right or sym[left] + sym[right] != t:
            continue  # stale
        sym[left], sym[right] = t, None
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    out: list[int] = []
    i = 0
    while i != -1:
        s = sym[i]
        if s in ids:
            out.append(ids[s])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in s.encode())
        i = nxt[i]
    return out


@pytest.fixture(scope="module")
def spm():
    tokens, types, scores = _toy_spm_vocab()
    return tokens, scores, Tokenizer.from_metadata(_spm_metadata(tokens, types, scores))


def test_spm_defaults(spm):
    _, _, t = spm
    assert t.add_bos is True and t.bos_id == 1 and t.eos_id == 2
    assert t.encode("")[:1] == [1] and t.encode("", add_bos=False) == []
    assert 2 in t.stop_ids


@pytest.mark.parametrize(
    "s",
    ["the cat sat on the hat", "hello world", "  two  spaces ", "Tuesday, it's done.", "xyz ümlaut 中", "a", " "],
)
def test_spm_matches_reference(spm, s):
    tokens, scores, t = spm
    assert t.encode(s, add_bos=False) == ref_spm_tokenize(tokens, scores, s)
    assert t.decode(t.encode(s)) == s


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("thecaisnolrwdy ,.'T") + ["é", "中", "🎉"]), max_size=60))
def test_spm_matches_reference_random(spm, s):
    tokens, scores, t = spm
    ids = t.encode(s, add_bos=False)
    assert ids == ref_spm_tokenize(tokens, scores, s)
    assert t.decode(ids) == s
    assert "".join(_stream_spm(t, ids)) == (" " + s if s else "")


def _stream_spm(t, ids):
    dec = StreamDecoder(t)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_spm_special_prefix(spm):
    """A raw fragment after a special token gets its own '▁' prefix (llama.cpp is_prev_special)."""
    tokens, scores, t = spm
    ids = t.encode("hello</s>world", add_bos=False, parse_special=True)
    want = ref_spm_tokenize(tokens, scores, "hello") + [2] + ref_spm_tokenize(tokens, scores, "world")
    assert ids == want
    # without parse_special the control text is ordinary characters (here: byte fallback for '<', '/', '>')
    assert 2 not in t.encode("hello</s>world", add_bos=False)


def test_spm_no_space_prefix():
    tokens, types, scores = _toy_spm_vocab()
    t = Tokenizer.from_metadata(_spm_metadata(tokens, types, scores, add_space_prefix=False))
    assert t.encode("the cat", add_bos=False) == ref_spm_tokenize(tokens, scores, "the cat", add_space_prefix=False)
    assert t.decode(t.encode("the cat")) == "the cat"


def test_duplicate_tokens_rejected():
    from flexio.errors import GGUFError

    tokens, types, scores = _toy_spm_vocab()
    tokens = list(tokens)
    tokens[-1] = tokens[-2]
    with pytest.raises(GGUFError, match="duplicate token"):
        Tokenizer.from_metadata(_spm_metadata(tokens, types, scores))


# --- bad metadata: every problem is a GGUFError naming the key ---------------------------------


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer.ggml.model", np.array([1, 2]), r"'tokenizer.ggml.model' has wrong type ndarray, expected str"),
    ("tokenizer.ggml.token_type", ["a", "b"], r"'tokenizer.ggml.token_type' has wrong type list, expected an array of integers"),
    ("tokenizer.ggml.token_type", np.array([1.5, 2.5]), r"'tokenizer.ggml.token_type' has wrong type an array of float64"),
    ("tokenizer.ggml.token_type", np.ones(7, np.int32), r"'tokenizer.ggml.token_type' has 7 entries, expected \d+ \(one per token\)"),
    ("tokenizer.ggml.scores", ["x"], r"'tokenizer.ggml.scores' has wrong type list, expected an array of numbers"),
    ("tokenizer.ggml.scores", np.zeros(10**4, np.float32), r"'tokenizer.ggml.scores' has 10000 entries, expected"),
    ("tokenizer.ggml.bos_token_id", "1", r"'tokenizer.ggml.bos_token_id' has wrong type str, expected int"),
    ("tokenizer.ggml.eos_token_id", 2.0, r"'tokenizer.ggml.eos_token_id' has wrong type float, expected int"),
    ("tokenizer.ggml.add_bos_token", np.array([True, False]), r"'tokenizer.ggml.add_bos_token' has wrong type ndarray"),
    ("tokenizer.chat_template", 7, r"'tokenizer.chat_template' has wrong type int, expected str"),
])
def test_bad_spm_metadata_names_the_key(key, value, match):
    from flexio.errors import GGUFError

    md = _spm_metadata(*_toy_spm_vocab())
    md[key] = value
    with pytest.raises(GGUFError, match=match):
        Tokenizer.from_metadata(md)


def test_bad_bpe_metadata_names_the_key(smollm2_path):
    from flexio.errors import GGUFError
    from flexio.gguf import open_gguf

    md = dict(open_gguf(smollm2_path).metadata)
    bad = dict(md, **{"tokenizer.ggml.merges": np.zeros(3, np.int32)})
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.merges' has wrong type ndarray, expected an array of strings"):
        Tokenizer.from_metadata(bad)
    tokens = list(md["tokenizer.ggml.tokens"])
    tokens[300] = "\udcff" + tokens[300]  # an invalid byte, as the reader keeps it (surrogateescape)
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.tokens' entry 300 is not valid UTF-8: b'\\xff"):
        Tokenizer.from_metadata(dict(md, **{"tokenizer.ggml.tokens": tokens}))
    merges = list(md["tokenizer.ggml.merges"])
    merges[7] = "Ġt hxq"
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.merges' entry 7 \('Ġt hxq'\) is invalid: 'hxq' is not in"):
        Tokenizer.from_metadata(dict(md, **{"tokenizer.ggml.merges": merges}))


def test_invalid_chat_template_bytes_are_replaced():
    md = _spm_metadata(*_toy_spm_vocab())
    md["tokenizer.chat_template"] = "{{ 'x\udce9' }}"
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        t = Tokenizer.from_metadata(md)
    assert t.apply_chat_template([]) == "x\ufffd"


def test_malformed_byte_token_decodes_as_text():
    tokens, types, scores = _toy_spm_vocab()
    tokens = list(tokens)
    tokens[3 + 0x41] = "<0xZZ>"  # type BYTE, but not a hex byte
    t = Tokenizer.from_metadata(_spm_metadata(tokens, types, scores))
    assert t.decode([3 + 0x41]) == "<0xZZ>"
