"""`llamalab finetune --model BASE --data train.jsonl --out DIR`: LoRA (default) or full fine-tuning.

Examples::

    llamalab finetune --model SmolLM2.gguf --data chats.jsonl --out runs/ft --steps 200 --r 8
    llamalab finetune --model BASE --data d.jsonl --out runs/ft --method full --lr 2e-5
    llamalab finetune --model BASE --data d.jsonl --out runs/ft --int8-base --merge
    llamalab generate runs/ft/final --prompt "..."      # the adapter dir names its base
"""

from __future__ import annotations

import argparse
import json

from llamalab.commands._args import add_model_argument

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


def run(args: argparse.Namespace) -> int:
    import torch

    from llamalab.finetune import FinetuneConfig, finetune, read_jsonl
    from llamalab.loading import load

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
    summary = {"final": str(res.final_dir), "merged": str(res.merged_dir) if res.merged_dir else None,
               "trainable_parameters": res.trainable_parameters, "total_parameters": res.total_parameters,
               "adapter_bytes": res.adapter_bytes, "train_examples": res.n_train, "val_examples": res.n_val,
               "val_loss_before": res.val_loss_before, "val_loss_after": res.val_loss_after, "steps": res.steps}
    print(json.dumps(summary, indent=2))
    return 0
