"""Zero-shot multiple choice by log-likelihood, and the continuation scoring it rests on.

For a context c and choices a_1..a_k the model picks argmax_j of a score of
ln p(a_j | c) = Σ_t ln p(a_j,t | c, a_j,<t):

* ``acc``        — the raw sum (favours short choices),
* ``acc_norm``   — the sum divided by the choice's UTF-8 bytes (lm-evaluation-harness's
  ``acc_norm`` divides by characters; bytes keep it tokenizer-independent and equal for ASCII),
* ``acc_token``  — the mean per token.

Context and continuation are tokenized together and split where the context's own tokens end
(trailing spaces of the context move to the continuation), as lm-evaluation-harness does, so a
word boundary is tokenized the way the model saw it in training. Contexts too long for the window
are cut from the left.

Task files are JSONL, one ``{"context": str, "choices": [str, ...], "answer": int}`` per line.
The bundled tasks live in ``llamalab/data/tasks/*.jsonl`` (see :mod:`llamalab.eval.tasks`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llamalab.errors import LlamalabError
from llamalab.eval.stats import bootstrap_ratio
from llamalab.eval.windows import Window, continuation_window, score_windows

TASKS_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class Score:
    logprob: float  # ln p(continuation | context)
    is_greedy: bool  # every continuation token is the argmax
    n_tokens: int


def builtin_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.jsonl"))}


def load_task(task: str | Path) -> tuple[str, list[Item]]:
    """(name, items) of a bundled task name or a JSONL path."""
    tasks = builtin_tasks()
    path = tasks.get(str(task)) or Path(task).expanduser()
    if not path.is_file():
        raise LlamalabError(f"no such task: {task} (a JSONL file or one of {', '.join(tasks) or 'none'})")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            item = Item(str(rec["context"]), tuple(str(c) for c in rec["choices"]), int(rec["answer"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise LlamalabError(f"{path}:{i + 1}: expected {{\"context\": str, \"choices\": [str, ...], "
                                f"\"answer\": int}} ({type(e).__name__}: {e})") from None
        if len(item.choices) < 2 or not 0 <= item.answer < len(item.choices):
            raise LlamalabError(f"{path}:{i + 1}: needs at least 2 choices and 0 <= answer < {len(item.choices)}")
        items.append(item)
    if not items:
        raise LlamalabError(f"{path} holds no items")
    return path.stem, items


def _prefix_ids(tok, add_bos: bool | None) -> list[int]:
    want = getattr(tok, "add_bos", False) if add_bos is None else add_bos
    bos = getattr(tok, "bos_token_id", None)
    return [bos] if want and bos is not None else []


def encode_pair(tok, context: str, continuation: str, add_bos: bool | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids); an empty context becomes the BOS (or else EOS) token."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    prefix = _prefix_ids(tok, add_bos)
    if not context:
        start = prefix or [tok.bos_token_id if getattr(tok, "bos_token_id", None) is not None else tok.eos_token_id]
        if start[0] is None:
            raise LlamalabError("an empty context needs a BOS or EOS token to condition on")
        return start, tok.encode(continuation, add_bos=False)
    ctx = tok.encode(context, add_bos=False)
    whole = tok.encode(context + continuation, add_bos=False)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tok.encode(continuation, add_bos=False)
    return prefix + ctx, cont


def loglikelihoods(model, tok, pairs: Sequence[tuple[str, str]], *, max_length: int | None = None,
                   batch_size: int = 8, add_bos: bool | None = None, progress: bool = False) -> list[Score]:
    """ln p(continuation | context) for each (context, continuation) pair of strings."""
    if tok is None:
        raise LlamalabError("this model has no tokenizer: scoring text needs one")
    return loglikelihoods_of_ids(model, [encode_pair(tok, c, x, add_bos) for c, x in pairs], max_length=max_length,
                                 batch_size=batch_size, progress=progress)


def loglikelihoods_of_ids(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          max_length: int | None = None, batch_size: int = 8, progress: bool = False,
                          desc: str = "loglikelihood") -> list[Score]:
    ctx_len = int(model.config.max_position_embeddings)
    L = min(ctx_len, max_length or ctx_len)
    vocab = int(model.config.vocab_size)
    windows: list[Window] = []
    for d, (c, x) in enumerate(pairs):
        if max(list(c) + list(x)) >= vocab:
            raise LlamalabError(f"token id outside the model's vocabulary ({vocab}): is this its tokenizer?")
        windows.append(continuation_window(c, x, L, doc=d))
    lp = [0.0] * len(windows)
    greedy = [True] * len(windows)

    def add(i: int, off: int, logits: list[torch.Tensor], targets: torch.Tensor) -> None:
        logp = F.log_softmax(logits[0], dim=-1)
        lp[i] += float(logp.gather(1, targets[:, None]).double().sum())
        greedy[i] = greedy[i] and bool((logp.argmax(-1) == targets).all())

    score_windows([model], windows, add, batch_size=batch_size, progress=progress, desc=desc)
    return [Score(lp[i], greedy[i], windows[i].n_targets) for i in range(len(windows))]


@dataclass
class MCResult:
    task: str
    items: int
    acc: float
    acc_norm: float  # per byte
    acc_token: float  # per token
    acc_norm_ci: tuple[float, float] | None
    chance: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def multiple_choice(model, tok, task: str | Path | Sequence[Item], *, limit: int | None = None,
                    max_length: int | None = None, batch_size: int = 8, add_bos: bool | None = None,
                    progress: bool = False, n_boot: int = 1000, seed: int = 0) -> MCResult:
    """Accuracy of zero-shot log-likelihood choice on a task (bundled name, JSONL path or items)."""
    name, items = ("items", list(task)) if isinstance(task, (list, tuple)) else load_task(task)
    items = items[:limit] if limit else items
    t0 = time.perf_counter()
    pairs = [(it.context, ch) for it in items for ch in it.choices]
    scores = loglikelihoods(model, tok, pairs, max_length=max_length, batch_size=batch_size, add_bos=add_bos,
                            progress=progress)
    right = {"acc": [], "acc_norm": [], "acc_token": []}
    k = 0
    for it in items:
        s = scores[k:k + len(it.choices)]
        k += len(it.choices)
        raw = [x.logprob for x in s]
        per_byte = [x.logprob / max(1, len(ch.encode("utf-8"))) for x, ch in zip(s, it.choices)]
        per_tok = [x.logprob / max(1, x.n_tokens) for x in s]
        for key, vals in (("acc", raw), ("acc_norm", per_byte), ("acc_token", per_tok)):
            right[key].append(float(max(range(len(vals)), key=vals.__getitem__) == it.answer))
    n = len(items)
    return MCResult(task=name, items=n, acc=sum(right["acc"]) / n, acc_norm=sum(right["acc_norm"]) / n,
                    acc_token=sum(right["acc_token"]) / n,
                    acc_norm_ci=bootstrap_ratio(right["acc_norm"], [1.0] * n, n_boot=n_boot, seed=seed),
                    chance=sum(1 / len(it.choices) for it in items) / n, seconds=time.perf_counter() - t0)
