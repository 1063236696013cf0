"""Linear layers that keep GGUF's Q8_0 / Q4_0 / Q4_1 blocks as they are and multiply with them directly.

A :class:`BlockQuantLinear` holds a weight (out, in) as blocks of 32 consecutive inputs of one output row,
in the file's own layout with the per-block fp16 scales split out (see :mod:`llamalab.kernels.reference`):

* ``q8_0``: ``qs`` int8 (out, in),          ``d`` fp16 (out, in/32)       W = d · q           (1.06 byte/weight)
* ``q4_0``: ``qs`` uint8 (out, in/2),       ``d``                         W = d · (q − 8)     (0.56 byte/weight)
* ``q4_1``: ``qs``, ``d`` and ``m`` fp16    (out, in/32)                  W = d · q + m       (0.63 byte/weight)

On CPU ``forward`` calls the ``llamalab::<kind>_linear`` op (:mod:`llamalab.kernels`: activations
quantized per block to int8, integer dot products; a GEMM on the dequantized weight for 32+ rows);
elsewhere, or when a gradient must reach the input, it multiplies by :meth:`dequantize`. The three
tensors are plain buffers, so the state dict saves to safetensors and loads back as is.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_dynamo_compiling

from llamalab import kernels
from llamalab.errors import WeightsError
from llamalab.kernels.reference import KINDS, QK, dequantize, pack_q4
from llamalab.quantization.linear import QuantizedLinear

GGML_TYPES = {"q8_0": 8, "q4_0": 2, "q4_1": 3}  # GGML tensor type ids
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and starting on a cache line (64 bytes; torch allocates so, numpy copies may not):
    vector loads that straddle two lines cost up to a third of the speed when streaming from memory."""
    t = t.contiguous()
    if t.device.type == "cpu" and t.data_ptr() % 64:
        t = torch.empty_like(t).copy_(t)
    return t


