"""GGUF in and out: llama.cpp's single-file format (metadata key/values + typed, possibly quantized tensors).

Reading (:func:`load_gguf`) parses the header, the metadata and the tensor table
(:mod:`llamalab.formats.gguf_reader`), checks the tensor table against the metadata before reading any
tensor, and dequantizes each tensor:

* F32 / F16 / BF16: a reinterpretation;
* Q8_0 (blocks of 32: fp16 scale d, 32 int8 q):      w = d * q
* Q4_0 (blocks of 32: fp16 d, 16 bytes of nibbles):   w = d * (q - 8)
* Q4_1 (blocks of 32: fp16 d, fp16 m, 16 bytes):      w = d * q + m
  (element j < 16 is the low nibble of byte j, element j >= 16 the high nibble of byte j - 16),
  vectorised in torch; Q4_K, Q6_K and the other k-quants through ``gguf.quants.dequantize``.

``keep_quantized=True`` (the default when no dtype is asked for and the C++ kernels are built) instead
keeps the Q8_0 / Q4_0 / Q4_1 linear layers — and a quantized output head — as blocks, in
:mod:`llamalab.quantization.blocks`' BlockQuantLinear, multiplied by :mod:`llamalab.kernels`.

llama.cpp applies RoPE to adjacent pairs (x0, x1), (x2, x3), ... while HF Llama checkpoints (and this
library) rotate halves (x_i, x_{i + d/2}). `convert_hf_to_gguf.py` therefore permutes the rows of
``q_proj`` / ``k_proj`` within each head: row ``2i`` <- HF row ``i``, row ``2i+1`` <- HF row ``i + d/2``.
:func:`unpermute_qk` undoes it on load, :func:`permute_qk` redoes it on export.

Writing (:func:`save_gguf`) uses ``gguf.GGUFWriter``: llama hyper-parameters, RoPE settings (linear and
YaRN as ``rope.scaling.*``; llama3 as the ``rope_freqs.weight`` tensor of per-frequency divisors that
llama.cpp expects, plus ``llamalab.rope.*`` keys so that the exact parameters come back on load),
tensors as f32 / f16 / bf16 / q8_0 (1-D norm weights stay f32, as llama.cpp's converter does), the
tokenizer (``tokenizer.ggml.*``) and the chat template.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from llamalab.config import LlamaConfig, describe, is_int, is_number, llama3_rope_scaling
from llamalab.errors import ConfigError, TokenizerError, WeightsError
from llamalab.formats.gguf_reader import GGUFFile, TensorInfo, read_gguf
from llamalab.quantization.blocks import GGML_TYPES, QK, BlockQuantLinear

T = TypeVar("T", torch.Tensor, np.ndarray)

# GGML tensor types (ggml.h) that we read directly; the rest go through gguf.quants
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K",
                   "Q2_K", "Q3_K"}
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0")


# GGUF tensor name -> ours (per-layer names take the block index)
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_IGNORED_TENSORS = {"rope_freqs.weight"}


def gguf_to_ours(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def ours_to_gguf(name: str) -> str:
    for g, o in _GLOBAL_NAMES.items():
        if o == name:
            return g
    _, idx, rest = name.split(".", 2)
    for g, o in _LAYER_NAMES.items():
        if o == rest:
            return f"blk.{idx}.{g}"
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------- q/k layout
def permute_qk(w: T, n_heads: int) -> T:
    """HF (rotate-half) rows -> llama.cpp (adjacent-pair) rows, per head (torch tensor or numpy array)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: T, n_heads: int) -> T:
    """llama.cpp (adjacent-pair) rows -> HF (rotate-half) rows, per head (torch tensor or numpy array)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- dequantizing
def dequantize(raw: np.ndarray, ttype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes -> float32 torch tensor of `shape` (torch order)."""
    return torch.from_numpy(np.ascontiguousarray(dequantize_np(raw, ttype, shape)))


