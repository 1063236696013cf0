"""Choosing the next token: logits processors and samplers as small pure functions over a batch.

Every function takes logits of shape (B, V) and per-row parameters (tensors of shape (B,)), so each
row of a batch — each request of a continuously batched server — may sample differently. The order
is the one Hugging Face and vLLM use:

1. **penalties** on the raw logits
   * repetition penalty (Keskar et al., 2019, "CTRL", arXiv:1909.05858): for every token already
     seen (prompt or output), ``l / r`` if ``l > 0`` else ``l * r`` — r > 1 makes repeats less likely;
   * frequency / presence penalties (OpenAI): ``l - f · count - p · [count > 0]`` over output tokens;
2. **logit bias**: ``l + bias[token]`` (−100 bans a token in practice, +100 forces it);
3. **temperature** T: ``l / T`` (T = 0 means greedy: argmax, nothing random);
4. **truncation**, in the sorted order of probabilities ``p_(1) >= p_(2) >= …``:
   * top-k keeps the k most likely tokens (Fan et al., 2018);
   * top-p / nucleus keeps the smallest prefix whose mass reaches p (Holtzman et al., 2019,
     arXiv:1904.09751): token i survives iff ``sum_{j<i} p_(j) < p``;
   * min-p keeps tokens with ``p >= min_p · p_(1)`` (Nguyen et al., 2024, arXiv:2407.01082);
5. **draw** from the renormalised distribution with the exponential-race trick
   ``argmax_i p_i / E_i``, ``E_i ~ Exp(1)`` (equivalent to a categorical draw), with one
   :class:`torch.Generator` per row so a ``seed`` makes a row reproducible whatever its batch mates.

Log-probabilities reported for chosen tokens (and top alternatives) are those of the model's own
distribution, ``log_softmax`` of the raw logits, as OpenAI-style APIs report them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from llamalab.errors import LlamalabError

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How one sequence picks its tokens. ``temperature=0`` (the default) is greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: bool = False  # report the log-probability of each chosen token
    top_logprobs: int = 0  # … and of this many most likely alternatives

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise a one-line :class:`LlamalabError` for any out-of-range value; return self."""
        def finite(name: str, v: float) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise LlamalabError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        if finite("temperature", self.temperature) < 0:
            raise LlamalabError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise LlamalabError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < finite("top_p", self.top_p) <= 1:
            raise LlamalabError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= finite("min_p", self.min_p) <= 1:
            raise LlamalabError(f"min_p must be in [0, 1], got {self.min_p}")
        if finite("repetition_penalty", self.repetition_penalty) <= 0:
            raise LlamalabError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        finite("frequency_penalty", self.frequency_penalty)
        finite("presence_penalty", self.presence_penalty)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise LlamalabError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) \
                or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise LlamalabError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                                f"got {self.top_logprobs!r}")
        bias: dict[int, float] = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                tid = int(k)
            except (TypeError, ValueError):
                raise LlamalabError(f"logit_bias keys must be token ids, got {k!r}") from None
            if tid < 0 or (vocab_size is not None and tid >= vocab_size):
                raise LlamalabError(f"logit_bias token id {tid} is outside the vocabulary"
                                    + (f" (size {vocab_size})" if vocab_size is not None else ""))
            bias[tid] = finite(f"logit_bias[{tid}]", v)
        self.logit_bias = bias
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed`` (None when unseeded: the global RNG is used)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


@dataclass
class SampleOutput:
    """One sampled token per row, with log-probabilities when asked for."""

    tokens: torch.Tensor  # (B,) long
    logprobs: torch.Tensor | None = None  # (B,) float32: log p(chosen token)
    top_ids: torch.Tensor | None = None  # (B, K) long: the K most likely tokens
    top_logprobs: torch.Tensor | None = None  # (B, K) float32


