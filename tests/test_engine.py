"""One forward for every decode path: the KV cache writes each layer's own slot, the compiled decode step
equals the eager forward token for token, batch > 1 equals each row alone, hooks and LoRA adapters see the
forward that generate / the server's engine run, streamed text never ends in U+FFFD, checkpoints load in
their own dtype, and a nominal context of 16M tokens allocates nothing for it."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import llamalab
from helpers import reference_greedy
from llamalab import Llama, LlamaConfig
from llamalab.generation.generate import complete, stream
from llamalab.generation.runner import Runner
from llamalab.generation.text import IncrementalDetokenizer
from llamalab.model.attention import GroupedQueryAttention
from llamalab.model.rope import apply_rope

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [20, 21, 22, 23]]


@pytest.fixture(scope="module")
def model(rand_model):
    return rand_model  # conftest's (helpers.rand_llama), as test_generate.py's


def test_cache_writes_each_layers_own_slots(model):
    """Layer i's keys/values land in cache layer i (not layer 0), equal to k_proj/v_proj of its input."""
    ids = torch.tensor([PROMPTS[0]])
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, layer in enumerate(model.layers)]
    cache = model.new_cache(2, 16)
    try:
        with torch.no_grad():
            model(ids, cache=cache, cache_rows=slice(1, 2))
    finally:
        for h in hooks:
            h.remove()
    T, cfg = ids.shape[1], model.config
    cos, sin = model.rotary(torch.arange(T)[None])
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        with torch.no_grad():
            k = apply_rope(a.k_proj(inputs[i]).view(1, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2), cos, sin)
            v = a.v_proj(inputs[i]).view(1, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        assert torch.allclose(cache.k[i, 1, :, :T], k[0], atol=1e-6), i
        assert torch.allclose(cache.v[i, 1, :, :T], v[0], atol=1e-6), i
        assert not cache.k[i, 0].any()  # row 0 untouched
    assert cache.lengths.tolist() == [0, T]
    lone = GroupedQueryAttention(64, 4, 2, 16)  # built outside a model: no layer index, no cache writes
    step = cache.plan(slice(0, 1), 1, 1)
    with pytest.raises(ValueError, match="layer index"):
        lone(torch.zeros(1, 1, 64), cos[:, :1], sin[:, :1], step=step, cache=cache)


def test_cache_edits_truncate_and_copy_row(model):
    cache = model.new_cache(3, 16)
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0]]), cache=cache, cache_rows=slice(0, 1))
    cache.copy_row(0, 2)
    assert torch.equal(cache.k[:, 2], cache.k[:, 0]) and cache.length(2) == len(PROMPTS[0])
    cache.truncate(2, 3)
    assert cache.length(2) == 3 and not cache.valid[2, 3:].any() and cache.valid[2, :3].all()
    with torch.no_grad():  # decoding after a truncation equals decoding the first 3 tokens + the new one
        got = model(torch.tensor([[9]]), cache=cache, cache_rows=slice(2, 3), last_only=True)[0, 0]
        want = model(torch.tensor([PROMPTS[0][:3] + [9]]))[0, -1]
    assert torch.allclose(got, want, atol=1e-5)


def test_batched_decode_equals_each_row_alone(model):
    runner = Runner(model, 3, 32, compile=False)
    for r, p in enumerate(PROMPTS):
        runner.prefill(r, p)
    toks = [[] for _ in PROMPTS]
    logits = None
    for step in range(5):  # row 1 drops out after two steps: the others go on as a subset of rows
        rows = [0, 1, 2] if step < 2 else [0, 2]
        inputs = [toks[r][-1] if toks[r] else PROMPTS[r][-1] for r in rows] if step else None
        if step:
            logits = runner.decode(rows, inputs)
            for j, r in enumerate(rows):
                toks[r].append(int(logits[j].argmax()))
        else:
            for r in rows:
                toks[r].append(int(model(torch.tensor([PROMPTS[r]]))[0, -1].argmax()))
    for r, p in enumerate(PROMPTS):
        assert toks[r] == reference_greedy(model, p, len(toks[r])), r


def test_compiled_step_equals_eager_token_for_token(model):
    """The decode step compiled whole (Inductor, CPU) over the static cache, at batch 2 (ragged rows, one
    finishing early), gives the eager forward's greedy tokens. The one compiling test: 37-76 s on the 2 shared,
    heavily loaded cores where it was written (a cold Inductor cache; a warm one skips code generation)."""
    eager = complete(model, None, PROMPTS[:2], max_new_tokens=8, compile=False)
    compiled = complete(model, None, PROMPTS[:2], max_new_tokens=8, compile=True)
    assert compiled[0].stats["compiled"] == 1.0 and eager[0].stats["compiled"] == 0.0
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    assert [c.token_ids for c in eager] == [reference_greedy(model, p, 8) for p in PROMPTS[:2]]


