"""`llamalab <command>`: one entry point. Each command lives in llamalab/commands/<name>.py and defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

Errors meant for the user (:class:`llamalab.errors.LlamalabError`, missing files, bad values) are printed
as one line, ``llamalab <command>: error: <message>``, with exit status 2 — never a traceback.
Set LLAMALAB_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ["demo", "train", "generate", "chat", "eval", "serve", "explain", "convert", "quantize", "finetune",
            "info"]


def _load(name: str):
    try:
        return importlib.import_module(f"llamalab.commands.{name.replace('-', '_')}")
    except ModuleNotFoundError as e:
        if e.name == f"llamalab.commands.{name.replace('-', '_')}":
            return None
        raise


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="llamalab", description="Build, train, run, evaluate, serve and explain "
                                     "Llama-architecture language models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name in COMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    from llamalab.errors import LlamalabError

    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from llamalab import __version__

        print(f"llamalab {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 0
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print(f"\nllamalab {args.command}: interrupted", file=sys.stderr)
        return 130
    except (LlamalabError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if os.environ.get("LLAMALAB_DEBUG"):
            raise
        msg = str(e) if isinstance(e, LlamalabError) else f"{e.strerror or e}: {e.filename}"
        print(f"llamalab {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
