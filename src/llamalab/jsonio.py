"""Reading JSON and JSONL files with one-line errors that name the file (and line)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamalab.errors import ConfigError, LlamalabError


def read_json_object(path: str | Path, error: type[LlamalabError] = ConfigError) -> dict[str, Any]:
    """The JSON object in a file; ``error`` if it is not valid JSON or not an object."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{path} must hold a JSON object")
    return d


def iter_jsonl(path: str | Path, error: type[LlamalabError] = LlamalabError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; ``error`` names ``file:line`` on bad JSON."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
