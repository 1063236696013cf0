"""One sequence being generated: the state every generation path keeps per prompt (or per choice).

:func:`~llamalab.generation.generate.generate` / ``stream`` / ``stream_batch``, speculative
decoding (:mod:`llamalab.generation.speculative`) and the server's continuous-batching engine
(:mod:`llamalab.server.engine`) all drive the same :class:`SequenceState`. The loops around it
differ — who owns the KV cache, how rows are batched, how text leaves — but what a sampled token
*means* (is it a stop token? does it complete a stop string? was it the last one allowed? which
text does it release?) is decided here, once.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llamalab.generation.sampling import SamplingParams
from llamalab.generation.text import IncrementalDetokenizer, StopStrings

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.tokenization.protocol import TokenizerProtocol

__all__ = ["SequenceState"]


@dataclass(eq=False)
class SequenceState:
    """A prompt, how to continue it, and what has come out so far; :meth:`accept` takes each sampled token.

    States and transitions (checked in this order)::

        (new) ──► RUNNING
        RUNNING ──accept(t)──► FINISHED "stop"    t is a stop token: counted, not kept; held-back text flushed
        RUNNING ──accept(t)──► FINISHED "stop"    t's text completes a stop string: the text before it only
        RUNNING ──accept(t)──► FINISHED "length"  t is the max_new_tokens-th kept token: held-back text flushed
        RUNNING ──accept(t)──► RUNNING            otherwise: t kept, its complete text released
        FINISHED ─accept(t)──► RuntimeError       (a bug in the loop driving it)

    Every transition returns ``(piece, finished)``: ``piece`` is text safe to show (whole UTF-8
    characters, never the start of a possible stop string), and ``finished`` is True once
    :attr:`finish_reason` is set. :meth:`close` is the flush the finishing transitions use.

    ``tok`` may be None (a model without a tokenizer, prompts given as ids): then no text is
    produced and only stop tokens and ``max_new_tokens`` end the sequence. The caller owns the KV
    cache and the sampling; this object owns ``generator`` (the sequence's RNG, kept across steps so
    a seeded sequence reproduces), and records the log-probabilities it is handed
    (:meth:`record_logprobs`) when its parameters ask for them.
    """

    prompt_ids: list[int]
    params: SamplingParams
    tok: TokenizerProtocol | None
    max_new_tokens: int
    stop: Sequence[str] = ()
    stop_token_ids: Collection[int] = frozenset()
    skip_special_tokens: bool = True
    device: torch.device | str = "cpu"  # where the RNG lives (the device the logits are on)

    token_ids: list[int] = field(default_factory=list, init=False)  # kept tokens (no stop token)
    num_sampled: int = field(default=0, init=False)  # tokens accepted, a final stop token included
    pieces: list[str] = field(default_factory=list, init=False)  # text released, one entry per accept
    finish_reason: str | None = field(default=None, init=False)  # "stop" | "length" once finished
    logprobs: list[float] = field(default_factory=list, init=False)
    top_logprobs: list[dict[int, float]] = field(default_factory=list, init=False)
    stats: dict[str, float] = field(default_factory=dict, init=False)  # set by the loop that ran it

    def __post_init__(self) -> None:
        self.generator = self.params.make_generator(self.device)
        self.detok = (IncrementalDetokenizer(self.tok, self.skip_special_tokens)
                      if self.tok is not None else None)
        self.stops = StopStrings(self.stop)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """All the text released so far."""
        return "".join(self.pieces)

    @property
    def remaining(self) -> int:
        """Tokens that may still be kept before ``max_new_tokens`` ends the sequence."""
        return self.max_new_tokens - len(self.token_ids)

    def accept(self, token: int) -> tuple[str, bool]:
        """Take one sampled token: (the text it releases, whether the sequence is now finished)."""
        if self.finish_reason is not None:
            raise RuntimeError(f"this sequence already finished ({self.finish_reason}); it takes no more tokens")
        self.num_sampled += 1
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
            piece = self.close()
        else:
            self.token_ids.append(token)
            piece = self.detok.add(token) if self.detok is not None else ""
            piece, hit = self.stops.feed(piece) if piece else ("", False)
            if hit:
                self.finish_reason = "stop"
            elif len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                piece += self.close()
        self.pieces.append(piece)
        return piece, self.finish_reason is not None

    def close(self) -> str:
        """The text still held back: the detokenizer's tail (less an incomplete character), then whatever
        the stop matcher held — unless that tail completes a stop string, which then ends it there."""
        tail = self.detok.flush() if self.detok is not None else ""
        piece, hit = self.stops.feed(tail) if tail else ("", False)
        return piece if hit else piece + self.stops.flush()

    def wants_logprobs(self) -> bool:
        return bool(self.params.logprobs or self.params.top_logprobs)

    def record_logprobs(self, logprob: float, top: dict[int, float] | None = None) -> None:
        """Keep the chosen token's log-probability (and the top alternatives', when asked for)."""
        if not self.wants_logprobs():
            return
        self.logprobs.append(float(logprob))
        if self.params.top_logprobs:
            self.top_logprobs.append(top or {})
