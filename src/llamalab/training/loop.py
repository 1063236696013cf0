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

    result = train_loop(model, batches, LoopConfig(steps=..., lr=...),
                         loss_fn=None,       # loss_fn(model, batch) -> scalar; default: LM loss on (x, y)
                         params=None,        # what to optimise (default: parameters with requires_grad)
                         eval_fn=None,       # eval_fn(model) -> {"val_loss": ..., ...}, every eval_every steps
                         checkpointer=None,  # a Checkpointer(run_dir, ctx, tokenizer=, save_fn=, keep=,
                                             # model_config=, extra=); None: no checkpoints
                         resume=False,       # continue from the checkpointer's newest valid checkpoint
                                             # (or from this checkpoint dir, already verified)
                         ctx=None,           # llamalab.training.distributed.DistContext (None: single process)
                         flops_per_token=None, tokens_per_step=None,
                         callbacks=())       # llamalab.training.callbacks: log.jsonl, progress bar, loss.png...
    # -> LoopResult(step, losses, val, run_dir, last_checkpoint, interrupted)

The loop itself writes nothing but the checkpointer's checkpoints, and prints only a resume, a time
limit or an interrupt; what a run records and shows comes from its callbacks
(:func:`llamalab.training.callbacks.standard_callbacks`: ``log.jsonl``, the progress bar and eval lines,
``loss.png``), each told of every step, log step, evaluation, checkpoint, the end and an interrupt.

``batches`` is any iterator of micro-batches (``next()``); with ``state_dict()``/``load_state_dict()``
(as :class:`llamalab.data.corpora.Batches` has) its position is checkpointed and resume is exact.
Each optimiser step takes ``grad_accum`` micro-batches.

A ``llamalab train`` run dir (the recipe, with :func:`~llamalab.training.callbacks.standard_callbacks`)::

    run_dir/train_config.toml   the run's config (resume continues it)   log.jsonl  one JSON object a line
    run_dir/heldout.json        the validation split: corpus, val_fraction, token shards (what eval scores)
    run_dir/loss.png            loss curve               samples.txt text sampled at the end
    run_dir/checkpoints/step_N/ safetensors + JSON only, never pickle (see :mod:`llamalab.training.checkpoint`)
    run_dir/final/              the final model (HF layout) + tokenizer: ``llamalab.load(run_dir)``

