"""Weight-only int8 / int4 quantization of a Llama's linear layers.

Only the weights are quantized; activations, the residual stream, norms, RoPE and the KV cache stay
in floating point. Each ``nn.Linear`` of the blocks (q/k/v/o, gate/up/down; the output head too with
``include_lm_head=True``; the embedding lookup always stays float) is swapped in place for a
quantized linear. Two layouts:

**Blocks (the default, ``layout="blocks"``)** — GGUF's own blocks of 32 consecutive inputs of one
output row, held by :class:`llamalab.quantization.blocks.BlockQuantLinear` and multiplied by our C++
kernels (``torch.ops.llamalab.q8_0_linear`` / ``q4_0_linear`` / ``q4_1_linear``, :mod:`llamalab.kernels`),
the layers a GGUF file's Q8_0 / Q4_0 / Q4_1 weights load into. Round-to-nearest, as llama.cpp's
reference quantizer, with ``d`` (and ``m``) the block's stored float16 values:

* int8 -> **Q8_0**: ``d = fp16(max|W_b| / 127)``, ``q = clamp(round(W / d), -127, 127)``, ``Ŵ = d · q``.
* int4 (group size 32, asymmetric: the default) -> **Q4_1**: ``d = fp16((max − min) / 15)``,
  ``m = fp16(min)``, ``q = clamp(round((W − m) / d), 0, 15)``, ``Ŵ = d · q + m``.
* int4 (group size 32, ``symmetric=True``) -> **Q4_0**: the block's largest-magnitude weight ``w*`` sets
  ``d = fp16(w* / −8)``, ``q = clamp(round(W / d) + 8, 0, 15)``, ``Ŵ = d · (q − 8)``.

Error bound per element (round-to-nearest against the *stored* ``d`` / ``m``, so the fp16 rounding of
the scale is inside the bound, not added to it):

* Q8_0: ``|W − Ŵ| ≤ d / 2``. fp16 rounds ``max|W_b| / 127`` by at most 2⁻¹¹ relative, so
  ``max|W_b| / d ≤ 127.07`` and no code is clamped. (Only a block whose ``d`` is an fp16 subnormal,
  ``max|W_b| < 127 · 2⁻¹⁴ ≈ 0.0078``, can clamp; its error is then ≤ max(d / 2, 2⁻¹⁸).)
* Q4_1: ``|W − Ŵ| ≤ d / 2`` for every block whose range spans zero (min ≤ 0 ≤ max, i.e. any real
  weight block); in general ``≤ max(d / 2, 2⁻¹¹ · (max − min + |min|) + 2⁻²¹)``, the second term being
  the fp16 rounding of ``d`` and ``m`` at the clamped ends.
* Q4_0: ``|W − Ŵ| ≤ |d| · (1 + 2⁻⁸)``: the grid ``d · (−8..7)`` reaches ``w*`` but stops one step short
  of ``−w*``, so elements beyond ``7.5 |d|`` on the side opposite ``w*`` are clamped; all others are
  within ``|d| / 2``.

``tests/test_quantize.py`` checks these bounds on random weights, and Q8_0's on all of SmolLM2's linears.

**Packed (``layout="packed"``, and int4 with group size 64 / 128)** — PyTorch's packed CPU kernels:

* :class:`Int8Linear` — symmetric, one scale per output channel (round-to-nearest):
  ``s_n = max_k |W[n,k]| / 127``,  ``q = clamp(round(W / s_n), -127, 127)``,  ``Ŵ = q · s_n``.
  The error per element is at most s_n / 2.
* :class:`Int4Linear` — group-wise over the input dimension (groups of ``group_size`` = 32/64/128
  consecutive inputs of one output row), 4-bit codes q ∈ {0..15} with a scale and a zero per group:
  ``Ŵ = (q − 8) · s + z``.  Asymmetric (default, "zero-point"): ``s = (max − min) / 15``,
  ``z = min + 8 s``, so the grid spans [min, max] exactly.  Symmetric: ``s = max|W| / 7``, ``z = 0``.
  The error per element is at most s / 2.  Scales and zeros are stored in bfloat16 (what the kernel
  reads); codes are chosen against the rounded scales, so the bound holds for the stored values.

A layer whose input width is not a multiple of 32 cannot hold blocks and takes the packed layer
(int8 per channel; int4 with the largest power-of-two group ≤ ``group_size`` that divides the width).

Compute of the packed layers.  On CPU ``torch._weight_int8pack_mm`` (per-channel int8) and
``torch._weight_int4pack_mm_for_cpu`` (int4, its own packed layout) do the products straight from the
quantized weights. Both are fast only with bfloat16 activations (with float32 ones they are 5–30×
slower), so the input is cast to bf16 for the product and the output cast back.  Anywhere else —
another device, group-wise int8, shapes the kernels refuse, or when a gradient must flow to the input
(LoRA on an int8 base) — the fallback dequantizes the weight to the activation dtype and calls
``F.linear``: pure PyTorch, runs on any device.  ``module.use_kernel = False`` forces it (block layers
alike). The kernels read their operands with aligned vector loads and crash (SIGSEGV) on a weight or
activation that does not start on a 64-byte boundary — which is where memory-mapped safetensors
put tensors. So every weight is copied to aligned memory once, when the layer is built or loaded
(:func:`aligned`), a misaligned activation is copied before the call, and a layer whose buffers
are somehow misaligned takes the fallback instead of the kernel.

The int4 kernel's packed layout depends on the CPU's vector width (its own nibble shuffle).  It is
a fixed permutation of the codes for each weight shape, so it is learned once per shape by packing
a few probe matrices whose codes spell out each element's index (:func:`_int4pack_order`); the
portable codes of a kernel-layout weight (to save it, dequantize it or merge LoRA into it) are then
one gather, and need not be kept twice in memory.

Checkpoint format (``save_quantized`` / ``Llama.from_pretrained``, which ``llamalab.load`` calls when
``config.json`` has ``llamalab_quantization``).  ``model.safetensors`` holds the float tensors under
their HF names and, for each quantized linear ``P`` (e.g. ``model.layers.0.self_attn.q_proj``):

* blocks: ``P.qs`` (int8 (out, in) for Q8_0; uint8 (out, in/2) nibbles for Q4_0 / Q4_1), ``P.d`` and,
  for Q4_1, ``P.m`` float16 (out, in/32) — the kind follows from the tensors;
* packed int8: ``P.qweight`` int8 (out, in); ``P.scales`` float32 (out,) — or (out, in/g) when group-wise;
* packed int4: ``P.qweight`` uint8 (out, in/2), two codes per byte, even input column in the low nibble;
  ``P.scales`` and ``P.zeros`` bfloat16 (out, in/g), meaning ``Ŵ = (q − 8) · s + z``.

Each layer is rebuilt from its own tensors (:func:`llamalab.quantization.saved.pop_quantized_layer`), so
a directory may mix the two, and checkpoints written before blocks were the default still load.  The
group size of a packed int4 layer follows from the shapes (in / scales.shape[1]).  ``config.json`` gets
``"llamalab_quantization": {"method": "int8"|"int4", "layout": "blocks"|"packed"|"mixed", "kinds": [...],
"group_size": …, "symmetric": …, "lm_head": …, "format": 1}`` (``kinds``: the block kinds used; "mixed":
some layers too narrow for blocks).
transformers cannot read these directories; convert back with
``llamalab.quantization.quantize.dequantize_model`` + ``save_pretrained`` if needed.

Importers of already-quantized GGUF weights use :class:`~llamalab.quantization.blocks.BlockQuantLinear`
(``from_gguf``: the file's blocks as they are). :meth:`Int8Linear.from_blocks` /
:meth:`Int4Linear.from_blocks` map Q8_0 / Q4_0 / Q4_1 codes onto the packed layers instead::

    from llamalab.quantization.quantize import Int8Linear, Int4Linear, replace_linear
    # GGUF Q8_0: int8 codes q (out, in) and one scale d per 32 consecutive inputs, W = q · d
    layer = Int8Linear.from_blocks(q_int8, d.view(out, in // 32), group_size=32)
    # GGUF Q4_0: codes q ∈ 0..15 as uint8 (out, in), W = (q − 8) · d
    layer = Int4Linear.from_blocks(q_uint8, d.view(out, in // 32), group_size=32)
    # GGUF Q4_1: codes q ∈ 0..15 as uint8 (out, in), W = q · d + m
    layer = Int4Linear.from_blocks(q_uint8, d.view(out, in // 32), mins=m.view(out, in // 32), group_size=32)
    replace_linear(model, "layers.0.self_attn.q_proj", layer)   # our module name (no "model." prefix)
    model.config.quantization = {"method": "int4", "layout": "packed", "group_size": 32, "symmetric": False,
                                 "lm_head": False, "format": 1}  # so that save_pretrained/save_quantized
                                                                 # write a checkpoint load_quantized reads

``q`` must be unpacked (one code per element, in the weight's natural (out, in) order, already
undoing any GGUF row permutation such as the q/k RoPE one); ``d``/``m`` may be float16 or float32.
Q8_0 keeps its per-32 scales exactly (group-wise int8, computed with the fallback path); pass
``per_channel=True`` to re-quantize it to per-channel int8 and use the faster int8 kernel.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from torch import nn

from llamalab.errors import ConfigError, WeightsError
from llamalab.kernels.hugepages import repack_if_in_huge_pages
from llamalab.quantization.blocks import BlockQuantLinear
from llamalab.quantization.linear import QuantizedLinear

FORMAT_VERSION = 1
METHODS = ("int8", "int4")
LAYOUTS = ("blocks", "packed")  # GGUF Q8_0 / Q4_0 / Q4_1 blocks on our kernels; PyTorch's packed int8 / int4
DEFAULT_GROUP_SIZE = 32
BLOCK_SIZE = 32  # inputs per GGUF block
# the linear layers of a block (our module-name suffixes)
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


ALIGNMENT = 64  # bytes: the packed CPU kernels' vector loads need operands starting on this boundary


def _cpu_kernels_enabled(device: torch.device) -> bool:
    return device.type == "cpu"


def is_aligned(t: torch.Tensor) -> bool:
    return t.device.type != "cpu" or t.data_ptr() % ALIGNMENT == 0


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` when contiguous and starting on a 64-byte boundary (or not on CPU), else an aligned copy."""
    if t.device.type != "cpu" or (t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0):
        return t
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if out.data_ptr() % ALIGNMENT:  # torch's CPU allocator aligns to 64 bytes; make sure regardless
        raw = torch.empty(t.numel() * t.element_size() + ALIGNMENT, dtype=torch.uint8)
        start = -raw.data_ptr() % ALIGNMENT
        out = raw[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    return out.copy_(t)


def _aligned_input(x: torch.Tensor) -> torch.Tensor:
    """The bf16 activation operand of a kernel: contiguous and 64-byte aligned (copied only if not)."""
    x = x.to(torch.bfloat16).contiguous()
    if torch.compiler.is_compiling():  # compiled graphs allocate their own (aligned) buffers
        return x
    return aligned(x) if x.data_ptr() % ALIGNMENT else x


# ============================================================================================ int8
class Int8Linear(QuantizedLinear):
    """y = x · Ŵᵀ with Ŵ = q · s: int8 codes, per-output-channel (or per-group) float32 scales."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> None:
        out_features, in_features = qweight.shape
        super().__init__(in_features, out_features)
        if qweight.dtype != torch.int8:
            raise WeightsError(f"Int8Linear needs int8 codes, got {qweight.dtype}")
        if group_size is None:
            if tuple(scales.shape) not in ((out_features,), (out_features, 1)):
                raise WeightsError(f"per-channel int8 scales must have shape ({out_features},), got "
                                   f"{tuple(scales.shape)}")
            scales = scales.reshape(out_features)
        elif in_features % group_size or tuple(scales.shape) != (out_features, in_features // group_size):
            raise WeightsError(f"group-wise int8 scales must have shape ({out_features}, {in_features}/"
                               f"{group_size}), got {tuple(scales.shape)}")
        self.group_size = group_size
        self._set(qweight, scales)

    def _set(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        """Hold the codes and scales in 64-byte aligned memory (copied once here, never per call)."""
        self.register_buffer("qweight", aligned(qweight.contiguous()))
        self.register_buffer("scales", aligned(scales.float().contiguous()))
        self.register_buffer("_scales_bf16", aligned(scales.to(torch.bfloat16).contiguous()), persistent=False)
        self._kernel_ready = is_aligned(self.qweight) and is_aligned(self._scales_bf16)

    @classmethod
    def from_float(cls, weight: torch.Tensor | nn.Linear, group_size: int | None = None) -> Int8Linear:
        """Symmetric round-to-nearest quantization of a float weight (out, in)."""
        w = (weight.weight if isinstance(weight, nn.Linear) else weight).detach().float()
        out_f, in_f = w.shape
        wg = w if group_size is None else w.view(out_f, in_f // group_size, group_size)
        scales = wg.abs().amax(-1) / 127.0
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = (wg / scales[..., None]).round().clamp(-127, 127).to(torch.int8).view(out_f, in_f)
        return cls(q, scales, group_size)

    @classmethod
    def from_blocks(cls, qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None,
                    per_channel: bool = False) -> Int8Linear:
        """Already-quantized int8 codes (out, in) and scales (out,) or (out, in/group_size).

        ``per_channel=True`` re-quantizes group-wise blocks (GGUF Q8_0) to per-channel scales, which
        the fast CPU kernel needs (adds at most half a new step of error per element)."""
        if group_size is not None and per_channel:
            w = (qweight.float().view(qweight.shape[0], -1, group_size) * scales.float()[..., None])
            return cls.from_float(w.view(qweight.shape))
        return cls(qweight.to(torch.int8), scales.float(), group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.qweight.to(dtype)
        if self.group_size is None:
            return q * self.scales.to(dtype)[:, None]
        n, k = q.shape
        return (q.view(n, k // self.group_size, self.group_size) * self.scales.to(dtype)[..., None]).view(n, k)

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor | None:
        if self.group_size is not None or not _cpu_kernels_enabled(x2d.device) or not self._kernel_ready:
            return None
        return torch._weight_int8pack_mm(_aligned_input(x2d), self.qweight, self._scales_bf16)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001 - torch signature
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._set(self.qweight, self.scales)  # realign (assign=True may bring in mmapped tensors); fresh bf16 scales

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {g}"


# ============================================================================================ int4
def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8, even column in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def _to_int4pack(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> the CPU int4 kernel's packed weight (its layout depends on the CPU)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


@functools.lru_cache(maxsize=32)
def _int4pack_order(n: int, k: int) -> torch.Tensor | None:
    """Which code each nibble of the kernel's packed (n, k) weight holds: flat indices into the codes.

    The packing only moves nibbles, so packing probe matrices whose codes are the base-16 digits of
    each element's flat index spells out, nibble by nibble, where every element went. None when the
    layout is not such a permutation (then the portable codes are kept beside the kernel's)."""
    index = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    for digit in range(max(1, math.ceil(math.log(n * k, 16)))):
        probe = ((index >> (4 * digit)) & 15).view(n, k)
        order |= _unpack_nibbles(_to_int4pack(probe).reshape(1, -1)).reshape(-1).long() << (4 * digit)
    if order.numel() != n * k or int(order.max()) >= n * k or not bool((torch.bincount(order) == 1).all()):
        return None
    check = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return order if torch.equal(_from_int4pack(_to_int4pack(check), order, n, k), check) else None


def _from_int4pack(packed: torch.Tensor, order: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The (n, k) uint8 codes of a kernel-packed weight, given its :func:`_int4pack_order`."""
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[order] = _unpack_nibbles(packed.reshape(1, -1)).reshape(-1)
    return codes.view(n, k)


class Int4Linear(QuantizedLinear):
    """y = x · Ŵᵀ with Ŵ = (q − 8) · s + z per group of ``group_size`` inputs; q ∈ 0..15.

    On CPU the codes live only in the kernel's packed layout (0.5 byte/weight); the portable layout
    of the checkpoint is recovered by a gather when the state dict is read (see :meth:`portable`)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features)
        if in_features % group_size or in_features % 2:
            raise WeightsError(f"int4 group size {group_size} does not divide in_features {in_features}")
        n_groups = in_features // group_size
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (out_features, n_groups):
                raise WeightsError(f"int4 {name} must have shape ({out_features}, {n_groups}), got {tuple(t.shape)}")
        self.group_size = group_size
        self._set(codes, scales, zeros)

    def _set(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """(Re)place the weight: kernel layout on CPU when the kernel takes the shape, else portable."""
        for name in ("kernel_weight", "kernel_scales_zeros", "qweight", "scales", "zeros"):
            self._buffers.pop(name, None)
        scales = scales.to(torch.bfloat16).contiguous()
        zeros = zeros.to(torch.bfloat16).contiguous()
        order = None
        if _cpu_kernels_enabled(codes.device):
            try:
                packed = _to_int4pack(codes)
                order = _int4pack_order(self.out_features, self.in_features)
                sz = torch.stack((scales.t(), zeros.t()), dim=-1).contiguous()  # (n_groups, N, 2)
                self.register_buffer("kernel_weight", aligned(packed), persistent=False)
                self.register_buffer("kernel_scales_zeros", aligned(sz), persistent=False)
            except (RuntimeError, AttributeError):
                pass
        if not self.in_kernel_layout or order is None:  # no kernel, or its layout cannot be read back
            self.register_buffer("qweight", _pack_nibbles(codes), persistent=False)
            self.register_buffer("scales", scales, persistent=False)
            self.register_buffer("zeros", zeros, persistent=False)

    @property
    def in_kernel_layout(self) -> bool:
        return "kernel_weight" in self._buffers

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_float(cls, weight: torch.Tensor | nn.Linear, group_size: int = DEFAULT_GROUP_SIZE,
                   symmetric: bool = False) -> Int4Linear:
        """Round-to-nearest group-wise 4-bit quantization of a float weight (out, in)."""
        w = (weight.weight if isinstance(weight, nn.Linear) else weight).detach().float()
        out_f, in_f = w.shape
        if in_f % group_size:
            raise WeightsError(f"int4 group size {group_size} does not divide in_features {in_f}")
        wg = w.view(out_f, in_f // group_size, group_size)
        if symmetric:
            scales = wg.abs().amax(-1) / 7.0
            scales = torch.where(scales > 0, scales, torch.ones_like(scales)).to(torch.bfloat16).float()
            zeros = torch.zeros_like(scales)
        else:
            lo, hi = wg.amin(-1), wg.amax(-1)
            scales = (hi - lo) / 15.0
            scales = torch.where(scales > 0, scales, torch.ones_like(scales)).to(torch.bfloat16).float()
            zeros = (lo + 8 * scales).to(torch.bfloat16).float()
        q = ((wg - zeros[..., None]) / scales[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
        return cls(q.view(out_f, in_f).to(w.device), scales, zeros, group_size)

    @classmethod
    def from_blocks(cls, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                    group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        """Already-quantized 4-bit codes (out, in) with values 0..15 and per-group scales (out, in/g).

        ``mins is None``: Ŵ = (q − 8) · scale (GGUF Q4_0).  Otherwise Ŵ = q · scale + min (GGUF Q4_1),
        stored as zero = min + 8 · scale."""
        scales = scales.float()
        zeros = torch.zeros_like(scales) if mins is None else mins.float() + 8 * scales
        return cls(codes, scales, zeros, group_size)

    @classmethod
    def from_packed(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> Int4Linear:
        """From the checkpoint layout: uint8 (out, in/2) nibbles, scales/zeros (out, in/g)."""
        codes = _unpack_nibbles(qweight)
        return cls(codes, scales, zeros, codes.shape[1] // scales.shape[1])

    # ---------------------------------------------------------------- views of the weight
    def portable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight uint8 (N, K/2), scales bf16 (N, K/g), zeros bf16 (N, K/g)) — the checkpoint layout."""
        if "qweight" in self._buffers:
            return self.qweight, self.scales, self.zeros
        order = _int4pack_order(self.out_features, self.in_features)
        assert order is not None  # _set keeps the portable codes otherwise
        codes = _from_int4pack(self.kernel_weight, order, self.out_features, self.in_features)
        sz = self.kernel_scales_zeros
        return _pack_nibbles(codes), sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        qweight, scales, zeros = self.portable()
        codes = _unpack_nibbles(qweight).to(dtype)
        n, k = codes.shape
        g = self.group_size
        w = (codes.view(n, k // g, g) - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]
        return w.view(n, k)

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor | None:
        if not self.in_kernel_layout or x2d.device.type != "cpu":
            return None
        return torch.ops.aten._weight_int4pack_mm_for_cpu(_aligned_input(x2d), self.kernel_weight,
                                                          self.group_size, self.kernel_scales_zeros)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001 - torch signature
        qweight, scales, zeros = self.portable()
        destination[prefix + "qweight"] = qweight
        destination[prefix + "scales"] = scales
        destination[prefix + "zeros"] = zeros

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: ANN001 - torch signature
        keys = [prefix + k for k in ("qweight", "scales", "zeros")]
        missing = [k for k in keys if k not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        qweight, scales, zeros = (state_dict[k] for k in keys)
        if tuple(qweight.shape) != (self.out_features, self.in_features // 2) or scales.shape != zeros.shape:
            error_msgs.append(f"{prefix}: int4 tensors of shape {tuple(qweight.shape)} do not fit "
                              f"({self.out_features}, {self.in_features // 2})")
            return
        self.group_size = self.in_features // scales.shape[1]
        self._set(_unpack_nibbles(qweight), scales, zeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


# ============================================================================================ model level
def replace_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule called ``name`` (dotted path, our names) for ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _fit_group(in_features: int, group_size: int) -> int:
    g = group_size
    while g > 1 and in_features % g:
        g //= 2
    if g < 16:
        raise ConfigError(f"cannot find an int4 group size <= {group_size} dividing in_features {in_features}")
    return g


def block_kind(in_features: int, method: str, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False,
               layout: str = "blocks") -> str | None:
    """The GGUF block kind (``q8_0`` / ``q4_1`` / ``q4_0``) a linear of this width gets, or None for the
    packed :class:`Int8Linear` / :class:`Int4Linear` (``layout="packed"``, int4 groups other than 32, or a
    width that is not a multiple of 32)."""
    if layout != "blocks" or in_features % BLOCK_SIZE:
        return None
    if method == "int8":
        return "q8_0"
    if method == "int4" and group_size == BLOCK_SIZE:
        return "q4_0" if symmetric else "q4_1"
    return None


def quantize_linear(linear: nn.Linear, method: str, group_size: int = DEFAULT_GROUP_SIZE,
                    symmetric: bool = False, layout: str = "blocks") -> QuantizedLinear:
    if method not in METHODS:
        raise ConfigError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown quantization layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    kind = block_kind(linear.in_features, method, group_size, symmetric, layout)
    if kind is not None:
        return BlockQuantLinear.from_float(linear.weight, kind).to(linear.weight.device)
    if method == "int8":
        return Int8Linear.from_float(linear)
    return Int4Linear.from_float(linear, _fit_group(linear.in_features, group_size), symmetric=symmetric)


def target_modules(model: nn.Module, include_lm_head: bool = False) -> list[str]:
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGET_SUFFIXES]
    if include_lm_head:
        names.append("lm_head")
    return names


def quantize_model(model: nn.Module, method: str = "int8", group_size: int = DEFAULT_GROUP_SIZE,
                   symmetric: bool = False, include_lm_head: bool | None = None, layout: str = "blocks") -> nn.Module:
    """Swap the model's block linears (and the output head) for quantized ones, in place.

    The head: ``include_lm_head`` None (default) quantizes it when the blocks are Q8_0 / Q4_x (int8, or int4
    with group size 32) — always as Q8_0, for int4 too, as llama.cpp's own q8_0 / q4_0 files keep their output
    matrix (on SmolLM2: +0.12% perplexity, ~1.5x faster decode, docs/quantization.md) — and keeps it float
    otherwise (packed layout, int4 groups of 64 / 128); True / False force it.

    ``layout="blocks"`` (default): int8 -> Q8_0 blocks; int4 with ``group_size`` 32 -> Q4_1 (asymmetric) or
    Q4_0 (``symmetric``), on llamalab's C++ kernels; int4 with group size 64 / 128 keeps the packed
    :class:`Int4Linear`. ``layout="packed"``: per-channel :class:`Int8Linear` (``group_size`` ignored) and
    group-wise :class:`Int4Linear`, on PyTorch's packed kernels. Sets ``model.config.quantization``."""
    if method not in METHODS:
        raise ConfigError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown quantization layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if method == "int4" and group_size not in (16, 32, 64, 128, 256):
        raise ConfigError(f"int4 group size must be 32, 64 or 128 (got {group_size})")
    if getattr(model.config, "quantization", None):
        raise ConfigError("model is already quantized")
    if include_lm_head is None:  # with the blocks (group 32 for int4), as llama.cpp's files
        include_lm_head = layout == "blocks" and (method == "int8" or group_size == BLOCK_SIZE)
    kinds: set[str] = set()
    packed = False
    with torch.no_grad():
        for name in target_modules(model, include_lm_head):
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                continue
            head_q8 = name == "lm_head" and layout == "blocks" and module.in_features % BLOCK_SIZE == 0
            layer = quantize_linear(module, "int8" if head_q8 else method, group_size, symmetric, layout)
            if isinstance(layer, BlockQuantLinear):
                kinds.add(layer.kind)
            else:
                packed = True
            replace_linear(model, name, layer)
    blocks = bool(kinds) and not packed
    if blocks or method == "int4":
        group = BLOCK_SIZE if blocks else group_size
    else:
        group = None
    record = {"method": method, "layout": "blocks" if blocks else ("packed" if not kinds else "mixed"),
              "group_size": group, "symmetric": True if method == "int8" else bool(symmetric),
              "lm_head": bool(include_lm_head), "format": FORMAT_VERSION}
    if kinds:
        record["kinds"] = sorted(kinds)
    model.config.quantization = record
    repack_if_in_huge_pages(model)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized linear by an ``nn.Linear`` holding its dequantized weight (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            lin = nn.Linear(module.in_features, module.out_features, bias=False, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(module.dequantize(dtype))
            replace_linear(model, name, lin)
    model.config.quantization = None
    if model.config.tie_word_embeddings:
        model.tie_weights()
    repack_if_in_huge_pages(model)
    return model


# ============================================================================================ save / load
def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-keyed tensors of a (partly) quantized model, tied head written once, as stored."""
    from llamalab.formats.hf import to_hf_key

    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[to_hf_key(name)] = t.detach().contiguous().cpu()
    return out


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write config.json (with ``llamalab_quantization``) + model.safetensors for a quantized model."""
    from safetensors.torch import save_file

    from llamalab.formats.files import atomic_write, atomic_write_text

    if not model.config.quantization:
        raise ConfigError("model is not quantized (call quantize_model first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = quantized_state_dict(model)
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        stale.unlink()
    atomic_write(directory / "model.safetensors",
                        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
    atomic_write_text(directory / "config.json", json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    atomic_write_text(directory / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    return directory


def model_bytes(model: nn.Module) -> int:
    """Bytes of weights as held in memory (shared tensors once; quantized layers in their layout)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for t in tensors:
            if id(t) not in seen and t.device.type != "meta":
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
