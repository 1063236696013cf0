"""The per-sequence state machine every generation path drives (generation/sequence.py): each transition
of its diagram, and the server's pure response helpers (server/app.py)."""

from __future__ import annotations

import pytest

from helpers import make_tokenizer
from llamalab.generation.sampling import SamplingParams
from llamalab.generation.sequence import SequenceState

STOP_ID = 2  # <|im_end|>


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def feed(seq: SequenceState, ids: list[int]) -> list[str]:
    pieces = []
    for t in ids:
        piece, finished = seq.accept(t)
        pieces.append(piece)
        if finished:
            break
    return pieces


def test_a_stop_token_finishes_counted_but_not_kept(tok):
    ids = tok.encode("hello world")
    seq = SequenceState([1], SamplingParams(), tok, max_new_tokens=50, stop_token_ids={STOP_ID})
    feed(seq, ids + [STOP_ID] + ids)
    assert seq.finish_reason == "stop" and seq.finished
    assert seq.token_ids == ids and seq.num_sampled == len(ids) + 1
    assert seq.text == "hello world"


def test_a_stop_string_finishes_with_the_text_before_it(tok):
    ids = tok.encode("A stop word: STOP here and nowhere else.")
    seq = SequenceState([1], SamplingParams(), tok, max_new_tokens=50, stop=["STOP"])
    pieces = feed(seq, ids)
    assert seq.finish_reason == "stop" and seq.text == "A stop word: "
    assert "".join(pieces) == seq.text and "S" not in seq.text  # the held-back start never leaked
    assert len(seq.token_ids) < len(ids)


def test_max_new_tokens_finishes_with_length_and_flushes_held_text(tok):
    ids = tok.encode("hello world, hello llama!")
    seq = SequenceState([1], SamplingParams(), tok, max_new_tokens=3, stop=["hello world, hello llama! and more"])
    pieces = feed(seq, ids)
    assert seq.finish_reason == "length" and seq.token_ids == ids[:3]
    assert pieces[:2] == ["", ""]  # all of it could still become the stop string: held back
    assert seq.text == tok.decode(ids[:3])  # ...and released when the length ends it


def test_an_incomplete_character_at_the_end_is_dropped(tok):
    ids = tok.encode("明")  # three byte tokens
    seq = SequenceState([1], SamplingParams(), tok, max_new_tokens=2)
    assert feed(seq, ids) == ["", ""]
    assert seq.finish_reason == "length" and "\ufffd" not in seq.text


def test_without_a_tokenizer_only_ids_and_stops(tok):
    seq = SequenceState([1], SamplingParams(), None, max_new_tokens=4, stop_token_ids={STOP_ID})
    assert feed(seq, [5, 6, 7, 8, 9]) == ["", "", "", ""]
    assert seq.finish_reason == "length" and seq.token_ids == [5, 6, 7, 8] and seq.remaining == 0


def test_accepting_after_the_end_is_refused(tok):
    seq = SequenceState([1], SamplingParams(), tok, max_new_tokens=1)
    assert seq.accept(5)[1] is True
    with pytest.raises(RuntimeError, match="already finished"):
        seq.accept(6)


def test_logprobs_are_kept_only_when_asked_for(tok):
    plain = SequenceState([1], SamplingParams(), tok, max_new_tokens=4)
    plain.record_logprobs(-0.5, {5: -0.5})
    assert plain.logprobs == [] and plain.top_logprobs == []
    asked = SequenceState([1], SamplingParams(logprobs=True, top_logprobs=2), tok, max_new_tokens=4)
    asked.record_logprobs(-0.5, {5: -0.5, 6: -1.0})
    assert asked.logprobs == [-0.5] and asked.top_logprobs == [{5: -0.5, 6: -1.0}]


def test_a_seeded_sequence_owns_its_generator(tok):
    a = SequenceState([1], SamplingParams(temperature=1.0, seed=3), tok, max_new_tokens=4)
    b = SequenceState([1], SamplingParams(temperature=1.0, seed=3), tok, max_new_tokens=4)
    assert a.generator is not b.generator
    assert a.generator.initial_seed() == b.generator.initial_seed() == 3
    assert SequenceState([1], SamplingParams(), tok, max_new_tokens=4).generator is None


def test_response_helpers_render_logprobs_and_budgets(tok):
    from llamalab.server.app import completion_logprobs, max_tokens_for, top_by_text
    from llamalab.server.engine import TokenLogprob
    from llamalab.server.protocol import APIError, GenerationRequest

    ids = tok.encode("hello world")
    items = [TokenLogprob(t, -0.1 * (i + 1)) for i, t in enumerate(ids)]
    out = completion_logprobs(tok, items, offset=5)
    assert "".join(out["tokens"]) == "hello world" and out["text_offset"][0] == 5
    assert out["token_logprobs"] == [x.logprob for x in items]
    byte_a, byte_b = tok.encode("明")[:2]  # each decodes to U+FFFD alone: the first (most likely) wins
    assert top_by_text(tok, [(byte_a, -1.0), (byte_b, -2.0)]) == {"\ufffd": -1.0}
    req = GenerationRequest("completion", "m", ["hi"], SamplingParams(), max_tokens=None)
    assert max_tokens_for(req, 10, 100) == 16
    req.max_tokens = 95
    with pytest.raises(APIError, match="at most 90 tokens"):
        max_tokens_for(req, 10, 100)