def dequantize_np(raw: np.ndarray, ttype: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF tensor bytes -> float32 numpy array of `shape`; vectorised numpy (fast on few cores)."""
    if ttype == F32:
        return raw.view(np.float32).reshape(shape).copy()
    if ttype == F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if ttype == BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if ttype == Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        out = blocks[:, 2:].view(np.int8).astype(np.float32)
        out *= d
        return out.reshape(shape)
    if ttype in (Q4_0, Q4_1):
        head = 2 if ttype == Q4_0 else 4
        blocks = raw.reshape(-1, head + 16)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, head:]
        out = np.empty((blocks.shape[0], 32), dtype=np.float32)
        out[:, :16] = qs & 0x0F
        out[:, 16:] = qs >> 4
        if ttype == Q4_0:
            out -= 8.0
            out *= d
        else:
            out *= d
            out += blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        return out.reshape(shape)
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(ttype)
        out = quants.dequantize(raw.reshape(shape[:-1] + (-1,)) if len(shape) > 1 else raw, qtype)
    except NotImplementedError:
        raise WeightsError(f"GGML type {GGMLQuantizationType(ttype).name} is not supported") from None
    return np.asarray(out, dtype=np.float32).reshape(shape)


def _get(meta: dict[str, Any], key: str, default: Any = None, required: bool = False) -> Any:
    if key in meta:
        return meta[key]
    if required:
        raise WeightsError(f"GGUF metadata lacks {key!r}")
    return default


def _int(meta: dict[str, Any], key: str, default: int | None = None, required: bool = False,
         minimum: int = 1) -> int:
    """An integer metadata value (at least ``minimum``), or a one-line error naming the key."""
    v = _get(meta, key, default, required)
    if not is_int(v) or v < minimum:
        raise ConfigError(f"GGUF metadata {key} must be an integer >= {minimum}, got {describe(v)}")
    return v


def _float(meta: dict[str, Any], key: str, default: float) -> float:
    v = _get(meta, key, default)
    if not is_number(v):
        raise ConfigError(f"GGUF metadata {key} must be a number, got {describe(v)}")
    return float(v)


def config_from_metadata(meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> LlamaConfig:
    """LlamaConfig from ``llama.*`` GGUF metadata (plus the tensor table for what metadata may omit)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"unsupported GGUF architecture {describe(arch)}: llamalab reads llama-architecture "
                          "files only")
    a = "llama."
    hidden = _int(meta, a + "embedding_length", required=True)
    n_heads = _int(meta, a + "attention.head_count", required=True)
    n_kv = _int(meta, a + "attention.head_count_kv", n_heads)
    head_dim = _int(meta, a + "attention.key_length", max(1, hidden // n_heads))
    if _int(meta, a + "attention.value_length", head_dim) != head_dim:
        raise ConfigError("GGUF key_length != value_length is not supported")
    rot = _int(meta, a + "rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ConfigError(f"partial RoPE (rope.dimension_count {rot} < head_dim {head_dim}) is not supported")
    if a + "vocab_size" in meta:
        vocab = _int(meta, a + "vocab_size")
    elif "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"].shape[0]
    elif isinstance(meta.get("tokenizer.ggml.tokens"), list) and meta["tokenizer.ggml.tokens"]:
        vocab = len(meta["tokenizer.ggml.tokens"])
    else:
        raise WeightsError("GGUF file has neither llama.vocab_size nor token_embd.weight")
    ctx = _int(meta, a + "context_length", 2048)
    rope_scaling = _rope_scaling(meta, tensors, ctx)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_int(meta, a + "feed_forward_length", required=True),
        n_layers=_int(meta, a + "block_count", required=True), n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, max_position_embeddings=ctx,
        rms_norm_eps=_float(meta, a + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=_float(meta, a + "rope.freq_base", 10000.0), rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _rope_scaling(meta: dict[str, Any], tensors: dict[str, TensorInfo], ctx: int) -> dict[str, Any] | None:
    a = "llama.rope."
    if "llamalab.rope.scaling.type" in meta:  # written by save_gguf: exact parameters (checked by LlamaConfig)
        prefix = "llamalab.rope.scaling."
        d = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
        return {"rope_type": d.pop("type"), **d}
    stype = meta.get(a + "scaling.type")
    if stype is not None and not isinstance(stype, str):
        raise ConfigError(f"GGUF metadata {a}scaling.type must be a string, got {describe(stype)}")
    key = a + "scaling.factor" if a + "scaling.factor" in meta else a + "scale_linear"
    factor = _float(meta, key, 0.0) or None
    if stype in (None, "none") and factor in (None, 1.0):
        return None  # (a rope_freqs.weight tensor, llama3 scaling, is resolved in load_gguf)
    orig = _int(meta, a + "scaling.original_context_length", ctx)
    if stype in ("linear", None, "none"):
        return {"rope_type": "linear", "factor": factor}
    if stype == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
        for key, ours in (("scaling.yarn_beta_fast", "beta_fast"), ("scaling.yarn_beta_slow", "beta_slow")):
            if a + key in meta:
                out[ours] = _float(meta, a + key, 0.0)
        return out
    raise ConfigError(f"unsupported GGUF rope scaling type {stype!r}")


def _llama3_from_freqs(freqs: np.ndarray, head_dim: int, theta: float, ctx: int) -> dict[str, Any]:
    """Recover llama3 rope_scaling (factor, low/high_freq_factor, original length) from rope_freqs divisors."""
    from llamalab.model.rope import compute_inv_freq

    f = np.asarray(freqs, dtype=np.float64)
    if not (np.isfinite(f).all() and (f > 0).all()):
        raise ConfigError("GGUF rope_freqs.weight must hold finite positive divisors")
    factor = float(f.max())
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    mid = (f > 1.0 + 1e-6) & (f < factor - 1e-6)
    guesses = [{k: v for k, v in llama3_rope_scaling(factor).items() if k != "rope_type"}]
    if mid.sum() >= 2:
        # smooth_i = (1/f_i - 1/factor) / (1 - 1/factor) = orig/(high-low) / wavelen_i - low/(high-low)
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[mid], s, 1)
        low = 1.0
        span = -low / intercept if intercept < 0 else 3.0
        guesses.append(dict(factor=factor, low_freq_factor=low, high_freq_factor=low + span,
                            original_max_position_embeddings=int(round(slope * span))))
    for g in guesses:
        rs = {"rope_type": "llama3", **g}
        try:
            ours, _ = compute_inv_freq(head_dim, theta, rs, ctx)
        except Exception:  # noqa: BLE001
            continue
        if np.allclose(inv / ours.double().numpy(), f, rtol=1e-3):
            return rs
    raise ConfigError("GGUF rope_freqs.weight does not match llama3 RoPE scaling; not supported")


def load_gguf(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
              keep_quantized: bool | None = None):
    """Read a llama-architecture GGUF file -> (Llama, Tokenizer | None).

    ``keep_quantized`` (default: when no ``dtype`` is given and the C++ kernels are available): Q8_0 /
    Q4_0 / Q4_1 matrices stay as blocks (:mod:`llamalab.quantization.blocks`), as llama.cpp runs them."""
    from llamalab.formats.hf import resolve_dtype
    from llamalab.model.llama import Llama
    from llamalab.tokenization.gguf_vocab import from_gguf_metadata

    g = read_gguf(path)
    try:
        config = config_from_metadata(g.metadata, g.tensors)
        _check_tensor_table(g, config)
        if "rope_freqs.weight" in g.tensors and not (config.rope_scaling or {}).get("rope_type") == "llama3":
            t = g.tensors["rope_freqs.weight"]
            if t.shape != (config.head_dim // 2,) or _type_name(t.type) not in ("F32", "F16", "BF16"):
                raise WeightsError(f"{g.path}: rope_freqs.weight must be {config.head_dim // 2} floats, got "
                                   f"{_type_name(t.type)} {t.shape}")
            freqs = dequantize(g.raw(t), t.type, t.shape).numpy()
            config.rope_scaling = _llama3_from_freqs(freqs, config.head_dim, config.rope_theta,
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
        if _type_name(t.type) not in SUPPORTED_TYPES:
            raise WeightsError(f"{g.path}: tensor {name} has unsupported type {_type_name(t.type)}")
    extra = [name for key, (name, _) in ours.items() if key not in expected]
    if extra:
        raise WeightsError(f"{g.path}: unexpected tensor {extra[0]} (not part of a llama with this metadata)")


def _tokenizer(meta: dict[str, Any], build):
    try:
        return build(meta)
    except TokenizerError as e:
        warnings.warn(f"GGUF tokenizer not loaded: {e}", stacklevel=3)
        return None


def _type_name(ttype: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ttype).name
    except ValueError:
        return str(ttype)


def _blocks(raw: np.ndarray, ttype: int, shape: tuple[int, ...]):
    """Unpacked codes (out, in) and per-32 scales (and mins) (out, in/32) of a Q8_0/Q4_0/Q4_1 tensor."""
    out_f, in_f = shape
    if ttype == Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).reshape(out_f, in_f // 32)
        q = blocks[:, 2:].copy().view(np.int8).reshape(out_f, in_f)
        return torch.from_numpy(q), torch.from_numpy(d), None
    head = 2 if ttype == Q4_0 else 4
    blocks = raw.reshape(-1, head + 16)
    d = blocks[:, :2].copy().view(np.float16).reshape(out_f, in_f // 32)
    m = blocks[:, 2:4].copy().view(np.float16).reshape(out_f, in_f // 32) if ttype == Q4_1 else None
    qs = blocks[:, head:]
    codes = np.concatenate((qs & 0x0F, qs >> 4), axis=1).reshape(out_f, in_f)
    return torch.from_numpy(codes), torch.from_numpy(d), None if m is None else torch.from_numpy(m)


def _llama_tensors(g):
    """(gguf name, our name, tensor) for each tensor of a llama GGUF file; anything unknown is an error."""
    for name, t in g.tensors.items():
        ours = gguf_to_ours(name)
        if ours is None:
            if name in _IGNORED_TENSORS:
                continue
            raise WeightsError(f"{g.path}: unexpected tensor {name} in a llama GGUF file")
        yield name, ours, t


def _load_keep_quantized(g: GGUFFile, config: LlamaConfig, target: torch.dtype, device):
    """Q8_0 / Q4_0 / Q4_1 linear layers (and a quantized output head) become llamalab.quantization.blocks
    BlockQuantLinear, the file's blocks as stored; everything else is dequantized to `target`."""
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
        raise WeightsError(f"{g.path}: keep_quantized needs Q8_0/Q4_0/Q4_1 linear weights; this file has none")
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
def gguf_block_layers(g: GGUFFile, config: LlamaConfig) -> dict:
    """Our module name -> :class:`BlockQuantLinear` for each Q8_0 / Q4_0 / Q4_1 matrix of a GGUF file's blocks,
    and for the output head (``output.weight``, or a quantized ``token_embd.weight`` when the head is tied).

    `g` is a :class:`llamalab.formats.gguf.GGUFFile`; q/k rows are brought from llama.cpp's RoPE layout to
    ours by reordering whole rows, so the blocks are used exactly as stored."""
    out: dict[str, BlockQuantLinear] = {}
    for name, t in g.tensors.items():
        ours = gguf_to_ours(name)
        if ours is None or t.type not in GGML_TYPES.values() or len(t.shape) != 2:
            continue
        if ours == "embed_tokens.weight":
            if not config.tie_word_embeddings or "output.weight" in g.tensors:
                continue
            ours = "lm_head.weight"
        elif not (ours.startswith("layers.") or ours == "lm_head.weight"):
            continue
        layer = BlockQuantLinear.from_gguf(g.raw(t), t.type, t.shape)
        heads = (config.n_heads if ours.endswith("q_proj.weight")
                 else config.n_kv_heads if ours.endswith("k_proj.weight") else None)
        if heads is not None:
            layer.permute_rows(unpermute_qk(torch.arange(t.shape[0]), heads))
        out[ours[: -len(".weight")]] = layer
    return out


def keeps_blocks_by_default(g) -> bool:
    """Whether ``llamalab.load`` keeps GGUF file `g` quantized when no dtype is asked for: its block
    linears are Q8_0 / Q4_0 / Q4_1 and the C++ kernels are built (the fallback would be slower than float)."""
    has_blocks = any(name.startswith("blk.") and t.type in GGML_TYPES.values() and len(t.shape) == 2
                     for name, t in g.tensors.items())
    from llamalab import kernels

    return has_blocks and kernels.native()


def keep_gguf_blocks(model: torch.nn.Module, g, device: torch.device | str = "cpu",
                     layers: dict[str, BlockQuantLinear] | None = None) -> dict[str, BlockQuantLinear]:
    """Swap `model`'s linears for the blocks of GGUF file `g` (``layers``, default :func:`gguf_block_layers`),
    in place; sets ``model.config.quantization`` so that ``save_pretrained`` writes the blocks and
    ``llamalab.load`` reads them back."""
    from llamalab.quantization.quantize import replace_linear

    layers = gguf_block_layers(g, model.config) if layers is None else layers
    for name, layer in layers.items():
        replace_linear(model, name, layer.to(device))
    if layers:
        model.config.quantization = {"method": "gguf", "kinds": sorted({lay.kind for lay in layers.values()}),
                                     "group_size": QK, "lm_head": "lm_head" in layers, "format": 1}
    return layers
