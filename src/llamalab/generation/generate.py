"""Text generation: prefill, decode, stops, streaming, ragged batches, speculative decoding.

Autoregressive decoding factorises p(y | x) = ∏_t p(y_t | x, y_<t). Each prompt is **prefilled**
(its keys/values written into a preallocated :class:`~llamalab.model.attention.KVCache`, in
chunks so long prompts never build a huge attention matrix), then each **decode** step feeds one
token per row and reads the rest from the cache. Rows keep their own cache length, so prompts of
different lengths batch without padding, and a finished row simply drops out of the batch.

Every step is the model's own forward (:class:`~llamalab.generation.runner.Runner`): decode runs
:meth:`Llama.forward_step`, compiled whole over a static cache where that pays and eagerly
otherwise, so hooks, adapters and quantized modules see the same forward in generation as anywhere.

Text comes out through an incremental detokenizer that only releases text once it is complete
UTF-8 (a multi-byte character split across byte-level tokens is held back until its last byte;
one still incomplete when generation ends is dropped, never emitted as U+FFFD), and a stop-string
matcher that holds back any tail that could still become a stop string.

Public API::

    llamalab.generate(model, tok, "Once upon a time", max_new_tokens=64, temperature=0.8, seed=0) -> str
    llamalab.generate(model, tok, ["a", "bc"]) -> list[str]         # ragged batch
    for piece in llamalab.stream(model, tok, [{"role": "user", "content": "Hi"}]): print(piece, end="")
    complete(model, tok, prompts, ...) -> list[Completion]           # tokens, finish reasons, logprobs
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llamalab.errors import LlamalabError
from llamalab.generation.runner import PREFILL_CHUNK, Runner
from llamalab.generation.sampling import SamplingParams, TokenCounts, sample

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.model.llama import Llama
    from llamalab.tokenization.protocol import TokenizerProtocol


__all__ = ["Completion", "IncrementalDetokenizer", "Runner", "StopStrings", "complete", "generate", "stream",
           "stream_batch"]

Prompt = str | Sequence[int] | Sequence[dict[str, Any]] | torch.Tensor

_SAMPLING_FIELDS = {f for f in SamplingParams.__dataclass_fields__}


@dataclass
class Completion:
    """One finished sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    stats: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- text pieces
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


DECODE_DTYPES = ("float16", "bfloat16", "float32")


