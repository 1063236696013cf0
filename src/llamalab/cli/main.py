"""`llamalab <command>`: one entry point. Each command lives in llamalab/cli/<name>.py and defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

Building the parser imports no torch (the command modules import their machinery inside ``run``),
so ``llamalab --help`` answers at once.

Errors meant for the user (:class:`llamalab.errors.LlamalabError`, missing files, bad values, a bad
option, a full or read-only disk) are printed as one line, ``llamalab <command>: error: <message>``,
with exit status 2 — never a traceback. Anything else is a bug: one line naming it, exit status 1.
Set LLAMALAB_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

COMMANDS = ["demo", "train", "generate", "chat", "eval", "serve", "explain", "convert", "quantize", "finetune",
            "info"]


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``PROG: error: MESSAGE``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _load(name: str):
    try:
        return importlib.import_module(f"llamalab.cli.{name.replace('-', '_')}")
    except ModuleNotFoundError as e:
        if e.name == f"llamalab.cli.{name.replace('-', '_')}":
            return None
        raise


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = OneLineParser(prog="llamalab", description="Build, train, run, evaluate, serve and explain "
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
    parser.set_defaults(_subparsers=sub.choices)
    return parser, modules


def _os_error_message(e: OSError) -> str:
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is not None:
        return f"{what}: {e.filename}"
    return what


def _quiet_stdout() -> None:
    """When stdout has failed (closed pipe, full disk), send what is still buffered nowhere, so the
    interpreter's final flush does not print a second error."""
    try:
        sys.stdout.flush()
        return  # stdout is fine: the error came from elsewhere
    except (OSError, ValueError):
        pass
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _tolerant_stdout() -> None:
    """Under a locale that cannot show all of Unicode (PYTHONIOENCODING=ascii, LC_ALL=C without UTF-8
    mode), print what the model writes with replacement characters rather than fail mid-stream."""
    enc = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if enc not in ("utf8", "utf8sig") and hasattr(sys.stdout, "reconfigure"):
        try:
            sys.stdout.reconfigure(errors="replace")
        except (ValueError, OSError):
            pass


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except ValueError:  # closed
        pass


def main(argv: list[str] | None = None) -> int:
    from llamalab.cli._args import check_arguments, merge_model
    from llamalab.errors import LlamalabError

    parser, modules = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser, so the line names the command
        (args._subparsers.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.version:
        from llamalab import __version__

        print(f"llamalab {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 0
    debug = bool(os.environ.get("LLAMALAB_DEBUG"))
    _tolerant_stdout()
    prefix = f"llamalab {args.command}: error:"
    try:
        check_arguments(args)
        merge_model(args, args.command)
        status = int(modules[args.command].run(args) or 0)
        _flush_stdout()  # a full disk shows here, not at exit
        return status
    except KeyboardInterrupt:
        print(f"\nllamalab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llamalab generate ... | head`
        _quiet_stdout()
        return 0
    except (LlamalabError, OSError, UnicodeError) as e:
        if debug:
            raise
        if isinstance(e, OSError) and not isinstance(e, LlamalabError):
            msg = _os_error_message(e)
            if msg.startswith(("No space left", "Read-only file system", "Disk quota")) and e.filename is None:
                msg += " (writing the output)"
            _quiet_stdout()
        elif isinstance(e, UnicodeError) and not isinstance(e, LlamalabError):
            msg = f"text encoding error: {e}"
        else:
            msg = str(e)
        print(f"{prefix} {' '.join(msg.split())}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, and how to see the traceback
        if debug:
            raise
        msg = " ".join(str(e).split())[:300]
        print(f"{prefix} internal error: {type(e).__name__}: {msg} (LLAMALAB_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
