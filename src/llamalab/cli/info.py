"""`llamalab info MODEL`: shapes, parameter count and memory (weights, KV cache).

Sizes are given in the dtype the weights are stored in (on disk: the safetensors/GGUF tensor
types and the file size) and loaded as (in memory: the dtype ``llamalab.load`` gives, named), so a
bf16 checkpoint reads as bf16 and a q8_0 GGUF shows both its file size and its dequantized size.
A quantized model's packed weights (int8 / int4, GGUF blocks and Q4_K / Q6_K super-blocks) count as the
parameters they stand for, and in memory as the bytes they take.
A preset is a random-init shape, measured on the meta device without allocating.
"""

from __future__ import annotations

import argparse
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from llamalab.cli._args import add_model_argument
from llamalab.errors import LlamalabError

HELP = "show a model's shapes, parameter count and memory: stored (file, dtype) and loaded (dtype, KV cache)"

MAX_HEADER = 100 << 20  # a safetensors JSON header larger than this is not a model we describe


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, help="HF dir, .gguf file, run dir, 'smollm2' or a preset name (a random-init shape)")
    p.add_argument("--context", type=int, default=None, help="context length for the KV-cache figure "
                   "(default: the model's)")
    p.add_argument("--dtype", default=None,
                   help="dtype to load the weights as (default: the checkpoint's; a preset: bfloat16)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _safetensors_dtypes(files: list[Path]) -> Counter:
    """Elements per stored dtype, from the safetensors headers (JSON, read without loading tensors)."""
    counts: Counter = Counter()
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                continue
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                continue
            try:
                header = json.loads(fh.read(n))
            except (ValueError, UnicodeDecodeError):
                continue
        for name, t in header.items() if isinstance(header, dict) else ():
            if name != "__metadata__" and isinstance(t, dict):
                numel = 1
                for d in t.get("shape", []):
                    numel *= int(d)
                counts[str(t.get("dtype", "?")).lower()] += numel
    return counts


def stored(path: Path) -> dict[str, Any] | None:
    """{"file_bytes", "dtypes": {dtype: elements}, "format"} for a GGUF file or an HF/run dir; None otherwise."""
    if path.is_file():
        from llamalab.formats.ggml_types import type_name as _type_name
        from llamalab.formats.gguf_reader import read_gguf

        g = read_gguf(path)
        try:
            counts: Counter = Counter()
            for t in g.tensors.values():
                numel = 1
                for d in t.shape:
                    numel *= int(d)
                counts[_type_name(t.type).lower()] += numel
        finally:
            g.close()
        return {"format": "gguf", "file_bytes": path.stat().st_size, "dtypes": dict(counts.most_common())}
    if path.is_dir():
        from llamalab.loading import _resolve_run_dir

        try:
            model_dir = _resolve_run_dir(path)
        except LlamalabError:
            return None
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            return None
        return {"format": "safetensors", "file_bytes": sum(f.stat().st_size for f in files),
                "dtypes": dict(_safetensors_dtypes(files).most_common())}
    return None


def quantized_layers(model: Any) -> dict[str, int]:
    """How many linears of each quantized kind the loaded model holds: GGUF blocks by kind (``q8_0``, ``q4_1``,
    ``q4_0``; k-quant super-blocks ``q4_k``, ``q6_k``), PyTorch's packed ones as ``int8`` / ``int8-g32`` /
    ``int4-g64``..."""
    from llamalab.quantization.linear import QuantizedLinear

    counts: Counter = Counter()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            kind = getattr(m, "kind", None)
            if kind is None:
                group = getattr(m, "group_size", None)
                kind = ("int4" if "Int4" in type(m).__name__ else "int8") + (f"-g{group}" if group else "")
            counts[kind] += 1
    return dict(sorted(counts.items()))


def _describe_dtypes(dtypes: dict[str, int]) -> str:
    total = sum(dtypes.values()) or 1
    def share(v: int) -> str:
        return "<1%" if 0 < v / total < 0.01 else f"{100 * v / total:.0f}%"

    return ", ".join(f"{k} {share(v)}" if len(dtypes) > 1 else k for k, v in dtypes.items())


def run(args: argparse.Namespace) -> int:
    from llamalab.bundled import BUNDLED
    from llamalab.config import PRESETS, LlamaConfig
    from llamalab.formats.hf import resolve_dtype

    if args.context is not None and args.context < 1:
        raise LlamalabError(f"--context must be a positive number of tokens, got {args.context}")
    preset = args.model in PRESETS and not Path(args.model).exists()
    disk = None
    if preset:
        from llamalab.model.llama import Llama

        config = LlamaConfig.from_preset(args.model)
        model = Llama.on_meta(config).to(resolve_dtype(args.dtype or "bfloat16"))
    else:
        from llamalab.loading import load

        path = Path(BUNDLED[args.model]() if args.model in BUNDLED else args.model)
        disk = stored(path)
        model, _ = load(path, dtype=args.dtype)
        config = model.config
    report = model.memory_report(args.context)
    params = model.logical_parameters()
    loaded_dtype = str(model.dtype).removeprefix("torch.")
    quant = getattr(config, "quantization", None)
    layers = quantized_layers(model)
    info = {"n_layers": config.n_layers, "hidden_size": config.hidden_size, "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
            "intermediate_size": config.intermediate_size, "rope_theta": config.rope_theta,
            "rope_scaling": config.rope_scaling, "tie_word_embeddings": config.tie_word_embeddings,
            "max_position_embeddings": config.max_position_embeddings, **report, "parameters": params,
            "loaded_dtype": loaded_dtype, "quantization": quant, "quantized_layers": layers, "stored": disk,
            "random_init_preset": preset}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    kind = "MHA" if config.n_kv_heads == config.n_heads else ("MQA" if config.n_kv_heads == 1 else "GQA")
    print(f"{args.model}: {params / 1e6:.1f}M parameters, {config.n_layers} layers, "
          f"hidden {config.hidden_size}, {config.n_heads} query heads / {config.n_kv_heads} KV heads ({kind}), "
          f"head_dim {config.head_dim}, vocab {config.vocab_size}")
    if preset:
        hint = " (for the pretrained SmolLM2-135M-Instruct use `smollm2`)" if args.model.startswith("smollm2") else ""
        print(f"  a random-init shape preset: no trained weights{hint}")
    if disk is not None:
        print(f"  stored: {disk['file_bytes'] / 2**20:,.1f} MiB {disk['format']} "
              f"({_describe_dtypes(disk['dtypes'])})")
    if quant:
        method = quant.get("method", quant) if isinstance(quant, dict) else quant
        kinds = ", ".join(f"{k.upper() if k.startswith('q') else k} x{n}" for k, n in layers.items())
        loaded_dtype = f"{method} linears ({kinds}), {loaded_dtype} elsewhere"
    kv_kib = report["kv_cache_bytes_per_token"] / 1024
    kv_mib = report["kv_cache_bytes"] / 2**20
    print(f"  in memory ({loaded_dtype}): weights {report['weight_bytes'] / 2**20:,.1f} MiB; "
          f"KV cache {kv_kib:,.1f} KiB/token, {kv_mib:,.1f} MiB at {report['context_len']:,} tokens")
    rs = config.rope_scaling
    print(f"  RoPE: theta {config.rope_theta:g}" + (f", scaling {rs}" if rs else ", no scaling"))
    return 0
