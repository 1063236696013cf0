"""Float linears on the dense kernel: :class:`DenseLinear` and :func:`use_dense_kernels`.

At batch-1 decode a linear is a matrix-vector product whose speed is the speed of reading its weight;
torch's own CPU product reads a float32 weight at a fraction of the memory bandwidth at one activation
row, a bfloat16 one slower still. ``torch.ops.llamalab.dense_linear`` streams the weight once (fp32
accumulation) for up to :data:`llamalab.kernels.DENSE_ROWS` rows.

:class:`DenseLinear` *is* an ``nn.Linear`` (a subclass with no state of its own): same parameters,
state-dict keys, hooks, LoRA wrapping, optimizers, save/load. Its forward takes the kernel only for
inference — CPU tensors, no gradient wanted, the input's dtype the weight's, no autocast, few rows, the
C++ kernels built — and is ``F.linear`` otherwise, so training a swapped model is training the plain one.
Float32 inference batches above those rows (a prefill) go to oneDNN's GEMM instead of ``F.linear`` on
x86 CPUs that are not Intel (:data:`BATCH_F32_ONEDNN`): torch's BLAS there, MKL, takes a slower path off
Intel CPUs (one thread, AMD EPYC Zen 5, 128x576 @ 576x1536: 100 GFLOPS through ``F.linear``, 221 through
oneDNN). Both are float32 GEMMs (the sums in another order: within ~1e-6 of each other, relative).
:func:`use_dense_kernels` swaps a model's ``nn.Linear`` layers in place (by class, so tied weights stay
tied); ``llamalab.load`` calls it for CPU models unless ``LLAMALAB_KERNELS=0``.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_dynamo_compiling

from llamalab import kernels
from llamalab.module_call import DirectCall

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_grad_enabled = torch.is_grad_enabled
_autocast_enabled = torch.is_autocast_enabled


def _onednn_f32_default() -> bool:
    """oneDNN for batched float32 products: ``LLAMALAB_ONEDNN_F32=1`` / ``0`` forces it; else on x86 CPUs
    whose vendor is not Intel (MKL's slow path), where torch has oneDNN's linear op."""
    forced = os.environ.get("LLAMALAB_ONEDNN_F32")
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if forced in ("0", "1"):
        return forced == "1"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" not in line
    except OSError:
        pass
    return False


BATCH_F32_ONEDNN: bool = _onednn_f32_default()


class DenseLinear(DirectCall, nn.Linear):
    """``nn.Linear`` whose inference forward on CPU runs ``llamalab::dense_linear`` at few activation rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (the parameters from _parameters, where nn.Module.__getattr__ finds them, and the cheapest checks
        # first: decode calls this twice a layer plus once for the head, ~1 µs of checks each)
        p = self._parameters
        w, b = p["weight"], p["bias"]
        if (x.dtype == w.dtype and x.is_cpu and w.is_cpu and (rows := kernels.DENSE_ROWS.get(w.dtype))
                and not (_grad_enabled()
                         and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)))
                and not _autocast_enabled("cpu") and _native()):
            if x.numel() <= rows * self.in_features:
                if is_dynamo_compiling():
                    return torch.ops.llamalab.dense_linear(x, w, b)
                return kernels.OPS.dense_linear(x, w, b)
            if BATCH_F32_ONEDNN and w.dtype == torch.float32 and not is_dynamo_compiling():
                return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")
        return F.linear(x, w, b)


def _native() -> bool:
    state = kernels._state  # (a dict lookup once loaded, which torch.compile can guard on)
    return bool(state["native"]) if "native" in state else kernels.load()


def use_dense_kernels(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of `model` a :class:`DenseLinear` (in place); returns how many were swapped.

    Only layers whose weight is float32 / bfloat16 / float16 on the CPU are swapped (subclasses of
    ``nn.Linear`` other than DenseLinear are left alone); nothing is swapped where the C++ kernels are not
    available (``LLAMALAB_KERNELS=0``, no compiler), since the fallback would only be ``F.linear`` again."""
    if not kernels.load():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in _FLOATS:
            m.__class__ = DenseLinear
            n += 1
    return n


def use_torch_linears(model: nn.Module) -> int:
    """Undo :func:`use_dense_kernels`: every DenseLinear back to a plain ``nn.Linear`` (in place)."""
    n = 0
    for m in model.modules():
        if type(m) is DenseLinear:
            m.__class__ = nn.Linear
            n += 1
    return n
