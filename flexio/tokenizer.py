"""GGUF tokenizer metadata -> Tokenizer: encode, decode, stream decode, chat template.

The token model is rebuilt with the HuggingFace `tokenizers` library so that its
output matches llama.cpp (src/llama-vocab.cpp), which is the reference every GGUF
file is converted for. Facts about llama.cpp's tokenizers that shape this module:

* `tokenizer.ggml.model == "gpt2"` is byte-level BPE. The text is first split by a
  list of regexes chosen by `tokenizer.ggml.pre`; they are applied one after another
  and each one splits every piece again, keeping matched and unmatched spans as
  pieces ("isolated" splitting). Each piece is then mapped byte -> printable
  unicode char (GPT-2's byte table) and merged by rank from `tokenizer.ggml.merges`.
  A merge line is split at the first space after position 0.
* `tokenizer.ggml.model == "llama"` is SentencePiece-style ("SPM"): spaces become
  U+2581 '▁', a '▁' is prepended to every raw-text fragment that starts the input or
  follows a special token (when `add_space_prefix`), and the whole fragment (no
  pre-splitting) is merged greedily: repeatedly merge the adjacent pair whose
  concatenation is a vocab token with the highest score, leftmost first on ties.
  Characters that end up outside the vocab are emitted as <0xNN> byte tokens.
  That is BPE whose merge list is every (left, right) split of every token,
  ranked by the merged token's score -- which is how we build it.
* Special tokens: token_type 3 (control) and 2 (unknown) are matched as whole
  tokens only when parse_special is true; type 4 (user-defined) always.
* add_bos: `tokenizer.ggml.add_bos_token` if present; otherwise true for SPM and
  for the llama3-style pre-tokenizers, false for other BPE.
* End of generation: eos, eot, eom ids from metadata, plus tokens recognised by
  their text (<|im_end|>, <|eot_id|>, <|endoftext|>, ...).
* Decoding: control/unknown tokens render as "" unless special=True; user-defined
  tokens render as their text; SPM drops one leading space of the first piece.
"""

from __future__ import annotations

import codecs
import json
import re
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import GGUFError, ParameterError, UnsupportedError

# --- token types (gguf TokenType / llama_token_type) ------------------------------

TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # an SPM byte token's text

# --- pre-tokenizer regexes, by `tokenizer.ggml.pre` (as in llama.cpp llama-vocab.cpp) --

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
# Mistral's Tekken (Nemo, Small 3): llama.cpp's rewrite of the tokenizer.json regex, whose classes
# [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] / [\p{Ll}\p{Lm}\p{Lo}\p{M}] become "a letter but not a-z" / "not A-Z"
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+"
    r"((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# name -> (regexes applied in order, llama3-style "ignore_merges" + add_bos default)
_PRE: dict[str, tuple[tuple[str, ...], bool]] = {}
for _names, _regexes, _llama3 in (
    (("default",), _DEFAULT, False),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"), (_LLAMA3,), True),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "roberta-bpe", "exaone4", "mellum"), (_GPT2,), False),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", _GPT2), False),
    (("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez", "hunyuan"), (_QWEN2,), False),
    (("chatglm-bpe", "glm4"), (_LLAMA3,), False),
    (("tekken",), (_TEKKEN,), True),
):
    for _n in _names:
        _PRE[_n] = (_regexes, _llama3)
# dbrx / smaug use the llama3 regex but not its ignore_merges/add_bos defaults
_PRE["dbrx"] = _PRE["smaug-bpe"] = ((_LLAMA3,), False)

# Token texts llama.cpp treats as end-of-generation even when no metadata key names them
# (src/llama-vocab.cpp, the special_eog_ids loop), and the fill-in-the-middle pad / repo / file-separator
# tokens it detects by text and adds to them.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
    "<|file_sep|>",
})


@lru_cache(maxsize=1)
def _byte_table() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's reversible byte <-> printable unicode char map (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    b2u: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            b2u[b] = chr(b)
        else:
            b2u[b] = chr(256 + extra)
            extra += 1
    return b2u, {u: b for b, u in b2u.items()}


# --- the vocabulary, read and checked once ------------------------------------------


