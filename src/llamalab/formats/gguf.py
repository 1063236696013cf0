"""GGUF in and out for llama models: llama.cpp's single-file format (metadata key/values + typed, possibly
quantized tensors).

Reading (:func:`load_gguf`): the container is parsed by :mod:`~llamalab.formats.gguf_reader`, the config comes
from the metadata (:mod:`~llamalab.formats.gguf_config`), the tensor table is checked against it before any
tensor is read, and tensors are dequantized and brought to HF's q/k layout (:mod:`~llamalab.formats.gguf_tensors`).
``keep_quantized=True`` (the default when no dtype is asked for and the C++ kernels are built) instead keeps the
Q8_0 / Q4_0 / Q4_1 linear layers — and a quantized output head — as blocks of 32
(:class:`~llamalab.quantization.blocks.BlockQuantLinear`), and the Q4_K / Q6_K ones whose input width is a multiple
of 256 as super-blocks of 256 (:class:`~llamalab.quantization.kquants.KQuantLinear`), both the file's bytes as
stored and multiplied by :mod:`llamalab.kernels` (x · Wᵀ with x rounded to int8 per 32 inputs). Any other
tensor, and a k-quant matrix of another width, is dequantized; a file may mix the kinds (Q4_K_M: Q4_K and Q6_K).

Writing (:func:`save_gguf`) uses ``gguf.GGUFWriter``: llama hyper-parameters, RoPE settings (linear and
YaRN as ``rope.scaling.*``; llama3 as the ``rope_freqs.weight`` tensor of per-frequency divisors that
llama.cpp expects, plus ``llamalab.rope.*`` keys so that the exact parameters come back on load),
tensors as f32 / f16 / bf16 / q8_0 (1-D norm weights stay f32, as llama.cpp's converter does), the
tokenizer (``tokenizer.ggml.*``, :mod:`llamalab.tokenization.gguf_vocab`) and the chat template.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamalab.config import LlamaConfig
from llamalab.errors import ConfigError, TokenizerError, WeightsError
from llamalab.formats.ggml_types import type_name
from llamalab.formats.gguf_config import config_from_metadata, llama3_from_freqs
from llamalab.formats.gguf_reader import GGUFFile, read_gguf
from llamalab.formats.gguf_tensors import (
    EXPORT_TYPES,
    IGNORED_TENSORS,
    SUPPORTED_TYPES,
    dequantize,
    dequantize_np,
    gguf_to_ours,
    ours_to_gguf,
    permute_qk,
    unpermute_qk,
)
from llamalab.kernels.kquants import QK_K
from llamalab.quantization.blocks import GGML_TYPES, QK, BlockQuantLinear
from llamalab.quantization.kquants import KQ_GGML_TYPES, KQuantLinear
from llamalab.quantization.linear import QuantizedLinear


def load_gguf(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
              keep_quantized: bool | None = None):
    """Read a llama-architecture GGUF file -> (Llama, Tokenizer | None).

    ``keep_quantized`` (default: when no ``dtype`` is given and the C++ kernels are available): Q8_0 /
    Q4_0 / Q4_1 matrices stay as blocks (:mod:`llamalab.quantization.blocks`) and Q4_K / Q6_K ones of a width
    divisible by 256 as super-blocks (:mod:`llamalab.quantization.kquants`), as llama.cpp runs them."""
    from llamalab.formats.hf import resolve_dtype
    from llamalab.model.llama import Llama
    from llamalab.tokenization.gguf_vocab import from_gguf_metadata

    g = read_gguf(path)
    try:
        config = config_from_metadata(g.metadata, g.tensors)
        _check_tensor_table(g, config)
        if "rope_freqs.weight" in g.tensors and not (config.rope_scaling or {}).get("rope_type") == "llama3":
            t = g.tensors["rope_freqs.weight"]
            if t.shape != (config.head_dim // 2,) or type_name(t.type) not in ("F32", "F16", "BF16"):
                raise WeightsError(f"{g.path}: rope_freqs.weight must be {config.head_dim // 2} floats, got "
                                   f"{type_name(t.type)} {t.shape}")
            freqs = dequantize(g.raw(t), t.type, t.shape).numpy()
            config.rope_scaling = llama3_from_freqs(freqs, config.head_dim, config.rope_theta,
                                                     config.max_position_embeddings)
            config = config.replace()  # re-validate
        target = resolve_dtype(dtype)
        config.torch_dtype = str(target).replace("torch.", "")
        if keep_quantized is None:
            keep_quantized = dtype is None and keeps_blocks_by_default(g)
        if keep_quantized:
            model = _load_keep_quantized(g, config, target, device)
            return model, _tokenizer(g.metadata, from_gguf_metadata)
        state: dict[str, torch.Tensor] = {}
        for _name, ours, t in _llama_tensors(g):
            w = dequantize_np(g.raw(t), t.type, t.shape)
            if ours.endswith("q_proj.weight"):
                w = unpermute_qk(w, config.n_heads)
            elif ours.endswith("k_proj.weight"):
                w = unpermute_qk(w, config.n_kv_heads)
            state[ours] = torch.from_numpy(np.ascontiguousarray(w)).to(target)
        model = Llama.from_state_dict(config, state, dtype=target, device=device, source=str(g.path))
        return model, _tokenizer(g.metadata, from_gguf_metadata)
    finally:
        g.close()


def _check_tensor_table(g: GGUFFile, config: LlamaConfig) -> None:
    """Every tensor named, shaped and typed as `config` needs, before any tensor is read or block built."""
    from llamalab.formats.hf import check_layer_count
    from llamalab.model.llama import Llama

    ours = {o: (name, t) for name, o, t in _llama_tensors(g)}
    check_layer_count(config, ours, str(g.path))
    expected = {k: tuple(p.shape) for k, p in Llama.on_meta(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    for key, shape in expected.items():
        if key not in ours:
            raise WeightsError(f"{g.path}: missing tensor {ours_to_gguf(key)}")
        name, t = ours[key]
        if t.shape != shape:
            raise WeightsError(f"{g.path}: tensor {name} has shape {t.shape}, the metadata implies {shape}")
        if type_name(t.type) not in SUPPORTED_TYPES:
            raise WeightsError(f"{g.path}: tensor {name} has unsupported type {type_name(t.type)}")
    extra = [name for key, (name, _) in ours.items() if key not in expected]
    if extra:
        raise WeightsError(f"{g.path}: unexpected tensor {extra[0]} (not part of a llama with this metadata)")


def _tokenizer(meta: dict[str, Any], build):
    try:
        return build(meta)
    except TokenizerError as e:
        warnings.warn(f"GGUF tokenizer not loaded: {e}", stacklevel=3)
        return None






def _llama_tensors(g):
    """(gguf name, our name, tensor) for each tensor of a llama GGUF file; anything unknown is an error."""
    for name, t in g.tensors.items():
        ours = gguf_to_ours(name)
        if ours is None:
            if name in IGNORED_TENSORS:
                continue
            raise WeightsError(f"{g.path}: unexpected tensor {name} in a llama GGUF file")
        yield name, ours, t


def _load_keep_quantized(g: GGUFFile, config: LlamaConfig, target: torch.dtype, device):
    """Q8_0 / Q4_0 / Q4_1 linear layers (and a quantized output head) become BlockQuantLinear, Q4_K / Q6_K ones
    KQuantLinear (:func:`kept_type`), the file's bytes as stored; everything else is dequantized to `target`."""
    from llamalab.model.llama import Llama

    state: dict[str, torch.Tensor] = {}
    quantized = gguf_block_layers(g, config)
    for _name, ours, t in _llama_tensors(g):
        heads = config.n_heads if ours.endswith("q_proj.weight") else (
            config.n_kv_heads if ours.endswith("k_proj.weight") else None)
        if ours[: -len(".weight")] in quantized:
            state[ours] = torch.zeros((), dtype=target).expand(t.shape)  # placeholder, replaced below
            continue
        w = dequantize_np(g.raw(t), t.type, t.shape)
        if heads is not None:
            w = unpermute_qk(w, heads)
        state[ours] = torch.from_numpy(np.ascontiguousarray(w)).to(target)
    if not quantized:
        raise WeightsError(f"{g.path}: keep_quantized needs Q8_0/Q4_0/Q4_1 (or Q4_K/Q6_K with widths divisible "
                           "by 256) linear weights; this file has none")
    model = Llama.from_state_dict(config, state, dtype=target, device=device, source=str(g.path))
    keep_gguf_blocks(model, g, device, layers=quantized)
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def _encode_tensor(w: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """(array for GGUFWriter.add_tensor, raw_dtype or None) for one float tensor."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as Q

    w = w.detach().to("cpu", torch.float32).contiguous()
    if kind == "f32" or w.dim() == 1:
        return w.numpy(), None
    if kind == "f16":
        return w.to(torch.float16).numpy(), None
    if kind == "bf16":
        return w.to(torch.bfloat16).view(torch.uint16).numpy().view(np.uint8), Q.BF16
    if kind == "q8_0":
        if w.shape[-1] % 32:
            return w.to(torch.float16).numpy(), None  # rows that are not whole blocks stay f16
        return quants.quantize(w.numpy(), Q.Q8_0), Q.Q8_0
    raise ConfigError(f"unknown GGUF export type {kind!r}; use one of {', '.join(EXPORT_TYPES)}")


def save_gguf(model, tokenizer, path: str | Path, type: str = "f32", name: str | None = None) -> Path:  # noqa: A002
    """Write `model` (+ `tokenizer`, may be None) as a llama-architecture GGUF file llama.cpp can run."""
    import gguf

    from llamalab.model.rope import compute_inv_freq
    from llamalab.tokenization.gguf_vocab import gguf_metadata

    kind = type.lower()
    if kind not in EXPORT_TYPES:
        raise ConfigError(f"unknown GGUF export type {type!r}; use one of {', '.join(EXPORT_TYPES)}")
    cfg: LlamaConfig = model.config
    if cfg.quantization:
        raise ConfigError("GGUF export of a llamalab-quantized model is not supported; export the float model")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name or path.stem)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(_FILE_TYPE[kind])
    rs = cfg.rope_scaling
    rope_freqs = None
    if rs:
        rtype = rs["rope_type"]
        for k, v in rs.items():
            if v is not None:
                _add_value(w, "llamalab.rope.scaling." + ("type" if k == "rope_type" else k), v)
        if rtype == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))
        elif rtype == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rs["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings",
                                                       cfg.max_position_embeddings)))
        elif rtype == "llama3":
            base, _ = compute_inv_freq(cfg.head_dim, cfg.rope_theta, None, cfg.max_position_embeddings)
            scaled, _ = compute_inv_freq(cfg.head_dim, cfg.rope_theta, rs, cfg.max_position_embeddings)
            rope_freqs = (base.double() / scaled.double()).float()
        else:
            raise ConfigError(f"GGUF export of rope_type {rtype!r} is not supported (llama.cpp has no equivalent)")
    if tokenizer is not None:
        meta = gguf_metadata(tokenizer)
        _pad_vocab(meta, cfg.vocab_size)
        for key, value in meta.items():
            _add_value(w, key, value)
    else:
        warnings.warn("exporting GGUF without a tokenizer: llama.cpp will not be able to load it", stacklevel=2)

    state = model.state_dict()
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.numpy())
    for ours, tensor in state.items():
        if ours == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = ours_to_gguf(ours)
        t = tensor
        if ours.endswith("q_proj.weight"):
            t = permute_qk(t, cfg.n_heads)
        elif ours.endswith("k_proj.weight"):
            t = permute_qk(t, cfg.n_kv_heads)
        arr, raw_dtype = _encode_tensor(t, kind)
        w.add_tensor(gname, arr, raw_dtype=raw_dtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    tmp.replace(path)
    return path


def _pad_vocab(meta: dict[str, Any], vocab_size: int) -> None:
    """llama.cpp needs one token per embedding row: pad a shorter vocabulary with unused tokens."""
    tokens = meta["tokenizer.ggml.tokens"]
    if len(tokens) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
    extra = vocab_size - len(tokens)
    if extra:
        meta["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [5] * extra  # UNUSED
        if "tokenizer.ggml.scores" in meta:
            meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"] + [-1e9] * extra


def _add_value(w, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)
    else:
        raise TypeError(f"cannot write {key}={value!r} to GGUF")


# ---------------------------------------------------------------------------------------------- kept blocks
def kept_type(ggml_type: int, shape: tuple[int, ...]) -> bool:
    """Whether a GGUF matrix of this GGML type and torch shape (out, in) is kept quantized on load: Q8_0 / Q4_0 /
    Q4_1 (blocks of 32, :class:`BlockQuantLinear`), or Q4_K / Q6_K with ``in`` a multiple of 256 (whole
    super-blocks per row, :class:`KQuantLinear`)."""
    if len(shape) != 2:
        return False
    if ggml_type in GGML_TYPES.values():
        return True
    return ggml_type in KQ_GGML_TYPES.values() and shape[1] % QK_K == 0


def gguf_block_layers(g: GGUFFile, config: LlamaConfig) -> dict[str, QuantizedLinear]:
    """Our module name -> a quantized linear for each kept matrix (:func:`kept_type`) of a GGUF file's blocks, and
    for the output head (``output.weight``, or a quantized ``token_embd.weight`` when the head is tied):
    :class:`BlockQuantLinear` for Q8_0 / Q4_0 / Q4_1, :class:`KQuantLinear` for Q4_K / Q6_K.

    `g` is a :class:`llamalab.formats.gguf_reader.GGUFFile`; q/k rows are brought from llama.cpp's RoPE layout to
    ours by reordering whole rows, so the (super-)blocks are used exactly as stored. Each layer is separate (the
    model runs q, k, v, gate and up as their own products), so a file mixing the kinds, e.g. Q4_K_M's Q6_K
    ``attn_v`` / ``ffn_down`` among Q4_K layers, keeps each layer in its own kind."""
    out: dict[str, QuantizedLinear] = {}
    for name, t in g.tensors.items():
        ours = gguf_to_ours(name)
        if ours is None or not kept_type(t.type, t.shape):
            continue
        if ours == "embed_tokens.weight":
            if not config.tie_word_embeddings or "output.weight" in g.tensors:
                continue
            ours = "lm_head.weight"
        elif not (ours.startswith("layers.") or ours == "lm_head.weight"):
            continue
        cls = BlockQuantLinear if t.type in GGML_TYPES.values() else KQuantLinear
        layer = cls.from_gguf(g.raw(t), t.type, t.shape)
        heads = (config.n_heads if ours.endswith("q_proj.weight")
                 else config.n_kv_heads if ours.endswith("k_proj.weight") else None)
        if heads is not None:
            layer.permute_rows(unpermute_qk(torch.arange(t.shape[0]), heads))
        out[ours[: -len(".weight")]] = layer
    return out


def keeps_blocks_by_default(g) -> bool:
    """Whether ``llamalab.load`` keeps GGUF file `g` quantized when no dtype is asked for: some of its block
    linears are kept types (:func:`kept_type`: Q8_0 / Q4_0 / Q4_1, Q4_K / Q6_K of widths divisible by 256) and the
    C++ kernels are built (the fallback would be slower than float)."""
    has_blocks = any(name.startswith("blk.") and kept_type(t.type, t.shape) for name, t in g.tensors.items())
    from llamalab import kernels

    return has_blocks and kernels.native()


def keep_gguf_blocks(model: torch.nn.Module, g, device: torch.device | str = "cpu",
                     layers: dict[str, QuantizedLinear] | None = None) -> dict[str, QuantizedLinear]:
    """Swap `model`'s linears for the blocks of GGUF file `g` (``layers``, default :func:`gguf_block_layers`),
    in place; sets ``model.config.quantization`` so that ``save_pretrained`` writes the blocks and
    ``llamalab.load`` reads them back."""
    from llamalab.quantization.quantize import replace_linear

    layers = gguf_block_layers(g, model.config) if layers is None else layers
    for name, layer in layers.items():
        replace_linear(model, name, layer.to(device))
    if layers:
        kinds = sorted({lay.kind for lay in layers.values()})
        group = QK if any(k in GGML_TYPES for k in kinds) else QK_K  # 32-blocks, or only 256-super-blocks
        model.config.quantization = {"method": "gguf", "kinds": kinds, "group_size": group,
                                     "lm_head": "lm_head" in layers, "format": 1}
    return layers
