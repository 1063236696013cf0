"""Text out of token ids, a piece at a time: an incremental detokenizer and a stop-string matcher.

Both are used by every generation path through :class:`~llamalab.generation.sequence.SequenceState`.
The detokenizer only releases text once it is complete UTF-8 (a multi-byte character split across
byte-level tokens is held back until its last byte; one still incomplete at the end is dropped,
never emitted as U+FFFD); the matcher holds back any tail that could still become a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.tokenization.protocol import TokenizerProtocol

__all__ = ["IncrementalDetokenizer", "StopStrings"]


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always whole characters.

    ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``: decoding a short window keeps the
    cost per token constant and lets SentencePiece-style leading spaces come out right. A window
    ending in U+FFFD (an incomplete UTF-8 sequence of byte tokens) releases nothing yet; at the end
    (:meth:`flush`) such an incomplete tail is dropped.
    """

    def __init__(self, tok: TokenizerProtocol, skip_special_tokens: bool = True) -> None:
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), less an incomplete character at its end."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        tail = after[len(before):] if len(after) > len(before) else ""
        return tail.rstrip("\ufffd")


class StopStrings:
    """Finds user stop strings in streamed text, also when they arrive split across pieces.

    Text that could be the start of a stop string is held back until it is known not to be one, so
    a stop string never leaks into the output.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return piece, False
        buf = self.held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
