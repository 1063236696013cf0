"""Percentile-bootstrap confidence intervals for ratio statistics (Efron & Tibshirani, 1993).

Corpus perplexity is exp(Σ nll / Σ tokens) — a ratio of sums over scoring units (documents or
windows), not a mean of per-unit perplexities. Resampling the units with replacement and
recomputing the ratio B times gives its sampling distribution; the (α/2, 1-α/2) percentiles of
that distribution are the interval. Units that are not independent (adjacent windows of one long
document) make the interval somewhat too narrow; documents are the better unit when there are
enough of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float], n_boot: int = 1000,
                    level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Interval for Σ numerators / Σ denominators over resampled units; None with fewer than 2 units."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    k = len(num)
    if k < 2 or n_boot < 1:
        return None
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot)
    step = max(1, 4_000_000 // k)  # bound memory: at most ~4M indices at once
    for s in range(0, n_boot, step):
        idx = rng.integers(0, k, size=(min(step, n_boot - s), k))
        d = den[idx].sum(1)
        ratios[s:s + len(idx)] = num[idx].sum(1) / np.where(d > 0, d, np.nan)
    lo, hi = np.nanpercentile(ratios, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")
