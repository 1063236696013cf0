"""`llamalab quantize --model PATH --to int8|int4 [--group-size 32|64|128] --out DIR`.

Writes a quantized checkpoint (safetensors + ``llamalab_quantization`` in config.json, see
:mod:`llamalab.quantization.quantize`) with the tokenizer, loadable by every command (``llamalab.load``).
"""

from __future__ import annotations

import argparse
import json

from llamalab.cli._args import add_model_argument

HELP = "quantize a model's linear layers to int8 (per channel) or int4 (group-wise) and save it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, help="HF dir, .gguf file, run dir or smollm2")
    p.add_argument("--to", required=True, choices=("int8", "int4"), help="target format")
    p.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128), help="int4 group size")
    p.add_argument("--symmetric", action="store_true", help="int4 without zero points (w = (q-8)*s)")
    p.add_argument("--lm-head", action="store_true", help="also quantize the output head (int8 recommended)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _dir_bytes(path) -> int:
    from pathlib import Path

    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from llamalab.errors import LlamalabError
    from llamalab.loading import load
    from llamalab.quantization.quantize import model_bytes, quantize_model, save_quantized

    out = Path(args.out)
    if out.resolve() == Path(args.model).resolve():
        raise LlamalabError("--out must differ from --model")
    model, tok = load(args.model, dtype=torch.float32)
    before = model_bytes(model)
    quantize_model(model, args.to, group_size=args.group_size, symmetric=args.symmetric,
                   include_lm_head=args.lm_head)
    save_quantized(model, out)
    if tok is not None:
        tok.save(out)
    summary = {"out": str(out), "method": args.to, "quantization": model.config.quantization,
               "source_bytes": _dir_bytes(args.model), "file_bytes": _dir_bytes(out),
               "memory_bytes_float32": before, "memory_bytes": model_bytes(model)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {out}: {args.to}" + (f" (group size {args.group_size})" if args.to == "int4" else "")
              + f", weights file {summary['file_bytes'] / 2**20:.1f} MiB, in memory "
              f"{summary['memory_bytes'] / 2**20:.1f} MiB (float32 {before / 2**20:.1f} MiB)")
    return 0
