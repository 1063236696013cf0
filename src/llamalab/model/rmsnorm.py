"""RMSNorm — root-mean-square layer normalisation (Zhang & Sennrich, 2019, arXiv:1910.07467).

    y = x / sqrt(mean(x²) + eps) * g

over the last (hidden) dimension, with a learned gain ``g`` (no bias, no mean subtraction; unlike
LayerNorm it does not re-centre). Llama applies it *before* attention and before the MLP of every
block (pre-norm) and once more before the output head. The statistics are computed in float32
whatever the model's dtype: the mean of squares of bf16 activations loses too much precision.
``eps`` comes from the checkpoint's config (``rms_norm_eps``: 1e-5 for Llama 2/3, 1e-6 for some).

Properties (tested): scaling the input by any c > 0 leaves the output unchanged (up to eps), and the
output of a unit-gain RMSNorm has root-mean-square 1.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