@dataclass(frozen=True)
class Vocab:
    """Tokenizer metadata of one GGUF file, validated. Arrays are indexed by token id."""

    model: str  # "gpt2" | "llama"
    pre: str  # tokenizer.ggml.pre ("" for SPM)
    tokens: list[str]  # (n_vocab,)
    token_type: np.ndarray  # (n_vocab,) int32, TT_*
    scores: np.ndarray | None  # (n_vocab,) float32, SPM only
    merges: list[str] | None  # (n_merges,) "left right", BPE only
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    add_bos: bool
    add_space_prefix: bool
    chat_template: str | None

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> Vocab:
        """Check every tokenizer key's type and length; a GGUFError names the key otherwise."""
        model = _typed(md, "tokenizer.ggml.model", str)
        if model is None:
            raise GGUFError("metadata key 'tokenizer.ggml.model' is missing: the file has no tokenizer")
        if model not in ("gpt2", "llama"):
            raise UnsupportedError(
                f"tokenizer.ggml.model {model!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
            )
        tokens = md.get("tokenizer.ggml.tokens")
        if not _is_str_list(tokens) or not tokens:
            raise GGUFError("metadata key 'tokenizer.ggml.tokens' is missing or not a string array")
        _check_text("tokenizer.ggml.tokens", tokens)
        n = len(tokens)
        if len(set(tokens)) != n:
            seen: dict[str, int] = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise GGUFError(f"duplicate token in 'tokenizer.ggml.tokens': {t!r} has ids {seen[t]} and {i}")
                seen[t] = i

        def arr(key: str, dtype, kinds: str, default=None):
            v = md.get(key)
            if v is None:
                return default
            if not isinstance(v, np.ndarray) or v.dtype.kind not in kinds:
                got = f"an array of {v.dtype}" if isinstance(v, np.ndarray) else type(v).__name__
                want = "integers" if kinds == "iu" else "numbers"
                raise GGUFError(f"metadata key {key!r} has wrong type {got}, expected an array of {want} (one per token)")
            if v.ndim != 1 or len(v) != n:
                raise GGUFError(f"metadata key {key!r} has {v.size} entries, expected {n} (one per token)")
            return v.astype(dtype, copy=False)

        token_type = arr("tokenizer.ggml.token_type", np.int32, "iu", np.full(n, TT_NORMAL, np.int32))
        scores = arr("tokenizer.ggml.scores", np.float32, "iuf")
        merges = md.get("tokenizer.ggml.merges")
        if merges is not None:
            if not _is_str_list(merges):
                raise GGUFError(f"metadata key 'tokenizer.ggml.merges' has wrong type {type(merges).__name__}, "
                                "expected an array of strings")
            _check_text("tokenizer.ggml.merges", merges)
        if model == "gpt2" and merges is None:
            raise GGUFError("metadata key 'tokenizer.ggml.merges' is missing: a gpt2 (BPE) tokenizer needs merges")
        pre = (_typed(md, "tokenizer.ggml.pre", str) or "") if model == "gpt2" else ""

        def tid(key: str, default: int | None) -> int | None:
            v = _typed(md, key, int)
            if v is None:
                v = default
            if v is None:
                return None
            if not 0 <= v < n:
                warnings.warn(f"metadata key {key!r} = {v} is outside the vocabulary (0..{n - 1}); ignored", stacklevel=3)
                return default if default is not None and 0 <= default < n else None
            return v

        def flag(key: str, default: bool) -> bool:
            v = _typed(md, key, bool)  # BOOL in the file; an integer is read as non-zero = true
            return default if v is None else v

        template = _typed(md, "tokenizer.chat_template", str)
        if template is not None and not _is_utf8(template):
            # invalid UTF-8 (kept as surrogate escapes by the reader) would fail at encode time
            warnings.warn("metadata key 'tokenizer.chat_template' is not valid UTF-8; invalid bytes become U+FFFD",
                          stacklevel=2)
            template = template.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

        spm = model == "llama"
        llama3 = pre in _PRE and _PRE[pre][1]
        add_bos_default = spm or llama3
        return cls(
            model=model,
            pre=pre,
            tokens=tokens,
            token_type=token_type,
            scores=scores if scores is not None else (np.zeros(n, np.float32) if spm else None),
            merges=merges if model == "gpt2" else None,
            bos_id=tid("tokenizer.ggml.bos_token_id", 1 if spm else None),
            eos_id=tid("tokenizer.ggml.eos_token_id", 2 if spm else None),
            eot_id=tid("tokenizer.ggml.eot_token_id", None),
            eom_id=tid("tokenizer.ggml.eom_token_id", None),
            add_bos=flag("tokenizer.ggml.add_bos_token", add_bos_default),
            add_space_prefix=flag("tokenizer.ggml.add_space_prefix", spm),
            chat_template=template,
        )


