"""LlamaConfig: the hyper-parameters of a Llama model, read from and written to HF `config.json`.

Two shapes of `config.json` exist in the wild and both are read:

* hub files (transformers < 5):  ``"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", ...}``
  (older files spell the key ``"type"`` instead of ``"rope_type"``);
* transformers >= 5:             ``"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, ...}``.

We write the first shape (``rope_theta`` + ``rope_scaling``), which every transformers version reads.
Anything we cannot run faithfully (biases in attention/MLP, another activation, a non-llama
``model_type``, an unknown ``rope_type``) is refused with a one-line :class:`ConfigError` instead of
producing silently wrong logits.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llamalab.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# Parameters each rope_type needs (besides rope_theta) and the ones it may take.
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_ROPE_POSITIVE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_ROPE_OPTIONAL = {
    "default": (),
    "linear": (),
    "dynamic": (),
    "yarn": ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "llama3": (),
}

# HF config.json keys that carry no information we need (or that we check separately).
_HF_IGNORED_KEYS = {
    "architectures", "transformers_version", "use_cache", "_name_or_path", "attention_dropout",
    "model_type", "torch_dtype", "dtype", "pretraining_tp", "attention_bias", "mlp_bias", "hidden_act",
    "rope_scaling", "rope_parameters", "rope_theta", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "quantization_config", "partial_rotary_factor",
}

# The longest context a config may claim: RoPE tables and KV caches are sized from it, so a corrupt or
# hostile file saying 10^9 must be refused, not allocated (the largest published Llamas use 2^17).
MAX_CONTEXT = 1 << 24
# The widest any dimension may be (vocabulary, hidden, MLP, heads x head_dim): real models stay under
# 2^18; beyond 2^24 a tensor's storage size overflows before any shape check could name the problem.
MAX_DIM = 1 << 24


def describe(value: Any) -> str:
    """A short repr for error messages (a hostile file's value may be a 40 MB array)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return f"an array of {len(value)}"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (JSON true/false and strings are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_token_id(name: str, value: Any, many: bool = False) -> None:
    ids = value if many and isinstance(value, list) else [value]
    if value is not None and not all(is_int(i) for i in ids):  # (some hub configs say -1 for "none")
        kind = "a token id or a list of them" if many else "a token id (an integer)"
        raise ConfigError(f"{name} must be {kind}, got {describe(value)}")


# config.json keys and the type each must have when present (null means "not set")
_HF_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings")
_HF_NUMBERS = ("rms_norm_eps", "rope_theta", "initializer_range")
_HF_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_HF_STRINGS = ("model_type", "hidden_act", "torch_dtype", "dtype")
_HF_OBJECTS = ("rope_scaling", "rope_parameters", "llamalab_quantization")


def _check_hf_types(d: dict[str, Any]) -> None:
    """Refuse config.json values of the wrong JSON type, naming the key (before anything reads them)."""
    for key in _HF_POSITIVE_INTS:
        if d.get(key) is not None and not (is_int(d[key]) and d[key] > 0):
            raise ConfigError(f"{key} must be a positive integer, got {describe(d[key])}")
    for key in _HF_NUMBERS:
        if d.get(key) is not None and not is_number(d[key]):
            raise ConfigError(f"{key} must be a number, got {describe(d[key])}")
    for key in _HF_BOOLS:
        if d.get(key) is not None and not isinstance(d[key], bool):
            raise ConfigError(f"{key} must be true or false, got {describe(d[key])}")
    for key in _HF_STRINGS:
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ConfigError(f"{key} must be a string, got {describe(d[key])}")
    for key in _HF_OBJECTS:
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ConfigError(f"{key} must be a JSON object, got {describe(d[key])}")
    archs = d.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"architectures must be a list of strings, got {describe(archs)}")
    for key in ("bos_token_id", "pad_token_id"):
        _check_token_id(key, d.get(key))
    _check_token_id("eos_token_id", d.get("eos_token_id"), many=True)



