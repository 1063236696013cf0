"""GGUF k-quant linears (Q4_K, Q6_K): schemas, the pure-PyTorch reference, fallback and fake implementations.

``llamalab::q4_k_linear(x, kq)`` and ``llamalab::q6_k_linear(x, kq)`` take an activation (..., K) of any float
dtype and a weight ``kq`` uint8 (N, K/256 · bytes per super-block: 144 for Q4_K, 210 for Q6_K) — the GGUF
file's super-blocks as stored — and return y = x · Wᵀ (..., N) in x's dtype. The C++ kernels are in
``kquants.cpp`` (the formats and the arithmetic are described there and in
:mod:`llamalab.quantization.kquants`); :func:`define_fallback` defines the ops as :func:`dequantize` +
``F.linear`` where the library is not built. :func:`linear_reference` is the kernel's arithmetic (activation
quantized per 32 to int8) in float64, for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QK_K = 256
SB_BYTES = {"q4_k": 144, "q6_k": 210}
SCHEMAS = {
    "q4_k_linear": "q4_k_linear(Tensor x, Tensor kq) -> Tensor",
    "q6_k_linear": "q6_k_linear(Tensor x, Tensor kq) -> Tensor",
}


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 scale bytes (..., 12) -> 6-bit scales and mins (..., 8) as int32."""
    s = s.to(torch.int32)
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], -1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], -1)
    return sc, mn


def _half(b: torch.Tensor) -> torch.Tensor:
    """Two bytes (..., 2) (little endian) -> their fp16 value as float32 (...)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def dequantize(kind: str, kq: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight (N, K) of super-blocks ``kq`` (N, K/256 · bytes), computed in float32 (then cast to dtype)."""
    n = kq.shape[0]
    blk = kq.reshape(n, -1, SB_BYTES[kind])
    if kind == "q4_k":
        d, dmin = _half(blk[..., 0:2]), _half(blk[..., 2:4])
        sc, mn = _q4_k_scales(blk[..., 4:16])
        q = blk[..., 16:].reshape(n, -1, 4, 32).to(torch.int32)
        codes = torch.stack([q & 15, q >> 4], 3).reshape(n, -1, 8, 32)  # sub-block 2c: low, 2c+1: high nibbles
        w = (d[..., None] * sc.float())[..., None] * codes.float() - (dmin[..., None] * mn.float())[..., None]
    elif kind == "q6_k":
        ql = blk[..., :128].reshape(n, -1, 2, 2, 32).to(torch.int32)  # (half, quarter & 1, l)
        qh = blk[..., 128:192].reshape(n, -1, 2, 1, 32).to(torch.int32)
        sc = blk[..., 192:208].contiguous().view(torch.int8).float()  # (n, nsb, 16)
        d = _half(blk[..., 208:210])
        nib = torch.cat([ql & 15, ql >> 4], 3)  # quarter k = 0..3
        hi = torch.cat([(qh >> (2 * k)) & 3 for k in range(4)], 3)
        codes = (nib | (hi << 4)) - 32  # (n, nsb, 2, 4, 32)
        w = (d[..., None] * sc).reshape(n, -1, 16, 1) * codes.reshape(n, -1, 16, 16).float()
    else:
        raise ValueError(f"unknown k-quant kind {kind!r}")
    return w.reshape(n, -1).to(dtype)


def linear_reference(kind: str, x: torch.Tensor, kq: torch.Tensor) -> torch.Tensor:
    """y = x · Wᵀ as the kernel computes it: each 32-block of x quantized to int8 (``dx = max|x| / 127``,
    ``qx = round(x / dx)``), then the exact products with the dequantized weight, summed in float64."""
    xf = x.reshape(-1, x.shape[-1]).float()
    xb = xf.view(xf.shape[0], -1, 32)
    dx = xb.abs().amax(-1) / 127.0
    inv = torch.where(dx != 0, 1.0 / dx, torch.zeros(()))
    qx = (xb * inv[..., None]).round().clamp(-127, 127)
    xq = (qx.double() * dx.double()[..., None]).reshape(xf.shape)
    y = xq @ dequantize(kind, kq).double().t()
    return y.to(x.dtype).reshape(*x.shape[:-1], kq.shape[0])


def define_fallback(lib: torch.library.Library) -> None:
    """Define this module's ops in Python on ``lib`` (the C++ library could not be built or loaded)."""
    for name, schema in SCHEMAS.items():
        lib.define(schema)

        def impl(x, kq, _kind=name[:4]):
            return F.linear(x, dequantize(_kind, kq, dtype=x.dtype))

        lib.impl(name, impl, "CompositeExplicitAutograd")


def register_fakes(namespace: str = "llamalab") -> None:
    """Register the fake (meta) implementations of this module's ops (torch.compile keeps them as calls)."""

    def fake(x, kq):
        return x.new_empty((*x.shape[:-1], kq.shape[0]))

    for name in SCHEMAS:
        torch.library.register_fake(f"{namespace}::{name}", fake)
