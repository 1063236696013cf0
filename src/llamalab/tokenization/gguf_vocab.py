"""A GGUF file's tokenizer metadata (``tokenizer.ggml.*``) in and out.

In: byte-level BPE (``model == "gpt2"``: tokens + merges, the pre-tokenizer named by
``tokenizer.ggml.pre``) or SentencePiece-style vocabularies (``model == "llama"``: tokens + scores + token
types), with BOS/EOS/padding ids, the add-BOS flag and the chat template. Out (:func:`gguf_metadata`): the
same keys for a :class:`~llamalab.tokenization.tokenizer.Tokenizer`, for GGUF export.
"""


from __future__ import annotations

import json
import re
import warnings
from typing import Any

import numpy as np

from llamalab.config import describe
from llamalab.errors import TokenizerError
from llamalab.tokenization.byte_bpe import bpe_backend, detect_pre
from llamalab.tokenization.sentencepiece import spm_backend
from llamalab.tokenization.tokenizer import Tokenizer, as_id_list
from llamalab.tokenization.vocab import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    first_line,
)


def _gguf_list(meta: dict[str, Any], key: str, kind: type, n: int | None, default: list | None = None) -> list:
    """A GGUF array (a list, or the numpy array the reader keeps numbers in) as a list of ``kind``,
    ``n`` long when given; a one-line TokenizerError when the file holds anything else."""
    v = meta.get(key)
    if v is None:
        if default is None:
            raise TokenizerError(f"GGUF tokenizer has no {key}")
        return default
    if kind is str:
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    else:
        v = np.asarray(v) if isinstance(v, (list, np.ndarray)) else None
        ok = v is not None and v.ndim == 1 and (v.dtype.kind in "iub" if kind is int else v.dtype.kind in "iuf")
        if ok and kind is float:
            ok = bool(np.isfinite(v).all())
        v = v.tolist() if ok else v
    if not ok:
        raise TokenizerError(f"GGUF metadata {key} must be an array of {kind.__name__}s, got {describe(v)}")
    if n is not None and len(v) != n:
        raise TokenizerError(f"GGUF metadata {key} has {len(v)} entries for {n} tokens")
    return v


def _gguf_flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    v = meta.get(key, default)
    if not isinstance(v, (bool, np.bool_)):
        raise TokenizerError(f"GGUF metadata {key} must be true or false, got {describe(v)}")
    return bool(v)


def from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer | None:
    """Rebuild the tokenizer from GGUF ``tokenizer.*`` metadata (None when the file has none)."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or meta.get("tokenizer.ggml.tokens") is None:
        return None
    tokens = _gguf_list(meta, "tokenizer.ggml.tokens", str, None)
    n = len(tokens)
    types = _gguf_list(meta, "tokenizer.ggml.token_type", int, n, default=[TOKEN_NORMAL] * n)
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"GGUF metadata tokenizer.chat_template must be a string, got {describe(template)}")
    try:
        if model == "gpt2":
            merges = _gguf_list(meta, "tokenizer.ggml.merges", str, None)
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if not isinstance(pre, str):
                raise TokenizerError(f"GGUF metadata tokenizer.ggml.pre must be a string, got {describe(pre)}")
            backend = bpe_backend(tokens, merges, types, pre)
            kind, default_add_bos, spm_scores = "bpe", False, None
        elif model == "llama":
            scores = _gguf_list(meta, "tokenizer.ggml.scores", float, n, default=[0.0] * n)
            backend = spm_backend(tokens, scores, types,
                                  add_dummy_prefix=_gguf_flag(meta, "tokenizer.ggml.add_space_prefix", True))
            kind, pre, default_add_bos = "spm", None, True
            spm_scores = scores
        else:
            raise TokenizerError(f"unsupported GGUF tokenizer model {describe(model)} (supported: gpt2, llama)")
    except TokenizerError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library refuses an inconsistent vocabulary
        raise TokenizerError(f"GGUF tokenizer metadata is inconsistent: {first_line(e)}"
                             ) from None

    def tok_at(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < n else None

    extra_ids = [i for i in as_id_list(meta.get("tokenizer.ggml.eot_token_id"))
                 + as_id_list(meta.get("tokenizer.ggml.eom_token_id")) if 0 <= i < n]
    return Tokenizer(backend, bos_token=tok_at("tokenizer.ggml.bos_token_id"),
                     eos_token=tok_at("tokenizer.ggml.eos_token_id"),
                     pad_token=tok_at("tokenizer.ggml.padding_token_id"),
                     unk_token=tok_at("tokenizer.ggml.unknown_token_id"),
                     chat_template=template,
                     add_bos=_gguf_flag(meta, "tokenizer.ggml.add_bos_token", default_add_bos),
                     add_eos=_gguf_flag(meta, "tokenizer.ggml.add_eos_token", False),
                     extra_stop_ids=extra_ids, kind=kind, pre=pre, scores=spm_scores)


def gguf_metadata(tok: Tokenizer) -> dict[str, Any]:
    """GGUF ``tokenizer.*`` metadata for `tok` (the inverse of :func:`from_gguf_metadata`)."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"GGUF export supports BPE tokenizers only, not {model.get('type')!r}")
    added = {int(i): t for i, t in tok.backend.get_added_tokens_decoder().items()}
    n = tok.vocab_size
    tokens = [tok.backend.id_to_token(i) for i in range(n)]
    if any(t is None for t in tokens):
        raise TokenizerError("GGUF export needs contiguous token ids (the vocabulary has holes)")
    types = []
    byte_re = re.compile(r"^<0x[0-9A-F]{2}>$")
    for i, t in enumerate(tokens):
        if i in added:
            types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
        elif tok.kind == "spm" and byte_re.match(t):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    meta: dict[str, Any] = {}
    if model.get("byte_fallback") or tok.kind == "spm":
        unk = model.get("unk_token")
        if unk is not None and unk in tokens:
            types[tokens.index(unk)] = TOKEN_UNKNOWN
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if tok.scores is not None and len(tok.scores) == n:  # the original sentencepiece scores
            scores = [float(x) for x in tok.scores]
        else:  # higher = merged earlier; pieces that no merge makes get the lowest scores
            rank: dict[str, int] = {}
            for r, m in enumerate(merges):
                rank.setdefault("".join(m.split(" ")), r)
            scores = [-float(rank.get(t, len(merges) + i)) if types[i] == TOKEN_NORMAL else 0.0
                      for i, t in enumerate(tokens)]
        normalizer = json.dumps(spec.get("normalizer"))
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.scores"] = scores
        pre_spec = json.dumps(spec.get("pre_tokenizer"))
        meta["tokenizer.ggml.add_space_prefix"] = "Prepend" in normalizer or any(
            f'"prepend_scheme": "{x}"' in pre_spec for x in ("first", "always"))
    else:
        pre = tok.pre or detect_pre(tok.backend)
        if pre is None:
            warnings.warn("unknown pre-tokenizer; writing tokenizer.ggml.pre = 'default' (GPT-2 regex)",
                          stacklevel=2)
            pre = "default"
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = pre
        meta["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("padding", tok.pad_token_id),
                     ("unknown", tok.token_to_id(tok.unk_token) if tok.unk_token else None)):
        if tid is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(tid)
    eot = [i for i in tok.stop_token_ids if i != tok.eos_token_id]
    if eot:
        meta["tokenizer.ggml.eot_token_id"] = int(eot[0])
    meta["tokenizer.ggml.add_bos_token"] = tok.add_bos
    meta["tokenizer.ggml.add_eos_token"] = tok.add_eos
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta
