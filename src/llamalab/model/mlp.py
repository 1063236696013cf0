"""SwiGLU feed-forward network (Shazeer, 2020, "GLU Variants Improve Transformer", arXiv:2002.05202).

    FFN(x) = W_down · ( SiLU(W_gate · x) ⊙ (W_up · x) ),     SiLU(z) = z · σ(z)

Three bias-free projections: gate and up map hidden_size → intermediate_size, down maps back. The
gate branch, passed through SiLU ("swish"), multiplies the up branch element-wise. Llama uses
intermediate_size ≈ 8/3 · hidden_size (rounded to a multiple of 256) so that the three matrices
cost about as much as a classic 4× two-matrix MLP.

In eager CPU inference (grad mode off, not traced by torch.compile) with :func:`llamalab.kernels.fused` on,
``SiLU(gate) ⊙ up`` is one call of the C++ op ``llamalab::silu_mul`` (kernels/norm.py): the same math, with
torch's rounding of each step for bfloat16 / float16; ``kernels.set_fused(False)`` runs the plain ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamalab import kernels
from llamalab.model.shared_input import joint_swiglu
from llamalab.module_call import DirectCall

_GATE_UP = ("gate_proj", "up_proj")


class SwiGLU(DirectCall, nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = joint_swiglu(self, _GATE_UP, x)  # gate, up and silu_mul in one kernel call (model/shared_input.py)
        if h is not None:
            return self._modules["down_proj"](h)  # (self.down_proj without nn.Module.__getattr__, see Block)
        gate, up = self.gate_proj(x), self.up_proj(x)
        if kernels.fused_for(gate, up):
            return self.down_proj(kernels.OPS.silu_mul(gate, up))  # the same math in one C++ call
        return self.down_proj(F.silu(gate) * up)
