"""Training precision: bf16 autocast where the device has bf16 arithmetic, float32 otherwise (never fp16)."""

from __future__ import annotations

import torch

from llamalab.errors import ConfigError


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32 (never fp16 for training), got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise ConfigError(f"bf16 is not supported on this {device.type} device; use precision = \"fp32\"")
    return precision
