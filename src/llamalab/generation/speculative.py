"""Speculative decoding (Leviathan et al., 2023, arXiv:2211.17192; Chen et al., 2023, arXiv:2302.01318).

A small *draft* model sharing the target's tokenizer proposes k tokens greedily, one cheap step
each; the *target* then scores all of them in one forward pass over k+1 positions (the same cost
as one memory-bound decode step, since the weights are read once). With greedy decoding the rule
is exact: accept the longest prefix of the draft that equals the target's own argmax at each
position, then append the target's argmax after it (the "bonus" token). Every round therefore
yields between 1 and k+1 tokens, all of them exactly what the target alone would have produced;
both KV caches are rolled back past the rejected tokens (only their fill lengths move).

    expected speed-up ≈ E[tokens per round] / (k · c_draft + c_verify)     (costs in target steps)

:func:`early_exit_draft` builds a draft from the target itself — its first n layers plus its own
final norm and head (self-speculative decoding, cf. LayerSkip, Elhoushi et al., 2024) — for when
no smaller sibling model is at hand.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from llamalab.errors import LlamalabError
from llamalab.generation.sampling import argmax

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.generation.sequence import SequenceState
    from llamalab.model.llama import Llama


def early_exit_draft(model: Llama, n_layers: int) -> torch.nn.Module:
    """A draft that runs only the first ``n_layers`` blocks of ``model`` (weights shared, not copied)."""
    if not 0 < n_layers <= model.config.n_layers:
        raise LlamalabError(f"draft layers must be in [1, {model.config.n_layers}], got {n_layers}")
    draft = copy.copy(model)  # shallow: shares every parameter tensor
    draft._modules = dict(model._modules)
    draft.layers = torch.nn.ModuleList(list(model.layers)[:n_layers])
    draft.config = model.config.replace(n_layers=n_layers)
    return draft


def check_compatible(target: torch.nn.Module, draft: torch.nn.Module) -> None:
    if draft.config.vocab_size != target.config.vocab_size:
        raise LlamalabError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                            f"({target.config.vocab_size}): speculative decoding needs the same tokenizer")


def speculative_events(target: torch.nn.Module, draft: torch.nn.Module, seqs: Sequence[SequenceState],
                       max_len: int, k: int = 4, compile: bool | None = None,
                       prefill_chunk: int = 512) -> Iterator[tuple[int, str]]:
    """Greedy speculative generation for each sequence in turn; yields (index in ``seqs``, text piece).

    Each sequence takes the target's tokens through :meth:`SequenceState.accept` (which decides stops
    and ``max_new_tokens``) and gets ``stats`` = {"proposed", "accepted", "acceptance_rate",
    "target_steps", "tokens_per_step"}.
    """
    from llamalab.generation.runner import Runner

    check_compatible(target, draft)
    if k < 1:
        raise LlamalabError(f"num_draft_tokens must be >= 1, got {k}")
    for s in seqs:
        p = s.params
        if not p.greedy or p.has_penalties or p.logit_bias:
            raise LlamalabError("speculative decoding (--draft-model) supports greedy decoding only "
                                "(temperature 0, no penalties or logit bias)")
    t_run = Runner(target, 1, max_len, compile=False)  # verifies k+1 tokens per call: the eager forward
    d_run = Runner(draft, 1, max_len, compile=compile)
    for i, s in enumerate(seqs):
        t_run.cache.reset()
        d_run.cache.reset()
        proposed = accepted = steps = 0
        last = int(argmax(t_run.prefill(0, s.prompt_ids, prefill_chunk)))
        d_run.prefill(0, s.prompt_ids, prefill_chunk)
        piece, finished = s.accept(last)
        if piece:
            yield i, piece
        while not finished:
            base = t_run.length(0)  # both caches hold prompt + accepted tokens except `last`
            room = min(k, max_len - base - 1, s.remaining)
            guesses: list[int] = []
            tok = last
            for _ in range(max(room, 0)):
                tok = int(argmax(d_run.decode([0], [tok])[0]))
                guesses.append(tok)
            logits = t_run.prefill(0, [last] + guesses, all_logits=True)  # (n+1, V)
            preds = argmax(logits).tolist()
            steps += 1
            n = 0
            while n < len(guesses) and guesses[n] == preds[n]:
                n += 1
            proposed += len(guesses)
            accepted += n
            t_run.truncate(0, base + 1 + n)
            if n == len(guesses) and guesses:
                d_run.decode([0], [guesses[-1]])  # the draft never consumed its own last guess
            d_run.truncate(0, base + 1 + n)
            for tok in guesses[:n] + [preds[n]]:
                piece, finished = s.accept(tok)
                if piece:
                    yield i, piece
                if finished:
                    break
            last = preds[n]
        s.stats = {"proposed": proposed, "accepted": accepted, "target_steps": steps,
                   "acceptance_rate": accepted / proposed if proposed else 0.0,
                   "tokens_per_step": len(s.token_ids) / steps if steps else 0.0}
