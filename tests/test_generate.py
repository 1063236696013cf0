"""Generation: greedy == step-by-step argmax, batched == alone, static decode step == model forward,
speculative == plain, stop tokens/strings (split across tokens), UTF-8-safe streaming on Chinese,
chat messages, context errors."""

from __future__ import annotations

import functools

import pytest
import torch

import helpers
import llamalab
from helpers import reference_greedy
from llamalab import Llama
from llamalab.errors import LlamalabError
from llamalab.generation.generate import complete, stream
from llamalab.generation.sampling import SamplingParams
from llamalab.generation.speculative import early_exit_draft
from llamalab.generation.text import IncrementalDetokenizer, StopStrings

SONG = "Hello world! 床前明月光，疑是地上霜。 The end."


@functools.cache  # trained once per session, shared with test_cli_generate.py
def make_parrot(steps: int = 70, seed: int = 0):
    """A tiny model trained to recite SONG after its first token (and then <|im_end|>)."""
    tok = helpers.make_tokenizer(bos_token="<|endoftext|>")  # Chinese: single-byte tokens, 3 per character
    model = helpers.tiny_llama(tok, seed=seed, rope_theta=1000.0, tie_word_embeddings=True).train()
    ids = torch.tensor([tok.encode(SONG) + [tok.eos_token_id]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


@pytest.fixture(scope="module")
def parrot():
    return make_parrot()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [20, 21, 22, 23], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]


def test_greedy_equals_stepwise_argmax(rand_model):
    for p in PROMPTS[:2]:
        out = complete(rand_model, None, [p], max_new_tokens=12)[0]
        assert out.token_ids == reference_greedy(rand_model, p, 12)
        assert out.finish_reason == "length"


def test_batched_equals_alone(rand_model):
    batched = complete(rand_model, None, PROMPTS, max_new_tokens=10)
    alone = [complete(rand_model, None, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    sp = dict(temperature=0.9, top_k=20, seed=3)
    assert [c.token_ids for c in complete(rand_model, None, PROMPTS, max_new_tokens=8, **sp)] == \
        [complete(rand_model, None, [p], max_new_tokens=8, **sp)[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_step_matches_model_forward(rand_model, dtype):
    """The compiled step's plan (every cache row, all slots, idle rows into the scratch slot) run eagerly
    gives the logits of the plain cached forward, and leaves the cache as that forward does."""
    model = Llama(rand_model.config).eval()
    model.load_state_dict(rand_model.state_dict())
    model = model.to(dtype)
    plain, static = model.new_cache(3, 64), model.new_cache(3, 64, scratch_slot=True)
    for r, p in enumerate(PROMPTS[:3]):  # ragged: rows of different lengths
        for c in (plain, static):
            model(torch.tensor([p]), cache=c, cache_rows=slice(r, r + 1))
    rows, tokens = torch.tensor([0, 2]), torch.tensor([17, 33])  # row 1 sits this step out
    with torch.no_grad():
        want = model(tokens[:, None], cache=plain, cache_rows=rows, last_only=True)[:, 0]
        step = static.plan_decode(rows)
        ids = torch.zeros(3, 1, dtype=torch.long)
        ids[rows, 0] = tokens
        got = model.forward_step(ids, static, step)[rows, 0]
        static.commit(step, rows)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert torch.allclose(got, want, atol=tol, rtol=0)
    assert torch.equal(plain.lengths, static.lengths)
    assert torch.equal(plain.valid, static.valid[:, :64])


def test_decode_dtype_is_accepted_and_checked(rand_model):
    ids = complete(rand_model, None, [PROMPTS[0]], max_new_tokens=8, decode_dtype="float16")[0].token_ids
    assert ids == reference_greedy(rand_model, PROMPTS[0], 8)
    with pytest.raises(LlamalabError, match="decode_dtype"):
        complete(rand_model, None, [[1]], decode_dtype="int8")


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_equals_plain_greedy(rand_model, k):
    draft = early_exit_draft(rand_model, 1)
    plain = complete(rand_model, None, PROMPTS[:3], max_new_tokens=15)
    spec = complete(rand_model, None, PROMPTS[:3], max_new_tokens=15, draft_model=draft, num_draft_tokens=k)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert 0 <= spec[0].stats["acceptance_rate"] <= 1
    same = complete(rand_model, None, PROMPTS[:1], max_new_tokens=15, draft_model=rand_model, num_draft_tokens=4)
    assert same[0].token_ids == plain[0].token_ids and same[0].stats["acceptance_rate"] == 1.0
    with pytest.raises(LlamalabError, match="greedy"):
        complete(rand_model, None, PROMPTS[:1], draft_model=draft, temperature=0.7)


def test_parrot_recites_and_stops_on_stop_token(parrot):
    model, tok = parrot
    first = tok.encode(SONG)[:1]
    out = complete(model, tok, [first], max_new_tokens=100)[0]
    assert out.finish_reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert tok.decode(first) + out.text == SONG


def test_streaming_is_utf8_safe_on_chinese(parrot):
    model, tok = parrot
    first = tok.encode(SONG)[:1]
    pieces = list(stream(model, tok, first, max_new_tokens=100))
    assert tok.decode(first) + "".join(pieces) == SONG
    assert all("\ufffd" not in p for p in pieces)
    han = [p for p in pieces if any("\u4e00" <= ch <= "\u9fff" for ch in p)]
    assert han, "the song's Chinese characters come out"
    # each Chinese character is 3 byte tokens here: the detokenizer held the first two back
    ids = tok.encode("明月光")
    assert len(ids) == 9
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["", "", "明", "", "", "月", "", "", "光"]


def test_stop_strings_across_token_boundaries(parrot):
    model, tok = parrot
    first = tok.encode(SONG)[:1]
    out = complete(model, tok, [first], max_new_tokens=100, stop=["ld! 床"])[0]
    assert out.finish_reason == "stop" and tok.decode(first) + out.text == "Hello wor"
    pieces = list(stream(model, tok, first, max_new_tokens=100, stop=["霜。", "zzz"]))
    assert tok.decode(first) + "".join(pieces) == "Hello world! 床前明月光，疑是地上"
    s = StopStrings(["<END>"])
    assert s.feed("abc<E") == ("abc", False)
    assert s.feed("N") == ("", False)
    assert s.feed("x") == ("<ENx", False)
    assert s.feed("<EN") == ("", False) and s.feed("D>tail") == ("", True)


def test_max_new_tokens_and_public_api(parrot):
    model, tok = parrot
    text = llamalab.generate(model, tok, "Hello", max_new_tokens=3)
    assert isinstance(text, str)
    out = complete(model, tok, ["Hello"], max_new_tokens=3)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length" and out.text == text
    both = llamalab.generate(model, tok, ["Hello", "The quick brown"], max_new_tokens=4)
    assert both[0] == llamalab.generate(model, tok, "Hello", max_new_tokens=4)
    assert "".join(llamalab.stream(model, tok, "Hello", max_new_tokens=5)) == \
        llamalab.generate(model, tok, "Hello", max_new_tokens=5)


def test_chat_messages_use_template(parrot):
    model, tok = parrot
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = tok.encode(tok.apply_chat_template(msgs))
    assert complete(model, tok, [msgs], max_new_tokens=6)[0].token_ids == \
        complete(model, tok, [ids], max_new_tokens=6)[0].token_ids


def test_logprobs_reported(parrot):
    model, tok = parrot
    out = complete(model, tok, ["Hello"], max_new_tokens=4, logprobs=True, top_logprobs=2)[0]
    assert len(out.logprobs) == len(out.token_ids) == 4
    assert all(lp <= 0 for lp in out.logprobs)
    assert all(out.token_ids[i] in out.top_logprobs[i] for i in range(4))


def test_seeded_sampling_reproducible(parrot):
    model, tok = parrot
    a = llamalab.generate(model, tok, "Hello", max_new_tokens=8, temperature=1.5, seed=11)
    assert a == llamalab.generate(model, tok, "Hello", max_new_tokens=8, temperature=1.5, seed=11)


def test_context_errors_and_truncation(rand_model):
    long = list(range(1, 100))  # context is 96
    with pytest.raises(LlamalabError, match="context"):
        complete(rand_model, None, [long], max_new_tokens=4)
    out = complete(rand_model, None, [long], max_new_tokens=4, truncate=True)[0]
    assert out.prompt_tokens == 92 and len(out.token_ids) == 4
    near = list(range(1, 94))  # 93 tokens: only 3 slots left -> stops at the context
    assert complete(rand_model, None, [near], max_new_tokens=10)[0].finish_reason == "length"
    with pytest.raises(LlamalabError, match="no tokenizer"):
        complete(rand_model, None, ["text"])
    with pytest.raises(LlamalabError, match="top_p"):
        complete(rand_model, None, [[1]], top_p=1.5)
    with pytest.raises(LlamalabError, match="temperature"):
        complete(rand_model, None, [[1]], params=SamplingParams(), temperature=-1)
    with pytest.raises(LlamalabError, match="vocabulary"):
        complete(rand_model, None, [[1000]])
