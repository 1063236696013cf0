"""RoPE, measured: frequency spectrum, the relative-position property, score decay, context extension.

Math (Su et al., 2021, arXiv:2104.09864; implementation in model/rope.py): pair i of a query or
key at position m is rotated by m·θ_i with θ_i = base^(-2i/d), so
    q_m · k_n = Re Σ_i q⁽ⁱ⁾ conj(k⁽ⁱ⁾) e^{i(m-n)θ_i}        (q⁽ⁱ⁾, k⁽ⁱ⁾ ∈ ℂ: the pairs as complex numbers)
depends on positions only through m - n. Pair i completes a turn every λ_i = 2π/θ_i tokens (its
wavelength). The RoFormer bound |Σ_i h_i e^{irθ_i}| ≤ max_i|h_{i+1} - h_i| · Σ_j |S_j|, with
S_j = Σ_{k<j} e^{irθ_k}, shrinks (on average) as the relative distance r grows: the "long-term decay".

Measured here: λ_i for the model and Llama 2/3/3.1; how llama3 and YaRN scaling reshape λ; the
relative property on the model's own q/k vectors (hooked at q_proj/k_proj, rotated with the model's
own RotaryEmbedding at shifted positions); and perplexity beyond the trained context for a small
model, with each rope_scaling type set at evaluation time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from llamalab.config import llama3_rope_scaling, normalize_rope_scaling
from llamalab.explain import figures
from llamalab.explain.report import Lab, Section
from llamalab.model.rope import RotaryEmbedding, apply_rope, compute_inv_freq

LLAMA3_SCALING = llama3_rope_scaling(8.0)


def wavelengths(head_dim: int, theta: float, scaling: dict | None = None, max_pos: int = 8192,
                seq_len: int | None = None) -> np.ndarray:
    """λ_i = 2π / θ_i in tokens, for every dimension pair i (after any context scaling)."""
    inv_freq, _ = compute_inv_freq(head_dim, theta, scaling, max_pos, seq_len)
    return (2 * math.pi / inv_freq.double()).numpy()


def trained_context(config) -> int:
    rs = config.rope_scaling or {}
    return int(rs.get("original_max_position_embeddings") or config.max_position_embeddings)


# ----------------------------------------------------------------------------- spectrum
def spectrum(lab: Lab, sec: Section) -> None:
    cfg = lab.config
    settings = [
        (f"this model (θ={cfg.rope_theta:g}, d={cfg.head_dim})", cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
         trained_context(cfg)),
        ("Llama 2 (θ=10k, d=128)", 128, 10000.0, None, 4096),
        ("Llama 3 (θ=500k, d=128)", 128, 500000.0, None, 8192),
        ("Llama 3.1 (θ=500k + llama3 ×8)", 128, 500000.0, LLAMA3_SCALING, 8192),
    ]
    fig, (ax, ax2) = figures.new(2, width=11, height=4)
    rows = []
    for (label, d, theta, scaling, ctx), color in zip(settings, ["C0", "C1", "C2", "C3"]):
        lam = wavelengths(d, theta, scaling, ctx)
        x = np.arange(d // 2) * 2 / d
        ax.semilogy(x, lam, color=color, label=label, lw=2 if "this" in label else 1.2)
        ax.axhline(ctx, color=color, ls=":", lw=1)
        n_long = int((lam > ctx).sum())
        rows.append([label, d // 2, float(lam.min()), float(lam.max()), ctx, n_long])
    ax.set_xlabel("dimension pair 2i/d (0 = fastest rotation)")
    ax.set_ylabel("wavelength λ_i = 2π/θ_i (tokens, log)")
    ax.set_title("RoPE spectrum (dotted: training context)")
    ax.legend(loc="upper left")

    base = wavelengths(128, 500000.0)
    schemes = [("llama3 ×8 (Llama 3.1)", LLAMA3_SCALING, None),
               ("YaRN ×8", dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=8192), None),
               ("linear ×8 (position interpolation)", dict(rope_type="linear", factor=8.0), None),
               ("dynamic NTK ×8 at 64k tokens", dict(rope_type="dynamic", factor=8.0), 65536)]
    for label, scaling, seq_len in schemes:
        scaled = wavelengths(128, 500000.0, normalize_rope_scaling(scaling, 8192), 8192, seq_len)
        ax2.semilogx(base, scaled / base, label=label, marker=".", ms=3, lw=1.2)
    ax2.axvline(8192, color="k", ls=":", lw=1)
    ax2.axvline(8192 / 4, color="grey", ls=":", lw=1)
    ax2.set_xlabel("original wavelength (tokens, log), θ=500k, d=128")
    ax2.set_ylabel("scaled λ / original λ (log)")
    ax2.set_yscale("log")
    ax2.set_title("How context scaling stretches each pair (8k → 64k)")
    ax2.legend(loc="upper left")
    name = figures.save(fig, lab.out, "rope_spectrum")
    mine, l2, l3 = rows[0], rows[1], rows[2]
    l31 = wavelengths(128, 500000.0, LLAMA3_SCALING, 8192)
    kept = int((np.isclose(l31, base)).sum())
    sec.figure(name, "Left: wavelength of every rotary dimension pair, against the training context (dotted). "
               "Right: the factor by which each scaling scheme stretches each wavelength, for Llama 3's θ and an "
               "8× extension.",
               f"{mine[5]} of this model's {mine[1]} pairs have wavelengths longer than its {mine[4]:,}-token "
               f"training context (they never complete a turn in training); Llama 3's θ=500k leaves {l3[5]} such "
               f"pairs vs {l2[5]} for Llama 2. llama3 scaling keeps the {kept} fastest pairs (λ < 2,048) exactly "
               f"and stretches the slow ones 8×; YaRN ramps similarly; linear stretches all of them.")
    sec.table(["setting", "pairs", "min λ (tokens)", "max λ (tokens)", "training context", "pairs with λ > context"],
              rows, "Wavelength statistics (2π/θ_i)")


# ----------------------------------------------------------------------------- q/k of the model
@torch.no_grad()
def capture_qk(lab: Lab, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-RoPE q (T, n_heads, d) and k (T, n_kv_heads, d) of one layer for the prompt (float32)."""
    cfg = lab.config
    ids, _ = lab.prompt_ids(96)
    got: dict[str, torch.Tensor] = {}
    attn = lab.model.layers[layer].self_attn
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))]
    try:
        lab.model(ids)
    finally:
        for h in hooks:
            h.remove()
    T = ids.shape[1]
    q = got["q"][0].float().view(T, cfg.n_heads, cfg.head_dim)
    k = got["k"][0].float().view(T, cfg.n_kv_heads, cfg.head_dim)
    return q, k


