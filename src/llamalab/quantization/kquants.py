"""Linear layers that keep GGUF's Q4_K / Q6_K super-blocks as they are and multiply with them directly.

A :class:`KQuantLinear` holds a weight (out, in) as one uint8 buffer ``kq`` (out, in/256 · bytes per
super-block): the file's bytes as stored, 256 consecutive inputs of one output row per super-block.

* ``q4_k`` (144 bytes, 4.5 bits per weight): fp16 ``d`` and ``dmin``, 12 bytes holding the 6-bit scales
  ``sc_j`` and mins ``m_j`` of the 8 sub-blocks of 32, then 128 bytes of 4-bit codes ``q`` (bytes 32c..32c+31:
  sub-block 2c in the low nibbles, 2c+1 in the high ones):  ``w = d·sc_j · q − dmin·m_j``.
* ``q6_k`` (210 bytes, 6.56 bits per weight): 128 bytes ``ql`` (the codes' low 4 bits), 64 bytes ``qh``
  (their high 2 bits), 16 int8 scales ``sc_i`` (one per 16 weights), fp16 ``d``:  ``w = d·sc_i · (q − 32)``
  with q = 0..63.

The kernel (``llamalab::q4_k_linear`` / ``q6_k_linear``, :mod:`llamalab.kernels.kquants`, C++ in
``kquants.cpp``) quantizes each 32-block of an activation row to int8 (``dx = max|x| / 127``), takes integer dot
products of the codes with it per sub-block (per half-block for Q6_K's per-16 scales) and applies the scales
in float once per (half) block; the mins (Q4_K) and the −32 offset (Q6_K) enter through the activation's
block sums. So it equals ``x_q · Wᵀ`` with x_q the int8-rounded activation, to float32 rounding. From 24
activation rows on it dequantizes the weight and runs a float32 GEMM instead.

On CPU with the C++ kernels built ``forward`` calls that op; elsewhere, or when a gradient must reach the
input, it multiplies by :meth:`dequantize` (plain PyTorch, bit for bit ``gguf.quants.dequantize``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.compiler import is_dynamo_compiling

from llamalab import kernels
from llamalab.errors import WeightsError
from llamalab.kernels.kquants import QK_K, SB_BYTES
from llamalab.kernels.kquants import dequantize as _dequantize
from llamalab.quantization.linear import QuantizedLinear

KQ_GGML_TYPES = {"q4_k": 12, "q6_k": 14}  # GGML tensor type ids
KQ_KINDS = tuple(KQ_GGML_TYPES)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and starting on a 64-byte cache line (numpy copies may not)."""
    t = t.contiguous()
    if t.device.type == "cpu" and t.data_ptr() % 64:
        t = torch.empty_like(t).copy_(t)
    return t


def kind_for_row_bytes(row_bytes: int, in_features: int) -> str | None:
    """The k-quant kind whose rows of `in_features` weights take `row_bytes` bytes (None: neither)."""
    if in_features <= 0 or in_features % QK_K:
        return None
    for kind, nb in SB_BYTES.items():
        if row_bytes == in_features // QK_K * nb:
            return kind
    return None


class KQuantLinear(QuantizedLinear):
    """y = x · Wᵀ with W kept in GGUF super-blocks of 256 (kind ``q4_k`` or ``q6_k``)."""

    def __init__(self, kind: str, kq: torch.Tensor, in_features: int) -> None:
        if kind not in SB_BYTES:
            raise WeightsError(f"unknown k-quant kind {kind!r}; one of {', '.join(SB_BYTES)}")
        if in_features <= 0 or in_features % QK_K:
            raise WeightsError(f"{kind} needs in_features a multiple of 256, got {in_features}")
        row = in_features // QK_K * SB_BYTES[kind]
        if kq.dim() != 2 or kq.dtype != torch.uint8 or kq.shape[1] != row:
            raise WeightsError(f"{kind} super-blocks must be uint8 (out, {row}) for {in_features} inputs, got "
                               f"{kq.dtype} {tuple(kq.shape)}")
        super().__init__(in_features, kq.shape[0])
        self.kind = kind
        kernels.load()
        self._op = getattr(torch.ops.llamalab, f"{kind}_linear").default  # (what a compiled graph calls)
        self._eager = getattr(kernels.OPS, f"{kind}_linear")  # the same op called unboxed (kernels.OPS)
        self.register_buffer("kq", _aligned(kq))

    @classmethod
    def from_gguf(cls, raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> KQuantLinear:
        """From a GGUF tensor's raw bytes (ggml type 12 / 14) of torch shape (out, in), kept as stored."""
        kind = {v: k for k, v in KQ_GGML_TYPES.items()}.get(ggml_type)
        if kind is None or len(shape) != 2:
            raise WeightsError(f"GGML type {ggml_type} with shape {shape} is not a Q4_K/Q6_K matrix")
        out_f, in_f = shape
        if in_f % QK_K:
            raise WeightsError(f"{kind} needs in_features a multiple of 256, got {in_f}")
        data = np.asarray(raw, dtype=np.uint8).reshape(out_f, in_f // QK_K * SB_BYTES[kind])
        return cls(kind, torch.from_numpy(data.copy()), in_f)

    def permute_rows(self, index: torch.Tensor) -> KQuantLinear:
        """Reorder the output rows in place (e.g. GGUF's q/k RoPE layout -> ours); super-blocks stay intact."""
        self.kq = _aligned(self.kq.index_select(0, index))  # (not kq[index]: ~200x slower on uint8)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize(self.kind, self.kq, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            return self._op(x, self.kq) if is_dynamo_compiling() else self._eager(x, self.kq)
        return F.linear(x, self.dequantize(x.dtype))

    @property
    def weight_nbytes(self) -> int:
        return self.kq.numel() * self.kq.element_size()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def pop_kquant_layer(state: dict[str, torch.Tensor], name: str, like, source: object) -> KQuantLinear:
    """The :class:`KQuantLinear` saved under ``name.kq`` in a checkpoint's state dict (popped from `state`),
    its kind found from the row byte count, checked against the float layer `like` it replaces."""
    kq = state.pop(f"{name}.kq")
    kind = kind_for_row_bytes(kq.shape[1], like.in_features) if kq.dim() == 2 else None
    if kind is None or kq.dtype != torch.uint8 or kq.shape[0] != like.out_features:
        raise WeightsError(f"{source}: k-quant {name}.kq is {kq.dtype} {tuple(kq.shape)}, not Q4_K/Q6_K rows of a "
                           f"{like.out_features}x{like.in_features} linear")
    return KQuantLinear(kind, kq, like.in_features)
