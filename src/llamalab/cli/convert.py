"""`llamalab convert SRC OUT`: re-write a model in another format.

* ``OUT`` ending in ``.gguf``: a llama-architecture GGUF file for llama.cpp (``--type f32|f16|bf16|q8_0``);
* any other ``OUT``: an HF-layout directory (config.json + safetensors + tokenizer files), ``--dtype``.

``SRC`` (or ``--model SRC``) is anything :func:`llamalab.load` reads that has weights: an HF directory, a
llamalab run dir, a ``.gguf`` file, or ``smollm2`` (the bundled pretrained model).
The command is three small steps — load, transform, write — so that new options slot in as a
transform (e.g. changing the number of KV heads) or as a writer (another output format).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError

HELP = "convert a model: HF dir / run dir / .gguf -> .gguf (f32, f16, bf16, q8_0) or an HF directory"

Transform = Callable[[Any, Any, argparse.Namespace], tuple[Any, Any]]
Writer = Callable[[Any, Any, Path, argparse.Namespace], Path]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", nargs="?", default=None, metavar="SRC",
                   help="HF model dir, llamalab run dir, .gguf file or 'smollm2' (the bundled model); or --model")
    p.add_argument("out", nargs="?", default=None, metavar="OUT",
                   help="OUT.gguf for llama.cpp, or a directory for the HF layout")
    p.add_argument("--model", "-m", default=None, metavar="SRC", help="the source model, as an option")
    p.add_argument("--type", default="f32", choices=("f32", "f16", "bf16", "q8_0"),
                   help="GGUF tensor type (2-D weights; norms stay f32). Default f32")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of an HF-layout output (default: float32)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--to-gqa", type=int, default=None, metavar="N",
                   help="regroup to N key/value heads: mean-pool K/V heads per group (Ainslie et al., 2023; "
                        "uptrain afterwards), or repeat them when N is larger (exact)")


# ---------------------------------------------------------------------------------------------- steps
def load_source(args: argparse.Namespace):
    from llamalab.bundled import BUNDLED
    from llamalab.config import PRESETS
    from llamalab.loading import load

    if args.src in PRESETS and not Path(args.src).exists():
        hint = "; the pretrained SmolLM2-135M-Instruct is `smollm2`" if args.src.startswith("smollm2") else ""
        raise LlamalabError(f"{args.src} is a random-init shape preset, not a model with weights{hint}")
    if args.src not in BUNDLED and not Path(args.src).exists():
        raise LlamalabError(f"no such model: {args.src} (a model dir, run dir, .gguf file or 'smollm2')")
    return load(args.src, dtype="float32")  # float weights (a GGUF file is otherwise kept in its blocks)


def resolve_paths(args: argparse.Namespace) -> None:
    """SRC OUT, or --model SRC OUT: set args.src and args.out."""
    if args.model is not None:
        if args.out is not None:
            raise LlamalabError(f"two sources given: --model {args.model!r} and {args.src!r}; give one")
        args.src, args.out = args.model, args.src
    if args.src is None or args.out is None:
        raise LlamalabError("usage: llamalab convert SRC OUT (OUT.gguf, or a directory for the HF layout)")


# (name, transform) pairs applied in order; each returns the (model, tokenizer) it was given when its
# option is not set. The lead adds e.g. ("to_gqa", _to_gqa) with a `--to-gqa N` argument.
def _to_gqa(model, tok, args: argparse.Namespace):
    if getattr(args, "to_gqa", None) is None:
        return model, tok
    from llamalab.explain.gqa import convert_to_gqa

    return convert_to_gqa(model, args.to_gqa), tok


TRANSFORMS: list[tuple[str, Transform]] = [("to_gqa", _to_gqa)]


def write_gguf(model, tok, out: Path, args: argparse.Namespace) -> Path:
    from llamalab.formats.gguf import save_gguf

    return save_gguf(model, tok, out, type=args.type)


def write_hf(model, tok, out: Path, args: argparse.Namespace) -> Path:
    model.save_pretrained(out, dtype=args.dtype)
    if tok is not None:
        tok.save(out)
    return out


def pick_writer(out: Path) -> Writer:
    return write_gguf if out.suffix.lower() == ".gguf" else write_hf


def check_options(writer: Writer, args: argparse.Namespace) -> None:
    """Refuse option mixes before the (slow) load."""
    if writer is write_gguf and args.dtype is not None:
        raise LlamalabError("--dtype is for HF-layout output; a .gguf output takes --type")
    if writer is write_hf and args.type != "f32":
        raise LlamalabError("--type is for .gguf output; an HF directory takes --dtype")


def _check_out(out: Path, force: bool) -> None:
    if not out.exists() or force:
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise LlamalabError(f"{out} already exists (use --force to overwrite)")


def run(args: argparse.Namespace) -> int:
    resolve_paths(args)
    out = Path(args.out)
    writer = pick_writer(out)
    check_options(writer, args)
    _check_out(out, args.force)
    t0 = time.perf_counter()
    model, tok = load_source(args)
    for _, transform in TRANSFORMS:
        model, tok = transform(model, tok, args)
    written = writer(model, tok, out, args)
    size = sum(f.stat().st_size for f in written.rglob("*") if f.is_file()) if written.is_dir() \
        else written.stat().st_size

    quant = getattr(model.config, "quantization", None)
    method = quant.get("method", quant) if isinstance(quant, dict) else quant
    dtype = f"{method} linears, {args.dtype or 'float32'} elsewhere" if quant else args.dtype or "float32"
    what = f"GGUF {args.type}" if writer is write_gguf else f"HF dir ({dtype})"
    print(f"wrote {written} [{what}, {size / 2**20:,.1f} MiB, {model.logical_parameters() / 1e6:.1f}M parameters"
          f"{', no tokenizer' if tok is None else ''}] in {time.perf_counter() - t0:.1f}s")
    return 0
