"""``--markdown`` and ``--write PATH`` for every benchmark script: its results as a markdown section.

A section is delimited by ``<!-- NAME:start -->`` / ``<!-- NAME:end -->`` (NAME: the script's name,
e.g. ``bench_generate``) and starts with the exact command line that produced it, the date and the
CPU model. ``--write docs/benchmarks.md`` replaces the script's own section there (or appends it
when the file has none yet), so the tables in docs/benchmarks.md are written by the scripts.

    ap = argparse.ArgumentParser(...); _report.add_args(ap); args = ap.parse_args()
    ...
    _report.emit(args, "bench_x", "Title", ["| a | b |", "|---|---|", "| 1 | 2 |"])
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import os
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_SHOWN = ("OMP_NUM_THREADS", "LLAMA_CPP_LIB_PATH", "LLAMALAB_COMPILE", "CUDA_VISIBLE_DEVICES")


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--markdown", action="store_true", help="print the results as a markdown section")
    ap.add_argument("--write", metavar="PATH", default=None,
                    help="write (or replace) this script's section in PATH, e.g. docs/benchmarks.md")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed from the repository root: the variables that change results, the venv
    python, the script path relative to the root, the arguments."""
    argv = list(sys.argv if argv is None else argv)
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENV_SHOWN if k in os.environ]
    exe = Path(sys.executable)
    python = str(exe.relative_to(ROOT)) if ROOT in exe.parents else "python"
    script = Path(argv[0]).resolve()
    script_s = str(script.relative_to(ROOT)) if ROOT in script.parents else argv[0]
    return " ".join(env + [python, script_s] + [shlex.quote(a) for a in argv[1:]])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    extra = ""
    try:
        import torch

        extra = f", torch {torch.__version__}"
        if torch.cuda.is_available():
            extra += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    try:
        load = f"; load average {os.getloadavg()[0]:.1f} when written"
    except OSError:
        load = ""
    return (f"{now}; CPU {cpu_model()} ({os.cpu_count()} logical cores){extra}; Python {platform.python_version()}"
            f"{load}")


def section(name: str, title: str, lines: list[str]) -> str:
    body = [f"<!-- {name}:start -->", f"### {title}", "", f"`{command_line()}`", "", f"{machine_line()}", ""]
    body += list(lines)
    while body and not body[-1].strip():
        body.pop()
    return "\n".join(body + ["<!-- " + name + ":end -->"]) + "\n"


def write_section(path: str | Path, name: str, text: str) -> None:
    """Replace the ``name`` section of the markdown file ``path`` by ``text`` (appended when absent)."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    i, j = old.find(start), old.find(end)
    if i >= 0 and j > i:
        new = old[:i] + text.rstrip("\n") + old[j + len(end):]
    elif i >= 0 or j >= 0:
        raise SystemExit(f"{path}: the {name} section's start and end markers do not match; fix them by hand")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new if new.endswith("\n") else new + "\n", encoding="utf-8")


class _Tee(io.StringIO):
    def __init__(self, out) -> None:
        super().__init__()
        self.out = out

    def write(self, s: str) -> int:
        self.out.write(s)
        return super().write(s)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def capture():
    """``with capture() as buf:`` — stdout still printed, and kept in ``buf`` (``buf.getvalue()``), for a
    script whose tables are its printed output."""
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield tee


def emit(args: argparse.Namespace, name: str, title: str, lines: list[str]) -> None:
    """Print the section (``--markdown``) and/or write it into ``--write PATH``."""
    text = section(name, title, lines)
    if getattr(args, "markdown", False):
        print("\n" + text, end="", flush=True)
    if getattr(args, "write", None):
        write_section(args.write, name, text)
        print(f"wrote the {name} section of {args.write}", file=sys.stderr)
