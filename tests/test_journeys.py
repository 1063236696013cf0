"""The README as a script: every shell and Python block it shows runs, and so does every command line a
command prints as a next step ("next, try …").

Commands run the way a user types them (``llamalab …`` in a subprocess, from a fresh working folder),
with budgets shrunk so the whole journey fits CI: ``train`` gets a few steps, ``generate``/``chat`` a few
new tokens, ``eval`` a small token budget, ``explain`` its quick mode. Nothing else is changed: a command
that the README shows and that does not run fails this test.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TIMEOUT_S = 600

# (flag, value) pairs that replace or extend a command's own, per command: small enough for CI
BUDGETS: dict[str, list[tuple[str, str | None]]] = {
    "train": [("--steps", "4"), ("--no-progress", None), ("--set", "eval.every=2"), ("--set", "eval.tokens=1024"),
              ("--set", "checkpoint.every=2"), ("--set", "sample.max_new_tokens=8"), ("--set", "sample.count=1"),
              ("--set", "train.batch_size=4"), ("--set", "log.every=1")],
    "generate": [("--max-new-tokens", "8")],
    "chat": [("--max-new-tokens", "8")],
    "eval": [("--max-tokens", "1024"), ("--limit", "4"), ("--no-progress", None)],
    "explain": [("--quick", None)],
}
INTERACTIVE_INPUT = {"chat": "Hello!\n"}


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def shell_commands(block: str) -> list[str]:
    """The `llamalab …` lines of a shell block, comments dropped (`make …` lines are the setup itself)."""
    out = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("llamalab "):
            out.append(line)
    return out


def printed_commands(stdout: str) -> list[str]:
    """Command lines a command printed for the user to try next (``.venv/bin/llamalab …`` or ``llamalab …``)."""
    out = []
    for line in stdout.splitlines():
        line = line.split(" #", 1)[0].strip().removeprefix("$ ")
        line = re.sub(r"^(\S*/)?\.venv/bin/", "", line)
        if line.startswith("llamalab ") and not line.startswith("llamalab serve"):
            out.append(line)
    return out


def with_budget(argv: list[str]) -> list[str]:
    """`argv` (after `llamalab`) with the command's budget flags set (replacing the user's value for a flag)."""
    cmd = argv[0]
    argv = list(argv)
    for flag, value in BUDGETS.get(cmd, []):
        if flag != "--set" and flag in argv:
            i = argv.index(flag)
            if value is not None:
                argv[i + 1] = value
            continue
        argv += [flag] if value is None else [flag, value]
    return argv


def run_llamalab(line: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(line)[1:]
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "llamalab", *with_budget(argv)], cwd=cwd, env=env,
                          input=INTERACTIVE_INPUT.get(argv[0], ""), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"`{line}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"`{line}` printed a traceback:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh, empty folder as a user's working directory (the recipes ship inside the package)."""
    return tmp_path_factory.mktemp("journey")


def test_readme_has_commands():
    commands = [c for b in fenced_blocks(README.read_text(), "bash") for c in shell_commands(b)]
    assert len(commands) >= 5, commands


@pytest.mark.slow
def test_readme_shell_blocks_and_printed_next_steps(workdir: Path):
    """Each README command in order, then every next-step line it printed (each line once)."""
    done: set[str] = set()
    readme = [c for b in fenced_blocks(README.read_text(), "bash") for c in shell_commands(b)]
    for line in readme:
        proc = run_llamalab(line, workdir)
        done.add(line)
        for follow in printed_commands(proc.stdout):
            if follow not in done:
                run_llamalab(follow, workdir)
                done.add(follow)


@pytest.mark.slow
def test_readme_python_blocks(tmp_path: Path):
    for i, block in enumerate(fenced_blocks(README.read_text(), "python")):
        script = tmp_path / f"block{i}.py"
        script.write_text(block)
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert proc.returncode == 0, f"README python block {i} failed:\n{block}\n{proc.stderr[-3000:]}"
