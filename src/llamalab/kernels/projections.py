"""Several linears of one activation in one op call: :func:`linears` (q|k|v in the attention, gate|up in the MLP).

What: ``linears(x, (q_proj, k_proj, v_proj))`` returns ``[q_proj(x), k_proj(x), v_proj(x)]``, bit for bit,
from one call of ``llamalab::block_linears`` (block-quantized :class:`~llamalab.quantization.blocks.BlockQuantLinear`
layers) or ``llamalab::dense_linears`` (float :class:`~llamalab.kernels.dense.DenseLinear` layers), or None
when it cannot promise that; the caller then calls the modules as usual.

Why: at batch-1 decode on the CPU each linear is a short product (tens of µs for SmolLM2's), and a Python
module call plus an op dispatch adds several µs to each; an attention layer makes three calls on one
input, the MLP two on another. One call saves the calls and dispatches of the others, and the block op
quantizes the activation to int8 once per weight layout instead of once per weight. The weights stay
the modules' own tensors (nothing is concatenated or copied), so state dicts, ``load_state_dict``,
``permute_rows`` and every other edit of a projection are seen at the next call.

When: :func:`llamalab.kernels.fused_for` ``(x)`` (the C++ kernels loaded, fused ops on, grad mode off, not
compiled, CPU) and no global module hooks; every module of exactly one class — a ``BlockQuantLinear`` with
``use_kernel`` on, or a ``DenseLinear`` without bias whose forward would take the dense kernel (the input in
the weight's dtype, CPU weight, no CPU autocast, at most ``DENSE_ROWS`` rows) — of one input width, with no
forward / backward (pre-)hooks and no ``forward`` set on the instance. The class test is ``type(m) is``: a
LoRA-wrapped projection, a subclass or any other module is called as a module, so its hooks and adapters see
the call. ``set_enabled(False)`` turns the grouping off (A/B measurements).
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as _module

from llamalab import kernels
from llamalab.kernels.dense import _FLOATS, DenseLinear
from llamalab.quantization.blocks import BlockQuantLinear

__all__ = ["linears", "set_enabled"]

_enabled = True
_ops: list = []  # [block_linears.default, dense_linears.default], looked up once the library is loaded


def set_enabled(on: bool) -> bool:
    """Turn :func:`linears` on or off for this process (off: it always returns None); returns the old value."""
    global _enabled
    old, _enabled = _enabled, bool(on)
    return old


def _hooked(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def linears(x: torch.Tensor, modules: tuple | list) -> list[torch.Tensor] | None:
    """``[m(x) for m in modules]``, bit-identical, in one op call; None where that is not certain (see above)."""
    if not (_enabled and kernels.fused_for(x)) or (
            _module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        return None
    first = modules[0]
    cls = type(first)
    if cls is not BlockQuantLinear and cls is not DenseLinear:
        return None
    width = first.in_features
    if not _ops:
        _ops.extend((torch.ops.llamalab.block_linears.default, torch.ops.llamalab.dense_linears.default))
    if cls is BlockQuantLinear:
        qs, d, m = [], [], []
        for mod in modules:
            if type(mod) is not cls or not mod.use_kernel or mod.in_features != width or _hooked(mod):
                return None
            args = mod._args
            qs.append(args[0])
            d.append(args[1])
            m.append(args[2] if len(args) == 3 else None)
        return _ops[0](x, qs, d, m)
    dtype = x.dtype  # DenseLinear
    if (dtype not in _FLOATS or x.numel() > kernels.DENSE_ROWS[dtype] * width
            or torch.is_autocast_enabled("cpu")):
        return None
    ws = []
    for mod in modules:
        if type(mod) is not cls:
            return None
        params = mod._parameters
        w = params["weight"]
        if (mod.in_features != width or params["bias"] is not None or w.dtype != dtype or w.device.type != "cpu"
                or _hooked(mod)):
            return None
        ws.append(w)
    return _ops[1](x, ws)
