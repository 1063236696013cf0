"""Quantized linears from a checkpoint's saved tensors (what ``save_quantized`` and ``save_pretrained`` write).

For a quantized layer ``P`` a checkpoint holds, in our key names:

* blocks: ``P.qs``, ``P.d`` [, ``P.m``]                                            -> :class:`BlockQuantLinear`
  (``llamalab quantize`` int8 / int4 by default: Q8_0 / Q4_1 / Q4_0; or kept from a GGUF file)
* k-quant super-blocks: ``P.kq`` uint8 (out, in/256 · 144 | 210), kept from a GGUF file's Q4_K | Q6_K
  -> :class:`KQuantLinear` (the kind follows from the row byte count)
* packed int8: ``P.qweight`` int8 (out, in) and ``P.scales`` (out,) or (out, in/group)  -> :class:`Int8Linear`
* packed int4: ``P.qweight`` uint8 (out, in/2), ``P.scales`` and ``P.zeros``             -> :class:`Int4Linear`

Each layer is rebuilt from its own tensors (blocks first, then k-quants), whatever ``config.quantization`` says its
layout is, so directories written before blocks were the default (all ``qweight``) load as they did, and a
directory may mix the two. :meth:`llamalab.model.Llama.from_state_dict` calls :func:`pop_quantized_layer` for each
such ``P`` and checks everything else as for a float checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llamalab.errors import WeightsError
from llamalab.formats.hf import to_hf_key
from llamalab.quantization.blocks import pop_block_layer
from llamalab.quantization.kquants import pop_kquant_layer
from llamalab.quantization.quantize import FORMAT_VERSION, LAYOUTS, METHODS, Int4Linear, Int8Linear, QuantizedLinear


def check_quantization(config: Any, source: object) -> None:
    """The config's ``llamalab_quantization`` names a method and a format this version reads."""
    q = config.quantization or {}
    method = q.get("method")
    if method not in METHODS + ("gguf",):  # gguf: blocks kept from a GGUF file (llamalab.quantization.blocks)
        raise WeightsError(f"{source}: unknown llamalab_quantization method {method!r}")
    layout = q.get("layout", "packed")
    if layout not in LAYOUTS + ("mixed",):
        raise WeightsError(f"{source}: unknown llamalab_quantization layout {layout!r}")
    if int(q.get("format", FORMAT_VERSION)) > FORMAT_VERSION:
        raise WeightsError(f"{source}: quantized format {q.get('format')} is newer than this llamalab reads")


def pop_quantized_layer(state: dict[str, torch.Tensor], name: str, like: nn.Linear, config: Any,
                        source: object) -> QuantizedLinear:
    """The quantized linear saved under ``name`` (its tensors popped from `state`), checked against the float
    layer `like` it replaces."""
    if f"{name}.qs" in state:
        layer = pop_block_layer(state, name, like, source)
        kinds = (config.quantization or {}).get("kinds")
        if isinstance(kinds, list) and kinds and layer.kind not in kinds:  # e.g. a Q4_1 layer that lost its .m
            raise WeightsError(f"{source}: {to_hf_key(name)} holds {layer.kind} blocks, but llamalab_quantization "
                               f"lists kinds {', '.join(map(str, kinds))}" + (f" (missing {to_hf_key(name)}.m?)"
                                                                                if "q4_1" in kinds else ""))
        return layer
    if f"{name}.kq" in state:
        if (config.quantization or {}).get("method") != "gguf":
            raise WeightsError(f"{source}: {to_hf_key(name)}.kq holds GGUF k-quant super-blocks, but "
                               f"llamalab_quantization's method is {(config.quantization or {}).get('method')!r}, "
                               "not 'gguf'")
        layer = pop_kquant_layer(state, name, like, source)
        kinds = (config.quantization or {}).get("kinds")
        if isinstance(kinds, list) and kinds and layer.kind not in kinds:
            raise WeightsError(f"{source}: {to_hf_key(name)} holds {layer.kind} super-blocks, but "
                               f"llamalab_quantization lists kinds {', '.join(map(str, kinds))}")
        return layer
    method = (config.quantization or {}).get("method")
    tensors = {}
    for part in ("qweight", "scales", "zeros") if method == "int4" else ("qweight", "scales"):
        key = f"{name}.{part}"
        if key not in state:
            raise WeightsError(f"{source}: missing tensor {to_hf_key(key)}")
        tensors[part] = state.pop(key)
    qw = tensors["qweight"]
    if method == "int8":
        if tuple(qw.shape) != (like.out_features, like.in_features):
            raise WeightsError(f"{source}: {to_hf_key(name)}.qweight has shape {tuple(qw.shape)}, config "
                               f"expects {(like.out_features, like.in_features)}")
        sc = tensors["scales"]
        group = None if sc.dim() == 1 else like.in_features // sc.shape[1]
        return Int8Linear(qw, sc, group)
    if tuple(qw.shape) != (like.out_features, like.in_features // 2):
        raise WeightsError(f"{source}: {to_hf_key(name)}.qweight has shape {tuple(qw.shape)}, config "
                           f"expects {(like.out_features, like.in_features // 2)}")
    return Int4Linear.from_packed(qw, tensors["scales"], tensors["zeros"])
