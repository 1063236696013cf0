"""`llamalab train CONFIG [--set key=value ...] [--resume]`: train a Llama from scratch (see llamalab.train).

Also under torchrun: ``torchrun --nproc-per-node 2 -m llamalab train configs/shakespeare.toml
--set distributed.strategy=fsdp``.
"""

from __future__ import annotations

import argparse

HELP = "train a Llama from scratch on a corpus (TOML config; torchrun for DDP/FSDP)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="shakespeare",
                   help="TOML config file, or the name of one in configs/ (default: shakespeare)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 --set model.n_layers=4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest valid checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run dir of the same name first")
    p.add_argument("--name", default=None, help="run name (run dir = out_dir/name)")
    p.add_argument("--steps", type=int, default=None, help="shortcut for --set train.steps=N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs still go to log.jsonl)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from llamalab.train import load_config, to_toml, train

    overrides = list(args.overrides)
    if args.name:
        overrides.append(f'name="{args.name}"')
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.print_config:
        print(to_toml(load_config(args.config, overrides)), end="")
        return 0
    train(args.config, overrides, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0
