"""SmolLM2's tokenizer -> a family's tokenizer of the real size, for synthetic model files.

A synthetic model needs a vocabulary of its family's kind and size: the embedding and
output matrices have one row per token, so a 128k (llama 3), 151k (qwen3) or 262k (gemma3)
vocabulary is what makes their byte sizes real. Each one is built from SmolLM2's byte-level
BPE vocabulary (49,135 normal tokens and their merges), valid for flexio and llama.cpp:

  gpt2 (BPE)   llama3 ('llama-bpe'), qwen3 ('qwen2'): SmolLM2's tokens and merges, then filler
               tokens a+b of two existing tokens each with its merge "a b" (ranked last), then
               the family's special tokens at their real ids.
  llama (SPM)  gemma3 (no space prefix), phi3, mistral: the family's leading special tokens and
               the 256 byte tokens <0xNN>, then SmolLM2's tokens as text pieces (' ' -> U+2581,
               score -rank), then filler pieces a+b (scored below every piece), then trailing
               special tokens.

Chat templates are the families' own Jinja templates (shortened where they only add features
flexio does not use, such as tools), so that `--chat` renders what the real file would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flexio.gguf import read_metadata

# token types (gguf TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] "
    "+ '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
    "message['content'] + '[/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])  # 256 tokens from 128000
QWEN3_SPECIALS = [  # from 151643; then [PAD151669] .. to the vocabulary size
    ("<|endoftext|>", CONTROL), ("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL), ("<|object_ref_start|>", CONTROL),
    ("<|object_ref_end|>", CONTROL), ("<|box_start|>", CONTROL), ("<|box_end|>", CONTROL), ("<|quad_start|>", CONTROL),
    ("<|quad_end|>", CONTROL), ("<|vision_start|>", CONTROL), ("<|vision_end|>", CONTROL), ("<|vision_pad|>", CONTROL),
    ("<|image_pad|>", CONTROL), ("<|video_pad|>", CONTROL), ("<tool_call>", USER_DEFINED),
    ("</tool_call>", USER_DEFINED), ("<|fim_prefix|>", CONTROL), ("<|fim_middle|>", CONTROL),
    ("<|fim_suffix|>", CONTROL), ("<|fim_pad|>", CONTROL), ("<|repo_name|>", CONTROL), ("<|file_sep|>", CONTROL),
    ("<tool_response>", USER_DEFINED), ("</tool_response>", USER_DEFINED), ("<think>", USER_DEFINED),
    ("</think>", USER_DEFINED),
]
QWEN3_FIRST_SPECIAL = 151643
GEMMA3_HEAD = ([("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN), ("<mask>", CONTROL)]
               + [(f"<unused{i}>", CONTROL) for i in range(100)]
               + [("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)])  # 105, 106
PHI3_TAIL = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
             "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
MISTRAL_HEAD = ([("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), ("[INST]", CONTROL), ("[/INST]", CONTROL),
                 ("[TOOL_CALLS]", CONTROL), ("[AVAILABLE_TOOLS]", CONTROL), ("[/AVAILABLE_TOOLS]", CONTROL),
                 ("[TOOL_RESULTS]", CONTROL), ("[/TOOL_RESULTS]", CONTROL)]
                + [(f"[control_{i}]", CONTROL) for i in range(8, 769)])  # 771 control tokens, as v0.3

KINDS = ("llama3", "qwen3", "gemma3", "phi3", "mistral")
REAL_SIZE = {"llama3": 128256, "qwen3": 151936, "gemma3": 262144, "phi3": 32064, "mistral": 32768}


@dataclass
class Vocab:
    """A tokenizer as GGUF metadata: `tokenizer.ggml.*` and the chat template."""

    model: str  # "gpt2" | "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad / eot -> token id
    flags: dict[str, bool] = field(default_factory=dict)  # add_bos_token / add_space_prefix
    chat_template: str | None = None

    def write(self, w) -> None:
        """Add the tokenizer keys to a gguf.GGUFWriter."""
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges is not None:
            w.add_token_merges(self.merges)
        adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
                  "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}
        for k, v in self.ids.items():
            adders[k](v)
        if "add_bos_token" in self.flags:
            w.add_add_bos_token(self.flags["add_bos_token"])
        if "add_space_prefix" in self.flags:
            w.add_add_space_prefix(self.flags["add_space_prefix"])
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)


def _byte_decoder() -> dict[str, int]:
    from flexio.tokenizer import _byte_table

    return _byte_table()[1]


def _source(src: str) -> tuple[list[str], list[str]]:
    """SmolLM2's normal tokens (byte-level strings, id order) and merges."""
    md, _ = read_metadata(src)
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    return [t for t, k in zip(tokens, types) if k == NORMAL], list(md["tokenizer.ggml.merges"])


def _fillers(base: list[str], n: int, join: str = "") -> list[tuple[str, str]]:
    """n pairs (a, b) of base tokens whose concatenation is new: a vocabulary's longer tokens are made of
    shorter ones. Deterministic: prefixes run over the base in order, suffixes over its short tokens."""
    seen = set(base)
    suffixes = [t for t in base[:4000] if 2 <= len(t) <= 4][:600] or base[:600]
    out: list[tuple[str, str]] = []
    for a in base:
        for b in suffixes:
            if len(out) == n:
                return out
            c = a + join + b
            if c not in seen:
                seen.add(c)
                out.append((a, b))
    raise ValueError(f"cannot make {n} filler tokens from {len(base)} base tokens")


