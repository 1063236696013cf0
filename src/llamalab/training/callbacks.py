"""What a training run reports and records, as callbacks on :func:`llamalab.training.loop.train_loop`.

The loop does the arithmetic (optimiser steps, evaluation, checkpoints through a
:class:`llamalab.training.checkpoint.Checkpointer`) and writes nothing itself; everything a run leaves
besides its checkpoints comes from a callback::

    class Callback:
        on_train_start(state)           after a resume, before the first step
        on_step_start(state)            before each optimiser step (state.step = steps done so far)
        on_step_end(state, metrics)     every step: step, loss, lr, grad_norm, tokens, elapsed_s
        on_log(state, metrics)          every cfg.log_every steps and the last: the above + tok_per_s, mfu
        on_eval(state, metrics)         what eval_fn returned
        on_checkpoint(state, path)      a checkpoint was written
        on_train_end(state)             the run finished (or hit its time limit), final checkpoint written
        on_interrupt(state)             Ctrl-C / SIGTERM, after the interrupt checkpoint

Every rank calls every hook (``state.is_main`` tells rank 0); the built-in ones that write or print do so
on rank 0 only. The built-ins:

* :class:`JsonlLog` — ``run_dir/log.jsonl``, one JSON object a line (the on_log rows and the eval rows);
  on resume it keeps the rows up to the resumed step and drops the later ones (they belong to steps
  that will be trained again);
* :class:`ProgressBar` — the bar (loss, tokens/s, MFU in the postfix) and one line per evaluation;
* :class:`LossPlot` — ``run_dir/loss.png`` from log.jsonl at the end (a plot failure is a warning);
* :class:`KillAtStep` — a test hook: SIGKILL at a step (``LLAMALAB_DEBUG_KILL_AT_STEP``, optionally only
  rank ``LLAMALAB_DEBUG_KILL_RANK``); :func:`standard_callbacks` adds it only when the variable is set;
* :class:`History` — the same rows in memory (nothing on disk).

:func:`standard_callbacks` is what ``llamalab train`` and ``llamalab finetune`` use.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamalab.formats.files import atomic_write
from llamalab.training.checkpoint import remove_path


@dataclass
class TrainState:
    """The run as the callbacks see it; the loop updates it in place."""

    cfg: Any  # the LoopConfig
    model: Any
    optimizer: Any
    ctx: Any  # the DistContext
    step: int = 0  # optimiser steps done
    tokens: int = 0  # tokens trained on, over every session of the run
    elapsed_s: float = 0.0  # training time, over every session of the run
    resuming: bool = False  # train_loop(resume=...) was asked for
    resumed_from: Path | None = None  # the checkpoint it continued from, if any
    last_checkpoint: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main


class Callback:
    """Hooks the loop calls; each does nothing unless overridden."""

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_step_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState, metrics: dict) -> None:
        pass

    def on_log(self, state: TrainState, metrics: dict) -> None:
        pass

    def on_eval(self, state: TrainState, metrics: dict) -> None:
        pass

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass

    def on_interrupt(self, state: TrainState) -> None:
        pass


def say(msg: str) -> None:
    """A line on stderr that leaves a progress bar intact."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


# =============================================================================================== log.jsonl
def read_log(path: Path, upto_step: int) -> list[dict]:
    """The rows of a log.jsonl with ``step <= upto_step`` (a torn or foreign line is skipped)."""
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


