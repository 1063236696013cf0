"""Training: the loop (loop.py), the run config (config.py), pickle-free checkpoints (checkpoint.py), precision
(precision.py), the from-scratch recipe (pretrain.py), supervised fine-tuning (finetune.py) and torchrun /
DDP / FSDP2 (distributed.py).

The names below are the training API in one place (``from llamalab import training``;
``training.train("shakespeare", steps=200)``); each loads its module on first use, so importing the
package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "train": "pretrain", "train_loop": "loop", "LoopConfig": "loop", "LoopResult": "loop", "make_optimizer": "loop",
    "load_config": "config", "to_toml": "config", "validate": "config", "model_config_from": "config",
    "resolve_config_path": "config", "DEFAULTS": "config",
    "latest_valid_checkpoint": "checkpoint", "verify_checkpoint": "checkpoint", "checkpoint_steps": "checkpoint",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f"llamalab.training.{_HOMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llamalab.training' has no attribute {name!r}")
