"""Grouped-query attention, measured: KV-cache sizes, decode speed, and MHA → GQA conversion.

GQA (Ainslie et al., 2023, arXiv:2305.13245) lets groups of n_rep = n_heads / n_kv_heads query heads
share one key/value head. The KV cache per token is

    bytes/token = 2 (K and V) · n_layers · n_kv_heads · head_dim · bytes_per_element

so MHA (n_kv_heads = n_heads) → GQA → MQA (n_kv_heads = 1; Shazeer, 2019) shrinks it by n_rep.

:func:`convert_to_gqa` turns a checkpoint with more KV heads into one with fewer by *mean-pooling*
the key and value projection heads of each group (the paper's best initialisation), after which a
short "uptraining" (≈5% of the original budget in the paper) recovers most of the quality. Asked for
*more* KV heads than the model has, it repeats each head instead, which is exact (the same function).
"""

from __future__ import annotations

import math

import torch

from llamalab.config import LlamaConfig
from llamalab.errors import ConfigError
from llamalab.explain import figures
from llamalab.explain.report import Lab, Section
from llamalab.explain.timing import interleaved_medians
from llamalab.model.llama import Llama


def _regroup(weight: torch.Tensor, old_heads: int, new_heads: int, head_dim: int) -> torch.Tensor:
    """(old_heads·head_dim, in) → (new_heads·head_dim, in): mean over consecutive heads, or repeat."""
    w = weight.detach().float().view(old_heads, head_dim, -1)
    if new_heads <= old_heads:
        w = w.view(new_heads, old_heads // new_heads, head_dim, -1).mean(1)
    else:
        w = w.repeat_interleave(new_heads // old_heads, dim=0)
    return w.reshape(new_heads * head_dim, -1).to(weight.dtype)


def convert_to_gqa(model: Llama, n_kv_heads: int) -> Llama:
    """A new model with ``n_kv_heads`` key/value heads: K/V heads mean-pooled per group (Ainslie et al.).

    Query head h uses KV head h // (n_heads / n_kv_heads) before and after, so the pooled head g is
    the mean of the old KV heads that query heads of group g used. Everything else is copied.
    """
    cfg = model.config
    if cfg.quantization:
        raise ConfigError("convert_to_gqa needs an unquantized model (dequantize it first)")
    if not isinstance(n_kv_heads, int) or n_kv_heads <= 0 or cfg.n_heads % n_kv_heads:
        raise ConfigError(f"--to-gqa {n_kv_heads}: the number of KV heads must divide n_heads ({cfg.n_heads})")
    old = cfg.n_kv_heads
    if old % n_kv_heads and n_kv_heads % old:
        raise ConfigError(f"cannot regroup {old} KV heads into {n_kv_heads}: one must divide the other")
    new_cfg = cfg.replace(n_kv_heads=n_kv_heads, head_dim=cfg.head_dim)
    new = Llama.on_meta(new_cfg)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensor = _regroup(tensor, old, n_kv_heads, cfg.head_dim)
        state[name] = tensor.detach().clone()
    new = new.to_empty(device=model.device).to(model.dtype)
    new.load_state_dict(state, strict=False, assign=False)
    new.tie_weights()
    missing = set(new.state_dict()) - set(state)
    if missing:
        raise ConfigError(f"convert_to_gqa: weights missing after conversion: {sorted(missing)[:3]}")
    return new.eval()


def keep_first_head(model: Llama, n_kv_heads: int) -> Llama:
    """The paper's weaker initialisation: each group keeps its first K/V head instead of the mean."""
    new = convert_to_gqa(model, n_kv_heads)
    old, hd = model.config.n_kv_heads, model.config.head_dim
    with torch.no_grad():
        for src, dst in zip(model.layers, new.layers):
            for name in ("k_proj", "v_proj"):
                w = getattr(src.self_attn, name).weight.view(old, hd, -1)[:: old // n_kv_heads]
                getattr(dst.self_attn, name).weight.copy_(w.reshape(n_kv_heads * hd, -1))
    return new


# ============================================================================ the report section
def _kind(n_heads: int, n_kv: int) -> str:
    return "MHA" if n_kv == n_heads else ("MQA" if n_kv == 1 else "GQA")


def kv_sizes(lab: Lab, sec: Section) -> None:
    shapes = [(f"this model ({lab.model_name})", lab.config)] + [
        (name, LlamaConfig.from_preset(name)) for name in ("llama3.2-1b", "llama3.1-8b", "llama3.1-70b")]
    rows, bars = [], []
    for label, cfg in shapes:
        for n_kv in sorted({cfg.n_heads, cfg.n_kv_heads, 1}, reverse=True):
            c = cfg.replace(n_kv_heads=n_kv, head_dim=cfg.head_dim)
            per_tok = c.kv_cache_bytes_per_token(2)
            full = per_tok * c.max_position_embeddings
            tag = _kind(c.n_heads, n_kv) + (" (as shipped)" if n_kv == cfg.n_kv_heads else "")
            rows.append([label, tag, f"{c.n_heads}/{n_kv}", per_tok / 1024, c.max_position_embeddings,
                         full / 2**30])
            bars.append((label, _kind(c.n_heads, n_kv), full / 2**30, n_kv == cfg.n_kv_heads))
    sec.table(["model", "attention", "q/kv heads", "KV cache KiB per token (bf16)", "context (tokens)",
               "KV cache GiB at full context"], rows,
              "KV-cache size = 2 · n_layers · n_kv_heads · head_dim · 2 bytes per token (LlamaConfig."
              "kv_cache_bytes_per_token), one sequence")
    fig, ax = figures.new(width=8, height=3.6)
    labels = [lab for lab, _ in shapes]
    colors = {"MHA": "C3", "GQA": "C0", "MQA": "C2"}
    width = 0.27
    for j, kind in enumerate(("MHA", "GQA", "MQA")):
        xs, ys = [], []
        for i, label in enumerate(labels):
            for lab_, k, gib, _ in bars:
                if lab_ == label and k == kind:
                    xs.append(i + (j - 1) * width)
                    ys.append(gib)
        ax.bar(xs, ys, width, color=colors[kind], label=kind)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), [lab.replace(" (", "\n(") for lab in labels], fontsize=8)
    ax.set_ylabel("KV cache at full context (GiB, bf16, log)")
    ax.set_title("KV cache of one full-length sequence: MHA vs GQA vs MQA")
    ax.legend()
    name = figures.save(fig, lab.out, "gqa_kv_cache")
    c8 = LlamaConfig.from_preset("llama3.1-8b")
    mha = c8.replace(n_kv_heads=c8.n_heads).kv_cache_bytes_per_token(2) * c8.max_position_embeddings / 2**30
    gqa = c8.kv_cache_bytes_per_token(2) * c8.max_position_embeddings / 2**30
    sec.figure(name, "KV-cache bytes for one sequence at each model's full context length, if the model used MHA, "
               "its shipped GQA, or MQA (bf16 cache).",
               f"At 128k tokens Llama-3.1-8B's GQA cache takes {gqa:.0f} GiB instead of {mha:.0f} GiB with MHA — "
               f"{mha / gqa:.0f}× less; its bf16 weights take {c8.num_parameters() * 2 / 2**30:.0f} GiB.")


@torch.no_grad()
def decode_speed(lab: Lab, sec: Section) -> None:
    model, cfg = lab.model, lab.config
    variants = {}
    for n_kv in sorted({cfg.n_heads, cfg.n_kv_heads, 1}, reverse=True):
        variants[f"{_kind(cfg.n_heads, n_kv)} ({n_kv} KV heads)"] = (
            model if n_kv == cfg.n_kv_heads else convert_to_gqa(model, n_kv))
    limit = cfg.max_position_embeddings
    contexts = [c for c in ((16, 64) if lab.quick else (256, 1024, 4096)) if c < limit] or [limit // 2]
    speed: dict[str, list[float]] = {k: [] for k in variants}
    mem: dict[str, list[float]] = {k: [] for k in variants}
    tok = torch.tensor([[1 % cfg.vocab_size]], device=model.device)
    gen = torch.Generator().manual_seed(0)
    for ctx in contexts:
        caches = {}
        for name, m in variants.items():
            cache = m.new_cache(1, ctx + 1, dtype=m.dtype)
            # a context of `ctx` tokens already in the cache (random keys/values: the cost is the same)
            for t in cache.k_layers + cache.v_layers:
                t[:, :, :ctx].copy_(torch.randn(t[:, :, :ctx].shape, generator=gen))
            cache.valid[:, :ctx] = True
            caches[name] = cache
            mem[name].append(cache.nbytes() * ctx / (ctx + 1) / 2**20)

        def step(m, cache, ctx=ctx):
            def fn():
                cache.lengths.fill_(ctx)
                m(tok, cache=cache, last_only=True)
            return fn

        t = interleaved_medians({n: step(variants[n], caches[n]) for n in variants},
                                repeats=3 if lab.quick else 5, inner=2 if lab.quick else 3)
        for name in variants:
            speed[name].append(1.0 / t[name])
        del caches
    fig, (ax, ax2) = figures.new(2, width=11, height=3.8)
    for name in variants:
        ax.plot(contexts, speed[name], "o-", label=name)
        ax2.plot(contexts, mem[name], "o-", label=name)
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("tokens already in the KV cache (log)")
        a.legend()
    ax.set_ylabel("decode speed (tokens/s, batch 1)")
    ax.set_title(f"Measured decode speed, {str(model.dtype).replace('torch.', '')}")
    ax2.set_ylabel(f"KV cache ({str(model.dtype).replace('torch.', '')}), MiB")
    ax2.set_yscale("log")
    ax2.set_title("KV-cache memory held (measured tensor sizes)")
    name = figures.save(fig, lab.out, "gqa_decode")
    names = list(variants)
    first, last = names[0], names[-1]
    rows = [[n] + [f"{s:.1f} tok/s, {m:,.1f} MiB" for s, m in zip(speed[n], mem[n])] for n in names]
    sec.figure(name, f"One decode step (batch 1) of {lab.model_name} after a context of N tokens, for variants of "
               "the same weights with fewer or more KV heads (convert_to_gqa; the MHA variant repeats heads and "
               f"computes the same function). Interleaved medians, {torch.get_num_threads()} thread(s).",
               f"At {contexts[-1]:,} tokens {last} decodes at {speed[last][-1]:.1f} tok/s vs {first} at "
               f"{speed[first][-1]:.1f} tok/s ({speed[last][-1] / speed[first][-1]:.2f}×), holding "
               f"{mem[first][-1] / mem[last][-1]:.0f}× less cache; at {contexts[0]:,} tokens the weights dominate "
               f"and the gap is {speed[last][0] / speed[first][0]:.2f}×.")
    sec.table(["variant"] + [f"context {c:,}" for c in contexts], rows, "Decode speed and KV-cache memory")


def _ppl(model: Llama, windows: torch.Tensor) -> float:
    from llamalab.explain.rope import per_position_loss

    return float(math.exp(per_position_loss(model, windows).mean()))


def conversion(lab: Lab, sec: Section) -> None:
    from llamalab.explain.experiments import base_run, corpus, experiment_budget, gqa_scratch_run
    from llamalab.explain.trainer import Budget, train

    budget = experiment_budget(lab)
    data = corpus(lab)
    windows = data.val_windows(16 if lab.quick else 128, budget.seq_len)
    mha = base_run(lab)
    scratch = gqa_scratch_run(lab)
    up_steps = max(2, budget.steps // 10)
    up_budget = Budget(steps=up_steps, batch_size=budget.batch_size, seq_len=budget.seq_len, lr=budget.lr * 0.3,
                       warmup=max(1, up_steps // 10), eval_every=max(1, up_steps // 6),
                       eval_windows=budget.eval_windows)
    rows = [["MHA (4 KV heads), trained", budget.steps, "—", _ppl(mha.model, windows), mha.seconds]]
    curves = {}
    for n_kv in (2, 1):
        kind = _kind(mha.model.config.n_heads, n_kv)
        first = keep_first_head(mha.model, n_kv)
        pooled = convert_to_gqa(mha.model, n_kv)
        before = _ppl(pooled, windows)
        up = train(pooled, data, up_budget, seed=1)
        rows.append([f"{kind} ({n_kv}) by keeping the first head, no uptraining", 0, "—", _ppl(first, windows),
                     0.0])
        rows.append([f"{kind} ({n_kv}) mean-pooled, before uptraining", 0, "—", before, 0.0])
        rows.append([f"{kind} ({n_kv}) mean-pooled + uptraining", up_steps, f"{100 * up_steps / budget.steps:.0f}%",
                     _ppl(pooled, windows), up.seconds])
        curves[f"{kind} ({n_kv} KV heads) mean-pooled"] = (before, up)
    rows.append(["GQA (2) from scratch, same budget as MHA (the converted ones had MHA's + 10%)",
                 budget.steps, "100%", _ppl(scratch.model, windows),
                 scratch.seconds])
    sec.table(["model", "training steps", "of MHA budget", "held-out ppl/byte", "train time s"], rows,
              f"Mean-pool conversion on a small byte-level model ({mha.model.num_parameters() / 1e6:.2f}M parameters, "
              f"4 heads), perplexity on {len(windows)} held-out windows of {budget.seq_len} bytes")
    fig, ax = figures.new(width=7.5, height=3.8)
    for (label, (before, up)), color in zip(curves.items(), ["C0", "C2"]):
        ax.plot([0] + up.val_steps, [math.log(before)] + up.val_loss, "o-", ms=3, color=color, label=label)
    ax.axhline(mha.val_loss[-1], color="C3", ls="--", label="MHA (before conversion)")
    ax.axhline(scratch.val_loss[-1], color="k", ls=":", label="GQA (2) from scratch, full budget")
    ax.set_xlabel("uptraining step")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title(f"Uptraining after mean-pooling K/V heads ({up_steps} steps = "
                 f"{100 * up_steps / budget.steps:.0f}% of the MHA budget)")
    ax.legend(fontsize=7)
    name = figures.save(fig, lab.out, "gqa_uptraining")
    r_mha, r_up = rows[0][3], rows[3][3]
    sec.figure(name, "Held-out loss while uptraining the converted models (step 0 = right after mean-pooling).",
               f"Mean-pooling to 2 KV heads moves perplexity from {r_mha:.2f} to {rows[2][3]:.2f}; "
               f"{up_steps} uptraining steps bring it to {r_up:.2f}, against {rows[-1][3]:.2f} for GQA trained "
               "from scratch with the full budget.")


@torch.no_grad()
def real_model_pooling(lab: Lab, sec: Section) -> None:
    from llamalab.explain.corpus import ByteCorpus

    model, cfg = lab.model, lab.config
    if lab.tok is None:
        sec.para("The model has no tokenizer, so the pooling check on real text is skipped.")
        return
    text = bytes(ByteCorpus(max_bytes=400_000).val[:6000].tolist()).decode("latin-1")
    ids = lab.tok.encode(text)[: 128 if lab.quick else 512]
    windows = torch.tensor([ids], device=model.device)
    rows = []
    for n_kv in sorted({cfg.n_heads, cfg.n_kv_heads, *(d for d in (cfg.n_kv_heads // 2, 1) if d >= 1 and
                                                     cfg.n_kv_heads % d == 0)}, reverse=True):
        m = model if n_kv == cfg.n_kv_heads else convert_to_gqa(model, n_kv)
        note = "as shipped" if n_kv == cfg.n_kv_heads else ("heads repeated (exact)" if n_kv > cfg.n_kv_heads
                                                            else "mean-pooled, no uptraining")
        rows.append([f"{_kind(cfg.n_heads, n_kv)} ({n_kv} KV heads)", note, _ppl(m, windows),
                     m.config.kv_cache_bytes_per_token(2) / 1024])
    sec.table(["variant of " + lab.model_name, "how", "perplexity (held-out Shakespeare)", "KV KiB/token (bf16)"],
              rows, f"convert_to_gqa on the real model, {windows.shape[1]} tokens")


def section(lab: Lab) -> Section:
    sec = Section("gqa", "GQA — grouped-query attention")
    sec.para("Attention reads the keys and values of every earlier token, so generation keeps them in a KV cache. "
             "With GQA several query heads share one key/value head: the queries stay as expressive, the cache "
             "shrinks by the group size. MHA and MQA are its two extremes.")
    sec.math("""
for query head h = 0 … n_heads−1,   g(h) = h // n_rep,   n_rep = n_heads / n_kv_heads
out_h = softmax( RoPE(Q_h) · RoPE(K_g(h))ᵀ / √head_dim + causal mask ) · V_g(h)
KV cache = 2 (K, V) · n_layers · n_kv_heads · head_dim · bytes_per_element   per token
MHA → GQA (Ainslie et al., 2023):  W_K,g ← mean of W_K,j over the heads j of group g (same for W_V), then uptrain""")
    sec.code_ref("src/llamalab/model/attention.py", "GroupedQueryAttention (SDPA with enable_gqa, or a "
                 "grouped view of the queries — K/V are never copied per query head), KVCache; conversion: "
                 "src/llamalab/explain/gqa.py convert_to_gqa")
    sec.heading("KV-cache size: this model and real shapes")
    kv_sizes(lab, sec)
    sec.heading("Decode speed and memory: MHA vs GQA vs MQA of the same model")
    decode_speed(lab, sec)
    sec.heading("Converting MHA to GQA by mean-pooling, then uptraining")
    conversion(lab, sec)
    real_model_pooling(lab, sec)
    return sec
