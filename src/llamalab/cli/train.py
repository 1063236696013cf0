"""`llamalab train [CONFIG] [--data PATH] [--set key=value ...] [--resume]`: train a Llama from scratch
(see llamalab.training.loop and llamalab.training.pretrain).

``llamalab train --data mytext/`` trains the default recipe on your own text (a folder of .txt/.md/.jsonl
files or one file) into ``runs/mytext``; ``llamalab train --resume --name mytext`` continues it on the
same text. Also under torchrun: ``torchrun --nproc-per-node 2 -m llamalab train shakespeare
--set distributed.strategy=fsdp``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

HELP = "train a Llama from scratch on a corpus (TOML config; --data for your own text; torchrun for DDP/FSDP)"
DEFAULT_CONFIG = "shakespeare"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help=f"TOML config file, or a bundled recipe by name: quick, shakespeare, tang, tiny "
                        f"(default: {DEFAULT_CONFIG}; on --resume: the run's own config); a folder or text file "
                        "here means --data")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="train on your own text: a folder of .txt/.md/.jsonl files or a single file "
                        "(run name: the folder's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=200 --set model.n_layers=4 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run from its newest valid checkpoint, with the run's own config")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run of the same name first")
    p.add_argument("--name", default=None, help="run name (run dir = out_dir/name; a plain name)")
    p.add_argument("--steps", type=int, default=None, help="shortcut for --set train.steps=N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs still go to log.jsonl)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _is_data_path(config: str) -> bool:
    """A folder or a non-TOML file is text to train on (a bundled config's name wins over a folder so named)."""

    p = Path(config).expanduser()
    if p.is_file():
        return p.suffix.lower() != ".toml"
    if not p.is_dir():
        return False
    if "/" in config or "\\" in config:
        return True
    from llamalab.assets import bundled_config

    return not ((Path("configs") / f"{config}.toml").is_file() or bundled_config(config) is not None)


def run_name_for(data: str) -> str:
    """A plain run name from a data path: its folder or file stem, with unusual characters replaced."""
    p = Path(data).expanduser().resolve()
    stem = p.name if p.is_dir() else p.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "mytext"


def _run_exists(overrides: list[str], kwargs: dict) -> bool:
    from llamalab.training.config import load_config

    cfg = load_config(None, overrides, **kwargs)
    return (Path(cfg["out_dir"]) / cfg["name"] / "train_config.toml").is_file()


def run(args: argparse.Namespace) -> int:
    from llamalab.errors import LlamalabError
    from llamalab.training.config import load_config, to_toml
    from llamalab.training.pretrain import train

    config, data = args.config, args.data
    if config is not None and _is_data_path(config):
        if data is not None:
            raise LlamalabError(f"{config} is text, not a config, and --data is given too: pass one of them")
        config, data = None, config
    overrides: list[str] = list(args.overrides)
    kwargs: dict = {}
    name = args.name or (run_name_for(data) if data else None)
    if name:
        kwargs["name"] = name
    if data is not None:
        if not Path(data).expanduser().exists():
            raise LlamalabError(f"--data {data}: no such file or folder")
        kwargs["data__corpus"] = str(Path(data).expanduser().resolve())
        if not any(o.split("=", 1)[0].strip() in ("sample.prompts", "prompts") for o in overrides):
            kwargs["sample__prompts"] = []  # sample from the corpus's own held-out text, not the recipe's prompts
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if config is None and not (args.resume and name and _run_exists(overrides, kwargs)):
        config = DEFAULT_CONFIG
    if args.print_config:
        print(to_toml(load_config(config, overrides, **kwargs)), end="")
        return 0
    try:
        train(config, overrides, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
              **kwargs)
    except BrokenPipeError:
        raise
    except OSError as e:  # a read-only or full file system: the checkpoints written so far are intact
        where = f": {e.filename}" if e.filename else ""
        raise LlamalabError(f"{e.strerror or e}{where} (checkpoints already written are intact; free space or "
                            "fix permissions, then --resume)") from None
    return 0
