"""RoPE — rotary position embedding (Su et al., 2021, "RoFormer", arXiv:2104.09864).

RoPE is *not* a vector added to the token embeddings. Inside every attention layer, each query and
key vector is split into head_dim/2 pairs, and pair i of the vector at position m is rotated by the
angle m·θ_i, where

    θ_i = rope_theta ^ (-2i / head_dim),   i = 0 … head_dim/2 - 1      ("inv_freq")

    [x'_a]   [cos mθ_i  -sin mθ_i] [x_a]
    [x'_b] = [sin mθ_i   cos mθ_i] [x_b]

Because a rotation by mθ followed by the transpose of a rotation by nθ is a rotation by (m-n)θ,
the score q_m·k_n depends on the positions only through m - n (relative positions), and rotations
keep vector norms. Values are not rotated.

Pairing convention: Hugging Face checkpoints pair dimension a = i with b = i + head_dim/2
("rotate_half"); Meta's original code and llama.cpp pair adjacent dimensions (2i, 2i+1). The two
are the same model up to a fixed permutation of the q/k projection rows, which the GGUF reader and
writer apply. We use the HF convention.

Context-length scaling changes only θ_i (and, for YaRN, a scale on cos/sin); the registry below is
keyed by the config's ``rope_type``, as in Hugging Face's ``modeling_rope_utils``:

* ``default``  — plain RoPE.
* ``linear``   — position interpolation (Chen et al., 2023, arXiv:2306.15595): θ_i / factor.
* ``dynamic``  — dynamic NTK-aware scaling (bloc97 / emozilla, 2023): once the sequence grows past
  max_position_embeddings (L), the base becomes
  theta · (factor·seq_len/L - (factor-1)) ^ (d/(d-2)).
* ``yarn``     — YaRN (Peng et al., 2023, arXiv:2309.00071): interpolate low frequencies by
  ``factor``, keep high frequencies, ramp in between (``beta_fast``=32, ``beta_slow``=1 rotations
  over the original context), and scale cos/sin by attention_factor = 0.1·ln(factor) + 1.
* ``llama3``   — Llama 3.1's rule (Meta, 2024): wavelengths longer than
  original_max_position_embeddings/low_freq_factor are divided by ``factor``, shorter than
  original/high_freq_factor kept, and smoothly interpolated between.

Angles, cos and sin are always computed in float32 (bf16 angles at position 100k would be off by
whole radians), and the rotation itself is done in float32 before casting back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _base_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def _default(head_dim: int, theta: float, scaling: dict, max_pos: int, seq_len: int | None, device):
    return _base_inv_freq(head_dim, theta, device), 1.0


def _linear(head_dim: int, theta: float, scaling: dict, max_pos: int, seq_len: int | None, device):
    return _base_inv_freq(head_dim, theta, device) / scaling["factor"], 1.0


def _dynamic(head_dim: int, theta: float, scaling: dict, max_pos: int, seq_len: int | None, device):
    factor = scaling["factor"]
    seq_len = max(seq_len or max_pos, max_pos)
    base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _base_inv_freq(head_dim, base, device), 1.0


def yarn_attention_factor(scaling: dict) -> float:
    """YaRN's scale on cos/sin ("mscale"): 0.1·ln(factor)+1, or the config's own value."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor = scaling["factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return get_mscale(factor)


def _yarn(head_dim: int, theta: float, scaling: dict, max_pos: int, seq_len: int | None, device):
    factor = scaling["factor"]
    original = scaling.get("original_max_position_embeddings") or max_pos
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(n_rotations: float) -> float:
        # the pair index whose wavelength fits n_rotations times into the original context
        return head_dim * math.log(original / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = _base_inv_freq(head_dim, theta, device)
    interpolation = extrapolation / factor
    keep = 1 - ramp  # 1 for high-frequency pairs (kept), 0 for low-frequency ones (interpolated)
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, yarn_attention_factor(scaling)


def _llama3(head_dim: int, theta: float, scaling: dict, max_pos: int, seq_len: int | None, device):
    inv_freq = _base_inv_freq(head_dim, theta, device)
    factor = scaling["factor"]
    low_ff, high_ff = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = original / low_ff, original / high_ff
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, out), 1.0