def _typed(md: dict[str, Any], key: str, kind: type) -> Any:
    """md[key] checked to be a `kind`, None if absent. Integers and bools are accepted for each
    other: a flag written as an integer is true when non-zero."""
    v = md.get(key)
    if v is None:
        return None
    if kind in (int, bool):
        if not isinstance(v, (int, np.integer)):
            raise GGUFError(f"metadata key {key!r} has wrong type {type(v).__name__}, expected {kind.__name__}")
        return kind(v)
    if not isinstance(v, kind):
        raise GGUFError(f"metadata key {key!r} has wrong type {type(v).__name__}, expected {kind.__name__}")
    return v


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_text(key: str, strings: list[str]) -> None:
    """Strings the tokenizers library will see must be valid UTF-8; the GGUF reader keeps
    invalid bytes as surrogate escapes, which the library cannot take."""
    if _is_utf8("".join(strings)):
        return
    i = next(i for i, s in enumerate(strings) if not _is_utf8(s))
    raw = strings[i].encode("utf-8", "surrogateescape")
    raise GGUFError(f"metadata key {key!r} entry {i} is not valid UTF-8: {raw!r}")


# --- building the HF tokenizers model -----------------------------------------------


def _added_tokens(v: Vocab):
    """Control/unknown tokens as `special` (split only when parse_special), user-defined always."""
    from tokenizers import AddedToken

    special, user = [], []
    for i in np.flatnonzero(np.isin(v.token_type, (TT_CONTROL, TT_UNKNOWN, TT_USER_DEFINED))):
        t = v.tokens[i]
        if int(v.token_type[i]) == TT_USER_DEFINED:
            user.append(AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False))
        else:
            special.append(AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False))
    return special, user


def _build_bpe(v: Vocab):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    if not v.pre:
        # llama.cpp: "missing pre-tokenizer type, using: 'default'"
        warnings.warn("metadata key 'tokenizer.ggml.pre' is missing; using the 'default' pre-tokenizer", stacklevel=3)
        regexes, ignore_merges = _PRE["default"]
    elif v.pre in _PRE:
        regexes, ignore_merges = _PRE[v.pre]
    else:
        warnings.warn(
            f"tokenizer.ggml.pre {v.pre!r} is not known to flexio; using the GPT-2 pre-tokenizer regex "
            "(tokenization may differ from llama.cpp)",
            stacklevel=3,
        )
        regexes, ignore_merges = (_GPT2,), False
    vocab = {t: i for i, t in enumerate(v.tokens)}
    merges = []
    for m in v.merges or ():
        k = m.find(" ", 1)  # llama.cpp splits at the first space after position 0
        if k > 0:
            merges.append((m[:k], m[k + 1 :]))
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    return tok


