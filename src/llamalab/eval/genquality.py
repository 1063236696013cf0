"""Generation-quality scores for a set of prompts: diversity, repetition, length, and fluency.

* **distinct-n** (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models"): unique n-grams / total n-grams over all generations pooled, n = 1, 2, 3. Low values
  mean the model says the same things to different prompts.
* **repeated n-gram rate** (rep-n, Welleck et al., 2019, "Neural Text Generation with Unlikelihood
  Training"): within each generation, the share of n-grams that already occurred earlier in it,
  pooled over generations; degenerate looping text scores near 1.
* **mean length** in tokens, and the share of generations that ended on a stop token/string.
* **reference perplexity**: exp of the mean negative log-likelihood of the generated tokens under a
  reference model (given the same prompt) — the usual proxy for fluency. Without a reference the
  model scores its own text (self-perplexity), which mostly reflects the sampling temperature.

n-grams are over the model's token ids, so compare diversity only between models sharing a tokenizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamalab.assets import asset_dir
from llamalab.errors import LlamalabError
from llamalab.eval.multichoice import loglikelihoods
from llamalab.jsonio import iter_jsonl

DEFAULT_PROMPTS = asset_dir("tasks") / "prompts.txt"


def ngrams(seq: Sequence, n: int) -> list[tuple]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence], n: int) -> float:
    """Unique n-grams / total n-grams over all sequences pooled (nan when there are none)."""
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngram_rate(seqs: Sequence[Sequence], n: int) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same sequence, pooled (nan when none)."""
    total = repeated = 0
    for s in seqs:
        grams = ngrams(s, n)
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else float("nan")


@dataclass
class GenQualityResult:
    prompts: int
    max_new_tokens: int
    temperature: float
    distinct_1: float
    distinct_2: float
    distinct_3: float
    rep_2: float
    rep_4: float
    mean_length: float
    stopped: float  # share of generations that ended on a stop token/string
    reference_perplexity: float | None
    reference: str  # "self" or the reference's name
    seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts from a text file (one per line; ``\\n`` escapes a newline) or a JSONL file (``prompt`` field)."""
    p = Path(path).expanduser() if path is not None else DEFAULT_PROMPTS
    if not p.is_file():
        raise LlamalabError(f"no such prompts file: {p}")
    prompts: list[str] = []
    if p.suffix == ".jsonl":
        for n, rec in iter_jsonl(p):
            text = rec.get("prompt") if isinstance(rec, dict) else rec
            if not isinstance(text, str):
                raise LlamalabError(f"{p}:{n}: expected a string or an object with a 'prompt' string")
            prompts.append(text)
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LlamalabError(f"{p} is not UTF-8 text") from None
        prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LlamalabError(f"{p} holds no prompts")
    return prompts


def generation_quality(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                       top_p: float | None = None, seed: int = 0, reference=None, ref_tok=None,
                       reference_name: str = "reference", batch_size: int = 8,
                       keep_samples: bool = True) -> GenQualityResult:
    """Generate for every prompt (plain-text completion) and score the generations."""
    from llamalab.generation.generate import complete

    if tok is None:
        raise LlamalabError("this model has no tokenizer: generation needs one")
    if not prompts:
        raise LlamalabError("no prompts")
    t0 = time.perf_counter()
    sampling: dict[str, Any] = {"temperature": temperature, "seed": seed}
    if top_p is not None:
        sampling["top_p"] = top_p
    outs = []
    for s in range(0, len(prompts), batch_size):
        outs.extend(complete(model, tok, list(prompts[s:s + batch_size]), max_new_tokens=max_new_tokens,
                             **sampling))
    stop_ids = set(getattr(tok, "stop_token_ids", None) or [])
    seqs = [[t for t in c.token_ids if t not in stop_ids] for c in outs]
    texts = [c.text for c in outs]
    ref, rtok, name = (reference, ref_tok, reference_name) if reference is not None else (model, tok, "self")
    pairs = [(p, t) for p, t in zip(prompts, texts) if t]
    ref_ppl = None
    if pairs:
        scores = loglikelihoods(ref, rtok, pairs, batch_size=batch_size)
        n = sum(s.n_tokens for s in scores)
        if n:
            ref_ppl = math.exp(-sum(s.logprob for s in scores) / n)
    return GenQualityResult(
        prompts=len(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
        distinct_1=distinct_n(seqs, 1), distinct_2=distinct_n(seqs, 2), distinct_3=distinct_n(seqs, 3),
        rep_2=repeated_ngram_rate(seqs, 2), rep_4=repeated_ngram_rate(seqs, 4),
        mean_length=sum(len(s) for s in seqs) / len(seqs),
        stopped=sum(c.finish_reason == "stop" for c in outs) / len(outs),
        reference_perplexity=ref_ppl, reference=name, seconds=time.perf_counter() - t0,
        samples=[{"prompt": p, "text": t} for p, t in zip(prompts, texts)] if keep_samples else [])