def _check_decode_dtype(dtype: Any) -> None:
    """``decode_dtype`` is accepted for compatibility and ignored (the step runs in the model's dtype)."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    if name is not None and name not in DECODE_DTYPES:
        raise LlamalabError(f"decode_dtype must be one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")


# --------------------------------------------------------------------------- prompts
def encode_prompt(tok: TokenizerProtocol, prompt: Prompt, add_bos: bool | None = None) -> list[int]:
    """A prompt as token ids: text, a list of chat messages ({role, content}), or ids already."""
    if isinstance(prompt, torch.Tensor):
        return [int(i) for i in prompt.flatten().tolist()]
    if isinstance(prompt, str):
        if tok is None:
            raise LlamalabError("this model has no tokenizer: pass token ids as the prompt")
        return list(tok.encode(prompt, add_bos=add_bos))
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        if tok is None:
            raise LlamalabError("this model has no tokenizer: chat messages need one")
        if not getattr(tok, "chat_template", None):
            raise LlamalabError("this tokenizer has no chat template: pass plain text instead of messages")
        for m in prompt:
            if "role" not in m or "content" not in m:
                raise LlamalabError(f"chat messages need 'role' and 'content', got {m!r}")
        out = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(tok.encode(out, add_bos=False)) if isinstance(out, str) else [int(i) for i in out]
    if all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return prompt
    raise LlamalabError("a prompt is a string, a list of token ids, or a list of {role, content} messages")


def stop_token_ids(model: Llama, tok: TokenizerProtocol) -> set[int]:
    """Every id that ends generation: the tokenizer's stop tokens and the config's eos ids."""
    ids = set(model.config.stop_token_ids)
    if tok is not None:
        ids.update(int(i) for i in (getattr(tok, "stop_token_ids", None) or []))
        eos = getattr(tok, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [int(eos)])
    return ids


def _fit_context(ids: list[int], max_new_tokens: int, context: int, truncate: bool) -> list[int]:
    if len(ids) >= context or (truncate and len(ids) + max_new_tokens > context):
        if not truncate:
            raise LlamalabError(f"the prompt has {len(ids)} tokens but the model's context is {context}; "
                                "shorten it or pass truncate=True (--truncate) to keep its end")
        keep = max(1, context - max_new_tokens)
        ids = ids[len(ids) - keep:]
    if not ids:
        raise LlamalabError("the prompt is empty (no tokens)")
    return ids


# --------------------------------------------------------------------------- the engine
class _Row:
    def __init__(self, slot: int, ids: list[int], params: SamplingParams, tok: TokenizerProtocol, stops: Sequence[str],
                 max_new: int, skip_special: bool, device: torch.device) -> None:
        self.slot, self.prompt, self.params, self.max_new = slot, ids, params, max_new
        self.gen = params.make_generator(device)
        self.detok = IncrementalDetokenizer(tok, skip_special) if tok is not None else None
        self.stops = StopStrings(stops)
        self.out: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[float] = []
        self.top: list[dict[int, float]] = []
        self.finish: str | None = None

    def push(self, token: int, stop_ids: set[int]) -> str:
        """Record a sampled token; returns the text it releases (and sets ``finish`` when done)."""
        if token in stop_ids:
            self.finish = "stop"
            piece = self._close()
        else:
            self.out.append(token)
            piece = self.detok.add(token) if self.detok is not None else ""
            piece, hit = self.stops.feed(piece) if piece else ("", False)
            if hit:
                self.finish = "stop"
            elif len(self.out) >= self.max_new:
                self.finish = "length"
                piece += self._close()
        self.text.append(piece)
        return piece

    def _close(self) -> str:
        tail = self.detok.flush() if self.detok is not None else ""
        piece, hit = self.stops.feed(tail) if tail else ("", False)
        return piece if hit else piece + self.stops.flush()


def _make_params(params: SamplingParams | None, kwargs: dict[str, Any]) -> SamplingParams:
    unknown = set(kwargs) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    if params is not None:
        if kwargs:
            from dataclasses import replace

            return replace(params, **kwargs)
        return params
    return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def _events(model: Llama, tok: TokenizerProtocol, prompts: Sequence[Prompt], *, max_new_tokens: int = 64,
            params: SamplingParams | Sequence[SamplingParams] | None = None, stop: Sequence[str] | str | None = None,
            add_bos: bool | None = None, truncate: bool = False, draft_model: torch.nn.Module | None = None,
            num_draft_tokens: int = 4, fast: bool = True, compile: bool | None = None,
            decode_dtype: torch.dtype | str | None = None, skip_special_tokens: bool = True,
            prefill_chunk: int = PREFILL_CHUNK, results: list[Completion] | None = None,
            **sampling: Any) -> Iterator[tuple[int, str]]:
    """The generation loop; yields (prompt index, text piece) and fills ``results`` at the end."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LlamalabError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(params, SamplingParams) or params is None:
        plist = [_make_params(params, sampling)] * len(prompts)
    else:
        plist = [_make_params(p, sampling) for p in params]
        if len(plist) != len(prompts):
            raise LlamalabError(f"{len(plist)} sampling params for {len(prompts)} prompts")
    _check_decode_dtype(decode_dtype)
    if not fast:
        compile = False
    V = model.config.vocab_size
    for p in plist:
        p.validate(V)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    context = model.config.max_position_embeddings
    ids_list = [_fit_context(encode_prompt(tok, p, add_bos), max_new_tokens, context, truncate) for p in prompts]
    for ids in ids_list:
        if max(ids) >= V or min(ids) < 0:
            raise LlamalabError(f"prompt token id {max(ids)} is outside the model's vocabulary ({V})")
    stop_ids = stop_token_ids(model, tok)
    B = len(ids_list)
    max_len = min(context, max(len(i) for i in ids_list) + max_new_tokens + num_draft_tokens + 1)
    dev = model.device
    rows = [_Row(i, ids, plist[i], tok, stops, min(max_new_tokens, context - len(ids)), skip_special_tokens, dev)
            for i, ids in enumerate(ids_list)]

    if draft_model is not None:
        from llamalab.generation.speculative import speculative_events

        yield from speculative_events(model, draft_model, rows, stop_ids, max_len, num_draft_tokens,
                                      compile=compile, prefill_chunk=prefill_chunk)
    else:
        runner = Runner(model, B, max_len, compile=compile)
        t0 = time.perf_counter()
        counts = TokenCounts(B, V, dev) if any(p.has_penalties for p in plist) else None
        logits = []
        for r in rows:
            logits.append(runner.prefill(r.slot, r.prompt, prefill_chunk))
            if counts is not None:
                counts.reset(r.slot, r.prompt)
        logits_t = torch.stack(logits)
        t1 = time.perf_counter()
        active = rows
        n_steps = 0
        while active:
            slots = torch.tensor([r.slot for r in active], device=dev)
            out = sample(logits_t, [r.params for r in active], [r.gen for r in active], counts, slots)
            if counts is not None:
                counts.add(out.tokens, slots)
            toks = out.tokens.tolist()
            for j, r in enumerate(active):
                _record_logprobs(r, out, j)
                piece = r.push(toks[j], stop_ids)
                if piece:
                    yield r.slot, piece
            still = [(r, toks[j]) for j, r in enumerate(active) if r.finish is None]
            active = [r for r, _ in still]
            if active:
                logits_t = runner.decode([r.slot for r in active], [t for _, t in still])
                n_steps += 1
        t2 = time.perf_counter()
        for r in rows:
            r.stats = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": n_steps,
                       "prompt_tokens": sum(len(x.prompt) for x in rows), "compiled": float(runner.compiled)}
            if runner.first_step_s is not None:  # compiling (cold) or loading the cached graph (warm)
                r.stats["first_step_s"] = runner.first_step_s
    if results is not None:
        for r in rows:
            results.append(Completion(text="".join(r.text), token_ids=r.out, finish_reason=r.finish or "length",
                                      prompt_tokens=len(r.prompt),
                                      logprobs=r.logprobs if r.params.logprobs or r.params.top_logprobs else None,
                                      top_logprobs=r.top if r.params.top_logprobs else None,
                                      stats=getattr(r, "stats", {})))


