"""`llamalab finetune --model BASE --data train.jsonl --out DIR`: LoRA (default) or full fine-tuning.

Examples::

    llamalab finetune --model SmolLM2.gguf --data chats.jsonl --out runs/ft --steps 200 --r 8
    llamalab finetune --model BASE --data d.jsonl --out runs/ft --method full --lr 2e-5
    llamalab finetune --model BASE --data d.jsonl --out runs/ft --int8-base --merge
    llamalab generate --model runs/ft/final -p "..."     # the adapter dir names its base

It ends with a summary (steps, losses, trainable parameters, where everything is) and the next
commands to try — chat with the result, merge the adapter into its base, convert to GGUF — each of
which runs as printed. ``--json`` prints the summary as JSON instead (also kept in
``out/finetune_summary.json``).
"""

from __future__ import annotations

import argparse
import json

from llamalab.cli._args import add_model_argument

HELP = "fine-tune a model on JSONL chat data (LoRA adapters in PEFT layout, or full fine-tuning)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, help="base model: HF dir, .gguf file, run dir or smollm2")
    p.add_argument("--data", required=True, help="JSONL: {'messages': [...]} or {'prompt', 'completion'} per line")
    p.add_argument("--val-data", default=None, help="JSONL validation set (default: split off --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of --data held out for validation")
    p.add_argument("--out", required=True, help="run directory (final/ holds the adapter or model)")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=512, help="tokens per example (and per packed row)")
    p.add_argument("--packing", action="store_true", help="pack several examples per row (block-diagonal mask)")
    p.add_argument("--warmup", type=int, default=10, help="warmup steps")
    p.add_argument("--r", "--rank", dest="r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated module names, or all-linear")
    p.add_argument("--int8-base", action="store_true", help="keep the frozen base in int8 (LoRA only)")
    p.add_argument("--merge", action="store_true", help="also write out/merged: base + adapter as one HF model")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this much training time")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from llamalab.data.sft import read_jsonl
    from llamalab.loading import load
    from llamalab.training.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        method=args.method, steps=args.steps, lr=args.lr or (2e-4 if args.method == "lora" else 2e-5),
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len, packing=args.packing,
        val_fraction=args.val_fraction, warmup_steps=args.warmup, precision=args.precision,
        eval_every=args.eval_every, ckpt_every=args.ckpt_every, max_minutes=args.max_minutes, seed=args.seed,
        r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=args.target_modules,
        int8_base=args.int8_base, merge=args.merge)
    data = read_jsonl(args.data)  # check the data before loading the model
    val = read_jsonl(args.val_data) if args.val_data else None
    model, tok = load(args.model, dtype=torch.float32)
    res = finetune(model, tok, [{"messages": m} for m in data], args.out, cfg, base_path=args.model,
                   val_data=[{"messages": m} for m in val] if val else None, resume=args.resume,
                   progress=not args.no_progress)
    if args.json:
        summary = {"final": str(res.final_dir), "merged": str(res.merged_dir) if res.merged_dir else None,
                   "base_model": res.base_model, "trainable_parameters": res.trainable_parameters,
                   "total_parameters": res.total_parameters, "adapter_bytes": res.adapter_bytes,
                   "train_examples": res.n_train, "val_examples": res.n_val, "val_loss_before": res.val_loss_before,
                   "val_loss_after": res.val_loss_after, "steps": res.steps}
        print(json.dumps(summary, indent=2))
    else:
        print(summary_text(res, cfg, _sample_prompt(data)))
    return 0


def _sample_prompt(conversations: list[list[dict[str, str]]]) -> str:
    """A short user message from the data for the printed `generate` line (else a greeting)."""
    for conv in conversations:
        for m in conv:
            text = m["content"].strip()
            if m["role"] == "user" and 0 < len(text) <= 60 and text.isprintable():
                return text
    return "Hello"


def summary_text(res, cfg, prompt: str = "Hello") -> str:  # noqa: ANN001 - FinetuneResult, FinetuneConfig
    """What a finished run reports: figures, where its outputs are, and the commands to try next."""
    from shlex import quote

    lines = [f"done: {res.steps} steps in {res.minutes:.1f} min ({res.tokens_per_s:,.0f} tok/s)"
             + (f", last train loss {res.losses[-1]:.3f}" if res.losses else "")]
    if res.val_loss_after is not None:
        before = f"{res.val_loss_before:.3f} -> " if res.val_loss_before is not None else ""
        lines.append(f"  val loss {before}{res.val_loss_after:.3f} on {res.n_val} held-out example"
                     f"{'s' if res.n_val != 1 else ''} ({res.n_train} trained on)")
    share = 100 * res.trainable_parameters / max(res.total_parameters, 1)
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else ",".join(cfg.target_modules)
    what = f"LoRA r={cfg.r} on {targets}" if res.method == "lora" else "full fine-tuning"
    total = f"{res.total_parameters / 1e6:.1f}M" if res.total_parameters >= 10**6 else f"{res.total_parameters:,}"
    size = "" if not res.adapter_bytes else (f", adapter {res.adapter_bytes / 2**20:.1f} MiB" if res.adapter_bytes
                                            >= 2**20 else f", adapter {res.adapter_bytes / 1024:.1f} KiB")
    lines.append(f"  {what}: {res.trainable_parameters:,} trainable of {total} parameters ({share:.2f}%){size}")
    run_dir, final = res.run_dir, res.final_dir
    lines.append(f"run dir: {run_dir}")
    if res.method == "lora":
        lines.append(f"  adapter:    {final}  (base: {res.base_model})")
    else:
        lines.append(f"  model:      {final}")
    if res.merged_dir is not None:
        lines.append(f"  merged:     {res.merged_dir}  (base + adapter as one HF model)")
    if (run_dir / "loss.png").exists():
        lines.append(f"  loss curve: {run_dir / 'loss.png'}")
    lines.append(f"  summary:    {run_dir / 'finetune_summary.json'}")
    q = quote
    steps = [(f"llamalab chat -m {q(str(final))}", "chat with it"),
             (f"llamalab generate -m {q(str(final))} --chat -p {q(prompt)}", "one answer")]
    if res.method == "lora":
        merged = res.merged_dir
        if merged is None:
            merged = run_dir / "merged"
            steps.append((f"llamalab convert {q(str(final))} {q(str(merged))}", "merge: base + adapter, one HF model"))
        steps.append((f"llamalab convert {q(str(merged))} {q(str(run_dir / 'model.gguf'))}", "GGUF for llama.cpp"))
    else:
        steps.append((f"llamalab convert {q(str(final))} {q(str(run_dir / 'model.gguf'))}", "GGUF for llama.cpp"))
    width = max(len(cmd) for cmd, _ in steps)
    lines.append("next, try:")
    lines += [f"  {cmd.ljust(width)}  # {why}" for cmd, why in steps]
    return "\n".join(lines)
