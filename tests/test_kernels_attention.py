"""The fused decode-attention op (``llamalab::decode_attention``: RoPE + cache append + GQA for one token):
the C++ op against the model's own unfused path (rope.rotate, KVCache.plan + write_layer, SDPA with
enable_gqa) on random inputs — MHA / MQA / GQA, odd head sizes, first and last slot, several rows at an
offset, every ISA path — the cache left exactly as write_layer leaves it, the pure-PyTorch fallback, and
through the model: greedy generation (plain, speculative, chat, saved + loaded) with the fused ops on and
off gives the same tokens, logits within 1e-5, and the op is used exactly on the eager decode path.
Its per-row sibling ``decode_attention_rows`` (rows of different lengths, rows as indices in any order): the
same against the masked unfused path, a row's output bit-identical batched or alone, and ragged batches
(complete, Runner.decode, a saved + loaded model) generating what each prompt generates alone and unfused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llamalab
from helpers import make_tokenizer, rand_llama, reference_greedy, save_chat_model, tiny_llama
from llamalab import kernels
from llamalab.generation.generate import complete
from llamalab.generation.runner import Runner
from llamalab.generation.speculative import early_exit_draft
from llamalab.kernels.attention import decode_attention_reference, decode_attention_rows_reference
from llamalab.model.kv_cache import KVCache, write_layer
from llamalab.model.rope import RotaryEmbedding, rotate


@pytest.fixture
def fused_switch(native):
    """Set the fused-ops switch in a test; restored afterwards."""
    old = kernels.set_fused(True)
    yield kernels.set_fused
    kernels.set_fused(old)


def _inputs(B, H, KV, D, Bc, S, row0, start, dtype, seed=0, per_row_tables=True):
    """q / k / v as the projections give them (transposed views), RoPE tables of real positions, and a
    cache whose rows hold random earlier keys/values (lengths = start for the call's rows)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, 1, KV, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, 1, KV, D, generator=g).to(dtype).transpose(1, 2)
    rope = RotaryEmbedding(D, 10000.0, None, 4096)
    pos = torch.full((B if per_row_tables else 1, 1), start)
    cos, signed_sin = rope.tables(pos)
    cache = KVCache(1, Bc, KV, S, D, dtype=dtype)
    g2 = torch.Generator().manual_seed(seed + 1)
    cache.k_layers[0].copy_(torch.randn(Bc, KV, S, D, generator=g2))
    cache.v_layers[0].copy_(torch.randn(Bc, KV, S, D, generator=g2))
    cache.lengths[row0:row0 + B] = start
    cache.valid[row0:row0 + B, :start] = True
    return q, k, v, cos, signed_sin, cache


def _unfused(q, k, v, cos, signed_sin, cache, row0):
    """The model's plain path for the same step: plan, rotate, write_layer, SDPA (enable_gqa), heads side by side."""
    B, H, _, D = q.shape
    step = cache.plan(slice(row0, row0 + B), B, 1)
    assert step.mask is None and step.start is not None
    kk, vv = write_layer(step, cache.layer(0), rotate(k, cos, signed_sin), v)
    out = F.scaled_dot_product_attention(rotate(q, cos, signed_sin), kk, vv, enable_gqa=H != k.shape[1])
    return out.transpose(1, 2).reshape(B, 1, H * D), step


# (B, H, KV, D, Bc, S, row0, start): GQA 9/3 (SmolLM2), MHA, MQA, head_dim not a multiple of 8/16 (6, 66, 80),
# the first slot and the last, several rows at an offset, more keys than one vector / an odd count
CASES = [(1, 9, 3, 64, 1, 40, 0, 17), (2, 4, 4, 6, 3, 5, 1, 0), (3, 6, 1, 66, 4, 9, 1, 8),
         (2, 8, 2, 80, 2, 33, 0, 32), (1, 12, 3, 128, 2, 300, 1, 250), (2, 10, 2, 18, 5, 7, 3, 6),
         (1, 2, 1, 2, 1, 3, 0, 2)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-KV{}-D{}-Bc{}-S{}-r{}-s{}".format(*c))
def test_op_equals_unfused_path_on_every_isa(native, dtype, case):
    B, H, KV, D, Bc, S, row0, start = case
    q, k, v, cos, ssin, cache = _inputs(B, H, KV, D, Bc, S, row0, start, dtype)
    want, _ = _unfused(q, k, v, cos, ssin, cache, row0)
    for isa in kernels.available_isas():
        kernels.set_isa(isa)
        _, _, _, _, _, mine = _inputs(B, H, KV, D, Bc, S, row0, start, dtype)
        got = torch.ops.llamalab.decode_attention(q, k, v, cos, ssin, *mine.layer(0), row0, start)
        assert got.shape == (B, 1, H * D) and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype], msg=isa)
        # the cache holds exactly what write_layer wrote (every row, every slot: nothing else touched)
        assert torch.equal(mine.k_layers[0], cache.k_layers[0]), isa
        assert torch.equal(mine.v_layers[0], cache.v_layers[0]), isa
    kernels.set_isa(None)


