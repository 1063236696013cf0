"""Fused CPU ops (norm) of the model's forward: schemas, pure-PyTorch fallback and fake implementations.
(Placeholder: no ops yet.)"""

from __future__ import annotations

import torch


def define_fallback(lib: torch.library.Library) -> None:
    """Define this module's ops in Python on ``lib`` (the C++ library could not be built or loaded)."""


def register_fakes() -> None:
    """Register the fake (meta) implementations of this module's ops (torch.compile keeps them as calls)."""
