"""Byte-level BPE backends (GPT-2 style) from a vocabulary and merges, with the pre-tokenizer a GGUF file
names (``tokenizer.ggml.pre``: ``smollm``, ``llama-bpe``, ``qwen2``, ...), and the inverse (which
pre-tokenizer a backend uses) for export.
"""


from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llamalab.errors import TokenizerError
from llamalab.tokenization.vocab import (
    TOKEN_CONTROL,
    add_typed_tokens,
)

_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer that matches llama.cpp's ``tokenizer.ggml.pre`` name."""
    if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        return _split_then_bytes(_LLAMA3_PATTERN)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _split_then_bytes(_QWEN2_PATTERN)
    if pre in ("gpt-2", "default", "gpt2", "phi-2", "jina-es", "jina-de", "mpt", "olmo"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(KNOWN_PRE)}")


KNOWN_PRE = ("gpt-2", "default", "smollm", "starcoder", "refact", "llama-bpe", "dbrx", "smaug-bpe", "qwen2")


def detect_pre(backend: HFTokenizer) -> str | None:
    """The llama.cpp pre-tokenizer name whose `tokenizers` equivalent this backend uses (None if none)."""
    spec = json.loads(backend.to_str()).get("pre_tokenizer")
    canon = _canon(spec)
    for name in ("gpt-2", "smollm", "llama-bpe", "qwen2"):
        if _canon(json.loads(_pre_json(name))) == canon:
            return name
    return None


@cache
def _pre_json(name: str) -> str:
    t = HFTokenizer(models.BPE())
    t.pre_tokenizer = _pre_tokenizer(name)
    return json.dumps(json.loads(t.to_str())["pre_tokenizer"])


def _canon(spec: Any) -> Any:
    """Pre-tokenizer JSON without options that do not change the ids (offsets), single-item sequences flat."""
    if isinstance(spec, dict):
        if spec.get("type") == "Sequence" and len(spec.get("pretokenizers", [])) == 1:
            return _canon(spec["pretokenizers"][0])
        return {k: _canon(v) for k, v in spec.items() if k != "trim_offsets"}
    if isinstance(spec, list):
        return [_canon(x) for x in spec]
    return spec


def bpe_backend(tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre: str) -> HFTokenizer:
    """A byte-level BPE `tokenizers` model from GGUF's tokens, merges ("a b") and token types."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise TokenizerError(f"bad BPE merge {m!r} in GGUF metadata")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return add_typed_tokens(tok, tokens, types, special_types=(TOKEN_CONTROL,))


