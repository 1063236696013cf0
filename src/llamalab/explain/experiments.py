"""The small controlled experiments shared by the sections, trained once per report and cached on the Lab.

* ``base``      — MHA + RMSNorm, the reference model (RoPE context extension, RMSNorm arm, MHA of GQA)
* ``layernorm`` — identical but LayerNorm (RMSNorm ablation)
* ``gqa``       — identical but n_kv_heads = n_heads/2, trained from scratch (GQA comparison)

Same seed ⇒ same initial weights for shared shapes and the same batches in the same order.
"""

from __future__ import annotations

import torch
from torch import nn

from llamalab.explain.corpus import ByteCorpus
from llamalab.explain.report import Lab
from llamalab.explain.trainer import Budget, TrainResult, small_config, train_new
from llamalab.model.rmsnorm import RMSNorm


class LayerNorm(nn.Module):
    """Classic LayerNorm (Ba et al., 2016) with gain and bias, statistics in float32 — the ablation's arm."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.layer_norm(x.float(), (x.shape[-1],), None, None, self.eps).to(x.dtype)
        return self.weight * y + self.bias


def use_layernorm(model: nn.Module) -> nn.Module:
    """Swap every RMSNorm of `model` for a LayerNorm of the same width and eps (in place): the model
    stays the library's Llama, only its norms change."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RMSNorm):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LayerNorm(module.weight.shape[0], module.eps))
    return model


def experiment_budget(lab: Lab) -> Budget:
    if lab.quick:
        return Budget(steps=8, batch_size=4, seq_len=16, lr=3e-3, warmup=2, eval_every=4, eval_windows=4)
    return Budget(steps=240, batch_size=16, seq_len=64, lr=3e-3, warmup=20, eval_every=20, eval_windows=48)


def corpus(lab: Lab) -> ByteCorpus:
    return lab.cached("corpus", lambda: ByteCorpus(max_bytes=400_000 if lab.quick else 3_000_000))


def _run(lab: Lab, key: str, surgery=None, **overrides) -> TrainResult:
    def make() -> TrainResult:
        budget = experiment_budget(lab)
        lab.log(f"explain: training the small '{key}' model ({budget.steps} steps) …")
        res = train_new(small_config(budget.seq_len, lab.quick, **overrides), corpus(lab), budget, seed=0,
                        surgery=surgery)
        lab.log(f"explain: '{key}' trained in {res.seconds:.1f} s, val loss {res.val_loss[-1]:.3f}")
        return res

    return lab.cached(f"run:{key}", make)


def base_run(lab: Lab) -> TrainResult:
    return _run(lab, "base")


def layernorm_run(lab: Lab) -> TrainResult:
    return _run(lab, "layernorm", surgery=use_layernorm)


def gqa_scratch_run(lab: Lab) -> TrainResult:
    return _run(lab, "gqa", n_kv_heads=2)
