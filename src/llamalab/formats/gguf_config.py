"""A :class:`~llamalab.config.LlamaConfig` from a GGUF file's ``llama.*`` metadata (and its ``rope_freqs.weight``):
hyper-parameters, RoPE theta and scaling — linear and YaRN from ``rope.scaling.*``, llama3 from llamalab's own
``llamalab.rope.*`` keys or recovered from llama.cpp's per-frequency divisors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llamalab.config import LlamaConfig, describe, is_int, is_number, llama3_rope_scaling
from llamalab.errors import ConfigError, WeightsError
from llamalab.formats.gguf_reader import TensorInfo


def _get(meta: dict[str, Any], key: str, default: Any = None, required: bool = False) -> Any:
    if key in meta:
        return meta[key]
    if required:
        raise WeightsError(f"GGUF metadata lacks {key!r}")
    return default


def _int(meta: dict[str, Any], key: str, default: int | None = None, required: bool = False,
         minimum: int = 1) -> int:
    """An integer metadata value (at least ``minimum``), or a one-line error naming the key."""
    v = _get(meta, key, default, required)
    if not is_int(v) or v < minimum:
        raise ConfigError(f"GGUF metadata {key} must be an integer >= {minimum}, got {describe(v)}")
    return v


def _float(meta: dict[str, Any], key: str, default: float) -> float:
    v = _get(meta, key, default)
    if not is_number(v):
        raise ConfigError(f"GGUF metadata {key} must be a number, got {describe(v)}")
    return float(v)


def config_from_metadata(meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> LlamaConfig:
    """LlamaConfig from ``llama.*`` GGUF metadata (plus the tensor table for what metadata may omit)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"unsupported GGUF architecture {describe(arch)}: llamalab reads llama-architecture "
                          "files only")
    a = "llama."
    hidden = _int(meta, a + "embedding_length", required=True)
    n_heads = _int(meta, a + "attention.head_count", required=True)
    n_kv = _int(meta, a + "attention.head_count_kv", n_heads)
    head_dim = _int(meta, a + "attention.key_length", max(1, hidden // n_heads))
    if _int(meta, a + "attention.value_length", head_dim) != head_dim:
        raise ConfigError("GGUF key_length != value_length is not supported")
    rot = _int(meta, a + "rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ConfigError(f"partial RoPE (rope.dimension_count {rot} < head_dim {head_dim}) is not supported")
    if a + "vocab_size" in meta:
        vocab = _int(meta, a + "vocab_size")
    elif "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    elif isinstance(meta.get("tokenizer.ggml.tokens"), list) and meta["tokenizer.ggml.tokens"]:
        vocab = len(meta["tokenizer.ggml.tokens"])
    else:
        raise WeightsError("GGUF file has neither llama.vocab_size nor token_embd.weight")
    ctx = _int(meta, a + "context_length", 2048)
    rope_scaling = _rope_scaling(meta, tensors, ctx)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_int(meta, a + "feed_forward_length", required=True),
        n_layers=_int(meta, a + "block_count", required=True), n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, max_position_embeddings=ctx,
        rms_norm_eps=_float(meta, a + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=_float(meta, a + "rope.freq_base", 10000.0), rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _rope_scaling(meta: dict[str, Any], tensors: dict[str, TensorInfo], ctx: int) -> dict[str, Any] | None:
    a = "llama.rope."
    if "llamalab.rope.scaling.type" in meta:  # written by save_gguf: exact parameters (checked by LlamaConfig)
        prefix = "llamalab.rope.scaling."
        d = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
        return {"rope_type": d.pop("type"), **d}
    stype = meta.get(a + "scaling.type")
    if stype is not None and not isinstance(stype, str):
        raise ConfigError(f"GGUF metadata {a}scaling.type must be a string, got {describe(stype)}")
    key = a + "scaling.factor" if a + "scaling.factor" in meta else a + "scale_linear"
    factor = _float(meta, key, 0.0) or None
    if stype in (None, "none") and factor in (None, 1.0):
        return None  # (a rope_freqs.weight tensor, llama3 scaling, is resolved in load_gguf)
    orig = _int(meta, a + "scaling.original_context_length", ctx)
    if stype in ("linear", None, "none"):
        return {"rope_type": "linear", "factor": factor}
    if stype == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
        for key, ours in (("scaling.yarn_beta_fast", "beta_fast"), ("scaling.yarn_beta_slow", "beta_slow")):
            if a + key in meta:
                out[ours] = _float(meta, a + key, 0.0)
        return out
    raise ConfigError(f"unsupported GGUF rope scaling type {stype!r}")


def llama3_from_freqs(freqs: np.ndarray, head_dim: int, theta: float, ctx: int) -> dict[str, Any]:
    """Recover llama3 rope_scaling (factor, low/high_freq_factor, original length) from rope_freqs divisors."""
    from llamalab.model.rope import compute_inv_freq

    f = np.asarray(freqs, dtype=np.float64)
    if not (np.isfinite(f).all() and (f > 0).all()):
        raise ConfigError("GGUF rope_freqs.weight must hold finite positive divisors")
    factor = float(f.max())
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    mid = (f > 1.0 + 1e-6) & (f < factor - 1e-6)
    guesses = [{k: v for k, v in llama3_rope_scaling(factor).items() if k != "rope_type"}]
    if mid.sum() >= 2:
        # smooth_i = (1/f_i - 1/factor) / (1 - 1/factor) = orig/(high-low) / wavelen_i - low/(high-low)
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[mid], s, 1)
        low = 1.0
        span = -low / intercept if intercept < 0 else 3.0
        guesses.append(dict(factor=factor, low_freq_factor=low, high_freq_factor=low + span,
                            original_max_position_embeddings=int(round(slope * span))))
    for g in guesses:
        rs = {"rope_type": "llama3", **g}
        try:
            ours, _ = compute_inv_freq(head_dim, theta, rs, ctx)
        except Exception:  # noqa: BLE001
            continue
        if np.allclose(inv / ours.double().numpy(), f, rtol=1e-3):
            return rs
    raise ConfigError("GGUF rope_freqs.weight does not match llama3 RoPE scaling; not supported")
