"""KL divergence of a model's next-token distributions from a reference model's, on the same text.

This is how quantized, converted or distilled models are judged against the model they came from
(llama.cpp's ``llama-perplexity --kl-divergence`` is the peer). At every scored position t, with the
reference's distribution P_t and the model's Q_t over the vocabulary:

    KL(P_t ‖ Q_t) = Σ_v P_t(v) · (ln P_t(v) − ln Q_t(v))          (nats, ≥ 0, = 0 iff P_t = Q_t)

reported as mean (with a bootstrap interval), median, 99th percentile and maximum over positions,
plus top-1 agreement (how often argmax Q_t = argmax P_t) and both models' perplexities on the
text. Perplexity alone hides a lot: two models can have equal perplexity and disagree on many
tokens; KL measures the whole distribution.

Both models must share a tokenizer (same ids for the same strings) or the comparison is
meaningless: :func:`same_tokenizer` checks the vocabularies and the error says where they differ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llamalab.data.corpora import Document
from llamalab.errors import LlamalabError
from llamalab.eval.perplexity import default_window, encode_documents
from llamalab.eval.sources import DEFAULT_VAL_FRACTION, documents
from llamalab.eval.stats import bootstrap_ratio, percentile
from llamalab.eval.windows import Window, score_windows, strided_windows


@dataclass
class KLResult:
    source: str
    tokens: int
    kl_mean: float
    kl_mean_ci: tuple[float, float] | None
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    perplexity: float  # the model's, on the same tokens
    reference_perplexity: float
    max_length: int
    stride: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def same_tokenizer(tok_a, tok_b) -> tuple[bool, str]:
    """(True, "") when both tokenizers map every id to the same string, else (False, why)."""
    if tok_a is None or tok_b is None:
        return True, ""  # nothing to compare: the caller compares vocabulary sizes
    if tok_a is tok_b:
        return True, ""
    na, nb = tok_a.vocab_size, tok_b.vocab_size
    if na != nb:
        return False, f"vocabulary sizes differ ({na} vs {nb})"
    if hasattr(tok_a, "get_vocab") and hasattr(tok_b, "get_vocab"):
        va, vb = tok_a.get_vocab(), tok_b.get_vocab()
        if va != vb:
            ia = {i: s for s, i in va.items()}
            ib = {i: s for s, i in vb.items()}
            diff = sorted(i for i in set(ia) | set(ib) if ia.get(i) != ib.get(i))
            i = diff[0]
            return False, (f"{len(diff)} of {na} token ids map to different strings (first: id {i} is "
                           f"{ia.get(i)!r} vs {ib.get(i)!r})")
    else:
        for i in range(na):
            if tok_a.id_to_token(i) != tok_b.id_to_token(i):
                return False, f"id {i} is {tok_a.id_to_token(i)!r} vs {tok_b.id_to_token(i)!r}"
    probe = "Hello, world! 123 ñ 漢字\n    def f(x):"
    if tok_a.encode(probe, add_bos=False) != tok_b.encode(probe, add_bos=False):
        return False, "same vocabulary but they split text differently (different merges or pre-tokenizer)"
    return True, ""


def check_comparable(model, tok, reference, ref_tok) -> int:
    """The number of vocabulary entries to compare over; raises when the models cannot be compared."""
    ok, why = same_tokenizer(tok, ref_tok)
    if not ok:
        raise LlamalabError(f"the model and the reference do not share a tokenizer: {why}; "
                            "KL divergence needs identical token ids")
    va, vb = int(model.config.vocab_size), int(reference.config.vocab_size)
    if va == vb:
        return va
    if tok is None or ref_tok is None:
        raise LlamalabError(f"the model and the reference have different vocabulary sizes ({va} vs {vb}) "
                            "and no tokenizer to show they agree")
    # same tokenizer, embedding matrices padded differently: compare over the real tokens
    return min(va, vb, tok.vocab_size)


def kl_divergence_of_ids(model, reference, docs_ids: Sequence[Sequence[int]], *, vocab: int | None = None,
                         max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
                         progress: bool = False, n_boot: int = 1000, seed: int = 0,
                         source: str = "ids") -> KLResult:
    L, S = default_window(model, max_length, stride)
    default_window(reference, L, S)  # the reference must hold the window too
    V = vocab or min(int(model.config.vocab_size), int(reference.config.vocab_size))
    windows: list[Window] = []
    for d, ids in enumerate(docs_ids):
        if ids and max(ids) >= V:
            raise LlamalabError(f"token id {max(ids)} is outside the compared vocabulary ({V})")
        windows.extend(strided_windows(ids, L, S, doc=d))
    if not windows:
        raise LlamalabError("nothing to score: every document is shorter than two tokens")
    kls: list[np.ndarray] = []
    win_kl = [0.0] * len(windows)
    win_n = [0] * len(windows)
    stats = {"agree": 0, "nll": 0.0, "ref_nll": 0.0}

    def add(i: int, off: int, logits: list[torch.Tensor], targets: torch.Tensor) -> None:
        lq = F.log_softmax(logits[0][:, :V], dim=-1)
        lp = F.log_softmax(logits[1][:, :V], dim=-1)
        kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)
        kls.append(kl.double().cpu().numpy())
        win_kl[i] += float(kl.double().sum())
        win_n[i] += len(targets)
        stats["agree"] += int((lq.argmax(-1) == lp.argmax(-1)).sum())
        stats["nll"] -= float(lq.gather(1, targets[:, None]).double().sum())
        stats["ref_nll"] -= float(lp.gather(1, targets[:, None]).double().sum())

    t0 = time.perf_counter()
    score_windows([model, reference], windows, add, batch_size=batch_size, progress=progress,
                  desc=f"KL {source}")
    allkl = np.concatenate(kls)
    n = len(allkl)
    return KLResult(source=source, tokens=n, kl_mean=float(allkl.mean()),
                    kl_mean_ci=bootstrap_ratio(win_kl, win_n, n_boot=n_boot, seed=seed),
                    kl_median=percentile(allkl, 50), kl_p99=percentile(allkl, 99), kl_max=float(allkl.max()),
                    top1_agreement=stats["agree"] / n, perplexity=math.exp(stats["nll"] / n),
                    reference_perplexity=math.exp(stats["ref_nll"] / n), max_length=L, stride=S,
                    seconds=time.perf_counter() - t0)


def kl_divergence(model, tok, reference, ref_tok, source: str | Path | Sequence[str] | Sequence[Document], *,
                  max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
                  max_tokens: int | None = None, add_bos: bool | None = None, split: str | None = None,
                  val_fraction: float = DEFAULT_VAL_FRACTION, progress: bool = False, n_boot: int = 1000,
                  seed: int = 0, label: str | None = None) -> KLResult:
    """KL(reference ‖ model) per token on a text source (see the module docstring); ``source``,
    ``split``, ``max_tokens`` and ``label`` as for :func:`llamalab.eval.perplexity`."""
    V = check_comparable(model, tok, reference, ref_tok)
    name, docs = documents(source, split, val_fraction)
    label = label or name
    enc = encode_documents(tok if tok is not None else ref_tok, docs, add_bos, max_tokens)
    return kl_divergence_of_ids(model, reference, [e.ids for e in enc], vocab=V, max_length=max_length,
                                stride=stride, batch_size=batch_size, progress=progress, n_boot=n_boot, seed=seed,
                                source=label)