@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; in between -> GQA
    head_dim: int | None = None  # None -> hidden_size // n_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # normalised: always has "rope_type"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    initializer_range: float = 0.02
    quantization: dict[str, Any] | None = None  # set by llamalab.quantization.quantize for saved quantized models
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # other HF keys, written back as-is

    def __post_init__(self) -> None:
        for name in ("hidden_size", "n_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {describe(value)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads <= 0 or self.hidden_size % self.n_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.n_heads
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {describe(value)}")
        for name, value in (("vocab_size", self.vocab_size), ("hidden_size", self.hidden_size),
                            ("intermediate_size", self.intermediate_size),
                            ("n_heads * head_dim", self.n_heads * self.head_dim),
                            ("n_kv_heads * head_dim", self.n_kv_heads * self.head_dim)):
            if value > MAX_DIM:
                raise ConfigError(f"{name} {value:,} is beyond the {MAX_DIM:,} llamalab accepts (a corrupt or "
                                  "hostile config?)")
        if self.max_position_embeddings > MAX_CONTEXT:
            raise ConfigError(f"max_position_embeddings {self.max_position_embeddings:,} is beyond the "
                              f"{MAX_CONTEXT:,} positions llamalab accepts (a corrupt or hostile config?)")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            if not is_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {describe(getattr(self, name))}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {describe(self.tie_word_embeddings)}")
        _check_token_id("bos_token_id", self.bos_token_id)
        _check_token_id("pad_token_id", self.pad_token_id)
        _check_token_id("eos_token_id", self.eos_token_id, many=True)
        if not isinstance(self.torch_dtype, str):
            raise ConfigError(f"torch_dtype must be a string, got {describe(self.torch_dtype)}")
        if self.quantization is not None:
            q = self.quantization
            if not isinstance(q, dict):
                raise ConfigError(f"quantization must be an object, got {describe(q)}")
            for key in ("format", "group_size"):
                if q.get(key) is not None and not (is_int(q[key]) and q[key] > 0):
                    raise ConfigError(f"quantization {key} must be a positive integer, got {describe(q[key])}")
            if not isinstance(q.get("method"), str):
                raise ConfigError(f"quantization method must be a string, got {describe(q.get('method'))}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) for grouped-query "
                "attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0):
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")

    # ------------------------------------------------------------------ derived
    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (the GQA group size)."""
        return self.n_heads // self.n_kv_heads

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (tied embeddings counted once)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * self.n_heads * d * 2 + h * self.n_kv_heads * d * 2
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.n_layers * per_layer + h + head

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes the KV cache needs per token: K and V, every layer, only the n_kv_heads heads."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        d = copy.deepcopy(d)
        _check_hf_types(d)
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"unsupported model_type {model_type!r}: llamalab runs model_type 'llama' only")
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if not any(a in ("LlamaForCausalLM", "LlamaModel") for a in archs):
            raise ConfigError(f"unsupported architectures {archs}: expected LlamaForCausalLM")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ConfigError(f"{flag}: true is not supported (Llama has no biases in its projections)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported: Llama's SwiGLU uses 'silu'")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp != 1 is not supported")
        if d.get("partial_rotary_factor", 1.0) not in (1.0, 1, None):
            raise ConfigError("partial_rotary_factor != 1 is not supported (Llama rotates the whole head)")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in d:
                raise ConfigError(f"config.json is missing required key {key!r}")

        rope_params = d.get("rope_parameters")
        rope_theta = d.get("rope_theta")
        rope_scaling = d.get("rope_scaling")
        if isinstance(rope_params, dict):
            if any(isinstance(v, dict) for v in rope_params.values()):
                raise ConfigError("per-layer rope_parameters are not supported for llama")
            rope_params = dict(rope_params)
            rope_theta = rope_params.pop("rope_theta", rope_theta)
            if rope_theta is not None and not is_number(rope_theta):
                raise ConfigError(f"rope_theta must be a number, got {describe(rope_theta)}")
            rtype = rope_params.get("rope_type", rope_params.get("type", "default"))
            rope_scaling = None if rtype == "default" and len(rope_params) <= 1 else rope_params
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        known = {f.name for f in fields(cls)}
        extra = {k: v for k, v in d.items() if k not in _HF_IGNORED_KEYS and k not in known
                 and k not in ("head_dim",)}
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d.get("intermediate_size") or 4 * d["hidden_size"],
                n_layers=d["num_hidden_layers"],
                n_heads=d["num_attention_heads"],
                n_kv_heads=d.get("num_key_value_heads"),  # null or absent: as many as query heads (MHA)
                head_dim=d.get("head_dim"),
                max_position_embeddings=d.get("max_position_embeddings") or 2048,
                rms_norm_eps=float(d["rms_norm_eps"] if d.get("rms_norm_eps") is not None else 1e-6),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(d.get("tie_word_embeddings") or False),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                torch_dtype=str(dtype).replace("torch.", ""),
                initializer_range=float(d["initializer_range"] if d.get("initializer_range") is not None else 0.02),
                quantization=d.get("llamalab_quantization"),
                extra=extra,
            )
        except TypeError as e:  # e.g. a string where a number belongs
            raise ConfigError(f"bad value in config.json: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=copy.deepcopy(self.rope_scaling),
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            torch_dtype=self.torch_dtype,
            initializer_range=self.initializer_range,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            pretraining_tp=1,
            use_cache=True,
        )
        if self.quantization:
            d["llamalab_quantization"] = copy.deepcopy(self.quantization)
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        from llamalab.jsonio import read_json_object

        try:
            return cls.from_hf_dict(read_json_object(path))
        except ConfigError as e:
            if str(path) in str(e):
                raise
            raise ConfigError(f"{path}: {e}") from None

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / "config.json"
        out.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return out

    def replace(self, **changes: Any) -> LlamaConfig:
        d = asdict(self)
        d.update(changes)
        if "n_heads" in changes and "head_dim" not in changes:
            d["head_dim"] = None
        return LlamaConfig(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        d = copy.deepcopy(PRESETS[name])
        d.update(overrides)
        return cls(**d)


def normalize_rope_scaling(rope_scaling: dict[str, Any] | None, max_position_embeddings: int) -> dict | None:
    """Check a `rope_scaling` dict and return it with a `rope_type` key (None for plain RoPE)."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"rope_scaling must be a JSON object, got {rope_scaling!r}")
    rs = dict(rope_scaling)
    rtype, legacy = rs.pop("rope_type", None), rs.pop("type", None)
    rtype = rtype if rtype is not None else legacy if legacy is not None else "default"
    if not isinstance(rtype, str):
        raise ConfigError(f"rope_type must be a string, got {describe(rtype)}")
    rs.pop("rope_theta", None)
    if rtype not in ROPE_TYPES:
        raise ConfigError(f"unknown rope_type {rtype!r}; supported: {', '.join(ROPE_TYPES)}")
    if rtype == "default":
        return None
    for key in _ROPE_REQUIRED[rtype]:
        if rs.get(key) is None:
            if key == "original_max_position_embeddings":
                rs[key] = max_position_embeddings
            else:
                raise ConfigError(f"rope_scaling of type {rtype!r} needs {key!r}")
    allowed = set(_ROPE_REQUIRED[rtype]) | set(_ROPE_OPTIONAL[rtype])
    unknown = sorted(set(rs) - allowed)
    if unknown:
        raise ConfigError(f"rope_scaling of type {rtype!r} has unsupported keys: {', '.join(unknown)}")
    for key, value in rs.items():
        if key == "truncate":
            if not isinstance(value, bool):
                raise ConfigError(f"rope_scaling truncate must be true or false, got {describe(value)}")
        elif value is not None and not (is_number(value) and (value > 0 or key not in _ROPE_POSITIVE and value == 0)):
            kind = "a positive" if key in _ROPE_POSITIVE else "a non-negative"
            raise ConfigError(f"rope_scaling {key} must be {kind} number, got {describe(value)}")
    orig = rs.get("original_max_position_embeddings")
    if orig is not None and (orig != int(orig) or orig > MAX_CONTEXT):
        raise ConfigError(f"rope_scaling original_max_position_embeddings must be a whole number of positions "
                          f"up to {MAX_CONTEXT:,}, got {describe(orig)}")
    if rtype == "llama3" and not rs["high_freq_factor"] > rs["low_freq_factor"]:
        raise ConfigError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
    return {"rope_type": rtype, **rs}


_LLAMA3_EOS = [128001, 128008, 128009]


def llama3_rope_scaling(factor: float = 8.0, original_max_position_embeddings: int = 8192) -> dict[str, Any]:
    """Llama 3.1 / 3.2's RoPE scaling (published config.json values; ``factor`` 8 for 3.1, 32 for 3.2)."""
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=original_max_position_embeddings)

PRESETS: dict[str, dict[str, Any]] = {
    # Real published shapes (weights are not shipped: these build random-init or meta models).
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, n_layers=32, n_heads=32,
                      n_kv_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2, torch_dtype="float16"),
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32,
                        n_kv_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=llama3_rope_scaling(8.0),
                        bos_token_id=128000, eos_token_id=_LLAMA3_EOS, torch_dtype="bfloat16"),
    "llama3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, n_layers=80, n_heads=64,
                         n_kv_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=llama3_rope_scaling(8.0),
                         bos_token_id=128000, eos_token_id=_LLAMA3_EOS, torch_dtype="bfloat16"),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, n_layers=16, n_heads=32,
                        n_kv_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling=llama3_rope_scaling(32.0),
                        bos_token_id=128000, eos_token_id=_LLAMA3_EOS, torch_dtype="bfloat16"),
    "llama3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, n_layers=28, n_heads=24,
                        n_kv_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling=llama3_rope_scaling(32.0),
                        bos_token_id=128000, eos_token_id=_LLAMA3_EOS, torch_dtype="bfloat16"),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, n_layers=30, n_heads=9,
                         n_kv_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
    # Small shapes for training on a CPU (vocab_size is usually replaced by the tokenizer's).
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, n_layers=2, n_heads=4, n_kv_heads=2,
                 max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
    "llamalab-20m": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, n_layers=8, n_heads=6,
                         n_kv_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=True),
    "llamalab-110m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, n_layers=12, n_heads=12,
                          n_kv_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                          tie_word_embeddings=True),
    # The 124.7M GQA reference shape of shared/DESIGN.md (untied), used by the benchmarks.
    "gqa-125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, n_layers=12, n_heads=12,
                     n_kv_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                     tie_word_embeddings=False),
}
