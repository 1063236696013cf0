"""Pure-PyTorch definitions of the block-quantized linears: dequantization, and the C++ kernel's math.

Layouts (GGUF's, with the per-block scales split out of the blocks):

* Q8_0: ``qs`` int8 (N, K), ``d`` float16 (N, K/32):           W = d · q
* Q4_0: ``qs`` uint8 (N, K/2), ``d`` float16 (N, K/32):        W = d · (q − 8)
* Q4_1: as Q4_0 plus ``m`` float16 (N, K/32):                 W = d · q + m

In a Q4 block of 32 weights, byte j of its 16 bytes holds weight j in the low nibble and weight j + 16
in the high nibble.

:func:`dequantize` gives the float weight (the fallback path: ``F.linear(x, dequantize(...))``).
:func:`block_linear_reference` reproduces what the C++ kernel computes — the activation quantized per
32-block to int8 (``dx = max|x| / 127``, ``qx = round(x / dx)``), exact integer dot products per block,
the scales applied once per block — so the kernel can be checked against it to float rounding.
"""

from __future__ import annotations

import torch

QK = 32
KINDS = ("q8_0", "q4_0", "q4_1")


def unpack_q4(qs: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 GGUF nibbles -> (N, K) uint8 codes 0..15 in weight order."""
    n = qs.shape[0]
    blocks = qs.view(n, -1, 16)
    return torch.cat((blocks & 15, blocks >> 4), dim=-1).view(n, -1)


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 in weight order -> (N, K/2) uint8 GGUF nibbles."""
    n = codes.shape[0]
    blocks = codes.to(torch.uint8).view(n, -1, QK)
    return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(n, -1).contiguous()


def codes(kind: str, qs: torch.Tensor) -> torch.Tensor:
    """Integer codes (N, K) as int16: signed for Q8_0, 0..15 for Q4_0 / Q4_1."""
    return (qs if kind == "q8_0" else unpack_q4(qs)).to(torch.int16)


def dequantize(kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (N, K) of a block-quantized tensor."""
    q = codes(kind, qs).to(torch.float32)
    n, k = q.shape
    q = q.view(n, k // QK, QK)
    if kind == "q4_0":
        q = q - 8.0
    w = q * d.float()[..., None]
    if kind == "q4_1":
        w = w + m.float()[..., None]
    return w.view(n, k).to(dtype)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8-valued codes (M, K/32, 32) as float32 and scales (M, K/32), as the kernel does."""
    xb = x.float().reshape(x.shape[0], -1, QK)
    dx = xb.abs().amax(-1) / 127.0
    inv = torch.where(dx != 0, 1.0 / dx, torch.zeros_like(dx))
    qx = (xb * inv[..., None]).round().clamp(-127, 127)
    return qx, dx


def block_linear_reference(kind: str, x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor,
                           m: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) float32 = what ``llamalab::<kind>_linear`` computes (up to float summation order)."""
    qx, dx = quantize_activation(x)
    q = codes(kind, qs).to(torch.float32)
    q = q.view(q.shape[0], -1, QK)
    dots = torch.einsum("mbk,nbk->mnb", qx, q)  # exact: |values| < 2**24
    dw = d.float()
    y = (dots * dx[:, None, :] * dw[None]).sum(-1)
    sx = dx * qx.sum(-1)  # (M, B): dx · Σ qx
    if kind == "q4_0":
        y = y - 8.0 * sx @ dw.t()
    elif kind == "q4_1":
        y = y + sx @ m.float().t()
    return y
