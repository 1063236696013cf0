"""LoRA: low-rank adapters on a frozen model (Hu et al., 2021, "LoRA", arXiv:2106.09685).

A frozen linear layer W (out × in) gets a trainable low-rank update:

    y = W x + (α / r) · B A dropout(x),      A: r × in,  B: out × r,  r ≪ min(in, out)

A starts random (Kaiming-uniform, as PEFT does) and B at zero, so at step 0 the model is exactly the
base model; training moves only A and B: r·(in + out) parameters per adapted layer instead of
in·out. After training the update folds into the weight, W' = W + (α/r)·B A (:func:`merge_lora`),
and inference costs nothing extra. With ``use_rslora`` the scale is α/√r (Kalajdzievski, 2023).

The base layer may be an ``nn.Linear`` or a quantized :class:`~llamalab.quantization.quantize.Int8Linear` /
``Int4Linear`` (QLoRA-style: the frozen base stays int8, gradients flow to the input through its
dequantized weight); merging a quantized base yields a float layer.

Files use the Hugging Face PEFT layout, so ``peft.PeftModel.from_pretrained(transformers_model,
dir)`` loads them on the transformers model and :func:`load_adapter` loads PEFT adapters trained
elsewhere (plain LoRA: no DoRA, no per-layer rank patterns):

* ``adapter_config.json`` — ``{"peft_type": "LORA", "r", "lora_alpha", "lora_dropout",
  "target_modules", "task_type": "CAUSAL_LM", "base_model_name_or_path", ...}``;
* ``adapter_model.safetensors`` — ``base_model.model.<HF module name>.lora_A.weight`` (r × in) and
  ``….lora_B.weight`` (out × r), e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.

API::

    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))  # in place
    save_adapter(model, "adapter/", base_model_name_or_path="path/to/base")  # or a bundled name: "smollm2"
    load_adapter(model, "adapter/")        # onto a freshly loaded base
    merge_lora(model)                      # fold into the weights, back to plain nn.Linear
    llamalab.load("adapter/")              # base from adapter_config.json + the adapter, merged
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamalab.errors import ConfigError, WeightsError
from llamalab.jsonio import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = ALL_LINEAR if self.target_modules in ("all-linear", "all") else \
                tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.target_modules if t not in ALL_LINEAR + ("lm_head",)]
        if unknown or not self.target_modules:
            raise ConfigError(f"unknown LoRA target module(s) {unknown or '(none)'}; choose from "
                              f"{', '.join(ALL_LINEAR)}, lm_head, or all-linear")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        d = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
             "lora_dropout": self.dropout, "target_modules": list(self.target_modules), "bias": "none",
             "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
             "use_rslora": self.use_rslora, "use_dora": False, "modules_to_save": None,
             "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
             "base_model_name_or_path": base_model_name_or_path, "revision": None}
        d.update(self.extra)
        return d

    @classmethod
    def from_peft(cls, d: dict[str, Any], source: str = ADAPTER_CONFIG) -> LoraConfig:
        if d.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"{source}: peft_type {d.get('peft_type')!r} is not supported (LORA only)")
        for key in ("use_dora", "fan_in_fan_out"):
            if d.get(key):
                raise ConfigError(f"{source}: {key}=true is not supported")
        for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
            if d.get(key):
                raise ConfigError(f"{source}: {key} is not supported (plain LoRA on whole modules only)")
        if d.get("bias", "none") != "none":
            raise ConfigError(f"{source}: bias={d.get('bias')!r} is not supported (only 'none')")
        targets = d.get("target_modules") or []
        if isinstance(targets, str):
            if targets == "all-linear":
                targets = list(ALL_LINEAR)
            else:
                raise ConfigError(f"{source}: regex target_modules {targets!r} are not supported; list names")
        from llamalab.config import describe, is_int, is_number

        if "r" not in d:
            raise ConfigError(f"{source}: missing key 'r'")
        checks = [("r", is_int(d["r"]) and 0 < d["r"] <= 1 << 16, "an integer 1..65536"),
                  ("lora_alpha", is_number(d.get("lora_alpha", 8)), "a number"),
                  ("lora_dropout", is_number(d.get("lora_dropout", 0.0)), "a number"),
                  ("use_rslora", isinstance(d.get("use_rslora", False), bool), "true or false"),
                  ("target_modules", isinstance(targets, list) and all(isinstance(t, str) for t in targets),
                   "a list of module names")]
        for key, ok, kind in checks:
            if not ok:
                raise ConfigError(f"{source}: {key} must be {kind}, got {describe(d.get(key))}")
        return cls(r=d["r"], alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                   target_modules=tuple(targets), use_rslora=d.get("use_rslora", False))


class LoRALinear(nn.Module):
    """``base(x) + scaling · lora_B(lora_A(dropout(x)))`` around a frozen base linear."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        device = _module_device(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """(α/r) · B A, shape (out, in), float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.dropout(x).to(a.dtype)))
        return y + (update * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    names = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in config.target_modules and hasattr(module, "in_features") and not isinstance(module, LoRALinear):
            if name.endswith(".base"):
                continue
            names.append(name)
    return names


def apply_lora(model: nn.Module, config: LoraConfig, freeze: bool = True) -> nn.Module:
    """Wrap the target linears of ``model`` with LoRA (in place); freeze everything else."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("model already has LoRA adapters (merge or reload the base first)")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    names = lora_targets(model, config)
    if not names:
        raise ConfigError(f"no modules named {', '.join(config.target_modules)} in the model")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), config.r, config.alpha, config.dropout,
                                         config.use_rslora))
    model.lora_config = config  # type: ignore[assignment]
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_key(module_name: str, part: str) -> str:
    from llamalab.formats.hf import to_hf_key

    return PEFT_PREFIX + to_hf_key(f"{module_name}.{part}.weight")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT key names."""
    out = {}
    for name, m in lora_modules(model).items():
        out[_peft_key(name, "lora_A")] = m.lora_A.weight.detach().float().contiguous().cpu()
        out[_peft_key(name, "lora_B")] = m.lora_B.weight.detach().float().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout)."""
    from safetensors.torch import save_file

    from llamalab.formats.files import atomic_write, atomic_write_text

    config: LoraConfig | None = getattr(model, "lora_config", None)
    if config is None or not lora_modules(model):
        raise ConfigError("model has no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / ADAPTER_CONFIG,
                      json.dumps(config.to_peft(base_model_name_or_path), indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise WeightsError(f"no {ADAPTER_CONFIG} in {directory} (not a LoRA adapter directory)")
    return read_json_object(path)


def base_model_reference(base: str | Path) -> str:
    """What an adapter records as its base: a bundled model's name (``smollm2``) as is, a real path
    absolute (so the adapter works from any directory), anything else as given."""
    from llamalab.bundled import BUNDLED

    if str(base) in BUNDLED:
        return str(base)
    path = Path(base)
    return str(path.resolve()) if path.exists() else str(base)


def adapter_base(directory: str | Path) -> Path:
    """The base model an adapter dir names (``base_model_name_or_path``), resolved locally.

    A bundled name (``smollm2``) comes back as is, for :func:`llamalab.load` to resolve; so does a
    missing path whose last part is a bundled name (what adapters once recorded: ``<cwd>/smollm2``)."""
    from llamalab.bundled import BUNDLED

    base = read_adapter_config(directory).get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise ConfigError(f"{directory}/{ADAPTER_CONFIG} names no base_model_name_or_path: pass the base model "
                          "and the adapter separately")
    if base in BUNDLED:
        return Path(base)
    path = Path(base)
    if not path.exists() and path.name in BUNDLED:
        return Path(path.name)
    if not path.is_absolute() and not path.exists() and (Path(directory) / base).exists():
        path = Path(directory) / base
    if not path.exists():
        raise WeightsError(f"the adapter's base model {base!r} is not a local path (models are never downloaded)")
    return path


def load_adapter(model: nn.Module, directory: str | Path, merge: bool = False) -> nn.Module:
    """Apply the PEFT LoRA adapter in ``directory`` to ``model`` (in place); optionally merge it."""
    directory = Path(directory)
    config = LoraConfig.from_peft(read_adapter_config(directory), str(directory / ADAPTER_CONFIG))
    weights = directory / ADAPTER_WEIGHTS
    if weights.exists():
        from llamalab.formats.hf import _read_safetensors

        tensors = _read_safetensors(weights)
    elif (directory / "adapter_model.bin").exists():
        from llamalab.formats.hf import read_tensor_bin

        tensors = read_tensor_bin(directory / "adapter_model.bin")
    else:
        raise WeightsError(f"no {ADAPTER_WEIGHTS} in {directory}")
    # PEFT may keep the adapter name in the key ("lora_A.default.weight"); drop it
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in tensors.items()}
    apply_lora(model, config)
    expected = {}
    for name, m in lora_modules(model).items():
        expected[_peft_key(name, "lora_A")] = m.lora_A.weight
        expected[_peft_key(name, "lora_B")] = m.lora_B.weight
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise WeightsError(f"{weights}: missing adapter tensor {missing[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise WeightsError(f"{weights}: unexpected adapter tensor {unexpected[0]} (does not fit this model)")
    with torch.no_grad():
        for key, p in expected.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(p.shape):
                raise WeightsError(f"{weights}: {key} has shape {tuple(t.shape)}, the model needs {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
    if merge:
        merge_lora(model)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W' = W + (α/r)·B A; LoRALinear -> nn.Linear (in place).

    A quantized base is dequantized (the merged model is float)."""
    from llamalab.quantization.quantize import QuantizedLinear

    merged = list(lora_modules(model))
    for name, m in lora_modules(model).items():
        base = m.base
        delta = m.delta_weight()
        if isinstance(base, QuantizedLinear):
            dtype = model.dtype if hasattr(model, "dtype") else torch.float32
            w = base.dequantize(torch.float32)
        else:
            dtype = base.weight.dtype
            w = base.weight.detach().float()
        lin = nn.Linear(m.in_features, m.out_features, bias=False, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_((w + delta.to(w.device)).to(dtype))
        lin.weight.requires_grad_(False)
        _replace(model, name, lin)
    if "lm_head" in merged and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head now differs from the embedding
    if hasattr(model, "lora_config"):
        del model.lora_config
    config = getattr(model, "config", None)
    if config is not None and config.quantization and not any(
            any(c.__name__ == "QuantizedLinear" for c in type(m).__mro__) for m in model.modules()):
        config.quantization = None
    return model
