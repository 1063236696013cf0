"""Attention maps of the given model for a prompt, grouped by the KV head each query head shares.

For query head h of layer ℓ at positions t (query) and s (key):
    A_h[t, s] = softmax_s( RoPE(q_t, t) · RoPE(k_s, s) / √head_dim ),   s ≤ t
with k the key of KV head h // n_rep. The maps are recomputed from q_proj/k_proj outputs captured
by forward hooks and rotated with the model's own RotaryEmbedding, exactly as model/attention.py
does. Sharing one key per group does not force the heads of a group to attend alike (their queries
differ); we measure how alike they are (cosine similarity of the maps) within vs across groups.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.colors import PowerNorm

from llamalab.explain import figures
from llamalab.explain.report import Lab, Section
from llamalab.model.rope import apply_rope


@torch.no_grad()
def attention_maps(model, ids: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (n_layers, n_heads, T, T) for one sequence ids (1, T)."""
    cfg = model.config
    got: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for i, blk in enumerate(model.layers):
        hooks.append(blk.self_attn.q_proj.register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(("q", i), o)))
        hooks.append(blk.self_attn.k_proj.register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(("k", i), o)))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    T = ids.shape[1]
    cos, sin = model.rotary(torch.arange(T, device=ids.device)[None])
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    maps = []
    for i in range(cfg.n_layers):
        q = got[("q", i)].float().view(1, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = got[("k", i)].float().view(1, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(cfg.n_rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0])
    return torch.stack(maps)


def group_similarity(maps: torch.Tensor, n_rep: int) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: mean cosine similarity of attention maps of head pairs in the same KV group / in different ones."""
    L, H, T, _ = maps.shape
    flat = maps.reshape(L, H, T * T)
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = flat @ flat.transpose(1, 2)  # (L, H, H)
    group = torch.arange(H) // n_rep
    same = (group[:, None] == group[None]) & ~torch.eye(H, dtype=torch.bool)
    diff = group[:, None] != group[None]
    within = sim[:, same].mean(-1).numpy() if same.any() else np.full(L, np.nan)
    across = sim[:, diff].mean(-1).numpy() if diff.any() else np.full(L, np.nan)
    return within, across


def heatmaps(lab: Lab, sec: Section, maps: torch.Tensor, labels: list[str], layer: int) -> None:
    cfg = lab.config
    rows_kv = min(cfg.n_kv_heads, 4)
    cols = min(cfg.n_rep, 4)
    T = maps.shape[-1]
    size = 2.3 if T <= 24 else 2.8
    fig, axes = figures.new(cols, rows_kv, width=size * cols + 1.2, height=size * rows_kv + 0.6, squeeze=False,
                            layout="constrained")
    norm = PowerNorm(0.5, vmin=0, vmax=1)  # square-root colours: the first-token "sink" would hide the rest
    tick = [s[:6] for s in labels]
    for g in range(rows_kv):
        for r in range(cols):
            h = g * cfg.n_rep + r
            ax = axes[g][r]
            im = ax.imshow(maps[layer, h].numpy(), cmap="viridis", norm=norm, interpolation="nearest")
            ax.set_title(f"KV head {g} · query head {h}", fontsize=8)
            ax.grid(False)
            step = max(1, T // 12)
            ax.set_xticks(range(0, T, step), tick[::step], rotation=90, fontsize=6)
            ax.set_yticks(range(0, T, step), tick[::step], fontsize=6)
            if r == 0:
                ax.set_ylabel("query token", fontsize=7)
            if g == rows_kv - 1:
                ax.set_xlabel("key token", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention probability (square-root scale)")
    fig.suptitle(f"Layer {layer}: rows = KV heads, columns = the query heads sharing it", fontsize=10)
    name = figures.save(fig, lab.out, "attention_heads")
    shown = f"{rows_kv} of {cfg.n_kv_heads} KV heads × {cols} of {cfg.n_rep} query heads" \
        if (rows_kv < cfg.n_kv_heads or cols < cfg.n_rep) else "all heads"
    within, across = group_similarity(maps[layer:layer + 1], cfg.n_rep)
    sims = f"cosine similarity of the maps within a row {within[0]:.2f} vs across rows {across[0]:.2f}" \
        if not np.isnan(within[0]) else "(MHA: no KV head is shared)"
    sec.figure(name, f"Attention probabilities of layer {layer} for the prompt ({T} tokens; {shown}). "
               "Each row is one KV head; the query heads in that row read the same keys and values. Square-root colour "
               "scale, so that weak attention stays visible next to the first token's large share.",
               f"Heads that share keys still attend differently — {sims}.")


def similarity_plot(lab: Lab, sec: Section, maps: torch.Tensor) -> None:
    cfg = lab.config
    if cfg.n_rep == 1:
        sec.para("This model uses MHA (one KV head per query head), so there are no groups to compare.")
        return
    within, across = group_similarity(maps, cfg.n_rep)
    fig, ax = figures.new(width=7.5, height=3.4)
    ax.plot(within, "o-", ms=3, label="query heads sharing a KV head")
    ax.plot(across, "s-", ms=3, label="query heads of different KV heads")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine similarity of attention maps")
    ax.set_ylim(0, 1.02)
    ax.set_title("Do heads that share keys attend alike?")
    ax.legend()
    name = figures.save(fig, lab.out, "attention_group_similarity")
    gap = within - across
    sec.figure(name, "For every layer, the mean cosine similarity between the attention maps of two query heads, "
               "for pairs in the same KV group and pairs in different groups.",
               f"Sharing a KV head makes maps more alike in {int((gap > 0).sum())} of {len(gap)} layers (mean gap "
               f"{float(np.nanmean(gap)):+.2f}); the shared keys set a common 'address book', the queries still "
               "choose their own entries.")


def section(lab: Lab) -> Section:
    sec = Section("attention", "Attention maps, grouped by KV head")
    sec.para("What the heads actually look at, for one prompt. In a GQA model each KV head serves a group of "
             "query heads: the maps of one group are computed against the very same keys.")
    sec.math("""
A_h[t, s] = softmax_s( RoPE(q_t^h, t) · RoPE(k_s^{g(h)}, s) / √head_dim )  for s ≤ t,  0 for s > t
g(h) = h // n_rep      (rows of the figure = g, columns = the n_rep query heads of that group)""")
    sec.code_ref("src/llamalab/model/attention.py", "GroupedQueryAttention.forward (the maps here are "
                 "recomputed from hooked q_proj/k_proj outputs; src/llamalab/explain/attention.py)")
    ids, labels = lab.prompt_ids(24 if lab.quick else 28)
    maps = attention_maps(lab.model, ids)
    layer = lab.config.n_layers // 2
    heatmaps(lab, sec, maps, labels, layer)
    similarity_plot(lab, sec, maps)
    return sec