# --------------------------------------------------------------------------- penalty state
class TokenCounts:
    """Per-row token statistics the penalties need: ``seen`` (prompt + output) and output ``counts``.

    Rows may be reset and refilled independently (continuous batching).
    """

    def __init__(self, batch_size: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(batch_size, vocab_size, dtype=torch.int32, device=device)

    def reset(self, row: int, prompt_ids: Sequence[int] | torch.Tensor = ()) -> None:
        self.seen[row] = False
        self.counts[row] = 0
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.seen.device)
        if ids.numel():
            self.seen[row, ids.clamp(0, self.seen.shape[1] - 1)] = True

    def add(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Record one new output token per row (``rows`` selects which rows; default all)."""
        tokens = tokens.view(-1, 1).to(self.counts.device)
        if rows is None:
            self.counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.int32))
            self.seen.scatter_(1, tokens, True)
        else:
            self.counts[rows, tokens[:, 0]] += 1
            self.seen[rows, tokens[:, 0]] = True


# --------------------------------------------------------------------------- processors
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty: seen tokens' logits divided by r when positive, multiplied by r when negative."""
    r = penalty.to(logits.dtype)[:, None]
    penalised = torch.where(logits > 0, logits / r, logits * r)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                             presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: ``l - frequency · count - presence · [count > 0]``."""
    c = counts.to(logits.dtype)
    return logits - frequency.to(logits.dtype)[:, None] * c - presence.to(logits.dtype)[:, None] * (c > 0)


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add a dense (B, V) bias (see :func:`logit_bias_matrix`)."""
    return logits + bias.to(logits.dtype)


def add_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``logits`` (B, V) plus each row's ``logit_bias`` dict, added at its token ids only (the values of
    :func:`apply_logit_bias` with :func:`logit_bias_matrix`, without a dense (B, V) matrix per step)."""
    rows, ids, values = [], [], []
    for i, p in enumerate(params):
        for tid, v in p.logit_bias.items():
            if tid >= logits.shape[-1]:
                raise LlamalabError(f"logit_bias token id {tid} is outside the vocabulary (size {logits.shape[-1]})")
            rows.append(i)
            ids.append(tid)
            values.append(v)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
    return logits.index_put(index, torch.tensor(values, dtype=logits.dtype, device=logits.device), accumulate=True)


def logit_bias_matrix(params: Sequence[SamplingParams], vocab_size: int,
                      device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Dense (B, V) bias from each row's ``logit_bias`` dict; None when no row has one."""
    if not any(p.logit_bias for p in params):
        return None
    bias = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
    for i, p in enumerate(params):
        for tid, v in p.logit_bias.items():
            if tid >= vocab_size:
                raise LlamalabError(f"logit_bias token id {tid} is outside the vocabulary (size {vocab_size})")
            bias[i, tid] = v
    return bias


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``l / T`` per row; rows with T = 0 (greedy) are left as they are."""
    t = temperature.to(logits.dtype)[:, None]
    return logits / torch.where(t > 0, t, torch.ones_like(t))


def truncate_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor) -> torch.Tensor:
    """Apply top-k, top-p and min-p to logits sorted in descending order; removed entries become -inf.

    ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 switch the respective filter off for that row. The most
    likely token always survives.
    """
    B, V = sorted_logits.shape
    rank = torch.arange(V, device=sorted_logits.device)[None]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).to(sorted_logits.device)[:, None]
    remove = rank >= k
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    p = top_p.to(probs.dtype).to(probs.device)[:, None]
    before = probs.cumsum(-1) - probs  # mass of the more likely tokens
    remove |= (before >= p) & (p < 1)
    mp = min_p.to(probs.dtype).to(probs.device)[:, None]
    remove |= probs < mp * probs[:, :1]
    remove[:, 0] = False
    return sorted_logits.masked_fill(remove, float("-inf"))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Top-k / top-p / min-p in vocabulary order (sorts, truncates, scatters back)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    kept = truncate_sorted(sorted_logits, top_k, top_p, min_p)
    return torch.full_like(logits, float("-inf")).scatter(-1, order, kept)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)``: the first index of each row's largest value (a NaN counts as the largest), int64.

    A CPU float32 tensor goes through numpy's argmax, which is vectorised where torch's CPU argmax is not:
    over SmolLM2's 49,152 logits 10 against 134 µs a call on a 2-core Intel Xeon, once per decoded token
    (``benchmarks/bench_sampling.py``). Same result, ties and NaNs included (tested); other tensors use torch."""
    if x.is_cpu and x.dtype == torch.float32 and x.dim() > 0 and x.shape[-1] > 0 and not x.requires_grad:
        return torch.from_numpy(np.asarray(x.numpy().argmax(-1)))  # (a 1-D x: a 0-d tensor, as torch gives)
    return x.argmax(dim=-1)


