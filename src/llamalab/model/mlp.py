"""SwiGLU feed-forward network (Shazeer, 2020, "GLU Variants Improve Transformer", arXiv:2002.05202).

    FFN(x) = W_down · ( SiLU(W_gate · x) ⊙ (W_up · x) ),     SiLU(z) = z · σ(z)

Three bias-free projections: gate and up map hidden_size → intermediate_size, down maps back. The
gate branch, passed through SiLU ("swish"), multiplies the up branch element-wise. Llama uses
intermediate_size ≈ 8/3 · hidden_size (rounded to a multiple of 256) so that the three matrices
cost about as much as a classic 4× two-matrix MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