def test_block_compiled_step_equals_eager_token_for_token(model):
    """compile="blocks": every layer through one compiled Block.forward (dynamic shapes) over the eager step's
    cache and plan, at batch 2 (ragged rows: the masked path; then one row: the unmasked one) gives the eager
    greedy tokens; an unknown mode is a one-line error."""
    from llamalab.generation.runner import Runner

    eager = complete(model, None, PROMPTS[:2], max_new_tokens=8, compile=False)
    blocks = complete(model, None, PROMPTS[:2], max_new_tokens=8, compile="blocks")
    assert blocks[0].stats["compiled"] == 1.0 and blocks[0].stats["first_step_s"] > 0
    assert [c.token_ids for c in blocks] == [c.token_ids for c in eager]
    with pytest.raises(ValueError, match="unknown compile mode 'block'"):
        Runner(model, 1, 8, compile="block")


class _Letters:
    """A stand-in tokenizer for the engine: token i is one letter."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


def test_hooks_see_the_forward_that_generate_and_the_engine_run(model):
    calls = []
    handle = model.layers[1].register_forward_hook(lambda m, a, out: calls.append(a[0].shape[1]))
    try:
        out = complete(model, None, [PROMPTS[0]], max_new_tokens=6, compile=True)[0]  # hooks: the eager step
        assert calls == [len(PROMPTS[0])] + [1] * 5  # prefill, then one call per decode step
        assert out.token_ids == reference_greedy(model, PROMPTS[0], 6)  # (the greedy reference adds more calls)
        calls.clear()
        from llamalab.generation.sampling import SamplingParams
        from llamalab.server.engine import Engine, GenOptions, Job

        engine = Engine(model, _Letters(), max_batch=2, max_len=32).start()
        done = threading.Event()
        deltas = []

        def sink(event):
            deltas.append(event)
            if getattr(event, "finish_reason", None) or not hasattr(event, "finish_reason"):
                done.set()

        try:
            engine.submit([Job(PROMPTS[0], SamplingParams(temperature=0.0), GenOptions(max_tokens=4), sink)])
            assert done.wait(30)
        finally:
            engine.stop()
        assert [t for d in deltas for t in d.token_ids] == out.token_ids[:4]
        assert calls == [len(PROMPTS[0])] + [1] * 3
    finally:
        handle.remove()


def test_lora_adapter_is_in_the_generation_forward(model):
    from llamalab.lora import LoraConfig, apply_lora

    tuned = Llama(model.config).eval()
    tuned.load_state_dict(model.state_dict())
    apply_lora(tuned, LoraConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj")))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    want = reference_greedy(tuned, PROMPTS[2], 8)
    assert want != reference_greedy(model, PROMPTS[2], 8)  # the adapter changes the answer
    assert complete(tuned, None, [PROMPTS[2]], max_new_tokens=8)[0].token_ids == want


def test_stream_cut_inside_a_character_drops_the_incomplete_tail():
    from test_generate import SONG, make_parrot

    model, tok = make_parrot()
    first = tok.encode(SONG)[:1]
    ids = tok.encode(SONG)
    start = SONG.index("床")
    n_before = len(tok.encode(SONG[:start]))  # tokens up to the first Chinese character (3 byte tokens each)
    cut = n_before + 2 - 1  # new tokens that end two bytes into 床
    pieces = list(stream(model, tok, first, max_new_tokens=cut))
    text = "".join(pieces)
    assert not text.endswith("\ufffd") and "\ufffd" not in text
    assert tok.decode(first) + text == SONG[:start]
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[n_before:n_before + 2]] == ["", ""]
    assert detok.flush() == ""


def test_checkpoint_loads_in_its_own_dtype(model, tmp_path):
    model.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    loaded, _ = llamalab.load(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    assert Llama.from_pretrained(tmp_path / "bf16", dtype="float32").dtype == torch.float32
    model.save_pretrained(tmp_path / "f32")
    assert Llama.from_pretrained(tmp_path / "f32").dtype == torch.float32
    out = subprocess.run([sys.executable, "-m", "llamalab", "info", str(tmp_path / "bf16")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bfloat16" in out.stdout


def test_huge_nominal_context_allocates_only_what_is_used():
    cfg = LlamaConfig(vocab_size=50, hidden_size=512, intermediate_size=64, n_layers=4, n_heads=4, n_kv_heads=4,
                      max_position_embeddings=16_000_000, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    big = Llama(cfg).eval()
    out = complete(big, None, [[1, 2, 3]], max_new_tokens=4)[0]
    assert len(out.token_ids) == 4
    with pytest.raises(ValueError, match="KV cache"):
        big.new_cache()  # the full nominal context (262 GB of cache) is refused, in one line


def _run_engine(model, prompts, max_tokens=6, prefill_chunk=256, max_batch=4):
    """Submit every prompt at once to a paused engine (so they arrive together), then let it run; each
    prompt's events, and the shapes (rows, tokens) of every forward through the model's first layer."""
    from llamalab.generation.sampling import SamplingParams
    from llamalab.server.engine import Engine, GenOptions, Job

    shapes = []
    handle = model.layers[0].register_forward_hook(lambda m, a, out: shapes.append(tuple(a[0].shape[:2])))
    engine = Engine(model, _Letters(), max_batch=max_batch, max_len=64, prefill_chunk=prefill_chunk)
    events = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def sink(i):
        def put(event):
            events[i].append(event)
            if getattr(event, "finish_reason", None) or not hasattr(event, "finish_reason"):
                done[i].set()
        return put

    try:
        engine.start()
        engine.pause()
        engine.submit([Job(p, SamplingParams(temperature=0.0), GenOptions(max_tokens=max_tokens), sink(i))
                       for i, p in enumerate(prompts)])
        engine.resume()
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
        handle.remove()
    return events, shapes, engine


def test_requests_arriving_together_are_prefilled_in_one_forward(model):
    """Two prompts of different lengths queued together go through one prefill forward (2 rows, padded
    to the longer), and each gets the tokens it gets alone; decode then runs both rows together."""
    prompts = [PROMPTS[0], PROMPTS[2]]
    events, shapes, engine = _run_engine(model, prompts)
    assert shapes[0] == (2, len(PROMPTS[0]))  # one prefill for both
    assert shapes[1:] == [(2, 1)] * 5  # then one batched decode step per token
    assert not engine.cache.has_padding  # the padding left nothing behind: decode stays unpadded
    for p, ev in zip(prompts, events):
        assert [t for d in ev for t in d.token_ids] == reference_greedy(model, p, 6)
    alone, _, _ = _run_engine(model, [PROMPTS[2]])
    assert [t for d in alone[0] for t in d.token_ids] == [t for d in events[1] for t in d.token_ids]


def test_prefill_cap_counts_padding_and_chunks_a_long_prompt(model):
    """With a cap of 8 prefill tokens per step: a 20-token prompt goes alone in chunks of 8; the short
    prompts behind it join one forward only while rows × longest chunk fits the cap."""
    long_p = list(range(30, 50))
    prompts = [long_p, [3, 4, 5], [6, 7], [8, 9, 10, 11]]
    events, shapes, _ = _run_engine(model, prompts, max_tokens=3, prefill_chunk=8)
    prefills = [s for s in shapes if s[1] > 1]
    assert prefills[:3] == [(1, 8), (1, 8), (2, 4)]  # long prompt's chunks, then its last 4 + [3, 4, 5]
    assert all(b * t <= 8 for b, t in prefills)
    for p, ev in zip(prompts, events):
        assert [t for d in ev for t in d.token_ids] == reference_greedy(model, p, 3)


def test_a_failing_prompt_in_a_batched_prefill_fails_only_itself(model):
    """A token id outside the vocabulary makes the batched prefill raise; each prompt is then retried
    alone, and only the bad one fails."""
    from llamalab.server.engine import Failed

    bad = [5, model.config.vocab_size + 7, 6]
    events, shapes, engine = _run_engine(model, [PROMPTS[0], bad, PROMPTS[2]], max_tokens=4)
    assert len(events[1]) == 1 and isinstance(events[1][0], Failed) and "prefill failed" in events[1][0].message
    for i in (0, 2):
        assert [t for d in events[i] for t in d.token_ids] == reference_greedy(model, PROMPTS[i], 4)
    assert engine.cache.lengths.tolist() == [0, 0, 0, 0]  # every row freed


def test_the_engine_thread_runs_the_forward_with_its_own_thread_count(model):
    """OpenMP's thread count is per thread: the engine sets its own in its thread (``threads``), whatever
    the thread that built it has, and leaves that thread's alone."""
    from llamalab.generation.sampling import SamplingParams
    from llamalab.server.engine import Engine, GenOptions, Job

    main_threads = torch.get_num_threads()
    want = 1 if main_threads > 1 else 2
    seen = []
    handle = model.layers[0].register_forward_hook(
        lambda m, a, out: seen.append((threading.current_thread().name, torch.get_num_threads())))
    engine = Engine(model, _Letters(), max_batch=1, max_len=32, threads=want).start()
    done = threading.Event()
    try:
        engine.submit([Job(PROMPTS[0], SamplingParams(temperature=0.0), GenOptions(max_tokens=2),
                           lambda event: getattr(event, "finish_reason", None) and done.set())])
        assert done.wait(30)
    finally:
        engine.stop()
        handle.remove()
    assert seen and set(seen) == {("llamalab-engine", want)}
    assert torch.get_num_threads() == main_threads


def test_serve_loads_on_one_thread_and_hands_the_threads_to_the_engine(model, monkeypatch):
    """`llamalab serve`'s main thread (loading, then HTTP) keeps one intra-op thread and the engine gets the
    process's count: only the engine thread starts an OpenMP team."""
    import llamalab.loading
    from llamalab.server import run

    class Stop(Exception):
        pass

    seen = {}
    monkeypatch.setattr(llamalab.loading, "load", lambda *a, **k: seen.setdefault("load", torch.get_num_threads())
                        and (model, _Letters()))

    def fake_build(*a, threads=None, **k):
        seen["engine"] = threads
        raise Stop

    monkeypatch.setattr(run, "build", fake_build)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(Stop):
            run.serve("unused", port=0)
        assert torch.get_num_threads() == 2  # the caller's count is back
    finally:
        torch.set_num_threads(before)
    assert seen == {"load": 1, "engine": 2}
