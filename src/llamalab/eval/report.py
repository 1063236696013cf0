"""Readable tables for evaluation results (the CLI's default output; ``--json`` gives the raw dicts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"


def _ci(v: Any, ci: Sequence[float] | None, digits: int = 3) -> str:
    return _num(v, digits) + (f" [{_num(ci[0], digits)}, {_num(ci[1], digits)}]" if ci else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def perplexity_table(results: Sequence[dict[str, Any]]) -> str:
    level = int(round(100 * results[0]["ci_level"])) if results else 95
    rows = [[r["source"], _num(r["documents"]), _num(r["tokens"]), _num(r["bytes"]),
             _num(r["cross_entropy"], 4), _ci(r["perplexity"], r["perplexity_ci"], 2),
             _ci(r["bits_per_byte"], r["bits_per_byte_ci"], 4)] for r in results]
    return table(["source", "docs", "tokens", "bytes", "nats/token", f"perplexity [{level}% CI]",
                  f"bits/byte [{level}% CI]"], rows)


def kl_table(results: Sequence[dict[str, Any]]) -> str:
    rows = [[r["source"], _num(r["tokens"]), _ci(r["kl_mean"], r["kl_mean_ci"], 5), _num(r["kl_median"], 5),
             _num(r["kl_p99"], 5), _num(r["kl_max"], 4), f"{100 * r['top1_agreement']:.2f}%",
             _num(r["perplexity"], 3), _num(r["reference_perplexity"], 3)] for r in results]
    return table(["source", "tokens", "mean KL [95% CI]", "median", "p99", "max", "same top-1", "PPL model",
                  "PPL ref"], rows)


def mc_table(results: Sequence[dict[str, Any]]) -> str:
    rows = [[r["task"], _num(r["items"]), f"{100 * r['acc']:.1f}%",
             f"{100 * r['acc_norm']:.1f}%" + (f" [{100 * r['acc_norm_ci'][0]:.0f}, {100 * r['acc_norm_ci'][1]:.0f}]"
                                             if r["acc_norm_ci"] else ""),
             f"{100 * r['acc_token']:.1f}%", f"{100 * r['chance']:.1f}%"] for r in results]
    return table(["task", "items", "acc", "acc/byte [95% CI]", "acc/token", "chance"], rows)


def generation_table(r: dict[str, Any]) -> str:
    rows = [[str(r["prompts"]), _num(r["mean_length"], 1), f"{100 * r['stopped']:.0f}%", _num(r["distinct_1"]),
             _num(r["distinct_2"]), _num(r["distinct_3"]), _num(r["rep_2"]), _num(r["rep_4"]),
             f"{_num(r['reference_perplexity'], 2)} ({r['reference']})"]]
    return table(["prompts", "mean length", "stopped", "distinct-1", "distinct-2", "distinct-3", "rep-2", "rep-4",
                  "PPL under reference"], rows)


def harness_table(res: dict[str, Any]) -> str:
    rows = []
    for task, metrics in res.get("results", {}).items():
        for key, val in metrics.items():
            if "," not in key or "stderr" in key or not isinstance(val, (int, float)):
                continue
            err = metrics.get(key.replace(",", "_stderr,"))
            rows.append([task, key.split(",")[0], _num(float(val), 4),
                         _num(float(err), 4) if isinstance(err, (int, float)) else "-"])
    return table(["harness task", "metric", "value", "stderr"], rows) if rows else "(no harness results)"
