"""Training the small byte-level models of the explain experiments, with the project's loop.

:func:`train` feeds seeded Shakespeare batches to :func:`llamalab.training.loop.train_loop` (next-token
cross-entropy, AdamW with decay on matrices only, warm-up then cosine to 10% of the peak rate,
clipping at 1.0, bf16 autocast where supported) and keeps the loss curves in memory
(:class:`llamalab.training.callbacks.History`; no checkpoints, nothing on disk). The same seed gives
the same initial weights *and* the same batches, so two runs that differ in one architectural choice
(RMSNorm vs LayerNorm, MHA vs GQA) see identical data in identical order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llamalab.config import LlamaConfig
from llamalab.explain.corpus import VOCAB_SIZE, ByteCorpus
from llamalab.model.llama import Llama


@dataclass
class Budget:
    """How much training one experiment gets (the same for every arm of a comparison)."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 20
    eval_every: int = 25
    eval_windows: int = 32

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


@dataclass
class TrainResult:
    model: Llama
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # smoothed training loss at each eval step
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def small_config(seq_len: int, quick: bool = False, **overrides) -> LlamaConfig:
    """The small model of the experiments: byte vocabulary, MHA, RMSNorm unless overridden."""
    base = dict(vocab_size=VOCAB_SIZE, hidden_size=64 if quick else 128, intermediate_size=176 if quick else 344,
                n_layers=2 if quick else 4, n_heads=4, n_kv_heads=4, max_position_embeddings=seq_len,
                rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None,
                eos_token_id=None)
    base.update(overrides)
    return LlamaConfig(**base)


@torch.no_grad()
def val_loss(model: Llama, corpus: ByteCorpus, seq_len: int, n_windows: int) -> float:
    was_training = model.training
    model.eval()
    w = corpus.val_windows(n_windows, seq_len)
    logits = model(w[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).item()
    model.train(was_training)
    return loss


def train(model: Llama, corpus: ByteCorpus, budget: Budget, seed: int = 0, lr_scale: float = 1.0) -> TrainResult:
    """Train ``model`` in place with the project's loop (:func:`llamalab.training.loop.train_loop`, bf16 autocast
    where the CPU has it); returns the loss curves and the wall time."""
    from llamalab.training.callbacks import History
    from llamalab.training.loop import LoopConfig, train_loop

    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            b = corpus.batch("train", budget.batch_size, budget.seq_len, gen)
            yield b[:, :-1], b[:, 1:]

    lr = budget.lr * lr_scale
    cfg = LoopConfig(steps=budget.steps, lr=lr, min_lr=0.1 * lr, warmup_steps=budget.warmup,
                     eval_every=budget.eval_every, log_every=1, seed=seed)
    result = TrainResult(model=model)
    t0 = time.perf_counter()
    history = History()
    loop = train_loop(model, batches(), cfg, callbacks=[history],
                      eval_fn=lambda m: {"val_loss": val_loss(m, corpus, budget.seq_len, budget.eval_windows)})
    result.seconds = time.perf_counter() - t0
    smooth = None
    for step, loss in enumerate(loop.losses, start=1):
        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
        if step % budget.eval_every == 0 or step == budget.steps:
            result.steps.append(step)
            result.train_loss.append(smooth)
    for row in history.evals:
        if "val_loss" in row:
            result.val_steps.append(int(row["step"]))
            result.val_loss.append(float(row["val_loss"]))
    model.eval()
    return result


def train_new(config: LlamaConfig, corpus: ByteCorpus, budget: Budget, seed: int = 0,
              surgery: Callable[[Llama], object] | None = None) -> TrainResult:
    """A fresh model of `config` (seeded init), changed by `surgery` if given (e.g. LayerNorm for RMSNorm), trained."""
    torch.manual_seed(seed)
    model = Llama(config)
    model.init_weights(seed=seed)
    if surgery is not None:
        surgery(model)
    return train(model, corpus, budget, seed=seed)
