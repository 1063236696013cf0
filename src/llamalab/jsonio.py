"""Reading JSON and JSONL files with one-line errors that name the file (and line).

Files are data from anywhere: invalid UTF-8, nesting deep enough to exhaust the parser's recursion,
or numbers with more digits than Python converts all become the caller's one-line error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamalab.errors import ConfigError, LlamalabError


def parse_json(text: bytes | str, where: str, error: type[LlamalabError] = ConfigError) -> Any:
    """The JSON value in ``text``; ``error`` naming ``where`` if it is not valid UTF-8 JSON."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{where} is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{where} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise error(f"{where} is not valid JSON: {str(e).splitlines()[0]}") from None


def read_json_object(path: str | Path, error: type[LlamalabError] = ConfigError) -> dict[str, Any]:
    """The JSON object in a file; ``error`` if it is not valid JSON or not an object."""
    path = Path(path)
    d = parse_json(path.read_bytes(), str(path), error)
    if not isinstance(d, dict):
        raise error(f"{path} must hold a JSON object")
    return d


def iter_jsonl(path: str | Path, error: type[LlamalabError] = LlamalabError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; ``error`` names ``file:line`` on bad JSON."""
    path = Path(path)
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise error(f"{path}:{n}: not valid UTF-8 (byte {e.start} of the line)") from None
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            except (RecursionError, ValueError) as e:
                reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
                raise error(f"{path}:{n}: not valid JSON ({reason})") from None
