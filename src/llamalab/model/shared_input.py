"""Linears that read the same input — attention's q|k|v, the MLP's gate|up — computed in one kernel call.

    [q, k, v] = [x · W_qᵀ, x · W_kᵀ, x · W_vᵀ]        [gate, up] = [x · W_gateᵀ, x · W_upᵀ]

A decode step multiplies each layer's normed activation by q_proj, k_proj and v_proj, and the next one by
gate_proj and up_proj. Where it can (:func:`joint_linears`, :func:`joint_swiglu`) they are one op call from
Python instead of one module call each:

* GGUF blocks (Q8_0 / Q4_0 / Q4_1, :class:`~llamalab.quantization.blocks.BlockQuantLinear`):
  ``llamalab::block_linears`` (kernels/blocks.cpp) quantizes the activation to int8 blocks once for all the
  weights and splits the rows of all of them over the threads as one range;
* float weights on the dense kernel (:class:`~llamalab.kernels.dense.DenseLinear`, float32 / bfloat16 /
  float16): ``llamalab::dense_linears`` (kernels/dense.cpp) widens the activation once and streams the
  weights one after the other, with no Python between them;

and each output is the one its own layer gives, bit for bit (tested). The MLP's calls are ``block_swiglu`` /
``dense_swiglu``, which also apply ``llamalab::silu_mul`` to the two outputs, so SwiGLU's gate is one call
from Python, not three. gpt-fast gets the same by fusing the weights into one ``wqkv``; here the modules and
their weights stay as they are — the names adapters and hooks target, the state dict, GGUF and Hugging Face
layouts, one quantization kind per tensor — and only the call is joint.

The joint call is taken only when calling each module would run nothing but its own forward and that
forward would call the kernel: the fused CPU ops apply (:func:`llamalab.kernels.fused_for`: grad mode off,
not traced by torch.compile, CPU), every module is a block linear of one kind and width with its kernel on
(``use_kernel``), or every one a bias-free DenseLinear of one width whose weight has the input's dtype, no
autocast and at most ``DENSE_ROWS`` rows (beyond that DenseLinear hands over to a GEMM), and none has a
forward hook or pre-hook, a global one, or ``module.compile()``. Otherwise each module is called in turn, as
before (adapters, hooks, training, ``LLAMALAB_FUSED=0``).

What the modules hold is looked at once and kept on the owner (``_joint``), checked on every call by
identity: a module replaced (an adapter) or its tensors changed (``load_state_dict``, ``.to()``, which
refresh a block linear's ``_args``; a new weight Parameter) makes a new plan, and a bias given to a dense
module since takes it off the joint call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from llamalab import kernels
from llamalab.kernels.dense import DenseLinear

__all__ = ["joint_linears", "joint_swiglu"]


class _Plan:
    """What the named linears of one owner hold, as the joint op takes it (``args``: None where it cannot):
    ``(qs, d, m, kind)`` for block linears, ``(weights,)`` for dense ones (``dense``)."""

    __slots__ = ("names", "mods", "items", "hooks", "args", "dense")

    def __init__(self, names: tuple[str, ...], modules: dict[str, nn.Module]) -> None:
        self.names = names
        self.mods = tuple(modules[n] for n in names)
        self.dense = all(type(m) is DenseLinear and m._parameters["bias"] is None for m in self.mods)
        # (a dense module's weight Parameter stands where a block linear's _args does: identity-checked per call)
        held = tuple(m._parameters["weight"] if self.dense else m.__dict__.get("_args") for m in self.mods)
        self.items = tuple(zip(names, self.mods, held))
        # every hook dict that nn.Module.__call__ would look in for these modules (dicts torch never rebinds)
        self.hooks = (_nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks,
                      *(h for m in self.mods for h in (m._forward_hooks, m._forward_pre_hooks)))
        kinds = {getattr(m, "joint_kind", None) for m in self.mods}
        widths = {getattr(m, "in_features", None) for m in self.mods}
        self.args = None
        if self.dense:
            dtypes = {w.dtype for w in held}
            if len(widths) == 1 and len(dtypes) == 1 and dtypes.pop() in kernels.DENSE_ROWS:
                self.args = (list(held),)
        elif len(kinds) == 1 and None not in kinds and len(widths) == 1 and None not in held:
            self.args = ([a[0] for a in held], [a[1] for a in held], [a[2] for a in held if len(a) == 3],
                         kinds.pop())

    def check(self, modules: dict[str, nn.Module]) -> bool | None:
        """None if the plan no longer describes ``modules`` (make a new one); else whether the joint call may run
        now: it can, and nothing but the modules' forwards would run for them (no hook, no module.compile())."""
        if self.args is None:
            for name, mod in zip(self.names, self.mods):
                if modules[name] is not mod:
                    return None
            return False
        free = True
        dense = self.dense
        for name, mod, held in self.items:  # (called twice a layer per decode step: kept to plain look-ups)
            if modules[name] is not mod or (mod._parameters["weight"] if dense else mod._args) is not held:
                return None
            if dense and mod._parameters["bias"] is not None:  # a bias given since (the joint op takes none)
                return None
            if mod._compiled_call_impl is not None or not (dense or mod.use_kernel):
                free = False
        return free and not any(self.hooks)


def _plan(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> _Plan | None:
    """The plan for ``owner``'s linears ``names`` (one constant tuple per caller) if the joint call may run on
    ``x`` now (the module docstring's conditions), else None (call each module)."""
    if not kernels.fused_for(x):
        return None
    modules = owner._modules
    plan = owner.__dict__.get("_joint")
    ok = None if plan is None or plan.names is not names else plan.check(modules)
    if ok is None:
        plan = owner.__dict__["_joint"] = _Plan(names, modules)
        ok = plan.check(modules)
    if not ok:
        return None
    if plan.dense:  # what DenseLinear's forward would check before its kernel, per call (its weight's dtype now)
        w = plan.args[0][0]
        rows = kernels.DENSE_ROWS.get(w.dtype)
        if x.dtype != w.dtype or not rows or x.numel() > rows * w.shape[1] or torch.is_autocast_enabled("cpu"):
            return None
    return plan


def joint_linears(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor] | None:
    """``[owner.<name>(x) for name in names]`` in one kernel call (``block_linears`` / ``dense_linears``), the
    same values; None where the module docstring's conditions do not hold (call each module)."""
    plan = _plan(owner, names, x)
    if plan is None:
        return None
    return kernels.OPS.dense_linears(x, *plan.args) if plan.dense else kernels.OPS.block_linears(x, *plan.args)


def joint_swiglu(owner: nn.Module, names: tuple[str, str], x: torch.Tensor) -> torch.Tensor | None:
    """``silu_mul(owner.<gate>(x), owner.<up>(x))`` in one kernel call (``block_swiglu`` / ``dense_swiglu``),
    the same values; None where the module docstring's conditions do not hold."""
    plan = _plan(owner, names, x)
    if plan is None:
        return None
    return kernels.OPS.dense_swiglu(x, *plan.args) if plan.dense else kernels.OPS.block_swiglu(x, *plan.args)
