"""Training checkpoints that are data, never code: safetensors + JSON, with a sha256 manifest.

Nothing in a checkpoint is unpickled. A checkpoint directory ``checkpoints/step_N/`` holds::

    config.json, model.safetensors, tokenizer.json   the model in HF layout (what ``final/`` becomes)
    trainer.json                 step, tokens, elapsed time, data position, loop config, world size
    state/model.safetensors      the full (unsharded) training state of the model
    state/optim.safetensors      the optimizer state, one tensor per ``<param name>/<state name>``;
                                 the param groups (learning rate, betas, ...) as JSON in its metadata
    rng_rank<r>.safetensors      rank r's RNG states: torch CPU (and CUDA), numpy, Python ``random``
    manifest.json                size and sha256 of every other file, written last

Model and optimizer state are gathered to full tensors (``torch.distributed.checkpoint.state_dict``
with ``full_state_dict=True``) and written by rank 0; on load every rank reads the full tensors and
keeps its own shard, so a run saved by 2 FSDP processes resumes in 1 process and the other way round.

Writes go to ``.tmp_step_N`` and are renamed when complete. :func:`verify_checkpoint` accepts a
checkpoint only when its manifest is well formed and lists every file with the right size and hash,
every JSON file parses and every safetensors header is valid; a checkpoint of the older
pickle-based format (``*.pt`` RNG files, ``state/.metadata``) is refused without being opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

from llamalab.errors import LlamalabError, WeightsError
from llamalab.formats.files import atomic_write_json

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".distcp", ".ckpt"}
REQUIRED_FILES = ("trainer.json", "state/model.safetensors", "state/optim.safetensors")


# ----------------------------------------------------------------------------------------------- files
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_path(path: Path) -> None:
    """Remove what ``path`` names, never what a symlink there points to (a link is unlinked, not followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """A run-dir JSON record, written atomically and synced (:mod:`llamalab.formats.files`)."""
    atomic_write_json(path, obj, fsync=True)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def checkpoint_steps(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for d in (Path(run_dir) / "checkpoints").glob("step_*"):
        tail = d.name.split("_")[-1]
        if d.is_dir() and tail.isdigit():
            out.append((int(tail), d))
    return sorted(out)


def _manifest_files(ckpt: Path) -> dict[str, dict] | str:
    """The manifest's {relative path: {"size", "sha256"}}, or why it is unusable."""
    try:
        obj = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: malformed JSON, bad UTF-8, a 5000-digit number
        return f"unreadable manifest.json ({e})"
    files = obj.get("files") if isinstance(obj, dict) else None
    if not isinstance(files, dict):
        return "malformed manifest.json (expected an object with a \"files\" object)"
    for rel, info in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts or "\\" in rel:
            return f"malformed manifest.json (path {rel!r} is not inside the checkpoint)"
        if not (isinstance(info, dict) and isinstance(info.get("size"), int)
                and isinstance(info.get("sha256"), str)):
            return f"malformed manifest.json (entry for {rel!r} needs an integer size and a sha256 string)"
    return files


def _format_problem(ckpt: Path, present: list[str]) -> str | None:
    """Why the files are not a pickle-free checkpoint of this format (None when they are)."""
    for rel in present:
        if PurePosixPath(rel).suffix.lower() in PICKLE_SUFFIXES or PurePosixPath(rel).name == ".metadata":
            return (f"it holds {rel}: an older pickle-based checkpoint format, which is never loaded "
                    "(unpickling can run code)")
    for rel in REQUIRED_FILES:
        if rel not in present:
            return f"missing {rel}"
    for rel in present:
        path = ckpt / rel
        if rel.endswith(".json"):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError):
                return f"{rel} is not valid JSON"
        elif rel.endswith(".safetensors"):
            problem = _safetensors_problem(path)
            if problem:
                return f"{rel} is not a valid safetensors file ({problem})"
    try:
        read_trainer_state(ckpt)
    except WeightsError as e:
        return str(e).replace(f"{ckpt}/", "")
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a safetensors file"
        return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return None


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when the checkpoint is complete, intact and pickle-free, else why not (one line)."""
    ckpt = Path(ckpt)
    if not (ckpt / "manifest.json").is_file():
        return "no manifest.json (incomplete)"
    files = _manifest_files(ckpt)
    if isinstance(files, str):
        return files
    present = sorted(str(p.relative_to(ckpt).as_posix()) for p in ckpt.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    for rel in present:
        if rel not in files:
            return f"{rel} is not listed in manifest.json"
    for rel, info in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"missing {rel}"
        if p.stat().st_size != info["size"]:
            return f"{rel} has {p.stat().st_size} bytes, expected {info['size']}"
        if sha256_file(p) != info["sha256"]:
            return f"{rel} is corrupt (checksum mismatch)"
    return _format_problem(ckpt, present)


def latest_valid_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    for _, ckpt in reversed(checkpoint_steps(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        log(f"warning: checkpoint {ckpt} is unusable: {problem}; trying an older one")
    return None


def _number(v: Any) -> bool:
    """A finite int or float (JSON's Infinity and NaN parse, and would break int() or arithmetic later)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_trainer_state(ckpt: Path) -> dict:
    """trainer.json, checked: a non-negative integer step, numeric counters, a data position of integers."""
    try:
        state = json.loads((Path(ckpt) / "trainer.json").read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise WeightsError(f"{ckpt}/trainer.json is not valid JSON ({e})") from None
    bad = None
    if not isinstance(state, dict):
        bad = "is not a JSON object"
    elif not isinstance(state.get("step"), int) or isinstance(state["step"], bool) or state["step"] < 0:
        bad = "has no non-negative integer step"
    elif not all(_number(state.get(k, 0)) and state.get(k, 0) >= 0 for k in ("tokens", "elapsed_s")):
        bad = "has a tokens or elapsed_s that is not a non-negative number"
    elif state.get("data") is not None and not (
            isinstance(state["data"], dict) and all(isinstance(v, int) for v in state["data"].values())):
        bad = "has a data position that is not an object of integers"
    if bad:
        raise WeightsError(f"{ckpt}/trainer.json {bad}")
    return state


# ----------------------------------------------------------------------------------------------- tensors
def _distinct(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses aliases such as tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def optimizer_to_tensors(optim_sd: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A (full, FQN-keyed) optimizer state dict as safetensors tensors + string metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: list[str] = []
    for fqn, state in optim_sd.get("state", {}).items():
        for name, value in state.items():
            key = f"{fqn}/{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                tensors[key] = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
                scalars.append(key)
            else:
                raise LlamalabError(f"optimizer state {key} of type {type(value).__name__} cannot be saved")
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in optim_sd.get("param_groups", [])]
    return _distinct(tensors), {"param_groups": json.dumps(groups), "python_scalars": json.dumps(scalars)}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict:
    groups = json.loads(meta.get("param_groups", "[]"))
    scalars = set(json.loads(meta.get("python_scalars", "[]")))
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise WeightsError("optimizer param_groups must be a list of objects")
    for g in groups:
        numbers = [g.get(k, 0.0) for k in ("lr", "eps", "weight_decay", "lr_scale")] + list(g.get("betas", []))
        if not (isinstance(g.get("params"), list) and all(isinstance(p, (str, int)) for p in g["params"])
                and all(_number(x) for x in numbers) and len(g.get("betas", [0, 0])) == 2):
            raise WeightsError("optimizer param_groups hold a value of the wrong type")
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        fqn, _, name = key.rpartition("/")
        state.setdefault(fqn, {})[name] = value.item() if key in scalars else value
    return {"state": state, "param_groups": groups}


# what a param group may carry over from a checkpoint; its other entries (amsgrad, maximize, capturable,
# foreach, fused, ...) choose the algorithm, so they come from this run's optimizer, never from a file
GROUP_HYPERPARAMETERS = {"params", "param_names", "lr", "initial_lr", "betas", "eps", "weight_decay", "lr_scale"}


def keep_own_algorithm(saved_groups: list[dict], own_groups: list[dict]) -> None:
    """Replace the algorithm flags of checkpointed param groups by this optimizer's own (in place)."""
    for i, g in enumerate(saved_groups):
        own = own_groups[i] if i < len(own_groups) else {}
        for key in [k for k in g if k not in GROUP_HYPERPARAMETERS]:
            del g[key]
        g.update({k: v for k, v in own.items() if k not in GROUP_HYPERPARAMETERS})


def check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError unless every loaded state tensor has its parameter's shape and dtype (a one-element
    ``step``): a checkpoint's optimizer state must not fail later, inside ``optimizer.step()``."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"optimizer state {name!r} is not a tensor")
                if name == "step":
                    ok = value.numel() == 1
                else:
                    ok = tuple(value.shape) == tuple(param.shape) and value.dtype == param.dtype
                if not ok:
                    raise ValueError(f"optimizer state {name!r} has shape {tuple(value.shape)} and dtype "
                                     f"{value.dtype} for a parameter of shape {tuple(param.shape)}")


def rng_to_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states (torch CPU and CUDA, numpy, Python) as tensors + JSON metadata."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(py_state, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    meta = {"python": json.dumps([py_version, py_gauss]),
            "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_gauss)])}
    return tensors, meta


def rng_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    try:
        py_version, py_gauss = json.loads(meta["python"])
        np_name, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
        py_state = tuple(int(x) for x in tensors["python"].tolist())
        random.setstate((int(py_version), py_state, None if py_gauss is None else float(py_gauss)))
        np.random.set_state((str(np_name), tensors["numpy"].numpy().astype(np.uint32), int(np_pos),
                             int(np_has_gauss), float(np_gauss)))
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise WeightsError(f"unreadable RNG state in the checkpoint ({e})") from None
    if torch.cuda.is_available():
        states = [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ----------------------------------------------------------------------------------------------- writer
def clean_key(k: str) -> str:
    for part in ("_checkpoint_wrapped_module.", "_orig_mod.", "module."):
        k = k.replace(part, "")
    return k


def _strip_wrappers(model: nn.Module) -> nn.Module:
    """A model whose blocks were wrapped (activation checkpointing / compile) saved under clean names."""
    names = [n for n, _ in model.named_parameters()]
    if not any("_checkpoint_wrapped_module" in n or "_orig_mod" in n for n in names):
        return model
    from llamalab.model.llama import Llama

    cfg = model.config
    sd = {clean_key(k): v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return Llama.from_state_dict(cfg, sd, dtype=torch.float32)


def _default_save(model: nn.Module, directory: Path) -> None:
    model.save_pretrained(directory)


def _misfit(e: BaseException) -> str:
    """One line out of a load_state_dict error: torch's first line is only a heading ("Error(s) in loading
    state_dict for Llama:"), so the line that names the missing or unexpected keys is added to it."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."


class Checkpointer:
    """Writes and reads the run's checkpoints (all ranks take part; rank 0 writes, renames and prunes)."""

    def __init__(self, run_dir: Path, ctx: Any = None, tokenizer: Any = None, save_fn: Callable | None = None,
                 keep: int = 2, model_config: Any = None, extra: dict | None = None) -> None:
        self.run_dir, self.ctx, self.tokenizer, self.save_fn = Path(run_dir), ctx, tokenizer, save_fn
        self.keep, self.model_config, self.extra = keep, model_config, extra or {}

    @property
    def _fsdp(self) -> bool:
        return self.ctx is not None and self.ctx.distributed and self.ctx.strategy == "fsdp"

    def _export_model(self, model: nn.Module, full_model_sd: dict) -> nn.Module:
        """The plain model rank 0 saves in HF layout (rebuilt from the gathered tensors under FSDP)."""
        inner = getattr(model, "module", model)  # the Llama inside a DDP wrapper (FSDP2 changes it in place)
        if not self._fsdp:
            return _strip_wrappers(inner)
        from llamalab.model.llama import Llama

        cfg = inner.config
        full = {clean_key(k): v for k, v in full_model_sd.items()}
        if cfg.tie_word_embeddings:
            full.pop("lm_head.weight", None)
        return Llama.from_state_dict(cfg, full, dtype=torch.float32)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, trainer_state: dict) -> Path:
        """Write ``checkpoints/step_N`` (a one-line error, and the older checkpoints intact, when the disk is
        full or read-only)."""
        from safetensors import SafetensorError

        try:
            return self._save(model, optimizer, step, trainer_state)
        except (OSError, SafetensorError) as e:
            if self.ctx is None or self.ctx.is_main:
                shutil.rmtree(self.run_dir / "checkpoints" / f".tmp_step_{step}", ignore_errors=True)
            reason = (e.strerror or str(e)) if isinstance(e, OSError) else str(e).split(": ")[-1]
            raise LlamalabError(f"cannot write the step {step} checkpoint in {self.run_dir / 'checkpoints'} "
                                f"({reason}); the checkpoints written before it are intact: free space or fix "
                                "permissions, then --resume") from None

    def _save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, trainer_state: dict) -> Path:
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        ctx = self.ctx
        is_main = ctx is None or ctx.is_main
        root = self.run_dir / "checkpoints"
        final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
        if is_main:
            if root.is_symlink() or not root.resolve().is_relative_to(self.run_dir.resolve()):
                raise LlamalabError(f"{root} is a link to {root.resolve()}: checkpoints are written, rotated and "
                                    "deleted only inside the run dir; make it a plain folder")
            root.mkdir(parents=True, exist_ok=True)
            remove_path(tmp)
            (tmp / "state").mkdir(parents=True)
        if ctx is not None:
            ctx.barrier()
        # a collective under FSDP: every rank takes part, rank 0 receives the full tensors
        model_sd, optim_sd = get_state_dict(model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rank = 0 if ctx is None else ctx.rank
        rng, rng_meta = rng_to_tensors()
        save_file(rng, str(tmp / f"rng_rank{rank}.safetensors"), metadata=rng_meta)
        if is_main:
            save_file(_distinct(model_sd), str(tmp / "state" / "model.safetensors"))
            optim_tensors, optim_meta = optimizer_to_tensors(optim_sd)
            save_file(optim_tensors, str(tmp / "state" / "optim.safetensors"), metadata=optim_meta)
            (self.save_fn or _default_save)(self._export_model(model, model_sd), tmp)
            if self.tokenizer is not None:
                self.tokenizer.save(tmp)
            info = dict(trainer_state, step=step, world=1 if ctx is None else ctx.world, **self.extra)
            model_config = self.model_config if self.model_config is not None else getattr(
                getattr(model, "module", model), "config", None)  # default: the model's own
            if model_config is not None:
                info["model_config"] = model_config.to_hf_dict()
            write_json_atomic(tmp / "trainer.json", info)
        del model_sd, optim_sd
        if ctx is not None:
            ctx.barrier()
        if is_main:
            mode = 0o666 & ~_umask()  # safetensors writes 0600: checkpoints follow the umask like other files
            for p in tmp.rglob("*"):
                if p.is_file():
                    p.chmod(mode)
            files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json_atomic(tmp / "manifest.json", {"step": step, "files": files})
            remove_path(final)
            os.replace(tmp, final)
            fsync_dir(root)
            for _, old in checkpoint_steps(self.run_dir)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        if ctx is not None:
            ctx.barrier()
        return final

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> dict:
        """Restore model, optimizer and this rank's RNG from a verified checkpoint; returns trainer.json."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        ckpt = Path(ckpt)
        try:
            model_sd, _ = _read_safetensors(ckpt / "state" / "model.safetensors")
            optim_sd = optimizer_from_tensors(*_read_safetensors(ckpt / "state" / "optim.safetensors"))
            keep_own_algorithm(optim_sd["param_groups"], optimizer.param_groups)
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                           options=StateDictOptions(full_state_dict=True))
            check_optimizer_state(optimizer)
        except (RuntimeError, ValueError, KeyError, TypeError, AssertionError, IndexError, AttributeError) as e:
            raise WeightsError(f"checkpoint {ckpt} does not fit this model and optimizer: {_misfit(e)}; resume "
                               "with the model and options the run was started with") from None
        rank = 0 if self.ctx is None else self.ctx.rank
        rng = ckpt / f"rng_rank{rank}.safetensors"
        if rng.exists():
            rng_from_tensors(*_read_safetensors(rng))
        return read_trainer_state(ckpt)


def full_model_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The full model tensors of a checkpoint (``state/model.safetensors``), names cleaned of wrappers."""
    ckpt = Path(ckpt)
    path = ckpt / "state" / "model.safetensors"
    if not path.is_file():
        if (ckpt / "state" / ".metadata").exists():
            raise WeightsError(f"{ckpt} is an older pickle-based checkpoint, which is never loaded "
                               "(unpickling can run code)")
        raise WeightsError(f"{ckpt} is not a training checkpoint (no state/model.safetensors)")
    problem = _safetensors_problem(path)
    if problem:
        raise WeightsError(f"{path} is not a valid safetensors file ({problem})")
    tensors, _ = _read_safetensors(path)
    return {clean_key(k): v for k, v in tensors.items()}