class BlockQuantLinear(QuantizedLinear):
    """y = x · Wᵀ with W kept in GGUF blocks of 32 (kind ``q8_0``, ``q4_0`` or ``q4_1``)."""

    def __init__(self, kind: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> None:
        if kind not in KINDS:
            raise WeightsError(f"unknown block kind {kind!r}; one of {', '.join(KINDS)}")
        out_features = qs.shape[0]
        in_features = qs.shape[1] * (1 if kind == "q8_0" else 2)
        super().__init__(in_features, out_features)
        want = (torch.int8 if kind == "q8_0" else torch.uint8)
        if qs.dim() != 2 or qs.dtype != want or in_features % QK:
            raise WeightsError(f"{kind} codes must be {want} (out, in{'' if kind == 'q8_0' else '/2'}) with in a "
                               f"multiple of 32, got {qs.dtype} {tuple(qs.shape)}")
        for name, t in (("d", d), ("m", m)):
            if t is not None and tuple(t.shape) != (out_features, in_features // QK):
                raise WeightsError(f"{kind} {name} must have shape ({out_features}, {in_features // QK}), got "
                                   f"{tuple(t.shape)}")
        if (kind == "q4_1") != (m is not None):
            raise WeightsError("q4_1 needs mins m; q8_0 / q4_0 take none")
        self.kind = kind
        kernels.load()
        self._op = getattr(torch.ops.llamalab, f"{kind}_linear").default  # (what a compiled graph calls)
        self._eager = getattr(kernels.OPS, f"{kind}_linear")  # the same op called unboxed (kernels.OPS)
        self.register_buffer("qs", _aligned(qs))
        self.register_buffer("d", _aligned(d.to(torch.float16)))
        self.register_buffer("m", None if m is None else _aligned(m.to(torch.float16)))
        self._refresh()

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_gguf(cls, raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> BlockQuantLinear:
        """From a GGUF tensor's raw bytes (ggml type 8 / 2 / 3) of torch shape (out, in), without dequantizing."""
        kind = {v: k for k, v in GGML_TYPES.items()}.get(ggml_type)
        if kind is None or len(shape) != 2:
            raise WeightsError(f"GGML type {ggml_type} with shape {shape} is not a Q8_0/Q4_0/Q4_1 matrix")
        out_f, in_f = shape
        nb = in_f // QK
        blocks = np.asarray(raw, dtype=np.uint8).reshape(out_f, nb, _BLOCK_BYTES[kind])
        with warnings.catch_warnings():  # (a read-only mmap of the file: only ever read from here)
            warnings.simplefilter("ignore", UserWarning)
            src8 = torch.from_numpy(blocks)
            # every block is an even number of bytes: its fp16 fields are whole int16 elements
            src16 = torch.from_numpy(blocks.view(np.int16)) if blocks.ctypes.data % 2 == 0 else None

        def field(lo: int, hi: int, dtype: torch.dtype, cols: int) -> torch.Tensor:
            """Bytes lo:hi of every block, gathered once (torch's strided copy: several times numpy's) straight
            into a cache-line aligned tensor."""
            out = torch.empty(out_f, cols, dtype=dtype)
            if hi - lo == 2 and src16 is not None:
                out.view(torch.int16).copy_(src16[..., lo // 2])
            else:
                out.view(torch.uint8).view(out_f, nb, hi - lo).copy_(src8[..., lo:hi])
            return out

        d = field(0, 2, torch.float16, in_f // QK)
        if kind == "q8_0":
            return cls(kind, field(2, 34, torch.int8, in_f), d)
        head = 2 if kind == "q4_0" else 4
        m = field(2, 4, torch.float16, in_f // QK) if kind == "q4_1" else None
        return cls(kind, field(head, head + 16, torch.uint8, in_f // 2), d, m)

    @classmethod
    def from_float(cls, weight: torch.Tensor | nn.Linear, kind: str = "q8_0") -> BlockQuantLinear:
        """Round-to-nearest block quantization of a float weight (out, in), as llama.cpp's reference does."""
        w = (weight.weight if isinstance(weight, nn.Linear) else weight).detach().float().cpu()
        out_f, in_f = w.shape
        if in_f % QK:
            raise WeightsError(f"block quantization needs in_features divisible by 32, got {in_f}")
        wb = w.view(out_f, in_f // QK, QK)
        if kind == "q8_0":
            d = (wb.abs().amax(-1) / 127.0).half()
            inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros(()))
            q = (wb * inv[..., None]).round().clamp(-127, 127).to(torch.int8)
            return cls(kind, q.view(out_f, in_f), d)
        if kind == "q4_0":  # the largest-magnitude weight maps to code 0 (-8 · d)
            idx = wb.abs().argmax(-1, keepdim=True)
            d = (wb.gather(-1, idx).squeeze(-1) / -8.0).half()
            inv = torch.where(d.float() != 0, 1.0 / d.float(), torch.zeros(()))
            q = (wb * inv[..., None] + 8.0).round().clamp(0, 15)
            return cls(kind, pack_q4(q.view(out_f, in_f)), d)
        if kind == "q4_1":
            lo, hi = wb.amin(-1), wb.amax(-1)
            d, m = ((hi - lo) / 15.0).half(), lo.half()
            inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros(()))
            q = ((wb - m.float()[..., None]) * inv[..., None]).round().clamp(0, 15)
            return cls(kind, pack_q4(q.view(out_f, in_f)), d, m)
        raise WeightsError(f"unknown block kind {kind!r}; one of {', '.join(KINDS)}")

    @classmethod
    def cat(cls, layers: list[BlockQuantLinear]) -> BlockQuantLinear:
        """One layer whose output rows are those of `layers` in order (e.g. q|k|v fused); same kind and width."""
        kinds = {lay.kind for lay in layers}
        widths = {lay.in_features for lay in layers}
        if len(kinds) != 1 or len(widths) != 1:
            raise WeightsError(f"cannot fuse block linears of kinds {sorted(kinds)} / widths {sorted(widths)}")
        m = torch.cat([lay.m for lay in layers]) if layers[0].m is not None else None
        return cls(layers[0].kind, torch.cat([lay.qs for lay in layers]), torch.cat([lay.d for lay in layers]), m)

    def permute_rows(self, index: torch.Tensor) -> BlockQuantLinear:
        """Reorder the output rows in place (e.g. GGUF's q/k RoPE layout -> ours); blocks stay intact."""
        # (index_select: indexing a uint8 tensor by a LongTensor takes ~200x longer for the same rows)
        self.qs = _aligned(self.qs.index_select(0, index))
        self.d = _aligned(self.d.index_select(0, index))
        if self.m is not None:
            self.m = _aligned(self.m.index_select(0, index))
        self._refresh()
        return self

    # ---------------------------------------------------------------- compute
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.qs.device.type == "cpu" and kernels.native():
            w = torch.ops.llamalab.dequantize(self.qs, self.d, self.m, KINDS.index(self.kind), dtype == torch.bfloat16)
            return w.to(dtype)
        return dequantize(self.kind, self.qs, self.d, self.m, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and x.is_cpu and not (x.requires_grad and torch.is_grad_enabled()):
            if is_dynamo_compiling():
                return self._op(x, self.qs, self.d) if self.m is None else self._op(x, self.qs, self.d, self.m)
            return self._eager(x, *self._args)  # (a plain attribute, not three buffer look-ups per call)
        return F.linear(x, self.dequantize(x.dtype))

    def _refresh(self) -> None:
        self.__dict__["_args"] = (self.qs, self.d) if self.m is None else (self.qs, self.d, self.m)

    @property
    def joint_kind(self) -> int:
        """The kind's index for ``llamalab::block_linears``: layers of one kind reading one input (q|k|v,
        gate|up) are multiplied in one call (:mod:`llamalab.model.shared_input`)."""
        return KINDS.index(self.kind)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor | None:
        return kernels.block_linear(self.kind, x2d, self.qs, self.d, self.m) if x2d.device.type == "cpu" else None

    @property
    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def pop_block_layer(state: dict[str, torch.Tensor], name: str, like: nn.Linear, source: object) -> BlockQuantLinear:
    """The :class:`BlockQuantLinear` saved under ``name.qs`` / ``.d`` / ``.m`` in a checkpoint's state dict
    (tensors popped from `state`), checked against the float layer `like` it replaces."""
    qs, d, m = state.pop(f"{name}.qs"), state.pop(f"{name}.d", None), state.pop(f"{name}.m", None)
    if d is None:
        raise WeightsError(f"{source}: missing tensor {name}.d for the blocks {name}.qs")
    kind = "q8_0" if qs.dtype == torch.int8 else ("q4_0" if m is None else "q4_1")
    layer = BlockQuantLinear(kind, qs, d, m)
    if (layer.out_features, layer.in_features) != (like.out_features, like.in_features):
        raise WeightsError(f"{source}: blocks {name} are {layer.out_features}x{layer.in_features}, the config "
                           f"expects {like.out_features}x{like.in_features}")
    return layer
