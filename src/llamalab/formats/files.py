"""Writing files so that a reader never sees half of one: the one atomic writer.

Every file llamalab writes for later (weights, configs, tokenizers, run records, shards, logs, plots)
goes through :func:`atomic_write`: the content is written to a new temporary file in the same
directory — created with ``O_EXCL`` by :func:`tempfile.mkstemp`, so a symlink planted at any name
cannot redirect the write — then renamed over the destination (``os.replace``, atomic on POSIX).
The file gets the mode a plain ``open()`` would give (0o666 less the umask), not mkstemp's 0o600.
A crash leaves either the old file or the new one, never a torn one; the temporary file is removed
on any error.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask can only swap it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object], fsync: bool = False) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str, fsync: bool = False) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), fsync=fsync)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1, fsync: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent), fsync=fsync)
