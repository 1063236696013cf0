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
are cut from the left. Choices sharing a context are scored in one packed sequence — the context
once, then every choice, each attending only to the context and to itself, with positions
restarting after the context — which gives the same numbers as scoring them apart, for about a
quarter of the tokens.

Task files are JSONL, one ``{"context": str, "choices": [str, ...], "answer": int}`` per line.
The bundled tasks live in ``llamalab/assets/tasks/*.jsonl`` (see :mod:`llamalab.eval.tasks`).
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

from llamalab.assets import asset_dir
from llamalab.errors import LlamalabError
from llamalab.eval.stats import bootstrap_ratio
from llamalab.eval.windows import continuation_window, score_windows

TASKS_DIR = asset_dir("tasks")


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlamalabError(f"{path} is not UTF-8 text") from None
    items = []
    for i, line in enumerate(text.splitlines()):
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
                          desc: str = "loglikelihood", share_context: bool = True) -> list[Score]:
    """ln p(continuation | context) for (context ids, continuation ids) pairs.

    With ``share_context`` (and a model that takes a 4-D attention mask), pairs with the same
    context are packed into one sequence, the context computed once (:func:`_pack`)."""
    ctx_len = int(model.config.max_position_embeddings)
    L = min(ctx_len, max_length or ctx_len)
    vocab = int(model.config.vocab_size)
    for c, x in pairs:
        if not c or not x:
            raise LlamalabError("each pair needs at least one context and one continuation token")
        if max(list(c) + list(x)) >= vocab:
            raise LlamalabError(f"token id outside the model's vocabulary ({vocab}): is this its tokenizer?")
    if share_context and hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        return _packed_loglikelihoods(model, pairs, L, batch_size, progress, desc)
    windows = [continuation_window(c, x, L, doc=d) for d, (c, x) in enumerate(pairs)]
    lp = [0.0] * len(windows)
    greedy = [True] * len(windows)

    def add(i: int, off: int, logits: list[torch.Tensor], targets: torch.Tensor) -> None:
        logp = F.log_softmax(logits[0], dim=-1)
        lp[i] += float(logp.gather(1, targets[:, None]).double().sum())
        greedy[i] = greedy[i] and bool((logp.argmax(-1) == targets).all())

    score_windows([model], windows, add, batch_size=batch_size, progress=progress, desc=desc)
    return [Score(lp[i], greedy[i], windows[i].n_targets) for i in range(len(windows))]


@dataclass
class _Packed:
    """One context followed by several continuations, each attending to the context and to itself only.

    Positions restart after the context for every continuation, so each continuation sees exactly
    what it would see alone: ``ids = ctx + x_1 + x_2 + …``; token i of x_j sits at position
    len(ctx) + i and attends to the context and to x_j[:i+1] (a tree-shaped causal mask).
    """

    ids: list[int]
    positions: list[int]
    segment: list[int]  # -1 for the context, j for continuation j
    members: list[int]  # which pairs the continuations are
    pred_at: list[list[int]]  # per continuation: packed index whose output predicts each token
    targets: list[list[int]]


def _pack(ctx: Sequence[int], conts: list[tuple[int, Sequence[int]]], L: int) -> _Packed:
    longest = max(len(x) for _, x in conts)
    ctx = list(ctx)[-max(1, L - longest):]  # context cut from the left so every continuation fits the window
    n = len(ctx)
    ids, positions, segment = list(ctx), list(range(n)), [-1] * n
    members, pred_at, targets = [], [], []
    for j, (member, x) in enumerate(conts):
        x = list(x)[-(L - 1):]
        start = len(ids)
        ids.extend(x)
        positions.extend(range(n, n + len(x)))
        segment.extend([j] * len(x))
        members.append(member)
        pred_at.append([n - 1] + list(range(start, start + len(x) - 1)))
        targets.append(x)
    return _Packed(ids, positions, segment, members, pred_at, targets)


def _tree_mask(p: _Packed, T: int) -> torch.Tensor:
    seg = torch.tensor(p.segment + [-2] * (T - len(p.ids)))
    idx = torch.arange(T)
    real = idx < len(p.ids)
    causal = idx[None, :] <= idx[:, None]
    in_ctx = (seg == -1)[None, :]
    same = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0)
    mask = causal & (in_ctx | same) & real[:, None] & real[None, :]
    return mask | torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax rows)


def _packed_loglikelihoods(model, pairs, L: int, batch_size: int, progress: bool, desc: str) -> list[Score]:
    from llamalab.progress import progress_bar

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (c, _) in enumerate(pairs):
        groups.setdefault(tuple(c), []).append(i)
    packs: list[_Packed] = []
    for ctx, members in groups.items():
        chunk: list[tuple[int, Sequence[int]]] = []
        size = 0
        for m in members:  # keep each packed sequence within a few windows' worth of tokens
            x = pairs[m][1]
            if chunk and size + len(x) > 2 * L:
                packs.append(_pack(ctx, chunk, L))
                chunk, size = [], 0
            chunk.append((m, x))
            size += len(x)
        packs.append(_pack(ctx, chunk, L))
    packs.sort(key=lambda p: -len(p.ids))
    out: list[Score | None] = [None] * len(pairs)
    dev = next(model.parameters()).device
    with torch.inference_mode(), progress_bar(total=len(pairs), disable=not progress, desc=desc, leave=False) as bar:
        for s in range(0, len(packs), batch_size):
            batch = packs[s:s + batch_size]
            T = len(batch[0].ids)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            pos = torch.zeros(len(batch), T, dtype=torch.long)
            for b, p in enumerate(batch):
                ids[b, :len(p.ids)] = torch.tensor(p.ids)
                pos[b, :len(p.ids)] = torch.tensor(p.positions)
            mask = torch.stack([_tree_mask(p, T) for p in batch])[:, None]
            h = model.hidden_states(ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev))
            for b, p in enumerate(batch):
                at = [i for row in p.pred_at for i in row]
                logp = F.log_softmax(model.lm_head(model.norm(h[b, at])).float(), dim=-1)
                k = 0
                for m, tgt in zip(p.members, p.targets):
                    t = torch.tensor(tgt, device=logp.device)
                    rows = logp[k:k + len(tgt)]
                    k += len(tgt)
                    out[m] = Score(float(rows.gather(1, t[:, None]).double().sum()),
                                   bool((rows.argmax(-1) == t).all()), len(tgt))
                bar.update(len(p.members))
    return [s for s in out if s is not None]


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