def exponential_race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One categorical draw per row: ``argmax p / E`` with ``E ~ Exp(1)`` from the row's generator."""
    noise = torch.empty_like(probs, dtype=torch.float32)
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    return argmax(probs.float() / noise)


# --------------------------------------------------------------------------- the sampler
def _row_tensor(values: Sequence[float | int], dtype: torch.dtype, device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams], counts: TokenCounts | None = None,
                   rows: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 1–3 (penalties, bias, temperature) for a batch; float32 (B, V) out.

    ``counts``/``rows``: the penalty statistics and which of its rows the batch rows are.
    ``bias``: a precomputed :func:`logit_bias_matrix` (else each row's dict is added at its ids: the same values).
    """
    logits = logits.float()
    dev = logits.device
    if counts is not None and any(p.has_penalties for p in params):
        seen = counts.seen if rows is None else counts.seen[rows]
        cnt = counts.counts if rows is None else counts.counts[rows]
        if any(p.repetition_penalty != 1 for p in params):
            logits = apply_repetition_penalty(logits, seen, _row_tensor([p.repetition_penalty for p in params],
                                                                        torch.float32, dev))
        if any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params):
            logits = apply_frequency_presence(logits, cnt,
                                              _row_tensor([p.frequency_penalty for p in params], torch.float32, dev),
                                              _row_tensor([p.presence_penalty for p in params], torch.float32, dev))
    if bias is not None:
        logits = apply_logit_bias(logits, bias)
    elif any(p.logit_bias for p in params):
        logits = add_logit_bias(logits, params)
    if any(not p.greedy for p in params):
        logits = apply_temperature(logits, _row_tensor([p.temperature for p in params], torch.float32, dev))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None, counts: TokenCounts | None = None,
           rows: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> SampleOutput:
    """Pick one token per row of ``logits`` (B, V) (or (B, 1, V)), each row with its own params.

    ``generators[i]`` is row i's RNG (e.g. ``params.make_generator()``, kept across steps so a seeded
    sequence is reproducible); None uses torch's global RNG.
    """
    if logits.dim() == 3:
        logits = logits[:, -1]
    B = logits.shape[0]
    if isinstance(params, SamplingParams):
        params = [params] * B
    if len(params) != B:
        raise ValueError(f"{len(params)} sampling params for a batch of {B} rows")
    raw = logits.float()
    x = process_logits(raw, params, counts, rows, bias)
    tokens = argmax(x)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=x.device)
        sub = x[idx]
        sub_params = [params[i] for i in random_rows]
        dev = x.device
        filtered = filter_logits(sub, _row_tensor([p.top_k for p in sub_params], torch.long, dev),
                                 _row_tensor([p.top_p for p in sub_params], torch.float32, dev),
                                 _row_tensor([p.min_p for p in sub_params], torch.float32, dev))
        gens = [None if generators is None else generators[i] for i in random_rows]
        tokens[idx] = exponential_race(torch.softmax(filtered, dim=-1), gens)
    out = SampleOutput(tokens=tokens)
    if any(p.logprobs or p.top_logprobs for p in params):
        logp = torch.log_softmax(raw, dim=-1)
        out.logprobs = logp.gather(-1, tokens[:, None])[:, 0]
        k = max(p.top_logprobs for p in params)
        if k:
            out.top_logprobs, out.top_ids = logp.topk(k, dim=-1)
    return out
