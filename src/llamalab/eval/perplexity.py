"""Perplexity, cross-entropy and bits per byte of a model on text.

For tokens x_1..x_N scored with model probabilities p(x_i | x_<i) (the context being whatever the
sliding window holds, see :mod:`llamalab.eval.windows`):

    cross-entropy  H = -(1/N) Σ_i ln p(x_i | x_<i)          (nats per token)
    perplexity     PPL = exp(H)
    bits per token = H / ln 2
    bits per byte  = (Σ_i -ln p(x_i | x_<i)) / (ln 2 · bytes)

Perplexity depends on the tokenizer (a coarser one has fewer, harder tokens); bits per byte — the
total information over the UTF-8 bytes of the scored text — does not, so it compares models with
different vocabularies. Each document is scored after a start token (BOS, or the EOS that
separates documents in training when the tokenizer adds no BOS — lm-evaluation-harness's
convention), so every text token is predicted and ``bytes`` is the UTF-8 size of the text. With
``stride == max_length`` the first token of every window goes unscored (Hugging Face's convention);
bits per byte then scales the mean loss by tokens/bytes of the whole text.

The interval is a percentile bootstrap of Σ nll / Σ tokens over documents (when there are at least
:data:`MIN_DOCS_FOR_DOC_BOOTSTRAP` of them) or else over windows (:mod:`llamalab.eval.stats`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llamalab.data.corpora import Document
from llamalab.errors import LlamalabError
from llamalab.eval.sources import DEFAULT_VAL_FRACTION, documents
from llamalab.eval.stats import bootstrap_ratio
from llamalab.eval.windows import Window, score_windows, strided_windows

MIN_DOCS_FOR_DOC_BOOTSTRAP = 10
DEFAULT_MAX_LENGTH = 512


@dataclass
class Encoded:
    """One document as token ids: ``ids[1:]`` are scored, covering ``n_bytes`` UTF-8 bytes of text."""

    doc_id: str
    ids: list[int]
    n_bytes: int


@dataclass
class PerplexityResult:
    source: str
    documents: int
    windows: int
    tokens: int  # tokens scored
    bytes: int | None  # UTF-8 bytes those tokens cover
    cross_entropy: float  # nats per token
    perplexity: float
    bits_per_token: float
    bits_per_byte: float | None
    ci_level: float
    ci_unit: str | None  # "documents" or "windows"
    perplexity_ci: tuple[float, float] | None
    bits_per_byte_ci: tuple[float, float] | None
    max_length: int
    stride: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_window(model, max_length: int | None, stride: int | None) -> tuple[int, int]:
    ctx = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or DEFAULT_MAX_LENGTH)
    L = min(DEFAULT_MAX_LENGTH, ctx) if max_length is None else int(max_length)
    if L > ctx:
        raise LlamalabError(f"max_length {L} exceeds the model's context ({ctx} positions)")
    return L, (max(1, L // 2) if stride is None else int(stride))


def start_token(tok, add_bos: bool | None) -> int | None:
    """The token each document is conditioned on: BOS when BOS is wanted (``add_bos``, or by default the
    tokenizer's own policy), else the EOS/document separator (as lm-evaluation-harness does); None
    with ``add_bos=False`` and no EOS."""
    bos, eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    want = getattr(tok, "add_bos", False) if add_bos is None else add_bos
    if want and bos is not None:
        return int(bos)
    if eos is not None:
        return int(eos)
    return None if add_bos is False else (int(bos) if bos is not None else None)


def _encode_prefix(tok, text: str, budget: int | None) -> tuple[str, list[int]]:
    """The longest line-aligned prefix of ``text`` whose encoding has at most ``budget`` tokens (all if None)."""
    if budget is None:
        return text, tok.encode(text, add_bos=False)
    if budget < 1:
        return "", []
    cut = min(len(text), budget * 8 + 64)
    while True:
        if cut < len(text):
            nl = text.rfind("\n", 0, cut)
            cut = nl + 1 if nl > 0 else cut
        part = text[:cut]
        ids = tok.encode(part, add_bos=False)
        if len(ids) <= budget:
            return part, ids
        new_cut = int(cut * budget / len(ids) * 0.97)
        if new_cut >= cut or new_cut < 1:  # a single enormous line: cut at a token boundary
            return tok.decode(ids[:budget]), ids[:budget]
        cut = new_cut


MIN_SHARE = 128  # below this many tokens per document, a cap takes whole documents in order instead


def encode_documents(tok, docs: Sequence[Document], add_bos: bool | None = None,
                     max_tokens: int | None = None) -> list[Encoded]:
    """Tokenize documents, each after its start token (:func:`start_token`), so every text token is scored.

    ``max_tokens`` caps the scored tokens (None or 0: no cap, score everything — as ``--max-tokens 0``):
    shared out evenly over the documents (short ones first, their leftover going to the rest) while
    that leaves each at least :data:`MIN_SHARE` tokens, else whole documents in order until the cap
    (the last one cut at a line end).
    """
    if tok is None:
        raise LlamalabError("this model has no tokenizer: evaluation on text needs one")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 0):
        raise LlamalabError(f"max_tokens must be a non-negative integer (0 or None: no cap), got {max_tokens!r}")
    max_tokens = max_tokens or None
    start = start_token(tok, add_bos)
    even = max_tokens is not None and max_tokens >= MIN_SHARE * len(docs)
    order = sorted(range(len(docs)), key=lambda i: len(docs[i].text)) if even else range(len(docs))
    remaining = max_tokens
    out: dict[int, Encoded] = {}
    for k, i in enumerate(order):
        if remaining is not None and remaining <= 0:
            break
        budget = None
        if remaining is not None:
            budget = -(-remaining // (len(docs) - k)) if even else remaining  # ceil of an even share
            budget = budget if start is not None else budget + 1  # without a start token ids[0] is context only
        text, ids = _encode_prefix(tok, docs[i].text, budget)
        n_bytes = len(text.encode("utf-8"))
        if start is not None:
            ids = [start, *ids]
        elif ids:
            n_bytes -= len(tok.decode(ids[:1]).encode("utf-8"))  # approximate for a partial UTF-8 token
        if len(ids) < 2:
            continue
        out[i] = Encoded(docs[i].doc_id, ids, max(n_bytes, 0))
        if remaining is not None:
            remaining -= len(ids) - 1
    encoded = [out[i] for i in sorted(out)]
    if not encoded:
        raise LlamalabError("nothing to score: every document is shorter than two tokens")
    return encoded


def perplexity_of_ids(model, docs_ids: Sequence[Sequence[int]], n_bytes: Sequence[int] | None = None, *,
                      max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
                      progress: bool = False, n_boot: int = 1000, ci_level: float = 0.95, seed: int = 0,
                      source: str = "ids") -> PerplexityResult:
    """Strided-window perplexity over documents given as token ids (each scored from its second token)."""
    L, S = default_window(model, max_length, stride)
    vocab = int(model.config.vocab_size)
    windows: list[Window] = []
    for d, ids in enumerate(docs_ids):
        if ids and (max(ids) >= vocab or min(ids) < 0):
            raise LlamalabError(f"token id {max(ids)} is outside the model's vocabulary ({vocab}): "
                                "is this the model's own tokenizer?")
        windows.extend(strided_windows(ids, L, S, doc=d))
    if not windows:
        raise LlamalabError("nothing to score: every document is shorter than two tokens")
    nll = [0.0] * len(windows)
    cnt = [0] * len(windows)

    def add(i: int, off: int, logits: list[torch.Tensor], targets: torch.Tensor) -> None:
        nll[i] += float(F.cross_entropy(logits[0], targets, reduction="sum").double())
        cnt[i] += len(targets)

    t0 = time.perf_counter()
    score_windows([model], windows, add, batch_size=batch_size, progress=progress, desc=f"perplexity {source}")
    seconds = time.perf_counter() - t0
    return summarize(source, windows, nll, cnt, docs_ids, n_bytes, L, S, seconds, n_boot, ci_level, seed)


def summarize(source: str, windows: Sequence[Window], nll: Sequence[float], cnt: Sequence[int],
              docs_ids: Sequence[Sequence[int]], n_bytes: Sequence[int] | None, L: int, S: int, seconds: float,
              n_boot: int = 1000, ci_level: float = 0.95, seed: int = 0) -> PerplexityResult:
    tokens = sum(cnt)
    H = sum(nll) / tokens
    predictable = sum(max(len(ids) - 1, 0) for ids in docs_ids)
    total_bytes = sum(n_bytes) if n_bytes is not None else None
    tok_per_byte = predictable / total_bytes if total_bytes else None
    n_docs = len({w.doc for w in windows})
    if n_docs >= MIN_DOCS_FOR_DOC_BOOTSTRAP:
        unit = "documents"
        by_doc: dict[int, list[float]] = {}
        for w, a, c in zip(windows, nll, cnt):
            s = by_doc.setdefault(w.doc, [0.0, 0.0])
            s[0] += a
            s[1] += c
        nums, dens = [v[0] for v in by_doc.values()], [v[1] for v in by_doc.values()]
    else:
        unit, nums, dens = "windows", list(nll), list(cnt)
    ci = bootstrap_ratio(nums, dens, n_boot=n_boot, level=ci_level, seed=seed)
    return PerplexityResult(
        source=source, documents=n_docs, windows=len(windows), tokens=tokens, bytes=total_bytes,
        cross_entropy=H, perplexity=math.exp(H), bits_per_token=H / math.log(2),
        bits_per_byte=H * tok_per_byte / math.log(2) if tok_per_byte else None,
        ci_level=ci_level, ci_unit=unit if ci else None,
        perplexity_ci=(math.exp(ci[0]), math.exp(ci[1])) if ci else None,
        bits_per_byte_ci=(ci[0] * tok_per_byte / math.log(2), ci[1] * tok_per_byte / math.log(2))
        if ci and tok_per_byte else None,
        max_length=L, stride=S, seconds=seconds)


def perplexity(model, tok, source: str | Path | Sequence[str] | Sequence[Document], *,
               max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
               max_tokens: int | None = None, add_bos: bool | None = None, split: str | None = None,
               val_fraction: float = DEFAULT_VAL_FRACTION, progress: bool = False, n_boot: int = 1000,
               ci_level: float = 0.95, seed: int = 0, label: str | None = None) -> PerplexityResult:
    """Perplexity / cross-entropy / bits per byte of ``model`` on a file, folder, JSONL, corpus or texts.

    ``max_length`` (default min(512, context)) and ``stride`` (default max_length/2) set the sliding
    window; ``max_tokens`` caps the scored tokens (None or 0: no cap); ``add_bos`` chooses each
    document's start token (:func:`start_token`: BOS, else EOS). ``split`` (validation / train /
    all; default validation for a bundled corpus, all for a path) picks the documents as
    :func:`llamalab.eval.sources.documents` does; ``label`` names the source in the result.
    """
    name, docs = documents(source, split, val_fraction)
    label = label or name
    enc = encode_documents(tok, docs, add_bos, max_tokens)
    res = perplexity_of_ids(model, [e.ids for e in enc], [e.n_bytes for e in enc], max_length=max_length,
                            stride=stride, batch_size=batch_size, progress=progress, n_boot=n_boot,
                            ci_level=ci_level, seed=seed, source=label)
    res.extra["start_token"] = start_token(tok, add_bos)
    return res
