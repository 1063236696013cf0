"""Training: a reusable loop (:func:`train_loop`) and the from-scratch recipe behind ``llamalab train``.

Objective: next-token cross-entropy, ``L = -1/N Σ_t log p(x_{t+1} | x_{≤t})`` (nats per token); the
validation loss is also reported in **bits per character**, ``L · tokens/chars / ln 2``, which does
not depend on the tokenizer.

Optimiser: AdamW (Loshchilov & Hutter, 2019) with weight decay on matrices only (embeddings and
projections; not the norm gains), linear warmup then cosine decay to ``min_lr``
(``lr(s) = min + ½(max − min)(1 + cos(π·(s − w)/(S − w)))``), global-norm gradient clipping,
gradient accumulation, bf16 autocast where the hardware has bf16 (fp32 master weights; never fp16,
which is ~400x slower on CPU), optional ``torch.compile``.

Reusable core (fine-tuning builds on it)::

    result = train_loop(model, batches, LoopConfig(steps=..., lr=...), run_dir,
                         tokenizer=None,     # saved with each checkpoint (tok.save)
                         loss_fn=None,       # loss_fn(model, batch) -> scalar; default: LM loss on (x, y)
                         params=None,        # what to optimise (default: parameters with requires_grad)
                         eval_fn=None,       # eval_fn(model) -> {"val_loss": ..., ...}, every eval_every steps
                         save_fn=None,       # save_fn(model, dir): the model part of a checkpoint
                                             # (default: model.save_pretrained(dir), HF layout)
                         resume=False,       # continue from the newest valid checkpoint in run_dir
                                             # (or from this checkpoint dir, already verified)
                         ctx=None,           # llamalab.training.distributed.DistContext (None: single process)
                         flops_per_token=None, tokens_per_step=None, progress=True)
    # -> LoopResult(step, losses, val, run_dir, last_checkpoint, interrupted)

``batches`` is any iterator of micro-batches (``next()``); with ``state_dict()``/``load_state_dict()``
(as :class:`llamalab.data.corpora.Batches` has) its position is checkpointed and resume is exact.
Each optimiser step takes ``grad_accum`` micro-batches.

Run dir::

    run_dir/train_config.toml   the run's config (resume continues it)   log.jsonl  one JSON object a line
    run_dir/heldout.json        the validation split: corpus, val_fraction, token shards (what eval scores)
    run_dir/loss.png            loss curve               samples.txt text sampled at the end
    run_dir/checkpoints/step_N/ safetensors + JSON only, never pickle (see :mod:`llamalab.training.checkpoint`)
    run_dir/final/              the final model (HF layout) + tokenizer: ``llamalab.load(run_dir)``

A checkpoint is written into ``.tmp_step_N`` and renamed when complete (atomic); on resume each
candidate's manifest is checked (sizes, hashes, format) and an unusable one is reported and skipped.
Saved every ``ckpt_every`` steps, at the end, and on Ctrl-C / SIGTERM. ``train.max_minutes`` limits
the training time of one process (a resumed run gets the full budget again).

Resume (``train(..., resume=True)``) starts from the run's own ``train_config.toml``: overrides may
lengthen the run or change how it is logged, evaluated or checkpointed, but one that changes the model,
the data or the tokenizer is an error, and the tokenizer comes from the checkpoint.

Where things live: this module holds the loop; :mod:`llamalab.training.checkpoint` the checkpoint format,
:mod:`llamalab.training.config` the TOML config (re-exported here), :mod:`llamalab.training.pretrain` the recipe.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.formats.files import atomic_write
from llamalab.training.checkpoint import Checkpointer, checkpoint_steps, latest_valid_checkpoint, remove_path
from llamalab.training.precision import resolve_precision

# =============================================================================================== loop config


@dataclass
class LoopConfig:
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp32
    compile: bool = False
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 0  # 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337
    max_minutes: float = 0.0  # stop (and checkpoint) after this much training time; 0 = no limit

    def lr_at(self, step: int) -> float:
        """Warmup (linear from lr/warmup) then cosine decay to min_lr at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class LoopResult:
    step: int
    run_dir: Path
    losses: list[float] = field(default_factory=list)
    val: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    interrupted: bool = False
    tokens_per_s: float = 0.0
    minutes: float = 0.0


# =============================================================================================== helpers
_PEAK_CACHE: dict[tuple[str, str], float] = {}


