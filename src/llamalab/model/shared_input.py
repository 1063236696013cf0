"""Linears that read the same input — attention's q|k|v, the MLP's gate|up — computed in one kernel call.

    [q, k, v] = [x · W_qᵀ, x · W_kᵀ, x · W_vᵀ]        [gate, up] = [x · W_gateᵀ, x · W_upᵀ]

A decode step multiplies each layer's normed activation by q_proj, k_proj and v_proj, and the next one by
gate_proj and up_proj. With GGUF blocks (Q8_0 / Q4_0 / Q4_1, :class:`~llamalab.quantization.blocks.
BlockQuantLinear`) each product quantizes that activation to int8 blocks and is one op call from Python.
Where it can (:func:`joint_args`) they are one call of ``llamalab::block_linears`` (kernels/blocks.cpp): the
activation quantized once, the rows of all the weights split over the threads as one range, and each output
the one its own layer gives, bit for bit (tested). The MLP's call is ``llamalab::block_swiglu``, which also
applies ``llamalab::silu_mul`` to the two outputs, so SwiGLU's gate is one call from Python, not three.
gpt-fast gets the same by fusing the weights into one ``wqkv``; here the modules and their weights stay as
they are — the names adapters and hooks target, the state dict, GGUF and Hugging Face layouts, one
quantization kind per tensor — and only the call is joint.

The joint call is taken only when calling each module would run nothing but its own forward and that
forward would call the block kernel: the fused CPU ops apply (:func:`llamalab.kernels.fused_for`: grad mode
off, not traced by torch.compile, CPU), every module is a block linear of one kind and width with its kernel
on (``use_kernel``), and none has a forward hook or pre-hook, a global one, or ``module.compile()``.
Otherwise each module is called in turn, as before (adapters, hooks, training, ``LLAMALAB_FUSED=0``).

What the modules hold is looked at once and kept on the owner (``_joint``), checked on every call by
identity: a module replaced (an adapter) or its tensors changed (``load_state_dict``, ``.to()``, which
refresh a block linear's ``_args``) makes a new plan.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from llamalab import kernels

__all__ = ["joint_args"]


class _Plan:
    """What the named linears of one owner hold, as the joint op takes it (``args``: None where it cannot)."""

    __slots__ = ("names", "mods", "items", "hooks", "args")

    def __init__(self, names: tuple[str, ...], modules: dict[str, nn.Module]) -> None:
        self.names = names
        self.mods = tuple(modules[n] for n in names)
        held = tuple(m.__dict__.get("_args") for m in self.mods)
        self.items = tuple(zip(names, self.mods, held))
        # every hook dict that nn.Module.__call__ would look in for these modules (dicts torch never rebinds)
        self.hooks = (_nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks,
                      *(h for m in self.mods for h in (m._forward_hooks, m._forward_pre_hooks)))
        kinds = {getattr(m, "joint_kind", None) for m in self.mods}
        widths = {getattr(m, "in_features", None) for m in self.mods}
        self.args = None
        if len(kinds) == 1 and None not in kinds and len(widths) == 1 and None not in held:
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
        for name, mod, held in self.items:  # (called twice a layer per decode step: kept to plain look-ups)
            if modules[name] is not mod or mod._args is not held:
                return None
            if mod._compiled_call_impl is not None or not mod.use_kernel:
                free = False
        return free and not any(self.hooks)


def joint_args(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> tuple | None:
    """The arguments after ``x`` of ``llamalab::block_linears`` (or ``block_swiglu``) for ``owner``'s linears
    ``names`` (one constant tuple per caller) on the input ``x``, where the module docstring's conditions hold;
    else None (call each module)."""
    if not kernels.fused_for(x):
        return None
    modules = owner._modules
    plan = owner.__dict__.get("_joint")
    ok = None if plan is None or plan.names is not names else plan.check(modules)
    if ok is None:
        plan = owner.__dict__["_joint"] = _Plan(names, modules)
        ok = plan.check(modules)
    return plan.args if ok else None
