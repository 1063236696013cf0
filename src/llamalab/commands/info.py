"""`llamalab info MODEL`: shapes, parameter count and memory (weights, KV cache) without allocating."""

from __future__ import annotations

import argparse
import json

HELP = "show a model's shapes, parameter count and memory (a preset is measured on the meta device)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF dir, .gguf file, run dir or preset name")
    p.add_argument("--context", type=int, default=None, help="context length for the KV-cache figure")
    p.add_argument("--dtype", default="bfloat16", help="dtype for the memory figures of a preset")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:

    from llamalab.config import PRESETS, LlamaConfig
    from llamalab.model import Llama
    from llamalab.weights.hf import resolve_dtype

    if args.model in PRESETS:
        config = LlamaConfig.from_preset(args.model)
        model = Llama.on_meta(config).to(resolve_dtype(args.dtype))
    else:
        from llamalab.loading import load

        model, _ = load(args.model)
        config = model.config
    report = model.memory_report(args.context)
    info = {"n_layers": config.n_layers, "hidden_size": config.hidden_size, "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
            "intermediate_size": config.intermediate_size, "rope_theta": config.rope_theta,
            "rope_scaling": config.rope_scaling, "tie_word_embeddings": config.tie_word_embeddings,
            "max_position_embeddings": config.max_position_embeddings, **report}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kind = "MHA" if config.n_kv_heads == config.n_heads else ("MQA" if config.n_kv_heads == 1 else "GQA")
    print(f"{args.model}: {report['parameters'] / 1e6:.1f}M parameters, {config.n_layers} layers, "
          f"hidden {config.hidden_size}, {config.n_heads} query heads / {config.n_kv_heads} KV heads ({kind}), "
          f"head_dim {config.head_dim}, vocab {config.vocab_size}")
    kv_kib = report["kv_cache_bytes_per_token"] / 1024
    kv_mib = report["kv_cache_bytes"] / 2**20
    print(f"  weights: {report['weight_bytes'] / 2**20:,.1f} MiB; KV cache: {kv_kib:,.1f} KiB/token, "
          f"{kv_mib:,.1f} MiB at {report['context_len']:,} tokens")
    rs = config.rope_scaling
    print(f"  RoPE: theta {config.rope_theta:g}" + (f", scaling {rs}" if rs else ", no scaling"))
    return 0