def spm_merges(tokens: Sequence[str], scores: np.ndarray, extra: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Every (left, right) split of every token whose halves are both symbols, best score first.

    llama.cpp's SPM loop merges the adjacent pair with the highest-scoring
    concatenation, leftmost on ties; a BPE merge list ranked by that score (ties by
    token id, then split point) reproduces it. `extra` are single characters that
    are not tokens but can still be merged into one. Linear in the total token length
    (a 262k-token vocabulary, gemma3's: ~1.3M splits, ~0.75M merges).
    """
    symbols = set(tokens)
    symbols.update(extra)
    neg = (-np.asarray(scores, np.float64)).tolist()
    found: list[tuple[float, int, int]] = []
    append = found.append
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            if t[:k] in symbols and t[k:] in symbols:
                append((neg[i], i, k))
    found.sort()
    return [(tokens[i][:k], tokens[i][k:]) for _, i, k in found]


def _build_spm(v: Vocab):
    """SPM as BPE with byte fallback. Returns (tokenizer, phantom): characters that occur
    inside tokens but are not tokens themselves get ids >= n_vocab ("phantom" symbols)
    so they can merge as in llama.cpp; encode() turns any left over into byte tokens."""
    from tokenizers import Tokenizer, models, normalizers

    assert v.scores is not None
    vocab = dict(zip(v.tokens, range(len(v.tokens))))
    phantom = sorted(set("".join(v.tokens)) - vocab.keys())
    for c in phantom:
        vocab[c] = len(vocab)
    unk = next((v.tokens[i] for i in np.flatnonzero(v.token_type == TT_UNKNOWN)), None)
    model = models.BPE(
        vocab=vocab, merges=spm_merges(v.tokens, v.scores, phantom), unk_token=unk, fuse_unk=False, byte_fallback=True
    )
    tok = Tokenizer(model)
    # Added (special) tokens are cut out before normalisation, so the '▁' prefix lands
    # on every raw fragment that starts the text or follows a special token, as in llama.cpp.
    steps = [normalizers.Prepend("▁")] if v.add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    return tok, phantom


def _build_error(v: Vocab, e: BaseException) -> str:
    """The tokenizers library's complaint -> a message naming the metadata key and the entry."""
    if v.model == "gpt2":
        vocab = set(v.tokens)
        for i, m in enumerate(v.merges or ()):
            k = m.find(" ", 1)
            if k <= 0:
                continue
            for part in (m[:k], m[k + 1 :], m[:k] + m[k + 1 :]):
                if part not in vocab:
                    return (f"metadata key 'tokenizer.ggml.merges' entry {i} ({m!r}) is invalid: "
                            f"{part!r} is not in 'tokenizer.ggml.tokens'")
        return f"metadata keys 'tokenizer.ggml.tokens' / 'tokenizer.ggml.merges' do not make a BPE tokenizer: {e}"
    return f"metadata keys 'tokenizer.ggml.tokens' / 'tokenizer.ggml.scores' do not make a SentencePiece tokenizer: {e}"


# --- the tokenizer ------------------------------------------------------------------


class Tokenizer:
    """Encode/decode text for one GGUF model; token ids match llama.cpp's."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._phantom: dict[int, list[int]] = {}  # SPM: id >= n_vocab -> byte token ids
        try:
            if vocab.model == "llama":
                self._tok, phantom = _build_spm(vocab)
                byte_ids = [self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]  # None: not in the vocab
                for k, c in enumerate(phantom):
                    self._phantom[len(vocab.tokens) + k] = [byte_ids[b] for b in c.encode() if byte_ids[b] is not None]
            else:
                self._tok = _build_bpe(vocab)
            special, user = _added_tokens(vocab)
            if special:
                self._tok.add_special_tokens(special)
            if user:
                self._tok.add_tokens(user)
        except BaseException as e:
            # The tokenizers library reports a bad vocabulary as a bare Exception (or a Rust
            # panic, which is a BaseException): name the key instead.
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise GGUFError(_build_error(vocab, e)) from None
        self._lock = threading.Lock()  # encode_special_tokens is tokenizer-wide state
        self._pieces: list[bytes | None] = [None] * len(vocab.tokens)
        self.bos_id = vocab.bos_id
        self.eos_id = vocab.eos_id
        self.add_bos = vocab.add_bos
        tt = vocab.token_type
        self._hidden = frozenset(int(i) for i in np.flatnonzero((tt == TT_CONTROL) | (tt == TT_UNKNOWN)))
        stop = {i for i in (vocab.eos_id, vocab.eot_id, vocab.eom_id) if i is not None}
        stop.update(i for i, t in enumerate(vocab.tokens) if t in _EOG_TEXTS)
        self.stop_ids: frozenset[int] = frozenset(stop)
        self.eot_ids = self.stop_ids  # alias

    @classmethod
    def from_gguf(cls, gguf_file) -> Tokenizer:
        """Build from a GGUFFile (flexio.gguf.open_gguf) or a path to a .gguf file."""
        if isinstance(gguf_file, (str, bytes)) or hasattr(gguf_file, "__fspath__"):
            from .gguf import open_gguf

            gguf_file = open_gguf(gguf_file)
        return cls(Vocab.from_metadata(gguf_file.metadata))

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        return cls(Vocab.from_metadata(metadata))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.tokens)

    # --- encode -----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Text -> token ids. add_bos=None follows the file (tokenizer.ggml.add_bos_token / llama.cpp default).

        parse_special=True matches control tokens such as <|im_start|> as single ids;
        otherwise their text is tokenized like any other text.
        """
        if add_bos is None:
            add_bos = self.add_bos
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise GGUFError("add_bos requested but the file has no 'tokenizer.ggml.bos_token_id'")
            ids.append(self.bos_id)
        if text:
            with self._lock:
                self._tok.encode_special_tokens = not parse_special
                got = self._tok.encode(text, add_special_tokens=False).ids
            if self._phantom:
                got = [j for i in got for j in self._phantom.get(i, (i,))]
            ids.extend(got)
        return ids

    # --- decode -----------------------------------------------------------------------

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes one token contributes to the text (no leading-space removal)."""
        if not 0 <= token_id < len(self._pieces):
            raise IndexError(f"token id {token_id} is outside the vocabulary (0..{len(self._pieces) - 1})")
        if token_id in self._hidden and not special:
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._piece(token_id)
            self._pieces[token_id] = piece
        return piece

    def _piece(self, i: int) -> bytes:
        text, kind = self.vocab.tokens[i], int(self.vocab.token_type[i])
        if kind in (TT_CONTROL, TT_UNKNOWN, TT_USER_DEFINED):
            return text.encode("utf-8")
        if self.vocab.model == "llama":
            if kind == TT_BYTE and _BYTE_TOKEN.fullmatch(text):
                return bytes([int(text[3:5], 16)])
            return text.replace("▁", " ").encode("utf-8")
        _, u2b = _byte_table()
        return b"".join(bytes([u2b[c]]) if c in u2b else c.encode("utf-8") for c in text)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Token ids -> text. Control tokens are dropped unless special=True.

        For SPM vocabularies the space prefix added by encode is removed from the
        first visible piece (as llama.cpp's detokenize does), so decode(encode(s)) == s.
        """
        pieces = [self.token_bytes(int(i), special) for i in ids]
        if self.vocab.model == "llama" and self.vocab.add_space_prefix:
            # drop the prefix space of the first visible piece (a hidden BOS before it does
            # not count; llama.cpp keeps the space in that case, HF drops it -- we follow HF)
            k = next((k for k, p in enumerate(pieces) if p), None)
            if k is not None and pieces[k].startswith(b" "):
                pieces[k] = pieces[k][1:]
        return b"".join(pieces).decode("utf-8", errors="replace")

    def stream(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special=special)

    # --- chat template ----------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `tokenizer.chat_template` (jinja2, sandboxed) for a list of {role, content} messages."""
        template = self.vocab.chat_template
        if not template:
            raise GGUFError("metadata key 'tokenizer.chat_template' is missing: the model has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ParameterError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r:.80}",
                                     param="messages")
        tok = lambda i: self.vocab.tokens[i] if i is not None else ""  # noqa: E731
        try:
            template = _compile_template(template)
        except Exception as e:  # jinja's syntax error: the file's template, not the caller's messages
            raise GGUFError(f"metadata key 'tokenizer.chat_template' does not compile: {type(e).__name__}: {e}") from None
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=tok(self.bos_id),
                eos_token=tok(self.eos_id),
                **kwargs,
            )
        except Exception as e:  # the template's raise_exception(), or a jinja error on these messages
            raise ParameterError(f"messages: the model's chat template refused them: {e}", param="messages") from None

    def __repr__(self) -> str:
        return f"Tokenizer({self.vocab.model}, pre={self.vocab.pre!r}, vocab={self.vocab_size}, add_bos={self.add_bos})"


class _TemplateError(Exception):
    pass


@lru_cache(maxsize=8)
def _compile_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise _TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    # Same environment options as HF transformers' chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


# --- streaming decode ---------------------------------------------------------------


class StreamDecoder:
    """Token ids in, text out as soon as it is complete UTF-8.

    A byte-level token can end in the middle of a multi-byte character (and SPM byte
    tokens <0xE2><0x96><0x81> carry one byte each), so bytes are fed to an incremental
    UTF-8 decoder that holds back an unfinished sequence until the next push; invalid
    bytes become U+FFFD, exactly as decode() does.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(int(token_id), self.special))

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character becomes U+FFFD) and reset."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
