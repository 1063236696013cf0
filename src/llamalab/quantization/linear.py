"""The base class of every quantized linear (:class:`QuantizedLinear`): shapes, the kernel switch, the float
fallback. It lives apart from the layers so that :mod:`.quantize` (int8 / int4, and the choice of layer) can
import :mod:`.blocks` (GGUF blocks) while both subclass it, with no import cycle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.module_call import DirectCall


class QuantizedLinear(DirectCall, nn.Module):
    """Common part of the quantized linears: shapes, the kernel switch, float fallback."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.use_kernel = True

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor | None:  # pragma: no cover - abstract
        return None

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if self.use_kernel and not needs_grad:
            shape = x.shape
            out = self._kernel(x.reshape(-1, shape[-1]))
            if out is not None:
                return out.to(x.dtype).view(*shape[:-1], self.out_features)
        return F.linear(x, self.dequantize(x.dtype))
