"""A llama GGUF file's tensors: their names (ours <-> llama.cpp's), types and dequantization, and the q/k row
permutation.

Dequantization:

* F32 / F16 / BF16: a reinterpretation;
* Q8_0 (blocks of 32: fp16 scale d, 32 int8 q):      w = d * q
* Q4_0 (blocks of 32: fp16 d, 16 bytes of nibbles):   w = d * (q - 8)
* Q4_1 (blocks of 32: fp16 d, fp16 m, 16 bytes):      w = d * q + m
  (element j < 16 is the low nibble of byte j, element j >= 16 the high nibble of byte j - 16),
  vectorised in torch; Q4_K, Q6_K and the other k-quants through ``gguf.quants.dequantize``.

llama.cpp applies RoPE to adjacent pairs (x0, x1), (x2, x3), ... while HF Llama checkpoints (and this
library) rotate halves (x_i, x_{i + d/2}). `convert_hf_to_gguf.py` therefore permutes the rows of
``q_proj`` / ``k_proj`` within each head: row ``2i`` <- HF row ``i``, row ``2i+1`` <- HF row ``i + d/2``.
:func:`unpermute_qk` undoes it on load, :func:`permute_qk` redoes it on export.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from llamalab.errors import WeightsError
from llamalab.formats.ggml_types import type_name

T = TypeVar("T", torch.Tensor, np.ndarray)


# GGML tensor types (ggml.h) that we read directly; the rest go through gguf.quants
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K",
                   "Q2_K", "Q3_K"}


EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0")


# GGUF tensor name -> ours (per-layer names take the block index)
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


IGNORED_TENSORS = {"rope_freqs.weight"}


def gguf_to_ours(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def ours_to_gguf(name: str) -> str:
    for g, o in _GLOBAL_NAMES.items():
        if o == name:
            return g
    _, idx, rest = name.split(".", 2)
    for g, o in _LAYER_NAMES.items():
        if o == rest:
            return f"blk.{idx}.{g}"
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------- q/k layout
def permute_qk(w: T, n_heads: int) -> T:
    """HF (rotate-half) rows -> llama.cpp (adjacent-pair) rows, per head (torch tensor or numpy array)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: T, n_heads: int) -> T:
    """llama.cpp (adjacent-pair) rows -> HF (rotate-half) rows, per head (torch tensor or numpy array)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- dequantizing
def dequantize(raw: np.ndarray, ttype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes -> float32 torch tensor of `shape` (torch order)."""
    return torch.from_numpy(np.ascontiguousarray(dequantize_np(raw, ttype, shape)))


def dequantize_np(raw: np.ndarray, ttype: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF tensor bytes -> float32 numpy array of `shape`; vectorised numpy (fast on few cores)."""
    if ttype == F32:
        return raw.view(np.float32).reshape(shape).copy()
    if ttype == F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if ttype == BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if ttype == Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        out = blocks[:, 2:].view(np.int8).astype(np.float32)
        out *= d
        return out.reshape(shape)
    if ttype in (Q4_0, Q4_1):
        head = 2 if ttype == Q4_0 else 4
        blocks = raw.reshape(-1, head + 16)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, head:]
        out = np.empty((blocks.shape[0], 32), dtype=np.float32)
        out[:, :16] = qs & 0x0F
        out[:, 16:] = qs >> 4
        if ttype == Q4_0:
            out -= 8.0
            out *= d
        else:
            out *= d
            out += blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        return out.reshape(shape)
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ttype)
        out = quants.dequantize(raw.reshape(shape[:-1] + (-1,)) if len(shape) > 1 else raw, qtype)
    except NotImplementedError:
        raise WeightsError(f"GGML type {type_name(ttype)} is not supported") from None
    return np.asarray(out, dtype=np.float32).reshape(shape)


def _blocks(raw: np.ndarray, ttype: int, shape: tuple[int, ...]):
    """Unpacked codes (out, in) and per-32 scales (and mins) (out, in/32) of a Q8_0/Q4_0/Q4_1 tensor."""
    out_f, in_f = shape
    if ttype == Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).reshape(out_f, in_f // 32)
        q = blocks[:, 2:].copy().view(np.int8).reshape(out_f, in_f)
        return torch.from_numpy(q), torch.from_numpy(d), None
    head = 2 if ttype == Q4_0 else 4
    blocks = raw.reshape(-1, head + 16)
    d = blocks[:, :2].copy().view(np.float16).reshape(out_f, in_f // 32)
    m = blocks[:, 2:4].copy().view(np.float16).reshape(out_f, in_f // 32) if ttype == Q4_1 else None
    qs = blocks[:, head:]
    codes = np.concatenate((qs & 0x0F, qs >> 4), axis=1).reshape(out_f, in_f)
    return torch.from_numpy(codes), torch.from_numpy(d), None if m is None else torch.from_numpy(m)
