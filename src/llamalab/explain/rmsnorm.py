"""RMSNorm, measured: learned gains, the residual stream's RMS through depth, cost, and an ablation.

Math (Zhang & Sennrich, 2019, arXiv:1910.07467; implementation in model/rmsnorm.py):
    RMSNorm(x) = x / sqrt(mean_j x_j² + eps) ⊙ g
    LayerNorm(x) = (x − mean(x)) / sqrt(var(x) + eps) ⊙ g + b
RMSNorm drops the re-centring and the bias: one reduction instead of two, and a gain only. In a
pre-norm Llama the residual stream h itself is never normalised — every block reads RMSNorm(h) and
adds its output back to h — so h may grow through depth while each block sees unit-RMS inputs
scaled by its learned gain g.
"""

from __future__ import annotations

import numpy as np
import torch

from llamalab.explain import figures
from llamalab.explain.experiments import LayerNorm
from llamalab.explain.report import Lab, Section
from llamalab.explain.timing import interleaved_medians
from llamalab.model.rmsnorm import RMSNorm


def gains(lab: Lab, sec: Section) -> None:
    layers = lab.model.layers
    fig, ax = figures.new(width=8, height=4.2)
    stats = {}
    for attr, color, label in (("input_layernorm", "C0", "input_layernorm (before attention)"),
                               ("post_attention_layernorm", "C1", "post_attention_layernorm (before MLP)")):
        w = [getattr(b, attr).weight.detach().float().cpu().numpy() for b in layers]
        q = np.array([np.percentile(x, [5, 50, 95]) for x in w])
        mx = np.array([np.abs(x).max() for x in w])
        x = np.arange(len(layers))
        ax.fill_between(x, q[:, 0], q[:, 2], color=color, alpha=0.2)
        ax.plot(x, q[:, 1], "o-", color=color, ms=3, label=f"{label}: median, 5–95% band")
        ax.plot(x, mx, "x", color=color, ms=4, label="max |g|")
        stats[attr] = (q[:, 1], mx)
    final = lab.model.norm.weight.detach().float().cpu().numpy()
    ax.set_xlabel("layer")
    ax.set_ylabel("learned gain g (per channel)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_title(f"RMSNorm gains of {lab.model_name} ({lab.config.hidden_size} channels each; dotted: init g=1)")
    ax.legend(ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7)
    name = figures.save(fig, lab.out, "rmsnorm_gains")
    med_in, max_in = stats["input_layernorm"]
    med_post, max_post = stats["post_attention_layernorm"]
    worst = int(np.argmax(np.maximum(max_in, max_post)))
    sec.figure(name, "Distribution of the learned gains g of every RMSNorm, per layer (band: 5th–95th "
               "percentile over channels; crosses: the largest |g|).",
               f"Median gain before attention ranges {med_in.min():.2f}–{med_in.max():.2f} over layers, before the "
               f"MLP {med_post.min():.2f}–{med_post.max():.2f}; the largest |g| is "
               f"{max(max_in.max(), max_post.max()):.1f}"
               f" (layer {worst}); the final norm's median gain is {np.median(final):.2f}. Untrained models have "
               "g = 1 everywhere, so this is learned per-channel emphasis.")


@torch.no_grad()
def residual_rms(lab: Lab, sec: Section) -> None:
    ids, _ = lab.prompt_ids(96)
    model = lab.model
    states: list[torch.Tensor] = []
    normed: list[torch.Tensor] = []
    hooks = [model.embed_tokens.register_forward_hook(lambda m, i, o: states.append(o.float()))]
    for b in model.layers:
        hooks.append(b.register_forward_hook(lambda m, i, o: states.append(o.float())))
        hooks.append(b.input_layernorm.register_forward_hook(lambda m, i, o: normed.append(o.float())))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    rms = torch.stack([s[0].pow(2).mean(-1).sqrt() for s in states])  # (L+1, T)
    nrms = torch.stack([s[0].pow(2).mean(-1).sqrt() for s in normed])  # (L, T)
    x = np.arange(rms.shape[0])
    rest = rms[:, 1:] if rms.shape[1] > 1 else rms
    fig, ax = figures.new(width=8, height=3.8)
    ax.semilogy(x, rest.median(1).values.numpy(), "o-", ms=3, label="residual stream h, median over tokens 1…")
    ax.fill_between(x, rest.min(1).values.numpy(), rest.max(1).values.numpy(), alpha=0.2, label="min–max")
    ax.semilogy(x, rms[:, 0].numpy(), "s--", ms=3, label="residual stream h, first token")
    ax.semilogy(np.arange(nrms.shape[0]), nrms.median(1).values.numpy(), "^-", ms=3,
                label="input_layernorm(h) read by the next block's attention, median")
    ax.set_xlabel("depth (0 = embeddings, i = after block i)")
    ax.set_ylabel("root mean square over channels (log)")
    ax.set_title(f"RMS of the residual stream through depth ({ids.shape[1]}-token prompt)")
    ax.legend(fontsize=7)
    name = figures.save(fig, lab.out, "rmsnorm_residual_rms")
    med = rest.median(1).values
    sec.figure(name, "Root mean square of the residual stream after each block, and of the normalised input that "
               "the next attention actually reads.",
               f"The residual stream's RMS grows {float(med[-1] / med[0]):.0f}× from the embeddings "
               f"({float(med[0]):.3g}) to the last block ({float(med[-1]):.3g}); the first token peaks at "
               f"{float(rms[:, 0].max()):.3g}. RMSNorm hands every block inputs of RMS "
               f"{float(nrms.median(1).values.min()):.2g}–{float(nrms.median(1).values.max()):.2g} whatever the depth.")


def cost(lab: Lab, sec: Section) -> None:
    h = lab.config.hidden_size
    eps = lab.config.rms_norm_eps
    torch.manual_seed(0)
    shapes = [(1, 1), (1, 512)] if not lab.quick else [(1, 1), (1, 64)]
    g = torch.ones(h, requires_grad=True)
    mods = {"RMSNorm (ours)": RMSNorm(h, eps),
            "F.rms_norm (fused)": lambda x: torch.nn.functional.rms_norm(x, (h,), g, eps),
            "LayerNorm (fused)": LayerNorm(h, eps)}
    rows = []
    repeats = 3 if lab.quick else 9
    for B, T in shapes:
        x = torch.randn(B, T, h)
        xg = x.clone().requires_grad_(True)
        with torch.no_grad():
            f = interleaved_medians({k: (lambda m=m, x=x: m(x)) for k, m in mods.items()}, repeats=repeats,
                                    inner=50 if T == 1 else 10)
        fb = interleaved_medians({k: (lambda m=m, xg=xg: m(xg).sum().backward()) for k, m in mods.items()},
                                 repeats=repeats, inner=20 if T == 1 else 5)
        for k in mods:
            rows.append([f"{B}×{T}×{h}", k, f[k] * 1e6, fb[k] * 1e6])
    sec.table(["input (B×T×hidden)", "norm", "forward µs", "forward+backward µs"], rows,
              "Measured cost of one norm (float32, interleaved medians, "
              f"{torch.get_num_threads()} thread(s)). Ours is the readable 4-op version in model/rmsnorm.py; "
              "the fused kernels are PyTorch's.")
    n_norms = 2 * lab.config.n_layers + 1
    big = [r for r in rows if r[0] == rows[-1][0]]
    fused_rms, fused_ln = big[1][2], big[2][2]
    sec.para(f"With equally good kernels (both fused), RMSNorm's forward takes {fused_rms:.0f} µs against LayerNorm's "
             f"{fused_ln:.0f} µs at {big[0][0]} (one reduction instead of two, no bias). Parameters: {h:,} per "
             f"RMSNorm (gain) vs {2 * h:,} per LayerNorm (gain + bias); this model has {n_norms} norms. Either way "
             "the norms cost far less than the matrix multiplies around them (timings on a busy machine vary; "
             "rerun to compare).")


def ablation(lab: Lab, sec: Section) -> None:
    from llamalab.explain.experiments import base_run, experiment_budget, layernorm_run

    budget = experiment_budget(lab)
    runs = {"RMSNorm": base_run(lab), "LayerNorm": layernorm_run(lab)}
    fig, (ax, ax2) = figures.new(2, width=11, height=3.8)
    rows = []
    for (label, run), color in zip(runs.items(), ["C0", "C3"]):
        ax.plot(run.steps, run.train_loss, "-", color=color, label=f"{label} (train, smoothed)")
        ax.plot(run.val_steps, run.val_loss, "o--", ms=3, color=color, label=f"{label} (held-out)")
        rows.append([label, run.model.num_parameters(), run.train_loss[-1], run.val_loss[-1],
                     float(np.exp(run.val_loss[-1])), run.seconds, run.seconds / budget.steps * 1e3])
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(f"Same model, data, seed and budget ({budget.tokens:,} tokens)")
    ax.legend(fontsize=7)
    r, ln = runs["RMSNorm"], runs["LayerNorm"]
    diff = np.array(ln.val_loss) - np.array(r.val_loss)
    ax2.plot(r.val_steps, diff, "o-", ms=3, color="k")
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("held-out loss: LayerNorm − RMSNorm (nats)")
    ax2.set_title("Difference (> 0: RMSNorm ahead)")
    name = figures.save(fig, lab.out, "rmsnorm_ablation")
    sec.figure(name, f"Byte-level models ({r.model.num_parameters() / 1e6:.2f}M parameters, {budget.steps} steps of "
               f"{budget.batch_size}×{budget.seq_len} bytes on Shakespeare) that differ only in the norm.",
               f"Final held-out loss: RMSNorm {r.val_loss[-1]:.3f} vs LayerNorm {ln.val_loss[-1]:.3f} nats/byte "
               f"(difference {diff[-1]:+.3f}); training took {r.seconds:.0f} s and {ln.seconds:.0f} s. At this scale "
               "the two normalisations learn about equally well — RMSNorm's gain is simplicity, not quality.")
    sec.table(["norm", "parameters", "final train loss", "final held-out loss", "held-out ppl/byte", "train time s",
               "ms/step"], rows, "Ablation results (one seed; differences of a few hundredths are within noise; "
              "times are wall clock on this machine, so a busy machine inflates them)")


def section(lab: Lab) -> Section:
    sec = Section("rmsnorm", "RMSNorm — root-mean-square normalisation")
    sec.para("Each block normalises its input before attention and before the MLP (pre-norm), and a final norm "
             "precedes the output head. RMSNorm rescales a vector to unit root mean square and multiplies by a "
             "learned per-channel gain; unlike LayerNorm it neither subtracts the mean nor adds a bias.")
    sec.math("""
RMSNorm(x) = x / sqrt( (1/n)·Σ_j x_j² + eps ) ⊙ g            (n = hidden_size, g learned, eps = rms_norm_eps)
LayerNorm(x) = (x − μ) / sqrt( (1/n)·Σ_j (x_j − μ)² + eps ) ⊙ g + b,   μ = (1/n)·Σ_j x_j
block:  h ← h + Attention(RMSNorm₁(h));   h ← h + SwiGLU(RMSNorm₂(h))      (h itself is never normalised)
invariance: RMSNorm(c·x) = RMSNorm(x) for every c > 0   (up to eps)""")
    sec.code_ref("src/llamalab/model/rmsnorm.py", "RMSNorm (statistics in float32); used in model/llama.py Block "
                 "and Llama.norm. The LayerNorm of the ablation is swapped in by src/llamalab/explain/experiments.py")
    sec.heading("Learned gains")
    gains(lab, sec)
    sec.heading("The residual stream through depth")
    residual_rms(lab, sec)
    sec.heading("Cost against LayerNorm")
    cost(lab, sec)
    sec.heading("Ablation: RMSNorm vs LayerNorm, same budget")
    ablation(lab, sec)
    return sec
