"""`llamalab eval MODEL`: perplexity / bits per byte, KL against a reference, multiple-choice tasks,
generation quality and lm-evaluation-harness tasks, as a table or JSON.

Examples::

    llamalab eval runs/shakespeare                         # the run's own held-out validation split
    llamalab eval smollm2                                  # the bundled corpora's held-out text (capped)
    llamalab eval MODEL --data notes.txt --split validation   # the split `llamalab train` holds out of notes.txt
    llamalab eval MODEL --data notes.txt docs/ --max-tokens 0 --max-length 1024 --stride 512
    llamalab eval q8.gguf --reference model_dir --data shakespeare   # KL divergence + both perplexities
    llamalab eval MODEL --tasks                            # bundled "which line comes next" tasks
    llamalab eval MODEL --prompts prompts.txt --reference big_model   # generation quality
    llamalab eval MODEL --harness llamalab_tang_nextline   # through lm-evaluation-harness
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from llamalab.cli._args import add_model_argument, check_seed, refuse_preset, resolve_device
from llamalab.errors import LlamalabError

HELP = "score a model: perplexity & bits/byte, KL vs a reference, multiple-choice tasks, generation quality"

DEFAULT_CORPORA = ["shakespeare", "tang", "python"]
DEFAULT_MAX_TOKENS = 8192


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--data", nargs="+", metavar="SRC",
                   help="text to score: a file, folder, .jsonl (text field) or a bundled corpus "
                        f"({', '.join(DEFAULT_CORPORA)}). Default when no other mode is chosen: a training "
                        "run's own held-out validation split, else the three bundled corpora' held-out splits")
    p.add_argument("--split", default=None, choices=["validation", "train", "all"],
                   help="which documents of each --data source: the split `llamalab train` makes of it "
                        "(validation = held out) or all. Default: validation for a bundled corpus, all for a path")
    p.add_argument("--reference", metavar="MODEL",
                   help="reference model: KL divergence on --data, perplexity of generations with --prompts")
    p.add_argument("--tasks", nargs="*", metavar="TASK",
                   help="multiple-choice tasks: bundled names or {context, choices, answer} JSONL files "
                        "(no names: all bundled tasks)")
    p.add_argument("--prompts", nargs="?", const="", metavar="FILE",
                   help="generation quality on prompts (one per line, or JSONL 'prompt'; no file: bundled prompts)")
    p.add_argument("--harness", nargs="+", metavar="TASK",
                   help="lm-evaluation-harness tasks (needs lm-eval; bundled: llamalab_<task>); no downloads")
    p.add_argument("--harness-include", metavar="DIR", help="extra folder of harness task YAML")
    p.add_argument("--max-length", type=int, default=None, help="window length in tokens (default min(512, context))")
    p.add_argument("--stride", type=int, default=None, help="window stride (default max-length/2)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"cap on scored tokens per source (default {DEFAULT_MAX_TOKENS}; 0 = no cap, as "
                        "max_tokens=0 in llamalab.eval.perplexity)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="add_bos", action="store_true", default=None,
                     help="start each document with BOS (default: the tokenizer's own policy, else EOS)")
    bos.add_argument("--no-bos", dest="add_bos", action="store_false", help="start each document with EOS, never BOS")
    p.add_argument("--limit", type=int, default=None,
                   help="items per task (multiple choice, harness), prompts for --prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generation (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling / bootstrap seed")
    p.add_argument("--dtype", default="float32", help="compute dtype for the model(s) (default float32)")
    p.add_argument("--reference-dtype", default="float32",
                   help="dtype for the reference (default float32; e.g. judge --dtype bfloat16 against it)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _dtype(name: str) -> str:
    import torch

    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise LlamalabError(f"unknown dtype {name!r} (float32, bfloat16, float16)")
    return name


def _load(path: str, dtype: str, device: str):
    import llamalab

    refuse_preset(path, "evaluate")
    model, tok = llamalab.load(path, dtype=dtype, device=device)
    return model.eval(), tok


def _sources(args: argparse.Namespace, no_mode: bool) -> tuple[list[tuple[str, Any]], str]:
    """[(label, documents)] to score, read before the model loads (a bad path or an empty split fails
    first), and a phrase saying what they are (for the header)."""
    from llamalab.eval.sources import documents, run_data, run_validation, training_run_dir

    if not no_mode:
        srcs = args.data or []
        if not srcs:
            return [], ""
        chosen = [documents(src, args.split) for src in srcs]
        parts = [lab if ":" in lab else f"{lab} (all of it)" for lab, _ in chosen]
        return chosen, ", ".join(parts)
    run_dir = training_run_dir(args.model)
    if run_dir is not None:
        if args.split not in (None, "validation"):
            raise LlamalabError(f"--split {args.split} needs --data: without it a run is scored on its own "
                                "held-out validation split")
        corpus, val_fraction = run_data(run_dir)
        label, docs = run_validation(run_dir)
        return [(label, docs)], (f"{label}, the validation split {run_dir} held out of {corpus} "
                                 f"(val_fraction {val_fraction:g})")
    chosen = [documents(src, args.split) for src in DEFAULT_CORPORA]
    return chosen, ", ".join(lab for lab, _ in chosen) + " (bundled corpora)"


def run(args: argparse.Namespace) -> int:
    import torch

    from llamalab.eval import report

    for name in ("max_length", "stride", "batch_size", "limit", "max_new_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise LlamalabError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.max_tokens < 0:
        raise LlamalabError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    args.dtype, args.reference_dtype = _dtype(args.dtype), _dtype(args.reference_dtype)
    check_seed(args.seed)
    args.device = resolve_device(args.device)

    no_mode = args.data is None and args.tasks is None and args.prompts is None and args.harness is None
    data, what = _sources(args, no_mode)
    progress = not args.no_progress and not args.json
    max_tokens = args.max_tokens or None
    model, tok = _load(args.model, args.dtype, args.device)
    reference = ref_tok = None
    if args.reference:
        reference, ref_tok = _load(args.reference, args.reference_dtype, args.device)

    out: dict[str, Any] = {"model": args.model, "reference": args.reference,
                           "settings": {"max_length": args.max_length, "stride": args.stride,
                                        "max_tokens": max_tokens, "split": args.split, "scored": what,
                                        "dtype": args.dtype,
                                        "reference_dtype": args.reference_dtype if args.reference else None,
                                        "batch_size": args.batch_size}}
    texts: list[str] = []
    with torch.inference_mode():
        if data:
            from llamalab.eval.kl import check_comparable, kl_divergence
            from llamalab.eval.perplexity import perplexity

            if reference is not None:
                check_comparable(model, tok, reference, ref_tok)  # fail before any work
            common = dict(max_length=args.max_length, stride=args.stride, batch_size=args.batch_size,
                          max_tokens=max_tokens, add_bos=args.add_bos, split=args.split, progress=progress,
                          seed=args.seed)
            out["perplexity"] = [perplexity(model, tok, src, label=label, **common).to_dict()
                                 for label, src in data]
            s = out["perplexity"][0]
            out["settings"].update(max_length=s["max_length"], stride=s["stride"])
            texts.append(report.perplexity_table(out["perplexity"]))
            if reference is not None:
                out["kl"] = [kl_divergence(model, tok, reference, ref_tok, src, label=label, **common).to_dict()
                             for label, src in data]
                texts.append(f"KL(reference ‖ model), reference = {args.reference}\n" + report.kl_table(out["kl"]))
        if args.tasks is not None:
            from llamalab.eval.multichoice import builtin_tasks, multiple_choice

            names = args.tasks or list(builtin_tasks())
            out["multiple_choice"] = [multiple_choice(model, tok, t, limit=args.limit, max_length=args.max_length,
                                                      batch_size=max(args.batch_size, 8), add_bos=args.add_bos,
                                                      progress=progress, seed=args.seed).to_dict() for t in names]
            texts.append(report.mc_table(out["multiple_choice"]))
        if args.prompts is not None:
            from llamalab.eval.genquality import generation_quality, load_prompts

            prompts = load_prompts(args.prompts or None)[:args.limit]  # --limit: the first N prompts
            g = generation_quality(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                   reference=reference, ref_tok=ref_tok, reference_name=args.reference or "self")
            out["generation"] = g.to_dict()
            texts.append(report.generation_table(out["generation"]))
    if args.harness:
        from llamalab.eval.harness import LlamalabLM, run_tasks

        lm = LlamalabLM(model, tok, batch_size=args.batch_size, max_length=args.max_length, add_bos=args.add_bos)
        out["harness"] = run_tasks(lm, args.harness, include_path=args.harness_include, limit=args.limit)
        texts.append(report.harness_table(out["harness"]))

    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False, default=str))
        return 0
    print(f"model: {args.model}" + (f"    reference: {args.reference}" if args.reference else ""))
    if data:
        s = out["settings"]
        cap = f", at most {max_tokens:,} tokens per source" if max_tokens else ", every token"
        print(f"window {s['max_length']} tokens, stride {s['stride']}{cap}; scored: {what}")
    print("\n\n".join(texts))
    return 0
