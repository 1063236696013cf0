"""Text generation: prefill, decode, stops, streaming, ragged batches, speculative decoding.

Autoregressive decoding factorises p(y | x) = ∏_t p(y_t | x, y_<t). Each prompt is **prefilled**
(its keys/values written into a preallocated :class:`~llamalab.model.attention.KVCache`, in
chunks so long prompts never build a huge attention matrix), then each **decode** step feeds one
token per row and reads the rest from the cache. Rows keep their own cache length, so prompts of
different lengths batch without padding, and a finished row simply drops out of the batch.

Every step is the model's own forward (:class:`~llamalab.generation.runner.Runner`): decode runs
:meth:`Llama.forward_step`, compiled whole over a static cache where that pays and eagerly
otherwise, so hooks, adapters and quantized modules see the same forward in generation as anywhere.

Each prompt's progress is a :class:`~llamalab.generation.sequence.SequenceState` (the same one the
server's engine and speculative decoding drive): it decides what a sampled token means — a stop
token, a completed stop string, the last token allowed — and releases text through an incremental
detokenizer that only lets out complete UTF-8 (a multi-byte character split across byte-level
tokens is held back until its last byte; one still incomplete when generation ends is dropped,
never emitted as U+FFFD) and a stop-string matcher that holds back any tail that could still become
a stop string (both in :mod:`llamalab.generation.text`).

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
from llamalab.generation.sequence import SequenceState

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.model.llama import Llama
    from llamalab.tokenization.protocol import TokenizerProtocol


__all__ = ["Completion", "complete", "generate", "stream", "stream_batch"]

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


# --------------------------------------------------------------------------- the loop
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
    max_len = min(context, max(len(i) for i in ids_list) + max_new_tokens + num_draft_tokens + 1)
    seqs = [SequenceState(ids, plist[i], tok, max_new_tokens=min(max_new_tokens, context - len(ids)), stop=stops,
                          stop_token_ids=stop_ids, skip_special_tokens=skip_special_tokens, device=model.device)
            for i, ids in enumerate(ids_list)]

    if draft_model is not None:
        from llamalab.generation.speculative import speculative_events

        yield from speculative_events(model, draft_model, seqs, max_len, num_draft_tokens,
                                      compile=compile, prefill_chunk=prefill_chunk)
    else:
        yield from _batched_events(model, seqs, max_len, compile, prefill_chunk)
    if results is not None:
        for s in seqs:
            results.append(Completion(text=s.text, token_ids=s.token_ids, finish_reason=s.finish_reason or "length",
                                      prompt_tokens=len(s.prompt_ids),
                                      logprobs=s.logprobs if s.wants_logprobs() else None,
                                      top_logprobs=s.top_logprobs if s.params.top_logprobs else None,
                                      stats=s.stats))


def _batched_events(model: Llama, seqs: list[SequenceState], max_len: int, compile: bool | None,
                    prefill_chunk: int) -> Iterator[tuple[int, str]]:
    """Every sequence in one batch, sequence i in cache row i; a finished one drops out of the next step."""
    dev = model.device
    runner = Runner(model, len(seqs), max_len, compile=compile)
    t0 = time.perf_counter()
    counts = TokenCounts(len(seqs), model.config.vocab_size, dev) if any(s.params.has_penalties for s in seqs) \
        else None
    logits = []
    for i, s in enumerate(seqs):
        logits.append(runner.prefill(i, s.prompt_ids, prefill_chunk))
        if counts is not None:
            counts.reset(i, s.prompt_ids)
    logits_t = torch.stack(logits)
    t1 = time.perf_counter()
    active = list(range(len(seqs)))  # the cache rows (= indices into seqs) still generating
    n_steps = 0
    while active:
        slots = torch.tensor(active, device=dev)
        out = sample(logits_t, [seqs[i].params for i in active], [seqs[i].generator for i in active], counts, slots)
        if counts is not None:
            counts.add(out.tokens, slots)
        toks = out.tokens.tolist()
        still: list[tuple[int, int]] = []  # (row, token to feed it next)
        for j, i in enumerate(active):
            s = seqs[i]
            if out.logprobs is not None and s.wants_logprobs():
                k = s.params.top_logprobs
                s.record_logprobs(float(out.logprobs[j]),
                                  dict(zip(out.top_ids[j, :k].tolist(), out.top_logprobs[j, :k].tolist())) if k
                                  else None)
            piece, finished = s.accept(toks[j])
            if piece:
                yield i, piece
            if not finished:
                still.append((i, toks[j]))
        active = [i for i, _ in still]
        if active:
            logits_t = runner.decode(active, [t for _, t in still])
            n_steps += 1
    t2 = time.perf_counter()
    for s in seqs:
        s.stats = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": n_steps,
                   "prompt_tokens": sum(len(x.prompt_ids) for x in seqs), "compiled": float(runner.compiled)}
        if runner.first_step_s is not None:  # compiling (cold) or loading the cached graph (warm)
            s.stats["first_step_s"] = runner.first_step_s


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
