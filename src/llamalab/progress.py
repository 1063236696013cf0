"""Progress bars that suit where stderr goes: a live tqdm bar on a terminal, and a plain line every
10% (no ``\\r`` redraws) in a log file or a pipe.

``progress_bar(total=..., desc=..., disable=...)`` takes tqdm's keyword arguments and returns an
object with the part of tqdm's interface the library uses: ``update``, ``set_postfix_str``,
``set_postfix``, ``close`` and use as a context manager.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

LOG_EVERY = 0.10  # share of the total between two plain lines


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's interface, writing ``desc: 30% (300/1,000 tok) 2.1s, loss 3.2`` at every tenth of the way."""

    def __init__(self, total: float | None = None, desc: str | None = None, unit: str = "it", initial: float = 0,
                 file: IO[str] | None = None, disable: bool = False, **_: Any) -> None:
        self.total, self.desc, self.unit, self.n = total, desc or "progress", unit, initial
        self.file, self.disable = file, disable
        self.postfix = ""
        self._t0 = time.perf_counter()
        self._start = initial
        self._next = self._step_after(initial)
        self._closed = False

    def _step_after(self, n: float) -> float:
        if not self.total:
            return float("inf")
        step = self.total * LOG_EVERY
        return (int(n / step) + 1) * step

    def _log(self) -> None:
        if self.disable:
            return
        elapsed = time.perf_counter() - self._t0
        done = f"{self.n:,.0f}/{self.total:,.0f} {self.unit}" if self.total else f"{self.n:,.0f} {self.unit}"
        pct = f"{100 * self.n / self.total:.0f}% " if self.total else ""
        rate = (self.n - self._start) / elapsed if elapsed > 0 else 0.0
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {pct}({done}, {rate:,.1f} {self.unit}/s, {elapsed:.1f}s){tail}",
              file=self.file or sys.stderr, flush=True)

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.n >= self._next:
            self._log()
            self._next = self._step_after(self.n)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed and self.total and self.n < self.total and self.n > self._start:
            self._log()  # stopped early: say where
        self._closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def write(msg: str, file: IO[str] | None = None, **_: Any) -> None:
        print(msg, file=file or sys.stderr, flush=True)


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar when its stream (``file``, default stderr) is a terminal, else a :class:`LineProgress`."""
    stream = kwargs.get("file") or sys.stderr
    if _is_tty(stream):
        from tqdm.auto import tqdm

        return tqdm(**kwargs)
    return LineProgress(**kwargs)
