"""Samplers and logits processors: each one's effect, batch rows independent, seeds reproducible."""

from __future__ import annotations

import pytest
import torch

from llamalab.errors import LlamalabError
from llamalab.generation.sampling import (
    SamplingParams,
    TokenCounts,
    filter_logits,
    process_logits,
    sample,
)


def _logits(B: int = 4, V: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = _logits()
    out = sample(x, SamplingParams())
    assert torch.equal(out.tokens, x.argmax(-1))


def test_top_k_never_outside_k_largest():
    x = _logits(B=2, V=40)
    k = 5
    allowed = [set(x[i].topk(k).indices.tolist()) for i in range(2)]
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    seen: list[set[int]] = [set(), set()]
    for _ in range(300):
        out = sample(x, SamplingParams(temperature=5.0, top_k=k), generators=gens)
        for i in range(2):
            seen[i].add(int(out.tokens[i]))
    for i in range(2):
        assert seen[i] <= allowed[i]
        assert len(seen[i]) > 1  # high temperature: more than the argmax shows up


def test_top_p_keeps_smallest_prefix():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    x = probs.log()
    kept = filter_logits(x, torch.tensor([0]), torch.tensor([0.7]), torch.tensor([0.0]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.8 >= 0.7
    kept = filter_logits(x, torch.tensor([0]), torch.tensor([0.5]), torch.tensor([0.0]))
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]
    kept = filter_logits(x, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(kept).all()


def test_min_p_threshold():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    x = probs.log()
    kept = filter_logits(x, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.3]))  # threshold 0.15
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]
    kept = filter_logits(x, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.61]))  # threshold 0.305
    assert torch.isfinite(kept).tolist() == [[True, False, False, False]]


def test_filters_per_row():
    x = _logits(B=3, V=30)
    kept = filter_logits(x, torch.tensor([1, 0, 3]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.0]))
    assert torch.isfinite(kept).sum(-1).tolist() == [1, 30, 3]


def test_repetition_penalty_lowers_repeated_token_probability():
    x = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    counts = TokenCounts(1, 4)
    counts.reset(0, [0, 1])
    p = SamplingParams(temperature=1.0, repetition_penalty=1.5)
    before = torch.softmax(x, -1)
    after = torch.softmax(process_logits(x, [p], counts), -1)
    assert after[0, 0] < before[0, 0] and after[0, 1] < before[0, 1]
    assert after[0, 2] > before[0, 2]
    y = process_logits(x, [p], counts)
    assert y[0, 0].item() == pytest.approx(2.0 / 1.5) and y[0, 1].item() == pytest.approx(-1.5)


def test_frequency_and_presence_penalties():
    x = torch.zeros(1, 5)
    counts = TokenCounts(1, 5)
    for t in (3, 3, 1):
        counts.add(torch.tensor([t]))
    y = process_logits(x, [SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.25)], counts)
    assert y[0].tolist() == pytest.approx([0.0, -0.75, 0.0, -1.25, 0.0])


def test_logit_bias_forces_and_bans():
    x = _logits(B=2, V=20)
    forced = int(x[0].argmin())
    out = sample(x, [SamplingParams(logit_bias={forced: 100.0}), SamplingParams(logit_bias={int(x[1].argmax()): -100})])
    assert int(out.tokens[0]) == forced
    assert int(out.tokens[1]) != int(x[1].argmax())


def test_seed_reproducible_and_independent_of_batch_mates():
    x = _logits(B=1, V=100)
    p = SamplingParams(temperature=1.0, seed=123)

    def run(batch: torch.Tensor, params: list[SamplingParams]) -> list[int]:
        gens = [q.make_generator() for q in params]
        return [int(sample(batch, params, generators=gens).tokens[0]) for _ in range(20)]

    alone = run(x, [p])
    assert alone == run(x, [p])
    other = SamplingParams(temperature=1.0, seed=7)
    assert alone == run(torch.cat([x, _logits(B=1, V=100, seed=3)]), [p, other])
    assert alone != run(x, [SamplingParams(temperature=1.0, seed=124)])


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    x = probs.log()[None]
    g = [torch.Generator().manual_seed(0)]
    n = 3000
    hits = torch.zeros(3)
    for _ in range(n):
        hits[sample(x, SamplingParams(temperature=1.0), generators=g).tokens[0]] += 1
    assert torch.allclose(hits / n, probs, atol=0.04)


def test_logprobs_and_top_alternatives():
    x = _logits(B=2, V=30)
    out = sample(x, SamplingParams(logprobs=True, top_logprobs=3))
    logp = torch.log_softmax(x, -1)
    assert torch.allclose(out.logprobs, logp.max(-1).values)
    assert out.top_ids.shape == (2, 3)
    assert torch.equal(out.top_ids[:, 0], out.tokens)
    assert torch.allclose(out.top_logprobs, logp.topk(3, -1).values)


@pytest.mark.parametrize("kwargs, word", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_logprobs=99), "top_logprobs"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
])
def test_bad_params_one_line_errors(kwargs, word):
    with pytest.raises(LlamalabError) as e:
        SamplingParams(**kwargs)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_sparse_logit_bias_equals_the_dense_matrix():
    """process_logits adds each row's logit_bias at its ids: exactly the dense logit_bias_matrix sum."""
    from llamalab.generation.sampling import add_logit_bias, apply_logit_bias, logit_bias_matrix

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=gen) * 5
    params = [SamplingParams(logit_bias={2: -100.0, 7: 0.3}), SamplingParams(), SamplingParams(logit_bias={49: 12.5})]
    want = apply_logit_bias(logits, logit_bias_matrix(params, 50))
    got = add_logit_bias(logits, params)
    assert torch.equal(got, want) and not torch.equal(got, logits)
    assert torch.equal(logits, torch.randn(3, 50, generator=torch.Generator().manual_seed(3)) * 5)  # not in place
    with pytest.raises(LlamalabError, match="outside the vocabulary"):
        add_logit_bias(logits[:, :40], params)


def test_argmax_equals_torch_argmax_with_ties_infs_and_nans():
    from llamalab.generation.sampling import argmax

    gen = torch.Generator().manual_seed(0)
    nan, inf = float("nan"), float("inf")
    cases = [torch.randn(49152, generator=gen), torch.randn(3, 1000, generator=gen),
             torch.randn(2, 1, 77, generator=gen),
             torch.tensor([[1.0, 5.0, 5.0, 2.0], [nan, 1.0, nan, 9.0], [-inf, -inf, -inf, -inf],
                           [inf, 0.0, inf, 1.0], [0.0, -0.0, 0.0, -1.0]]),
             torch.randn(4, 50, generator=gen).t(),  # not contiguous
             torch.randint(0, 3, (6, 40), generator=gen).float()]  # many ties
    for x in cases:
        got = argmax(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1)), x.shape
    for other in (torch.randn(3, 9, dtype=torch.float64, generator=gen), torch.randn(2, 9).to(torch.bfloat16)):
        assert torch.equal(argmax(other), other.argmax(dim=-1))
    with torch.inference_mode():
        x = torch.randn(2, 300)
        assert torch.equal(argmax(x), x.argmax(dim=-1))