def _rotate(rotary: RotaryEmbedding, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate rows x (N, d) at positions pos (N,) with the model's own rotary embedding."""
    cos, sin = rotary(pos[None].to(x.device))
    return apply_rope(x[None, None], cos, sin)[0, 0]


def _rotate64(inv_freq: torch.Tensor, scale: float, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Exact float64 rotation (reference for the float32 implementation)."""
    ang = pos.double()[:, None] * inv_freq.double()[None]
    emb = torch.cat((ang, ang), -1)
    x = x.double()
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return (x * emb.cos() + rot * emb.sin()) * scale


@torch.no_grad()
def relative_property(lab: Lab, sec: Section) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = lab.config
    layer = cfg.n_layers // 2
    q, k = capture_qk(lab, layer)
    T = q.shape[0]
    gen = torch.Generator().manual_seed(0)
    n = 256
    heads = torch.randint(0, cfg.n_heads, (n,), generator=gen)
    qa = q[torch.randint(0, T, (n,), generator=gen), heads]
    kb = k[torch.randint(0, T, (n,), generator=gen), heads // cfg.n_rep]
    rel = torch.randint(0, 64, (n,), generator=gen)
    n0 = torch.randint(0, 64, (n,), generator=gen)
    rotary = lab.model.rotary
    inv_freq, scale = compute_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    norms = qa.norm(dim=-1) * kb.norm(dim=-1)

    def scores(offset: int, exact: bool) -> torch.Tensor:
        m, nn_ = n0 + rel + offset, n0 + offset
        if exact:
            return (_rotate64(inv_freq, scale, qa, m) * _rotate64(inv_freq, scale, kb, nn_)).sum(-1)
        return (_rotate(rotary, qa, m) * _rotate(rotary, kb, nn_)).sum(-1).double()

    limit = max(cfg.max_position_embeddings, 1000)
    offsets = sorted({int(x) for x in np.unique(np.logspace(0, math.log10(limit), 9).round())})
    base32, base64 = scores(0, False), scores(0, True)
    dev32, dev64, devmax = [], [], []
    for off in offsets:
        d32 = ((scores(off, False) - base32).abs() / norms).float()
        dev32.append(float(d32.median()))
        devmax.append(float(d32.max()))
        dev64.append(float(((scores(off, True) - base64).abs() / norms).median()))

    fig, (ax, ax2) = figures.new(2, width=11, height=3.8)
    ax.loglog(offsets, devmax, "o-", label="float32 (the model's code), max")
    ax.loglog(offsets, dev32, "o-", label="float32 (the model's code), median")
    ax.loglog(offsets, np.maximum(dev64, 1e-17), "s--", label="exact math in float64, median")
    ax.set_xlabel("shift s added to both positions (tokens, log)")
    ax.set_ylabel("|score(m+s, n+s) − score(m, n)| / (|q||k|)")
    ax.set_title(f"Relative-position property, layer {layer}, {n} real (q, k) pairs")
    ax.legend()
    # one real pair: score against relative distance, at two absolute offsets
    i = int(norms.argmax())
    r = torch.arange(0, 200)
    for off, style in ((0, "-"), (1000, "--")):
        sc = (_rotate(rotary, qa[i].expand(len(r), -1), r + off) * _rotate(rotary, kb[i].expand(len(r), -1),
                                                                          torch.zeros_like(r) + off)).sum(-1)
        ax2.plot(r.numpy(), (sc / math.sqrt(cfg.head_dim)).numpy(), style, label=f"key at position {off}")
    ax2.set_xlabel("relative distance m − n (tokens)")
    ax2.set_ylabel("attention logit q·k/√d")
    ax2.set_title("One real (q, k) pair: the logit depends only on m − n")
    ax2.legend()
    name = figures.save(fig, lab.out, "rope_relative")
    sec.figure(name, "Left: how much the attention score of real query/key pairs changes when both positions are "
               "shifted by s (normalised by |q||k|). Right: the logit of one pair against their distance, with "
               "the key at position 0 and at 1,000 — the curves coincide.",
               f"Shifting both positions changes the score by a median {dev32[-1]:.1e} of |q||k| at s={offsets[-1]:,} "
               f"in float32 (exact math: {dev64[-1]:.0e}); the residue is float32 rounding of the angle m·θ, "
               "which grows with position — scores depend on m − n only.")
    return qa, kb


@torch.no_grad()
def decay(lab: Lab, sec: Section, qa: torch.Tensor, kb: torch.Tensor) -> None:
    cfg = lab.config
    # dense distances, then the mean over 60 log-spaced bins (the raw bound oscillates)
    r = np.unique(np.logspace(0, 5, 4000).round()).astype(np.int64)
    edges = np.logspace(0, 5, 61)
    fig, (ax, ax2) = figures.new(2, width=11, height=3.8)
    summary = []
    for label, d, theta in ((f"this model (θ={cfg.rope_theta:g}, d={cfg.head_dim})", cfg.head_dim, cfg.rope_theta),
                            ("θ=10k, d=128 (Llama 2)", 128, 10000.0), ("θ=500k, d=128 (Llama 3)", 128, 500000.0)):
        inv = compute_inv_freq(d, theta)[0].double().numpy()
        S = np.cumsum(np.exp(1j * r[:, None] * inv[None]), axis=1)  # S_j = Σ_{k<=j} e^{i r θ_k}
        bound = np.abs(S).mean(axis=1) / ((d // 2 + 1) / 2)  # relative to its value at r = 0
        idx = np.digitize(r, edges)
        xs = np.array([r[idx == b].mean() for b in np.unique(idx)])
        ys = np.array([bound[idx == b].mean() for b in np.unique(idx)])
        ax.loglog(xs, ys, label=label)
        summary.append((label, float(np.interp(10, xs, ys)), float(np.interp(1000, xs, ys))))
    ax.set_xlabel("relative distance r (tokens, log)")
    ax.set_ylabel("(2/d) Σ_j |S_j(r)|, relative to r=0")
    ax.set_title("RoFormer long-term decay of the score bound")
    ax.legend()
    # measured on the model's own q/k: mean logit of real pairs as their distance grows
    inv_freq, scale = compute_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    dist = np.unique(np.logspace(0, math.log10(max(cfg.max_position_embeddings, 64)), 60).round()).astype(np.int64)
    kk = _rotate64(inv_freq, scale, kb, torch.zeros(len(kb)))
    mean_logit, mean_abs = [], []
    for dd in dist:
        qq = _rotate64(inv_freq, scale, qa, torch.full((len(qa),), int(dd)))
        s = (qq * kk).sum(-1) / math.sqrt(cfg.head_dim)
        mean_logit.append(float(s.mean()))
        mean_abs.append(float(s.abs().mean()))
    ax2.semilogx(dist, mean_logit, label="mean logit")
    ax2.semilogx(dist, mean_abs, label="mean |logit|")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlabel("relative distance (tokens, log)")
    ax2.set_ylabel("q·k/√d over 256 real pairs")
    ax2.set_title(f"Measured on this model's q/k (layer {cfg.n_layers // 2})")
    ax2.legend()
    name = figures.save(fig, lab.out, "rope_decay")
    mine = summary[0]
    sec.figure(name, "Left: the RoFormer upper bound on the attention score against relative distance for three "
               "RoPE bases. Right: the mean attention logit of the model's own (q, k) pairs moved apart.",
               f"The bound falls to {mine[1]:.2f} of its r=0 value at r=10 and {mine[2]:.2f} at r=1,000 for this "
               f"model's base; a "
               f"larger θ delays the decay. On real vectors the mean logit goes from {mean_logit[0]:.3g} at "
               f"distance 1 to {mean_logit[-1]:.3g} at {int(dist[-1]):,} (mean |logit| {mean_abs[0]:.3g} → "
               f"{mean_abs[-1]:.3g}).")


# ----------------------------------------------------------------------------- context extension
def scaling_variants(train_ctx: int, factor: float) -> list[tuple[str, dict | None]]:
    return [
        ("none (extrapolate)", None),
        ("linear (PI)", dict(rope_type="linear", factor=factor)),
        ("dynamic NTK", dict(rope_type="dynamic", factor=factor)),
        ("YaRN", dict(rope_type="yarn", factor=factor, original_max_position_embeddings=train_ctx)),
        ("llama3", llama3_rope_scaling(factor, original_max_position_embeddings=train_ctx)),
    ]


@torch.no_grad()
def per_position_loss(model, windows: torch.Tensor) -> np.ndarray:
    logits = model(windows[:, :-1])
    ce = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    return ce.mean(0).numpy()


def context_extension(lab: Lab, sec: Section) -> None:
    from llamalab.explain.experiments import base_run, corpus, experiment_budget

    budget = experiment_budget(lab)
    run = base_run(lab)
    model = run.model
    train_ctx = budget.seq_len
    factor = 4
    eval_len = factor * train_ctx
    windows = corpus(lab).val_windows(16 if lab.quick else 96, eval_len)
    original = model.rotary
    curves = {}
    try:
        for label, scaling in scaling_variants(train_ctx, factor):
            cfg = model.config.replace(rope_scaling=scaling)
            model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, train_ctx)
            curves[label] = per_position_loss(model, windows)
    finally:
        model.rotary = original
    n_buckets = 16
    edges = np.linspace(0, eval_len, n_buckets + 1).astype(int)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = figures.new(width=7.5, height=4)
    rows = []
    for label, ce in curves.items():
        ppl = [math.exp(ce[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
        ax.plot(centers, ppl, "o-", ms=3, label=label)
        spans = [(0, train_ctx), (train_ctx, 2 * train_ctx), (2 * train_ctx, eval_len)]
        rows.append([label] + [math.exp(ce[a:b].mean()) for a, b in spans])
    ax.axvline(train_ctx, color="k", ls=":", lw=1)
    ax.text(train_ctx, ax.get_ylim()[1], " trained context", va="top", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("position in the sequence (bytes)")
    ax.set_ylabel("perplexity per byte (log)")
    ax.set_title(f"Context extension ×{factor} without fine-tuning (small model trained at {train_ctx})")
    ax.legend()
    name = figures.save(fig, lab.out, "rope_context_extension")
    best = min(rows, key=lambda r: r[3])
    none = rows[0]
    sec.figure(name, f"Perplexity by position on held-out Shakespeare for a {model.num_parameters() / 1e6:.2f}M-"
               f"parameter byte-level model trained at a {train_ctx}-byte context ({run.seconds:.0f} s of training), "
               f"evaluated on {eval_len}-byte windows with each rope_scaling type set at evaluation time "
               f"(factor {factor}).",
               f"Beyond the trained context, plain RoPE goes from perplexity {none[1]:.2f} to {none[3]:.2f}; "
               f"{best[0]} does best there ({best[3]:.2f}) with no fine-tuning at all.")
    sec.table(["rope_scaling", f"ppl 0–{train_ctx}", f"ppl {train_ctx}–{2 * train_ctx}",
               f"ppl {2 * train_ctx}–{eval_len}"], rows,
              f"Perplexity per byte by position range ({len(windows)} held-out windows of {eval_len} bytes)")


def section(lab: Lab) -> Section:
    sec = Section("rope", "RoPE — rotary position embedding")
    sec.para("RoPE encodes position by <i>rotating</i> each query and key inside attention (nothing is added to "
             "the embeddings). Every pair of dimensions turns at its own frequency, from one turn every few tokens "
             "to one turn per hundreds of thousands; a dot product of two rotated vectors only sees the angle "
             "between them, i.e. the relative position.")
    sec.math("""
θ_i = rope_theta^(−2i/d),  i = 0 … d/2−1                    (d = head_dim; wavelength λ_i = 2π/θ_i tokens)
RoPE(x, m)[i]       = x[i]·cos(mθ_i) − x[i+d/2]·sin(mθ_i)     (Hugging Face "rotate_half" pairing: i with i+d/2)
RoPE(x, m)[i+d/2]   = x[i]·sin(mθ_i) + x[i+d/2]·cos(mθ_i)
⟨RoPE(q, m), RoPE(k, n)⟩ = Re Σ_i q⁽ⁱ⁾·conj(k⁽ⁱ⁾)·e^{i(m−n)θ_i}   → depends on m − n only
scaling: linear θ_i/s;  dynamic NTK base·(s·L'/L − (s−1))^(d/(d−2));  YaRN/llama3: per-pair mix of θ_i and θ_i/s""")
    sec.code_ref("src/llamalab/model/rope.py", "compute_inv_freq (θ_i for every rope_type), apply_rope, "
                 "RotaryEmbedding; called on q and k in model/attention.py")
    sec.heading("The frequency spectrum")
    spectrum(lab, sec)
    sec.heading("The relative-position property, on this model's own vectors")
    qa, kb = relative_property(lab, sec)
    sec.heading("Long-distance decay")
    decay(lab, sec, qa, kb)
    sec.heading("Context extension: perplexity beyond the trained context")
    context_extension(lab, sec)
    return sec