InvFreqFn = Callable[[int, float, dict, int, "int | None", Any], "tuple[torch.Tensor, float]"]

ROPE_INIT_FUNCTIONS: dict[str, InvFreqFn] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
}


def compute_inv_freq(
    head_dim: int,
    rope_theta: float,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 2048,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq float32 of shape [head_dim/2], attention_scaling) for a config's RoPE settings."""
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r}; supported: {', '.join(ROPE_INIT_FUNCTIONS)}")
    return ROPE_INIT_FUNCTIONS[rope_type](head_dim, rope_theta, scaling, max_position_embeddings, seq_len, device)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, T, head_dim) -> the tables :func:`rotate` takes, (B, 1, T, head_dim), broadcast over heads:
    cos, and sin with the sign of the rotation folded in (-sin on the first half, +sin on the second).
    A forward computes them once and every layer shares them."""
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(1), signed_sin.unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_dim) by the tables of :func:`rope_tables`, in float32:

        x'[:d/2] = x[:d/2]·cos − x[d/2:]·sin,   x'[d/2:] = x[d/2:]·cos + x[:d/2]·sin

    i.e. x·cos + swap_halves(x)·signed_sin, where swapping the halves is a roll by d/2 (one op; the
    sign lives in the table, so no negation or concatenation per layer)."""
    half = x.shape[-1] // 2
    if x.dtype == torch.float32:
        return x * cos + x.roll(half, -1) * signed_sin
    x32 = x.float()
    return (x32 * cos + x32.roll(half, -1) * signed_sin).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_dim) by angles whose cos/sin (B, T, head_dim) are float32."""
    return rotate(x, *rope_tables(cos, sin))


_DECODE_TABLES = 16384  # single positions' tables kept by RotaryEmbedding.tables (~0.5 KB each at head_dim 64)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin (float32) for given position ids from the config's RoPE settings.

    Holds no parameters and no device state worth saving: inv_freq is cached per device (and, for
    dynamic NTK, recomputed from the longest position in the call).
    """

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict | None, max_position_embeddings: int):
        super().__init__()
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.rope_type = (rope_scaling or {}).get("rope_type", "default")
        self._cache: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def inv_freq(self, device: torch.device, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        if self.rope_type == "dynamic" and seq_len is not None and seq_len > self.max_position_embeddings:
            return compute_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling,
                                    self.max_position_embeddings, seq_len, device)
        if device not in self._cache:
            self._cache[device] = compute_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling,
                                                   self.max_position_embeddings, None, device)
        return self._cache[device]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, T, head_dim), float32."""
        seq_len = None
        if self.rope_type == "dynamic":
            seq_len = int(position_ids.max()) + 1
        inv_freq, attention_scaling = self.inv_freq(position_ids.device, seq_len)
        angles = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2), float32
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if attention_scaling != 1.0:
            cos, sin = cos * attention_scaling, sin * attention_scaling
        return cos, sin

    def tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> :func:`rope_tables` of their cos/sin: what each attention layer rotates by.

        A single CPU position (a batch-1 decode step) is looked up in a table of the ones already made — each
        made by this same call on that (1, 1) position, so bit for bit what it would compute again, in one
        dict look-up instead of ~11 tensor ops a token (not under torch.compile, nor for dynamic NTK, whose
        angles depend on the longest position of the call)."""
        if (position_ids.shape == (1, 1) and position_ids.is_cpu and self.rope_type != "dynamic"
                and not torch.compiler.is_dynamo_compiling()):
            key = int(position_ids)
            made = self.__dict__.setdefault("_decode_tables", {})
            hit = made.get(key)
            if hit is None:
                if len(made) >= _DECODE_TABLES:
                    made.clear()
                with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in any later mode
                    hit = made[key] = rope_tables(*self(position_ids.clone()))
            return hit
        return rope_tables(*self(position_ids))