def test_op_takes_contiguous_inputs_and_shared_tables(native):
    B, H, KV, D, Bc, S, row0, start = 3, 6, 2, 64, 3, 20, 0, 11
    q, k, v, cos, ssin, cache = _inputs(B, H, KV, D, Bc, S, row0, start, torch.float32, per_row_tables=False)
    want, _ = _unfused(q, k, v, cos, ssin, cache, row0)
    _, _, _, _, _, mine = _inputs(B, H, KV, D, Bc, S, row0, start, torch.float32, per_row_tables=False)
    got = torch.ops.llamalab.decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), cos, ssin,
                                              *mine.layer(0), row0, start)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(mine.k_layers[0], cache.k_layers[0]) and torch.equal(mine.v_layers[0], cache.v_layers[0])


def test_op_softmax_is_max_subtracted_and_checks_its_arguments(native):
    # scores of ±1e4: exp without the max subtracted overflows to inf / nan
    q, k, v, cos, ssin, cache = _inputs(1, 4, 2, 16, 1, 8, 0, 5, torch.float32)
    q = q * 3e3
    cache.k_layers[0].mul_(3e3)
    want, _ = _unfused(q, k * 3e3, v, cos, ssin, cache, 0)
    _, _, _, _, _, mine = _inputs(1, 4, 2, 16, 1, 8, 0, 5, torch.float32)
    mine.k_layers[0].mul_(3e3)
    got = torch.ops.llamalab.decode_attention(q, k * 3e3, v, cos, ssin, *mine.layer(0), 0, 5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    ck, cv = mine.layer(0)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.llamalab.decode_attention(q, k, v, cos, ssin, ck, cv, 0, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.llamalab.decode_attention(q, k, v, cos, ssin, ck, cv, 1, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.llamalab.decode_attention(q.double(), k, v, cos, ssin, ck, cv, 0, 0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.llamalab.decode_attention(q, k.bfloat16(), v, cos, ssin, ck, cv, 0, 0)
    with pytest.raises(RuntimeError, match="multiple"):
        torch.ops.llamalab.decode_attention(q[:, :3], k, v, cos, ssin, ck, cv, 0, 0)


def test_reference_is_the_unfused_path():
    # the fallback definition (pure PyTorch) against the model's unfused path, bit for bit in float32
    for case in CASES[:4]:
        B, H, KV, D, Bc, S, row0, start = case
        q, k, v, cos, ssin, cache = _inputs(B, H, KV, D, Bc, S, row0, start, torch.float32)
        want, _ = _unfused(q, k, v, cos, ssin, cache, row0)
        _, _, _, _, _, mine = _inputs(B, H, KV, D, Bc, S, row0, start, torch.float32)
        got = decode_attention_reference(q, k, v, cos, ssin, *mine.layer(0), row0, start)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(mine.k_layers[0], cache.k_layers[0]) and torch.equal(mine.v_layers[0], cache.v_layers[0])


_CHILD = """
import torch
from llamalab import kernels
from llamalab.kernels.attention import decode_attention_reference, decode_attention_rows_reference
print("native", kernels.load(), "fused", kernels.fused())
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 6, 1, 8, generator=g)
k, v = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
cos, sin = torch.rand(2, 1, 1, 8, generator=g), torch.rand(2, 1, 1, 8, generator=g)
ck, cv = torch.randn(3, 2, 5, 8, generator=g), torch.randn(3, 2, 5, 8, generator=g)
ck2, cv2 = ck.clone(), cv.clone()
out = torch.ops.llamalab.decode_attention(q, k, v, cos, sin, ck, cv, 1, 3)
want = decode_attention_reference(q, k, v, cos, sin, ck2, cv2, 1, 3)
print("equal", torch.equal(out, want) and torch.equal(ck, ck2) and torch.equal(cv, cv2), tuple(out.shape))
rows, slots = torch.tensor([2, 0]), torch.tensor([4, 0])
out = torch.ops.llamalab.decode_attention_rows(q, k, v, cos, sin, ck, cv, rows, slots)
want = decode_attention_rows_reference(q, k, v, cos, sin, ck2, cv2, rows, slots)
print("rows equal", torch.equal(out, want) and torch.equal(ck, ck2) and torch.equal(cv, cv2), tuple(out.shape))
"""


def test_fallback_defines_the_op_without_the_cpp_build(tmp_path):
    env = {**os.environ, "LLAMALAB_KERNELS": "0", "LLAMALAB_KERNEL_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "native False fused False" in res.stdout and "equal True (2, 1, 48)" in res.stdout
    assert "rows equal True (2, 1, 48)" in res.stdout


def test_fake_keeps_the_op_in_a_compiled_graph(native):
    q, k, v, cos, ssin, cache = _inputs(2, 4, 2, 16, 3, 8, 1, 5, torch.float32)
    _, _, _, _, _, mine = _inputs(2, 4, 2, 16, 3, 8, 1, 5, torch.float32)

    def f(q, k, v, cos, ssin, ck, cv):
        return torch.ops.llamalab.decode_attention(q, k, v, cos, ssin, ck, cv, 1, 5) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v, cos, ssin, *mine.layer(0))
    want, _ = _unfused(q, k, v, cos, ssin, cache, 1)
    torch.testing.assert_close(got, want * 2, rtol=1e-5, atol=1e-5)
    assert torch.equal(mine.k_layers[0], cache.k_layers[0]) and torch.equal(mine.v_layers[0], cache.v_layers[0])


# ----------------------------------------------------------------------------------- through the model
UNIFORM_OP, ROWS_OP = "llamalab::decode_attention", "llamalab::decode_attention_rows"


def _op_calls(fn, op: str = UNIFORM_OP) -> tuple[object, int]:
    """fn()'s result and how many times it ran ``op`` (default llamalab::decode_attention)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == op)


def _both_op_calls(fn) -> tuple[object, int, int]:
    """fn()'s result and how many times it ran the uniform op and the per-row op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    counts = {e.key: e.count for e in prof.key_averages()}
    return out, counts.get(UNIFORM_OP, 0), counts.get(ROWS_OP, 0)


def _steps(model, prompt, n, dtype=torch.float32):
    """Prefill, n greedy decode steps, a continued prompt (a prefill over the fused-written cache), a
    rollback (truncate) and a copied row, then decode again: every step's last logits, stacked."""
    cache = KVCache.from_config(model.config, batch_size=2, max_seq_len=64, dtype=dtype)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache=cache, cache_rows=slice(0, 1))[:, -1]
        for phase in range(2):
            for _ in range(n):
                out.append(logits)
                tok = logits.argmax(-1, keepdim=True)
                logits = model(tok, cache=cache, cache_rows=slice(0, 1))[:, -1]
            if phase == 0:
                logits = model(torch.tensor([[7, 8, 9]]), cache=cache, cache_rows=slice(0, 1))[:, -1]  # continued
                cache.truncate(0, cache.length(0) - 2)  # roll back two tokens, as speculative decoding does
                logits = model(torch.tensor([[11]]), cache=cache, cache_rows=slice(0, 1))[:, -1]
        cache.copy_row(0, 1)
        both = torch.tensor([[3], [4]])
        for _ in range(3):  # two rows of equal length, one call: B = 2 at row 0
            logits2 = model(both, cache=cache, cache_rows=slice(0, 2))[:, -1]
            out.extend([logits2[:1], logits2[1:]])
            both = logits2.argmax(-1, keepdim=True)
        out.append(model(torch.tensor([[5]]), cache=cache, cache_rows=slice(1, 2))[:, -1])  # row 1 alone
    return torch.cat(out)


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_model_steps_fused_equal_unfused(fused_switch, heads):
    model = rand_llama()
    if heads != (4, 2):
        model = tiny_llama(make_tokenizer(), n_heads=heads[0], n_kv_heads=heads[1], seed=3)
    prompt = [5, 17, 33, 2, 64, 9, 21]
    fused_switch(False)
    want, calls_off = _op_calls(lambda: _steps(model, prompt, 6))
    fused_switch(True)
    got, calls_on = _op_calls(lambda: _steps(model, prompt, 6))
    assert calls_off == 0
    n_layers = model.config.n_layers
    assert calls_on == n_layers * (6 + 1 + 6 + 3 + 1)  # every one-token step of every layer, nothing else
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_model_bf16_steps_fused_close_to_unfused(fused_switch):
    model = rand_llama().to(torch.bfloat16)
    prompt = [5, 17, 33, 2, 64, 9, 21]
    fused_switch(False)
    want = _steps(model, prompt, 4, torch.bfloat16)
    fused_switch(True)
    got, calls = _op_calls(lambda: _steps(model, prompt, 4, torch.bfloat16))
    assert calls == model.config.n_layers * (4 + 1 + 4 + 3 + 1)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_op_is_not_used_off_the_eager_decode_path(fused_switch):
    model = rand_llama()
    n_layers = model.config.n_layers
    ids = torch.tensor([[5, 6, 7, 8]])
    cache = KVCache.from_config(model.config, batch_size=2, max_seq_len=32)
    with torch.no_grad():
        _, n = _op_calls(lambda: model(ids, cache=cache, cache_rows=slice(0, 1)))  # prefill (T > 1)
        assert n == 0
        cache.lengths[1] = 2  # ragged rows, no padding: the per-row op, not the uniform one
        cache.valid[1, :2] = True
        _, n = _op_calls(lambda: model(torch.tensor([[1], [2]]), cache=cache, cache_rows=slice(0, 2)))
        assert n == 0
        _, n = _op_calls(lambda: model(torch.tensor([[1], [2]]), cache=cache, cache_rows=slice(0, 2)), ROWS_OP)
        assert n == n_layers
        # a left-padded batch: the cache holds padding, every later step takes the masked unfused path
        padded = KVCache.from_config(model.config, batch_size=2, max_seq_len=32)
        model(torch.tensor([[0, 5, 6], [7, 8, 9]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), cache=padded)
        assert padded.has_padding
        for op in (UNIFORM_OP, ROWS_OP):
            _, n = _op_calls(lambda: model(torch.tensor([[1], [2]]), cache=padded), op)
            assert n == 0
        # a plan_decode step (every row, all slots, the scratch slot: the compiled step's plan) run eagerly
        static = KVCache.from_config(model.config, batch_size=2, max_seq_len=32, scratch_slot=True)
        model(ids, cache=static, cache_rows=slice(0, 1))
        step = static.plan_decode(torch.tensor([0]))
        for op in (UNIFORM_OP, ROWS_OP):
            _, n = _op_calls(lambda: model.forward_step(torch.tensor([[3], [0]]), static, step), op)
            assert n == 0
    # autograd wanted: the unfused path (the op has no backward)
    cache2 = KVCache.from_config(model.config, batch_size=1, max_seq_len=32)
    with torch.no_grad():
        model(ids, cache=cache2)
    out, n = _op_calls(lambda: model(torch.tensor([[3]]), cache=cache2))
    assert n == 0 and out.requires_grad


def test_greedy_generation_and_speculative_decoding_unchanged(fused_switch):
    model = rand_llama()
    prompts = [[5, 17, 33, 2, 64], [9, 9, 1, 70, 3]]  # equal lengths: one uniform batched step (rows 0..1)
    draft = early_exit_draft(model, 1)
    runs = {}
    for on in (True, False):
        fused_switch(on)
        batched, calls = _op_calls(lambda: complete(model, None, prompts, max_new_tokens=12, compile=False))
        alone, calls_alone = _op_calls(lambda: complete(model, None, prompts[1:], max_new_tokens=12, compile=False))
        spec, calls_spec = _op_calls(lambda: complete(model, None, prompts, max_new_tokens=12, compile=False,
                                                      draft_model=draft, num_draft_tokens=3))
        assert (min(calls, calls_alone, calls_spec) > 0) == on
        runs[on] = [c.token_ids for c in batched + alone + spec]
    want = [reference_greedy(model, p, 12) for p in prompts + prompts[1:] + prompts]
    assert runs[True] == runs[False] == want


def test_saved_and_loaded_chat_model_generates_the_same(fused_switch, tmp_path):
    d = save_chat_model(tmp_path / "m", initializer_range=0.1)
    model, tok = llamalab.load(str(d))
    assert kernels.fused()
    chat = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "how are you today?"},
            {"role": "user", "content": "the quick brown fox"}]
    texts = {}
    for on in (True, False):
        fused_switch(on)
        texts[on], calls = _op_calls(lambda: llamalab.generate(model, tok, chat, max_new_tokens=16, compile=False))
        assert (calls > 0) == on
    assert texts[True] == texts[False]


# ----------------------------------------------------------------------------------- rows of different lengths
def _ragged_inputs(B, H, KV, D, Bc, S, rows, lengths, dtype, seed=0):
    """q / k / v (transposed views) for B batch rows that are cache rows ``rows`` (any order) holding
    ``lengths`` tokens each (random earlier keys/values, no padding), and their RoPE tables."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, 1, KV, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, 1, KV, D, generator=g).to(dtype).transpose(1, 2)
    cos, signed_sin = RotaryEmbedding(D, 10000.0, None, 4096).tables(torch.tensor(lengths)[:, None])
    cache = KVCache(1, Bc, KV, S, D, dtype=dtype)
    g2 = torch.Generator().manual_seed(seed + 1)
    cache.k_layers[0].copy_(torch.randn(Bc, KV, S, D, generator=g2))
    cache.v_layers[0].copy_(torch.randn(Bc, KV, S, D, generator=g2))
    for r, n in zip(rows, lengths):
        cache.lengths[r] = n
        cache.valid[r, :n] = True
    return q, k, v, cos, signed_sin, cache


def _unfused_ragged(q, k, v, cos, signed_sin, cache, rows):
    """The model's plain path for a ragged step: plan (rows as given), rotate, write_layer, masked SDPA."""
    B, H, _, D = q.shape
    step = cache.plan(rows, B, 1)
    assert step.lengths_only and not step.every_row
    kk, vv = write_layer(step, cache.layer(0), rotate(k, cos, signed_sin), v)
    out = F.scaled_dot_product_attention(rotate(q, cos, signed_sin), kk, vv, attn_mask=step.mask,
                                         enable_gqa=H != k.shape[1])
    return out.transpose(1, 2).reshape(B, 1, H * D), step


# (B, H, KV, D, Bc, S, rows, lengths): rows out of order, a row at slot 0 and one at the last slot S-1, odd D,
# GQA / MHA / MQA, a batch of one, equal lengths given as an index tensor, a 16-row batch
RAGGED = [(3, 9, 3, 64, 5, 40, [4, 0, 2], [17, 0, 39]), (2, 4, 4, 6, 3, 5, [2, 0], [4, 1]),
          (4, 6, 1, 66, 6, 33, [1, 5, 3, 0], [32, 7, 0, 20]), (1, 8, 2, 80, 3, 9, [2], [8]),
          (2, 10, 2, 18, 4, 7, [3, 1], [3, 3]), (16, 4, 2, 16, 16, 24, list(range(15, -1, -1)), list(range(0, 24, 3))
                                                  + list(range(1, 24, 3)))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", RAGGED, ids=lambda c: "B{}-H{}-KV{}-D{}-Bc{}-S{}".format(*c[:6]))
def test_rows_op_equals_unfused_path_on_every_isa(native, dtype, case):
    B, H, KV, D, Bc, S, rows, lengths = case
    q, k, v, cos, ssin, cache = _ragged_inputs(B, H, KV, D, Bc, S, rows, lengths, dtype)
    want, step = _unfused_ragged(q, k, v, cos, ssin, cache, torch.tensor(rows))
    for isa in kernels.available_isas():
        kernels.set_isa(isa)
        mine = _ragged_inputs(B, H, KV, D, Bc, S, rows, lengths, dtype)[-1]
        got = torch.ops.llamalab.decode_attention_rows(q, k, v, cos, ssin, *mine.layer(0), step.row_index,
                                                       step.slots[:, 0])
        assert got.shape == (B, 1, H * D) and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype], msg=isa)
        assert torch.equal(mine.k_layers[0], cache.k_layers[0]), isa  # exactly what write_layer wrote
        assert torch.equal(mine.v_layers[0], cache.v_layers[0]), isa
    kernels.set_isa(None)
    # the fallback (pure PyTorch) is the unfused path too
    ref = _ragged_inputs(B, H, KV, D, Bc, S, rows, lengths, dtype)[-1]
    fb = decode_attention_rows_reference(q, k, v, cos, ssin, *ref.layer(0), step.row_index, step.slots[:, 0])
    torch.testing.assert_close(fb.float(), want.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(ref.k_layers[0], cache.k_layers[0]) and torch.equal(ref.v_layers[0], cache.v_layers[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_rows_output_is_bit_identical_batched_or_alone(native, dtype):
    """Each row's output of a ragged batch equals, bit for bit, that row decoded alone (the uniform op at its
    own row and slot, and the per-row op with a batch of one), on every ISA; so do the cache rows."""
    B, H, KV, D, Bc, S, rows, lengths = 5, 9, 3, 64, 6, 50, [3, 0, 5, 1, 4], [49, 0, 13, 31, 16]
    q, k, v, cos, ssin, _ = _ragged_inputs(B, H, KV, D, Bc, S, rows, lengths, dtype, seed=4)
    for isa in kernels.available_isas():
        kernels.set_isa(isa)
        batch = _ragged_inputs(B, H, KV, D, Bc, S, rows, lengths, dtype, seed=4)[-1]
        got = torch.ops.llamalab.decode_attention_rows(q, k, v, cos, ssin, *batch.layer(0), torch.tensor(rows),
                                                       torch.tensor(lengths))
        for b, (r, n) in enumerate(zip(rows, lengths)):
            one = slice(b, b + 1)
            alone = _ragged_inputs(B, H, KV, D, Bc, S, rows, lengths, dtype, seed=4)[-1]
            uniform = torch.ops.llamalab.decode_attention(q[one], k[one], v[one], cos[one], ssin[one],
                                                          *alone.layer(0), r, n)
            assert torch.equal(uniform, got[one]), (isa, b)
            assert torch.equal(alone.k_layers[0][r], batch.k_layers[0][r]), (isa, b)
            assert torch.equal(alone.v_layers[0][r], batch.v_layers[0][r]), (isa, b)
            alone = _ragged_inputs(B, H, KV, D, Bc, S, rows, lengths, dtype, seed=4)[-1]
            single = torch.ops.llamalab.decode_attention_rows(q[one], k[one], v[one], cos[one], ssin[one],
                                                              *alone.layer(0), torch.tensor([r]), torch.tensor([n]))
            assert torch.equal(single, got[one]), (isa, b)
    kernels.set_isa(None)


def test_rows_op_checks_its_arguments(native):
    q, k, v, cos, ssin, cache = _ragged_inputs(2, 4, 2, 16, 3, 8, [0, 2], [3, 5], torch.float32)
    ck, cv = cache.layer(0)
    ok = torch.tensor([0, 2]), torch.tensor([3, 5])
    torch.ops.llamalab.decode_attention_rows(q, k, v, cos, ssin, ck, cv, *ok)
    for rows, slots, msg in [([0, 3], [3, 5], "out of range"), ([0, -1], [3, 5], "out of range"),
                             ([0, 2], [3, 8], "out of range"), ([0, 2], [-1, 5], "out of range"),
                             ([2, 2], [3, 5], "once"), ([0, 2, 1], [3, 5, 1], r"\(B,\)")]:
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.llamalab.decode_attention_rows(q, k, v, cos, ssin, ck, cv, torch.tensor(rows),
                                                     torch.tensor(slots))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.llamalab.decode_attention_rows(q, k, v, cos, ssin, ck, cv, ok[0].int(), ok[1])


def test_rows_op_fake_keeps_it_in_a_compiled_graph(native):
    q, k, v, cos, ssin, cache = _ragged_inputs(3, 4, 2, 16, 4, 8, [3, 0, 1], [7, 2, 0], torch.float32)
    mine = _ragged_inputs(3, 4, 2, 16, 4, 8, [3, 0, 1], [7, 2, 0], torch.float32)[-1]
    want, step = _unfused_ragged(q, k, v, cos, ssin, cache, torch.tensor([3, 0, 1]))

    def f(q, k, v, cos, ssin, ck, cv, rows, slots):
        return torch.ops.llamalab.decode_attention_rows(q, k, v, cos, ssin, ck, cv, rows, slots) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v, cos, ssin, *mine.layer(0), step.row_index, step.slots[:, 0])
    torch.testing.assert_close(got, want * 2, rtol=1e-5, atol=1e-5)
    assert torch.equal(mine.k_layers[0], cache.k_layers[0]) and torch.equal(mine.v_layers[0], cache.v_layers[0])


# ----------------------------------------------------------------------------------- ragged rows through the model
RAGGED_PROMPTS = [[5, 17, 33, 2, 64, 9, 21, 4, 4], [9, 9, 1], [70, 3, 8, 8, 1, 2], [1], [44, 12]]


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def test_complete_ragged_batch_equals_alone_and_unfused(fused_switch, heads):
    """complete() of prompts of different lengths: the batch decodes through the per-row op (rows of
    different lengths every step), each prompt alone through the uniform op; batched == alone == the
    unfused path == the cache-free greedy loop, token for token (float32)."""
    model = rand_llama() if heads == (4, 2) else \
        tiny_llama(make_tokenizer(), n_heads=heads[0], n_kv_heads=heads[1], seed=3, eos_token_id=None)
    prompts = RAGGED_PROMPTS
    runs = {}
    for on in (True, False):
        fused_switch(on)
        batched, uniform, rows = _both_op_calls(lambda: complete(model, None, prompts, max_new_tokens=12,
                                                                 compile=False))
        n_layers = model.config.n_layers
        # every decode step is ragged: the rows op (the one-token prompt's prefill is a uniform T = 1 step)
        assert (uniform, rows) == ((n_layers, 11 * n_layers) if on else (0, 0))
        alone = []
        for p in prompts:
            (c,), uniform, rows = _both_op_calls(lambda p=p: complete(model, None, [p], max_new_tokens=12,
                                                                      compile=False))
            assert (uniform, rows) == (((11 + (len(p) == 1)) * n_layers, 0) if on else (0, 0))
            alone.append(c.token_ids)
        runs[on] = ([c.token_ids for c in batched], alone)
    want = [reference_greedy(model, p, 12) for p in prompts]
    assert runs[True][0] == runs[True][1] == want
    assert runs[False][0] == runs[False][1] == want


def _runner_steps(model, schedule, tokens0=3):
    """A Runner of 6 rows: rows 0..4 prefilled with RAGGED_PROMPTS (different lengths), then one decode
    step per entry of ``schedule`` (the rows taking part, in that order: index-tensor rows, rows dropping out
    as in continuous batching), greedy; every step's logits per row, and the cache."""
    runner = Runner(model, 6, 48, compile=False)
    for i, p in enumerate(RAGGED_PROMPTS):
        runner.prefill(i, p)
    nxt = dict.fromkeys(range(5), tokens0)
    logits: dict[int, list[torch.Tensor]] = {r: [] for r in range(5)}
    for rows in schedule:
        out = runner.decode(rows, [nxt[r] for r in rows])
        for r, lg in zip(rows, out):
            logits[r].append(lg)
            nxt[r] = int(lg.argmax())
    return {r: torch.stack(v) for r, v in logits.items() if v}, runner.cache


def test_runner_ragged_rows_in_any_order_fused_equal_unfused(fused_switch):
    """Runner.decode over rows given out of order, dropping out and joining (index-tensor rows and slices,
    uniform and ragged): fused == unfused logits (1e-5) and argmax, every row against that row decoded alone."""
    model = rand_llama()
    schedule = [[3, 0, 2, 1, 4], [4, 2, 0], [0, 1, 2, 3, 4], [1, 3], [0, 1], [2, 4, 3], [0], [4, 0, 1, 2, 3]] * 2
    got = {}
    for on in (True, False):
        fused_switch(on)
        (got[on], _), uniform, rows = _both_op_calls(lambda: _runner_steps(model, schedule))
        n_layers = model.config.n_layers
        # uniform: the one-token prompt's prefill and the two steps of row 0 alone (a slice); the rest ragged
        assert (rows == (len(schedule) - 2) * n_layers and uniform == 3 * n_layers) if on else (rows == uniform == 0)
    for r in got[True]:
        torch.testing.assert_close(got[True][r], got[False][r], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[True][r].argmax(-1), got[False][r].argmax(-1))
    fused_switch(True)
    for r in range(5):  # the same row's steps alone: same tokens, logits to float rounding of the linears
        alone, _ = _runner_steps(model, [[r] for rows in schedule if r in rows])
        torch.testing.assert_close(alone[r], got[True][r], rtol=1e-5, atol=1e-5)
        assert torch.equal(alone[r].argmax(-1), got[True][r].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_layer_ragged_step_writes_what_write_layer_writes(fused_switch, dtype):
    """One GroupedQueryAttention layer over a ragged index-tensor step (a row at slot 0, one at the last slot):
    fused and unfused leave bit-equal caches, outputs equal to float rounding; with padding in the cache the
    fused op is not taken."""
    torch.manual_seed(0)
    from llamalab.model.attention import GroupedQueryAttention

    attn = GroupedQueryAttention(48, 6, 2, 8, layer_idx=0).eval().to(dtype)
    x = torch.randn(4, 1, 48).to(dtype)
    rope = RotaryEmbedding(8, 10000.0, None, 64)
    caches, outs = {}, {}
    for on in (True, False):
        fused_switch(on)
        cache = KVCache(1, 5, 2, 12, 8, dtype=dtype)
        g = torch.Generator().manual_seed(1)
        cache.k_layers[0].copy_(torch.randn(5, 2, 12, 8, generator=g))
        cache.v_layers[0].copy_(torch.randn(5, 2, 12, 8, generator=g))
        for r, n in zip([4, 1, 0, 2], [11, 0, 5, 7]):
            cache.lengths[r] = n
            cache.valid[r, :n] = True
        step = cache.plan(torch.tensor([4, 1, 0, 2]), 4, 1)
        assert step.lengths_only and step.start is None and step.mask is not None
        cos, ssin = rope.tables(step.position_ids)
        with torch.no_grad():
            outs[on], uniform, rows = _both_op_calls(lambda c=cos, s=ssin, st=step, kc=cache:
                                                     attn(x, c, s, step=st, cache=kc))
        assert (uniform, rows) == ((0, 1) if on else (0, 0))
        caches[on] = cache
    assert torch.equal(caches[True].k_layers[0], caches[False].k_layers[0])
    assert torch.equal(caches[True].v_layers[0], caches[False].v_layers[0])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[True].float(), outs[False].float(), rtol=tol, atol=tol)
    fused_switch(True)
    cache = caches[True]
    cache.has_padding = True  # (as a left-padded prefill sets it)
    step = cache.plan(torch.tensor([4, 1]), 2, 1)
    assert not step.lengths_only
    cos, ssin = rope.tables(step.position_ids)
    with torch.no_grad():
        _, uniform, rows = _both_op_calls(lambda: attn(x[:2], cos, ssin, step=step, cache=cache))
    assert uniform == rows == 0


def test_saved_and_loaded_model_ragged_batch_equals_alone(fused_switch, tmp_path):
    """Through llamalab.load: a batch of prompts of different lengths generates, fused on, what each prompt
    generates alone and what the unfused path generates (greedy, float32)."""
    d = save_chat_model(tmp_path / "m", initializer_range=0.1)
    model, tok = llamalab.load(str(d))
    prompts = ["hello world", "the quick brown fox jumps over", "to be", "a rose by any other name would smell"]
    texts = {}
    for on in (True, False):
        fused_switch(on)
        (batched, _, rows) = _both_op_calls(lambda: llamalab.generate(model, tok, prompts, max_new_tokens=10,
                                                                      compile=False))
        assert (rows > 0) == on
        alone = [llamalab.generate(model, tok, p, max_new_tokens=10, compile=False) for p in prompts]
        assert batched == alone
        texts[on] = batched
    assert texts[True] == texts[False]