class JsonlLog(Callback):
    """``run_dir/log.jsonl``: the on_log rows and the eval rows (``{"step": N, **eval}``), one a line."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "log.jsonl"

    def on_train_start(self, state: TrainState) -> None:
        if not state.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = read_log(self.path, state.step) if state.resuming else []
        tmp = self.path.with_name(self.path.name + ".tmp")
        remove_path(tmp)  # never write through a symlink planted at the temporary name
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def _write(self, state: TrainState, row: dict) -> None:
        if state.is_main:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def on_log(self, state: TrainState, metrics: dict) -> None:
        self._write(state, metrics)

    def on_eval(self, state: TrainState, metrics: dict) -> None:
        self._write(state, {"step": state.step, **metrics})


# =============================================================================================== console
class ProgressBar(Callback):
    """The progress bar (:func:`llamalab.progress.progress_bar`; postfix loss | tok/s | MFU, set every
    log step) when ``enabled``, and a ``step N: val_loss ...`` line per evaluation either way."""

    def __init__(self, enabled: bool = True, desc: str = "train") -> None:
        self.enabled, self.desc, self.bar = enabled, desc, None

    def on_train_start(self, state: TrainState) -> None:
        from llamalab.progress import progress_bar

        self.bar = progress_bar(total=state.cfg.steps, initial=state.step, disable=not (self.enabled and state.is_main),
                                desc=self.desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def on_log(self, state: TrainState, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {metrics['loss']:.3f} | {metrics['tok_per_s']:,.0f} tok/s | "
                                     f"MFU {100 * metrics['mfu']:.1f}%", refresh=False)

    def on_step_end(self, state: TrainState, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_eval(self, state: TrainState, metrics: dict) -> None:
        if state.is_main:
            say(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, state: TrainState) -> None:
        self._close()

    def on_interrupt(self, state: TrainState) -> None:
        self._close()


# =============================================================================================== loss.png
def plot_losses(log_path: Path, out: Path) -> None:
    """The train (every log row) and validation (every eval row) loss of a log.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path, 1 << 62)
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


class LossPlot(Callback):
    """``run_dir/loss.png`` from ``run_dir/log.jsonl`` (the whole run, resumed sessions included) at the end."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def on_train_end(self, state: TrainState) -> None:
        log_path = self.run_dir / "log.jsonl"
        if not (state.is_main and log_path.exists()):
            return
        try:
            plot_losses(log_path, self.run_dir / "loss.png")
        except Exception as e:  # noqa: BLE001 - a plot must never lose a run
            say(f"warning: could not draw the loss curve: {e}")


# =============================================================================================== test hook
class KillAtStep(Callback):
    """SIGKILL this process (every rank, or only ``rank``) when ``step`` steps are done: what a crash does."""

    def __init__(self, step: int, rank: int = -1) -> None:
        self.step, self.rank = step, rank

    @classmethod
    def from_env(cls) -> KillAtStep | None:
        """From ``LLAMALAB_DEBUG_KILL_AT_STEP`` / ``LLAMALAB_DEBUG_KILL_RANK``; None when the first is unset."""
        at = os.environ.get("LLAMALAB_DEBUG_KILL_AT_STEP")
        return None if at is None else cls(int(at), int(os.environ.get("LLAMALAB_DEBUG_KILL_RANK", "-1")))

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.step and self.rank in (-1, state.ctx.rank):
            os.kill(os.getpid(), signal.SIGKILL)


# =============================================================================================== in memory
class History(Callback):
    """The run in memory: ``steps`` (every step's metrics), ``logs`` (the on_log rows) and ``evals``
    (``{"step": N, **eval}``), the rows :class:`JsonlLog` would write."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.logs: list[dict] = []
        self.evals: list[dict] = []

    def on_step_end(self, state: TrainState, metrics: dict) -> None:
        self.steps.append(dict(metrics))

    def on_log(self, state: TrainState, metrics: dict) -> None:
        self.logs.append(dict(metrics))

    def on_eval(self, state: TrainState, metrics: dict) -> None:
        self.evals.append({"step": state.step, **metrics})


def standard_callbacks(run_dir: str | Path, progress: bool = True) -> list[Callback]:
    """log.jsonl, the progress bar (``progress``) and eval lines, loss.png, and the kill hook when its
    environment variable is set."""
    out: list[Callback] = [JsonlLog(run_dir), ProgressBar(enabled=progress), LossPlot(run_dir)]
    kill = KillAtStep.from_env()
    if kill is not None:
        out.append(kill)
    return out
