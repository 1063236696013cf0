"""Fused CPU ops (norm) of the model's forward: schemas, pure-PyTorch fallback and fake implementations.

``llamalab::rms_norm(x, weight, eps)`` — RMSNorm over the last dim, RMSNorm.forward's math in one call:

    float32 x and weight:  y = x · rsqrt(mean(x²) + eps) · weight                     (float32)
    otherwise:             y = weight * (x · rsqrt(mean(x²) + eps) in float32).to(x.dtype)

(the product rounded to ``promote(x.dtype, weight.dtype)`` as torch rounds it).

``llamalab::add_rms_norm(x, residual, weight, eps) -> (s, y)`` — ``s = x + residual`` (in x's dtype) and
``y = rms_norm(s, weight, eps)`` in one pass (a pre-norm block's residual add and the next norm).

``llamalab::silu_mul(gate, up)`` — SwiGLU's gate: ``F.silu(gate) * up``, silu(g) = g / (1 + exp(-g)) in
float32 rounded to the dtype, then the product rounded (identity roundings for float32).

The C++ kernels are in ``norm.cpp``; :func:`define_fallback` defines the same ops with these PyTorch
expressions (:func:`rms_norm_reference` etc.) where the library is not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCHEMAS = {
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "add_rms_norm": "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    "silu_mul": "silu_mul(Tensor gate, Tensor up) -> Tensor",
}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in plain PyTorch ops (RMSNorm.forward's unfused path)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual)) in plain PyTorch ops."""
    s = x + residual
    return s, rms_norm_reference(s, weight, eps)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up in plain PyTorch ops."""
    return F.silu(gate) * up


def define_fallback(lib: torch.library.Library) -> None:
    """Define this module's ops in Python on ``lib`` (the C++ library could not be built or loaded)."""
    impls = {"rms_norm": rms_norm_reference, "add_rms_norm": add_rms_norm_reference,
             "silu_mul": silu_mul_reference}
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, impls[name], "CompositeExplicitAutograd")


def register_fakes(namespace: str = "llamalab") -> None:
    """Register the fake (meta) implementations of this module's ops (torch.compile keeps them as calls)."""

    def rms_norm_fake(x, weight, eps):
        return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))

    def add_rms_norm_fake(x, residual, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))

    def silu_mul_fake(gate, up):
        return gate.new_empty(torch.broadcast_shapes(gate.shape, up.shape),
                              dtype=torch.promote_types(gate.dtype, up.dtype))

    torch.library.register_fake(f"{namespace}::rms_norm", rms_norm_fake)
    torch.library.register_fake(f"{namespace}::add_rms_norm", add_rms_norm_fake)
    torch.library.register_fake(f"{namespace}::silu_mul", silu_mul_fake)