def _bpe(src: str, n_regular: int) -> tuple[list[str], list[str]]:
    """n_regular byte-level tokens with their merges: SmolLM2's (cut to n_regular if fewer), then fillers."""
    base, merges = _source(src)
    if n_regular <= len(base):
        keep = base[:n_regular]
        have = set(keep)
        ok = []
        for m in merges:
            a, b = m.split(" ", 1)
            if a in have and b in have and a + b in have:
                ok.append(m)
        return keep, ok
    pairs = _fillers(base, n_regular - len(base))
    return base + [a + b for a, b in pairs], merges + [f"{a} {b}" for a, b in pairs]


def _pieces(src: str) -> list[str]:
    """SmolLM2's tokens as SentencePiece text pieces (spaces as U+2581), those that are whole UTF-8."""
    dec = _byte_decoder()
    out, seen = [], set()
    for t in _source(src)[0]:
        try:
            text = bytes(dec[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        p = text.replace(" ", "\u2581")
        if p and p not in seen and not (p.startswith("<") and p.endswith(">")):
            seen.add(p)
            out.append(p)
    return out


def _spm(src: str, head: list[tuple[str, int]], tail: list[str], n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    """head specials, 256 byte tokens, pieces and filler pieces, tail specials: n_vocab tokens."""
    tokens = [t for t, _ in head] + [f"<0x{b:02X}>" for b in range(256)]
    types = [k for _, k in head] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    n_pieces = n_vocab - len(tokens) - len(tail)
    if n_pieces < 1:
        raise ValueError(f"a vocabulary of {n_vocab} tokens has no room for pieces beside {len(tokens) + len(tail)} specials")
    base = [p for p in _pieces(src) if p not in set(tokens) | set(tail)]
    pieces = base[:n_pieces]
    if len(pieces) < n_pieces:
        pieces += [a + b for a, b in _fillers(base, n_pieces - len(pieces))]
    tokens += pieces
    types += [NORMAL] * len(pieces)
    scores += [-float(i + 1) for i in range(len(pieces))]
    tokens += tail
    types += [CONTROL] * len(tail)
    scores += [0.0] * len(tail)
    return tokens, types, scores


def family_vocab(kind: str, n_vocab: int, src: str) -> Vocab:
    """The tokenizer of family `kind` (KINDS) with n_vocab tokens, built from the SmolLM2 GGUF at `src`."""
    if kind == "llama3":
        n_reg = n_vocab - len(LLAMA3_SPECIALS)
        tokens, merges = _bpe(src, n_reg)
        return Vocab("gpt2", tokens + LLAMA3_SPECIALS, [NORMAL] * n_reg + [CONTROL] * len(LLAMA3_SPECIALS),
                     merges=merges, pre="llama-bpe", ids={"bos": n_reg, "eos": n_reg + 9},  # <|eot_id|>
                     flags={"add_bos_token": True}, chat_template=LLAMA3_TEMPLATE)
    if kind == "qwen3":
        n_reg = min(QWEN3_FIRST_SPECIAL, n_vocab - len(QWEN3_SPECIALS))
        tokens, merges = _bpe(src, n_reg)
        specials = list(QWEN3_SPECIALS)
        specials += [(f"[PAD{n_reg + len(specials) + i}]", UNUSED) for i in range(n_vocab - n_reg - len(specials))]
        return Vocab("gpt2", tokens + [t for t, _ in specials], [NORMAL] * n_reg + [k for _, k in specials],
                     merges=merges, pre="qwen2", ids={"bos": n_reg, "eos": n_reg + 2, "pad": n_reg},
                     flags={"add_bos_token": False}, chat_template=CHATML_TEMPLATE)
    if kind == "gemma3":
        tokens, types, scores = _spm(src, GEMMA3_HEAD, [], n_vocab)
        return Vocab("llama", tokens, types, scores, pre="default", ids={"bos": 2, "eos": 1, "unk": 3, "pad": 0},
                     flags={"add_bos_token": True, "add_space_prefix": False}, chat_template=GEMMA3_TEMPLATE)
    if kind == "phi3":
        tail = PHI3_TAIL + [f"<|placeholder{i}|>" for i in range(7, 7 + max(0, 64 - len(PHI3_TAIL)))]
        head = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)]
        tokens, types, scores = _spm(src, head, tail, n_vocab)
        return Vocab("llama", tokens, types, scores, pre="default",
                     ids={"bos": 1, "eos": tokens.index("<|endoftext|>"), "unk": 0, "pad": tokens.index("<|endoftext|>")},
                     chat_template=PHI3_TEMPLATE)
    if kind == "mistral":
        tokens, types, scores = _spm(src, MISTRAL_HEAD, [], n_vocab)
        return Vocab("llama", tokens, types, scores, pre="default", ids={"bos": 1, "eos": 2, "unk": 0},
                     flags={"add_bos_token": True}, chat_template=MISTRAL_TEMPLATE)
    raise ValueError(f"unknown tokenizer kind {kind!r} (known: {', '.join(KINDS)})")


def vocab_kv(v: Vocab) -> dict[str, Any]:
    """The metadata keys `v.write` adds, as flexio.gguf reads them back (for tests)."""
    md: dict[str, Any] = {"tokenizer.ggml.model": v.model, "tokenizer.ggml.tokens": v.tokens,
                          "tokenizer.ggml.token_type": np.asarray(v.types, np.int32)}
    if v.scores is not None:
        md["tokenizer.ggml.scores"] = np.asarray(v.scores, np.float32)
    if v.merges is not None:
        md["tokenizer.ggml.merges"] = v.merges
    if v.pre is not None:
        md["tokenizer.ggml.pre"] = v.pre
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id",
             "eot": "eot_token_id"}
    md.update({f"tokenizer.ggml.{names[k]}": i for k, i in v.ids.items()})
    md.update({f"tokenizer.ggml.{k}": b for k, b in v.flags.items()})
    if v.chat_template is not None:
        md["tokenizer.chat_template"] = v.chat_template
    return md