A checkpoint is written into ``.tmp_step_N`` and renamed when complete (atomic); on resume each
candidate's manifest is checked (sizes, hashes, format) and an unusable one is reported and skipped.
With a checkpointer, saved every ``ckpt_every`` steps, at the end, and on Ctrl-C / SIGTERM (the
checkpointer's ``keep`` newest are kept). ``train.max_minutes`` limits
the training time of one process (a resumed run gets the full budget again).

Resume (``train(..., resume=True)``) starts from the run's own ``train_config.toml``: overrides may
lengthen the run or change how it is logged, evaluated or checkpointed, but one that changes the model,
the data or the tokenizer is an error, and the tokenizer comes from the checkpoint.

Where things live: this module holds the loop; :mod:`llamalab.training.callbacks` what a run records and shows,
:mod:`llamalab.training.checkpoint` the checkpoint format, :mod:`llamalab.training.config` the TOML config,
:mod:`llamalab.training.pretrain` the recipe.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.training.callbacks import Callback, TrainState
from llamalab.training.callbacks import say as _say
from llamalab.training.checkpoint import Checkpointer, checkpoint_steps, latest_valid_checkpoint
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
    run_dir: Path | None  # the checkpointer's (None without one)
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


def train_loop(model: nn.Module, batches: Iterator, cfg: LoopConfig, *,
               loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
               params: list[nn.Parameter] | None = None, eval_fn: Callable[[nn.Module], dict] | None = None,
               checkpointer: Checkpointer | None = None, resume: bool | Path = False, ctx: Any = None,
               flops_per_token: float | None = None, tokens_per_step: int | None = None,
               callbacks: Sequence[Callback] = ()) -> LoopResult:
    """Run ``cfg.steps`` optimiser steps of ``loss_fn`` over ``batches``; see the module docstring."""
    from llamalab.training.distributed import DistContext, no_grad_sync

    ctx = ctx or DistContext(device=next(model.parameters()).device)
    is_main = ctx.is_main
    loss_fn = loss_fn or lm_loss
    device = ctx.device
    precision = resolve_precision(cfg.precision, device)
    fsdp_mp = ctx.distributed and ctx.strategy == "fsdp"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" and not fsdp_mp
                else nullcontext())
    say = _say if is_main else (lambda msg: None)
    if resume and checkpointer is None:
        raise LlamalabError("resume needs a checkpointer: train_loop(..., checkpointer=Checkpointer(run_dir))")
    if checkpointer is not None and ctx.distributed and checkpointer.ctx is None:
        raise LlamalabError("a distributed run needs its DistContext in the checkpointer: Checkpointer(run_dir, ctx)")
    run_dir = checkpointer.run_dir if checkpointer is not None else None
    optimizer = make_optimizer(params, model, cfg)
    state = TrainState(cfg=cfg, model=model, optimizer=optimizer, ctx=ctx, resuming=bool(resume))
    if resume:
        assert checkpointer is not None and run_dir is not None
        found = resume if isinstance(resume, Path) else latest_valid_checkpoint(run_dir, say) if is_main else None
        found_s = ctx.broadcast_str(str(found) if found else "")
        if found_s:
            state.resumed_from = Path(found_s)
            saved = checkpointer.load(model, optimizer, state.resumed_from)
            state.step, state.tokens = int(saved["step"]), int(saved.get("tokens", 0) or 0)
            state.elapsed_s = float(saved.get("elapsed_s", 0.0) or 0.0)
            if hasattr(batches, "load_state_dict") and isinstance(saved.get("data"), dict):
                try:
                    batches.load_state_dict(saved["data"])
                except (KeyError, TypeError, ValueError) as e:
                    raise LlamalabError(f"checkpoint {found_s} holds a data position this run cannot use "
                                        f"({type(e).__name__}: {e})") from None
            say(f"resumed from {found_s} (step {state.step})")
        elif is_main and checkpoint_steps(run_dir):
            raise LlamalabError(f"no usable checkpoint in {run_dir / 'checkpoints'} to resume from")
    state.last_checkpoint = state.resumed_from
    train_model = torch.compile(model) if cfg.compile else model
    peak = measured_peak_flops(device, precision) * ctx.world if flops_per_token else 0.0

    def emit(hook: str, *args: Any) -> None:
        for cb in callbacks:
            getattr(cb, hook)(state, *args)

    def save_checkpoint() -> Path | None:
        if checkpointer is None:
            return state.last_checkpoint
        state.last_checkpoint = checkpointer.save(model, optimizer, state.step, {
            "tokens": state.tokens, "elapsed_s": state.elapsed_s, "loop": asdict(cfg),
            "data": batches.state_dict() if hasattr(batches, "state_dict") else None})
        emit("on_checkpoint", state.last_checkpoint)
        return state.last_checkpoint

    def run_eval() -> dict:
        if eval_fn is None:
            return {}
        model.eval()
        with torch.no_grad(), autocast:
            out = eval_fn(model)
        model.train()
        emit("on_eval", out)
        return out

    emit("on_train_start")
    result = LoopResult(step=state.step, run_dir=run_dir, last_checkpoint=state.resumed_from)
    last_ckpt_step = state.step if state.resumed_from is not None else -1
    model.train()
    t_window, tok_window = time.perf_counter(), 0
    t_session = time.perf_counter()
    elapsed_before, session_tokens = state.elapsed_s, 0
    try:
        with _Stopper():
            while state.step < cfg.steps:
                emit("on_step_start")
                lr = cfg.lr_at(state.step)
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
                state.step += 1
                step = state.step
                loss_val = ctx.all_reduce_mean(loss_sum / cfg.grad_accum)
                if not math.isfinite(loss_val):
                    raise LlamalabError(f"loss became {loss_val} at step {step}: lower the learning rate")
                step_tokens = tokens_per_step or step_tokens * ctx.world
                state.tokens += step_tokens
                tok_window += step_tokens
                session_tokens += step_tokens
                session_s = time.perf_counter() - t_session
                state.elapsed_s = elapsed_before + session_s
                result.losses.append(loss_val)
                metrics = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens}
                if step % max(1, cfg.log_every) == 0 or step == cfg.steps:
                    dt = time.perf_counter() - t_window
                    tps = tok_window / max(dt, 1e-9)
                    mfu = tps * flops_per_token / peak if peak else 0.0
                    emit("on_log", {**metrics, "tok_per_s": tps, "mfu": mfu, "elapsed_s": state.elapsed_s})
                    result.tokens_per_s = tps
                    t_window, tok_window = time.perf_counter(), 0
                emit("on_step_end", {**metrics, "elapsed_s": state.elapsed_s})
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    result.val = run_eval()
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps and checkpointer is not None:
                    result.last_checkpoint = save_checkpoint()
                    last_ckpt_step = step
                if cfg.max_minutes and session_s > 60 * cfg.max_minutes:
                    say(f"time limit of {cfg.max_minutes} minutes reached at step {step}")
                    break
    except KeyboardInterrupt:
        result.interrupted = True
        if state.step > 0 and state.step != last_ckpt_step and checkpointer is not None:
            say(f"interrupted at step {state.step}: writing a checkpoint (resume with --resume)")
            result.last_checkpoint = save_checkpoint()
        result.step = state.step
        emit("on_interrupt")
        raise
    result.val = run_eval() or result.val
    if state.step != last_ckpt_step and checkpointer is not None:
        result.last_checkpoint = save_checkpoint()
    result.step = state.step
    result.minutes = state.elapsed_s / 60
    if session_tokens and not result.tokens_per_s:  # fewer steps than log_every: this session's average
        result.tokens_per_s = session_tokens / max(time.perf_counter() - t_session, 1e-9)
    emit("on_train_end")
    return result

