"""Module calls that go straight to ``forward`` when nothing else could run.

``nn.Module.__call__`` is two Python frames (``_wrapped_call_impl`` → ``_call_impl``), a JIT-tracing
query and eight hook-dict checks before it reaches ``forward``: about a microsecond. A SmolLM2 decode
step makes ~330 such calls (11 a layer: the block, its attention, two norms, the MLP, seven linears),
a few percent of a step that takes ~13 ms on one core.

:class:`DirectCall` is a mixin for the model's own modules (``class RMSNorm(DirectCall, nn.Module)``).
Its ``__call__`` runs ``forward`` directly when none of the things ``nn.Module.__call__`` exists for
can apply — no forward hook or pre-hook on this module, none registered globally
(``register_module_forward_hook``), no ``module.compile()`` on it, and grad mode off (backward hooks
only act on a graph that autograd records). Otherwise it is ``nn.Module.__call__``, unchanged. So
hooks, adapters, per-module compile and training behave exactly as before; only inference calls with
nothing to dispatch skip the dispatch.

Measured: ``benchmarks/bench_layer.py`` times a SmolLM2 layer's decode both ways in the same rounds
(248.2 against 262.2 µs through ``nn.Module.__call__`` on a 2-core Intel Xeon; "Module calls" in
docs/generation.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

_module_call = nn.Module.__call__
_grad_enabled = torch.is_grad_enabled


class DirectCall:
    """Mixin placed before ``nn.Module``: inference calls with no hook to run go straight to ``forward``."""

    def __call__(self, *args, **kwargs):
        if (self._forward_hooks or self._forward_pre_hooks or self._compiled_call_impl is not None
                or _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks or _grad_enabled()):
            return _module_call(self, *args, **kwargs)
        return self.forward(*args, **kwargs)