def _record_logprobs(r: _Row, out: Any, j: int) -> None:
    if out.logprobs is not None and (r.params.logprobs or r.params.top_logprobs):
        r.logprobs.append(float(out.logprobs[j]))
        if r.params.top_logprobs:
            k = r.params.top_logprobs
            r.top.append(dict(zip(out.top_ids[j, :k].tolist(), out.top_logprobs[j, :k].tolist())))


# --------------------------------------------------------------------------- public API
def complete(model: Llama, tok: TokenizerProtocol, prompts: Sequence[Prompt], **kwargs: Any) -> list[Completion]:
    """Generate for a batch of prompts (ragged lengths fine); one :class:`Completion` per prompt.

    Options: ``max_new_tokens``, ``stop`` (strings), ``params`` (a :class:`SamplingParams` or one per
    prompt) or its fields as keywords (``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``repetition_penalty``, ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``seed``,
    ``logprobs``, ``top_logprobs``), ``add_bos``, ``truncate`` (keep the prompt's end when it does not
    fit the context instead of raising), ``draft_model`` + ``num_draft_tokens`` (speculative
    decoding), ``compile`` (True / False: run the decode step compiled whole or eagerly; default: the
    ``LLAMALAB_COMPILE`` environment variable, else on where it pays — see :mod:`llamalab.generation.runner`),
    ``fast=False`` (same as ``compile=False``), ``decode_dtype`` (accepted, ignored),
    ``skip_special_tokens``, ``prefill_chunk``.
    """
    results: list[Completion] = []
    for _ in _events(model, tok, prompts, results=results, **kwargs):
        pass
    return results


def generate(model: Llama, tok: TokenizerProtocol, prompt: Prompt | Sequence[str], **kwargs: Any) -> str | list[str]:
    """Generated text for a prompt (a list of strings: a batch, returns a list). See :func:`complete`."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return [c.text for c in complete(model, tok, list(prompt), **kwargs)]
    return complete(model, tok, [prompt], **kwargs)[0].text


def stream(model: Llama, tok: TokenizerProtocol, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
    """Yields the generated text piece by piece, each piece whole UTF-8 characters."""
    for _, piece in _events(model, tok, [prompt], **kwargs):
        yield piece


def stream_batch(model: Llama, tok: TokenizerProtocol, prompts: Sequence[Prompt],
                 results: list[Completion] | None = None, **kwargs: Any) -> Iterator[tuple[int, str]]:
    """Yields (prompt index, piece) as a batch generates; ``results`` gets the completions at the end."""
    yield from _events(model, tok, prompts, results=results, **kwargs)
