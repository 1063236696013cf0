"""Hugging Face checkpoint directories: config.json + model.safetensors (or sharded + index.json).

Loading is memory-light: the model is built on the ``meta`` device (no storage), each tensor is read
from the memory-mapped safetensors file, cast once to the target dtype, and assigned into the module
(``load_state_dict(assign=True)``), so there is never a second full copy of the weights. Tied
embeddings (no ``lm_head.weight`` in the files) are re-tied after loading. Nothing is ever
unpickled: safetensors, or ``torch.load(weights_only=True)`` for legacy ``pytorch_model.bin``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from llamalab.config import LlamaConfig
from llamalab.errors import ConfigError, WeightsError
from llamalab.formats.files import atomic_write, atomic_write_text

IGNORED_KEY = re.compile(r".*rotary_emb\.inv_freq$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32}


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[key]


def to_hf_key(name: str) -> str:
    """Our parameter name -> the HF LlamaForCausalLM state-dict key."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_key(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", str(size).upper())
    if not m:
        raise ConfigError(f"cannot parse size {size!r} (e.g. 500MB, 2GB)")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


# ---------------------------------------------------------------------------------------------- reading
def _weight_files(directory: Path) -> tuple[list[Path], str]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        from llamalab.jsonio import read_json_object

        weight_map = read_json_object(index, WeightsError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"{index} is not a valid safetensors index: weight_map must map tensor names to "
                               "file names")
        for name in set(weight_map.values()):
            shard = Path(name)
            if shard.is_absolute() or not shard.parts or ".." in shard.parts or shard.suffix != ".safetensors":
                raise WeightsError(f"{index} names shard {name!r}: shards must be .safetensors files inside "
                                   f"{directory}")
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files, "safetensors"
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files, "safetensors"
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return bins, "bin"
    raise WeightsError(f"no weights in {directory}: expected model.safetensors (or shards with an index)")


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir, keyed by HF names (memory-mapped where the format allows)."""
    directory = Path(directory)
    files, kind = _weight_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if kind == "safetensors":
            tensors.update(_read_safetensors(f))
        else:
            tensors.update(read_tensor_bin(f))
    return tensors


def read_tensor_bin(path: Path) -> dict[str, torch.Tensor]:
    """A legacy ``torch.save`` file of named tensors, read by torch's restricted loader
    (``weights_only=True``: tensors and plain containers only, never code); anything else is refused."""
    import pickle

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"cannot read {path}: it holds pickled Python objects, not only tensors (refused: "
                           "llamalab never runs code from a file; use safetensors)") from None
    except Exception as e:  # noqa: BLE001 - zip/pickle/IO failures of a corrupt file: report as one line
        msg = str(e).splitlines()[0] if str(e) else "unreadable"
        raise WeightsError(f"cannot read {path}: {type(e).__name__}: {msg}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise WeightsError(f"cannot read {path}: not a dictionary of named tensors")
    return sd


def tensor_names(directory: str | Path) -> list[str]:
    """The tensor names a checkpoint dir holds (safetensors headers only: no tensor data is read)."""
    from safetensors import safe_open

    directory = Path(directory)
    files, kind = _weight_files(directory)
    if kind != "safetensors":
        return list(read_state_dict(directory))
    names: list[str] = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                names += list(fh.keys())
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsError(f"corrupt or truncated safetensors file {f}: {msg}") from None
    return names


def check_layer_count(config: LlamaConfig, names: Iterable[str], source: str) -> None:
    """The config's layer count must be the layers the checkpoint holds: checked before any block is built
    (a file claiming 10^7 layers would otherwise build 10^7 blocks first)."""
    layers: set[int] = set()
    for name in names:
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdecimal():
            layers.add(int(parts[1]))
    if len(layers) == config.n_layers and max(layers, default=-1) == config.n_layers - 1:
        return  # exactly layers 0 .. n-1
    if not layers:
        held = "no layer tensors"
    elif len(layers) == max(layers) + 1:
        held = f"tensors for {len(layers)} layers"
    else:
        held = f"tensors for {len(layers)} layers numbered up to {max(layers)}"
    raise WeightsError(f"{source}: the config says {config.n_layers:,} layers but the checkpoint holds {held}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
        return out
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"corrupt or truncated safetensors file {path}: {msg}") from None


def read_checkpoint(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """An HF directory's config and tensors (our key names), checked to be a checkpoint before any tensor is read:
    the directory exists, holds config.json, and (quantized checkpoints) tensors for the config's layers.
    :meth:`llamalab.model.Llama.from_pretrained` builds the model from them."""
    directory = Path(path)
    if not directory.exists():
        raise WeightsError(f"no such model directory: {directory}")
    if not directory.is_dir():
        raise WeightsError(f"{directory} is not a directory (expected config.json + *.safetensors)")
    if not (directory / "config.json").exists():
        raise WeightsError(f"{directory} has no config.json")
    config = LlamaConfig.from_json(directory / "config.json")
    if config.quantization:
        check_layer_count(config, (from_hf_key(k) for k in tensor_names(directory)), str(directory))
    return config, {from_hf_key(k): v for k, v in read_state_dict(directory).items()}


def stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (the most common floating dtype): the default
    load dtype, as transformers and llama.cpp keep a checkpoint's own precision."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.dtype in (torch.float32, torch.bfloat16, torch.float16):
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


# ---------------------------------------------------------------------------------------------- writing
def hf_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-keyed tensors of a model, tied lm_head written once (omitted), contiguous, optionally cast."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[to_hf_key(name)] = t.contiguous().cpu()
    return out


def save_hf(model, path: str | Path, max_shard_size: int | str = "2GB", dtype: torch.dtype | str | None = None,
            extra_config: dict | None = None) -> Path:
    """Write config.json + safetensors (sharded above max_shard_size) that transformers loads."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    target = resolve_dtype(dtype, default=model.dtype)
    tensors = hf_state_dict(model, target)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        stale.unlink()
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(directory / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata=meta))
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            atomic_write(directory / name, lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(directory / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = str(target).replace("torch.", "")
    if extra_config:
        cfg.update(extra_config)
    atomic_write_text(directory / "config.json", json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    atomic_write_text(directory / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    return directory
