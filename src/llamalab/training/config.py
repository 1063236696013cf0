"""The ``llamalab train`` config: defaults, TOML files, ``--set key=value`` overrides, checks before any work.

``load_config(file_or_dict, ["train.lr=1e-3"], steps=200)`` merges DEFAULTS <- the TOML file (or dict) <-
overrides <- keyword args; unknown keys and wrong types raise a one-line :class:`ConfigError`.
:func:`validate` checks everything that needs no data (shapes, divisibility, corpus present) and
:func:`model_config_from` turns the ``[model]`` section into a :class:`llamalab.config.LlamaConfig`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import tomllib
import torch

from llamalab.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "name": "",  # run name (default: the config file's stem)
    "out_dir": "runs",
    "seed": 1337,
    "data": {"corpus": "shakespeare", "tokenizer": "bpe", "vocab_size": 2048, "val_fraction": 0.05,
             "cache_dir": "data_cache"},
    "model": {"preset": "tiny"},  # plus any LlamaConfig field (hidden_size, n_layers, ...)
    "train": {"steps": 1000, "batch_size": 32, "seq_len": 256, "grad_accum": 1, "lr": 3e-3, "min_lr": 3e-4,
              "warmup_steps": 100, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0,
              "precision": "auto", "compile": False, "device": "auto", "max_minutes": 0.0,
              "threads": 0},  # threads: torch intra-op threads (0 = torch's default)
    "eval": {"every": 200, "tokens": 65536, "batch_size": 16},
    "checkpoint": {"every": 500, "keep": 2},
    "log": {"every": 10},
    "sample": {"prompts": [], "max_new_tokens": 160, "temperature": 0.8, "top_k": 40, "count": 3},
    "distributed": {"strategy": "auto", "activation_checkpointing": False, "compile_blocks": False,
                    "timeout_s": 300, "backend": "auto"},
}
_MODEL_FIELDS = {"preset", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
                 "initializer_range"}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # TOMLDecodeError, or a value past Python's limits
        return text  # a bare string


def _set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {p} is not a section")
    node[parts[-1]] = value


def _find_section(key: str) -> str:
    if key in DEFAULTS and not isinstance(DEFAULTS[key], dict):
        return key
    hits = [s for s, v in DEFAULTS.items() if isinstance(v, dict) and key in v]
    if key in _MODEL_FIELDS:
        hits.append("model")
    hits = list(dict.fromkeys(hits))
    if len(hits) == 1:
        return f"{hits[0]}.{key}"
    if not hits:
        raise ConfigError(f"unknown config key {key!r}")
    raise ConfigError(f"ambiguous config key {key!r}: say {' or '.join(f'{h}.{key}' for h in hits)}")


def _merge(base: dict, new: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        path = f"{where}{k}"
        if where == "model.":
            if k not in _MODEL_FIELDS:
                raise ConfigError(f"unknown config key {path!r}; model keys: {', '.join(sorted(_MODEL_FIELDS))}")
            out[k] = v
            continue
        if k not in base:
            section = where.rstrip(".") or "top level"
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key {path!r} (in {section}; known: {known})")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"config key {path!r} must be a section ([{path}])")
            out[k] = _merge(base[k], v, f"{path}.")
        else:
            out[k] = _check_type(path, base[k], v)
    return out


def _check_type(path: str, default: Any, v: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"{path} must be true or false, got {v!r}")
    elif isinstance(default, int):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{path} must be an integer, got {v!r}")
    elif isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{path} must be a number, got {v!r}")
        v = float(v)
    elif isinstance(default, str):
        if not isinstance(v, str):
            raise ConfigError(f"{path} must be a string, got {v!r}")
    elif isinstance(default, list):
        if not isinstance(v, list):
            v = [v]
    return v


def load_config(config: str | Path | dict | None = None, overrides: list[str] | dict | None = None,
                **kwargs: Any) -> dict:
    """Defaults ← TOML file (or dict) ← overrides (``["train.lr=1e-3", ...]`` or a dict) ← keyword args.

    Keyword args may name a key by its leaf when unambiguous (``steps=100``) or with ``__`` for the dot
    (``train__lr=1e-3``). Unknown keys and wrong types raise :class:`ConfigError`.
    """
    raw: dict[str, Any] = {}
    name = ""
    if isinstance(config, dict):
        raw = copy.deepcopy(config)
    elif config is not None:
        path = resolve_config_path(config)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # bad TOML or UTF-8, a 5000-digit integer, deep nesting
            raise ConfigError(f"{path}: invalid TOML: {str(e)[:200] or type(e).__name__}") from None
        name = path.stem
    cfg = _merge(DEFAULTS, raw)
    flat: dict[str, Any] = {}
    if isinstance(overrides, dict):
        flat.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-3)")
            k, v = item.split("=", 1)
            flat[k.strip()] = _parse_value(v.strip())
    for k, v in kwargs.items():
        flat[k.replace("__", ".")] = v
    nested: dict[str, Any] = {}
    for k, v in flat.items():
        _set_dotted(nested, k if "." in k else _find_section(k), v)
    cfg = _merge(cfg, nested)
    if not cfg["name"]:
        cfg["name"] = name or "run"
    return cfg


def resolve_config_path(config: str | Path) -> Path:
    p = Path(config)
    if p.is_file():
        return p
    from llamalab.assets import bundled_config, bundled_config_names

    local = Path("configs") / f"{config}.toml"  # a recipe of the user's own, by name, in ./configs
    if local.is_file():
        return local
    bundled = bundled_config(str(config))
    if bundled is not None:
        return bundled
    raise ConfigError(f"no such config file: {config} (bundled recipes: {', '.join(bundled_config_names())})")


def to_toml(cfg: dict) -> str:
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    lines = [f"{k} = {val(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {val(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines) + "\n"


def model_config_from(cfg: dict, vocab_size: int, bos: int | None = None, eos: int | None = None):
    """The LlamaConfig a training config describes (raises ConfigError for impossible shapes)."""
    from llamalab.config import PRESETS, LlamaConfig

    m = dict(cfg["model"])
    preset = m.pop("preset", None) or "tiny"
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    if "n_heads" in m and "head_dim" not in m:
        m["head_dim"] = None
    try:
        mc = LlamaConfig.from_preset(preset, **m, vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos,
                                     torch_dtype="float32")
    except TypeError as e:
        raise ConfigError(f"bad [model] section: {e}") from None
    seq_len = cfg["train"]["seq_len"]
    if seq_len > mc.max_position_embeddings:
        raise ConfigError(f"train.seq_len {seq_len} exceeds the model's max_position_embeddings "
                          f"{mc.max_position_embeddings}")
    return mc


def validate(cfg: dict, world: int = 1) -> None:
    """Every check that needs no data: raises a one-line ConfigError before any work."""
    from llamalab.data.corpora import check_corpus

    if not 0 <= cfg["seed"] < 2**63:  # numpy's data order takes no negative seed, torch none past 64 bits
        raise ConfigError(f"seed must be in 0 .. 2**63-1, got {cfg['seed']}")
    t = cfg["train"]
    for key in ("steps", "batch_size", "seq_len", "grad_accum"):
        if t[key] <= 0:
            raise ConfigError(f"train.{key} must be positive, got {t[key]}")
    if not t["lr"] > 0 or t["min_lr"] < 0 or t["min_lr"] > t["lr"]:
        raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0 (got lr {t['lr']}, min_lr {t['min_lr']})")
    if t["warmup_steps"] < 0:
        raise ConfigError("train.warmup_steps must be >= 0")
    if t["batch_size"] % (t["grad_accum"] * world):
        raise ConfigError(f"train.batch_size {t['batch_size']} must be divisible by grad_accum ({t['grad_accum']}) "
                          f"x processes ({world})")
    from llamalab.training.precision import resolve_precision

    resolve_precision(t["precision"], torch.device("cpu") if t["device"] in ("auto", "cpu") else
                      torch.device(t["device"])) if t["precision"] != "auto" else None
    if cfg["distributed"]["strategy"] not in ("auto", "none", "ddp", "fsdp"):
        raise ConfigError(f"distributed.strategy must be auto, none, ddp or fsdp, got "
                          f"{cfg['distributed']['strategy']!r}")
    d = cfg["data"]
    if not 0 <= d["val_fraction"] < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d['val_fraction']}")
    check_corpus(d["corpus"])
    if d["tokenizer"] != "bpe" and not Path(d["tokenizer"]).exists():
        raise ConfigError(f"data.tokenizer must be \"bpe\" (train one) or a model/tokenizer dir; "
                          f"{d['tokenizer']} does not exist")
    model_config_from(cfg, d["vocab_size"] if d["tokenizer"] == "bpe" else 1024)