def measured_peak_flops(device: torch.device, precision: str) -> float:
    """Matmul FLOP/s measured here (a 1024–4096 square GEMM), the denominator of MFU."""
    key = (str(device), precision)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best_rate = 0.0
    for n in ((4096, 8192) if device.type == "cuda" else (1024, 2048)):  # the best of two sizes
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best_rate = max(best_rate, 2 * n**3 * 4 / (time.perf_counter() - t))
    _PEAK_CACHE[key] = best_rate
    return _PEAK_CACHE[key]


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6·(matmul parameters) + 12·layers·(heads·head_dim)·seq_len (PaLM's estimate, forward + backward)."""
    cfg = getattr(model, "config", None)
    seen: set[int] = set()
    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            n += mod.weight.numel()
    attn = 0 if cfg is None else 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * n + attn


def lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch ``(x, y)`` (y = x shifted by one)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_optimizer(params: list[nn.Parameter] | None, model: nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (ndim >= 2) only."""
    ps = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    unique = list({id(p): p for p in ps}.values())
    if not unique:
        raise LlamalabError("nothing to train: no parameter requires grad")
    decay = [p for p in unique if p.ndim >= 2]
    no_decay = [p for p in unique if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type == "cuda" for p in unique) and not any(
        type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in unique)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None)


# =============================================================================================== the loop
class _Stopper:
    """SIGTERM (torchrun, schedulers) behaves like Ctrl-C: checkpoint, then stop."""

    def __init__(self) -> None:
        self.previous: Any = None

    def __enter__(self) -> _Stopper:
        if _in_main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _read_log(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # a torn last line, or anything else that is not a log row
            continue
        step = row.get("step", 0) if isinstance(row, dict) else None
        if isinstance(step, (int, float)) and not isinstance(step, bool) and step <= upto_step:
            rows.append(row)
    return rows


def plot_losses(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_log(log_path, 1 << 62)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def train_loop(model: nn.Module, batches: Iterator, cfg: LoopConfig, run_dir: str | Path, *,
               tokenizer: Any = None, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
               params: list[nn.Parameter] | None = None, eval_fn: Callable[[nn.Module], dict] | None = None,
               save_fn: Callable[[nn.Module, Path], None] | None = None, resume: bool | Path = False, ctx: Any = None,
               flops_per_token: float | None = None, tokens_per_step: int | None = None, progress: bool = True,
               model_config: Any = None, extra_state: dict | None = None) -> LoopResult:
    """Run ``cfg.steps`` optimiser steps of ``loss_fn`` over ``batches``; see the module docstring."""
    from tqdm import tqdm

    from llamalab.progress import progress_bar
    from llamalab.training.distributed import DistContext, no_grad_sync

    run_dir = Path(run_dir)
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    is_main = ctx.is_main
    loss_fn = loss_fn or lm_loss
    device = ctx.device
    precision = resolve_precision(cfg.precision, device)
    fsdp_mp = ctx.distributed and ctx.strategy == "fsdp"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" and not fsdp_mp
                else nullcontext())
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if is_main else (lambda msg: None)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    model_config = model_config if model_config is not None else getattr(
        getattr(model, "module", model), "config", None)
    optimizer = make_optimizer(params, model, cfg)
    ckpt = Checkpointer(run_dir, ctx, tokenizer, save_fn, cfg.keep_checkpoints, model_config, extra_state)
    step = 0
    tokens_seen = 0
    elapsed = 0.0  # training time of every session of this run (recorded); the limit counts this session's
    resumed_from: Path | None = None
    if resume:
        found = resume if isinstance(resume, Path) else latest_valid_checkpoint(run_dir, say) if is_main else None
        found_s = ctx.broadcast_str(str(found) if found else "")
        if found_s:
            resumed_from = Path(found_s)
            state = ckpt.load(model, optimizer, resumed_from)
            step, tokens_seen = int(state["step"]), int(state.get("tokens", 0) or 0)
            elapsed = float(state.get("elapsed_s", 0.0) or 0.0)
            if hasattr(batches, "load_state_dict") and isinstance(state.get("data"), dict):
                try:
                    batches.load_state_dict(state["data"])
                except (KeyError, TypeError, ValueError) as e:
                    raise LlamalabError(f"checkpoint {found_s} holds a data position this run cannot use "
                                        f"({type(e).__name__}: {e})") from None
            say(f"resumed from {found_s} (step {step})")
        elif is_main and checkpoint_steps(run_dir):
            raise LlamalabError(f"no usable checkpoint in {run_dir / 'checkpoints'} to resume from")
    log_path = run_dir / "log.jsonl"
    if is_main:
        kept = _read_log(log_path, step) if resume else []
        tmp_log = log_path.with_name(log_path.name + ".tmp")
        remove_path(tmp_log)  # never write through a symlink planted at the temporary name
        tmp_log.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp_log, log_path)
    train_model = torch.compile(model) if cfg.compile else model
    peak = measured_peak_flops(device, precision) * ctx.world if flops_per_token else 0.0

    def trainer_state() -> dict:
        return {"tokens": tokens_seen, "elapsed_s": elapsed, "loop": asdict(cfg),
                "data": batches.state_dict() if hasattr(batches, "state_dict") else None}

    def log(row: dict) -> None:
        if is_main:
            with log_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def run_eval() -> dict:
        if eval_fn is None:
            return {}
        model.eval()
        with torch.no_grad(), autocast:
            out = eval_fn(model)
        model.train()
        log({"step": step, **out})
        parts = ", ".join(f"{k} {v:.4f}" for k, v in out.items())
        say(f"step {step}: {parts}")
        return out

    result = LoopResult(step=step, run_dir=run_dir, last_checkpoint=resumed_from)
    last_ckpt_step = step if resumed_from is not None else -1
    bar = progress_bar(total=cfg.steps, initial=step, disable=not (progress and is_main), desc="train", unit="step",
               dynamic_ncols=True, file=sys.stderr)
    kill_at = os.environ.get("LLAMALAB_DEBUG_KILL_AT_STEP")  # test hook: SIGKILL this process at a step
    kill_rank = int(os.environ.get("LLAMALAB_DEBUG_KILL_RANK", "-1"))
    model.train()
    t_window, tok_window = time.perf_counter(), 0
    t_session = time.perf_counter()
    elapsed_before, session_tokens = elapsed, 0
    try:
        with _Stopper():
            while step < cfg.steps:
                if kill_at is not None and int(kill_at) == step and kill_rank in (-1, ctx.rank):
                    os.kill(os.getpid(), signal.SIGKILL)
                lr = cfg.lr_at(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                loss_sum = torch.zeros((), device=device)
                step_tokens = 0
                for micro in range(cfg.grad_accum):
                    batch = _to_device(next(batches), device)
                    with no_grad_sync(train_model, ctx, sync=micro == cfg.grad_accum - 1):
                        with autocast:
                            loss = loss_fn(train_model, batch)
                        (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach().float()
                    if isinstance(batch, (list, tuple)) and isinstance(batch[0], torch.Tensor):
                        step_tokens += batch[0].numel()
                grad_norm = 0.0
                if cfg.grad_clip > 0:
                    gn = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                        cfg.grad_clip)
                    grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_val = ctx.all_reduce_mean(loss_sum / cfg.grad_accum)
                if not math.isfinite(loss_val):
                    raise LlamalabError(f"loss became {loss_val} at step {step}: lower the learning rate")
                step_tokens = tokens_per_step or step_tokens * ctx.world
                tokens_seen += step_tokens
                tok_window += step_tokens
                session_tokens += step_tokens
                session_s = time.perf_counter() - t_session
                elapsed = elapsed_before + session_s
                result.losses.append(loss_val)
                if step % max(1, cfg.log_every) == 0 or step == cfg.steps:
                    dt = time.perf_counter() - t_window
                    tps = tok_window / max(dt, 1e-9)
                    mfu = tps * flops_per_token / peak if peak else 0.0
                    log({"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                         "tok_per_s": tps, "mfu": mfu, "elapsed_s": elapsed})
                    bar.set_postfix_str(f"loss {loss_val:.3f} | {tps:,.0f} tok/s | MFU {100 * mfu:.1f}%",
                                        refresh=False)
                    result.tokens_per_s = tps
                    t_window, tok_window = time.perf_counter(), 0
                bar.update(1)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    result.val = run_eval()
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                    result.last_checkpoint = ckpt.save(model, optimizer, step, trainer_state())
                    last_ckpt_step = step
                if cfg.max_minutes and session_s > 60 * cfg.max_minutes:
                    say(f"time limit of {cfg.max_minutes} minutes reached at step {step}")
                    break
    except KeyboardInterrupt:
        bar.close()
        result.interrupted = True
        if step > 0 and step != last_ckpt_step:
            say(f"interrupted at step {step}: writing a checkpoint (resume with --resume)")
            result.last_checkpoint = ckpt.save(model, optimizer, step, trainer_state())
        result.step = step
        raise
    bar.close()
    result.val = run_eval() or result.val
    if step != last_ckpt_step:
        result.last_checkpoint = ckpt.save(model, optimizer, step, trainer_state())
    if is_main and log_path.exists():
        try:
            plot_losses(log_path, run_dir / "loss.png")
        except Exception as e:  # noqa: BLE001 - a plot must never lose a run
            say(f"warning: could not draw the loss curve: {e}")
    result.step = step
    result.minutes = elapsed / 60
    if session_tokens and not result.tokens_per_s:  # fewer steps than log_every: this session's average
        result.tokens_per_s = session_tokens / max(time.perf_counter() - t_session, 1e-9)
    return result
