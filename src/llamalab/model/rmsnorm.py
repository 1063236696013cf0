"""RMSNorm — root-mean-square layer normalisation (Zhang & Sennrich, 2019, arXiv:1910.07467).

    y = x / sqrt(mean(x²) + eps) * g

over the last (hidden) dimension, with a learned gain ``g`` (no bias, no mean subtraction; unlike
LayerNorm it does not re-centre). Llama applies it *before* attention and before the MLP of every
block (pre-norm) and once more before the output head. The statistics are computed in float32
whatever the model's dtype: the mean of squares of bf16 activations loses too much precision.
``eps`` comes from the checkpoint's config (``rms_norm_eps``: 1e-5 for Llama 2/3, 1e-6 for some).

In eager CPU inference (grad mode off, not traced by torch.compile) with :func:`llamalab.kernels.fused` on, the
forward is one call of the C++ op ``llamalab::rms_norm`` (kernels/norm.py): the same math as below, the
rounding steps included; ``kernels.set_fused(False)`` / ``LLAMALAB_FUSED=0`` run the plain ops instead.

Properties (tested): scaling the input by any c > 0 leaves the output unchanged (up to eps), and the
output of a unit-gain RMSNorm has root-mean-square 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamalab import kernels
from llamalab.module_call import DirectCall


class RMSNorm(DirectCall, nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (self.weight from _parameters directly — unless a subclass, e.g. a parametrization, makes it a property)
        w = self._parameters["weight"] if type(self) is RMSNorm else self.weight
        if kernels.fused_for(x, w):  # one C++ call, the same math as below
            return kernels.OPS.rms_norm(x, w, self.eps)
        # F.rms_norm computes x * rsqrt(mean(x²) + eps) [* g] in float32 in one call (fewer eager ops than
        # spelling it out; the same arithmetic). Other dtypes: normalise in float32, round to the model's
        # dtype, then apply the gain — Hugging Face's order, so bf16 results round the same way.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

