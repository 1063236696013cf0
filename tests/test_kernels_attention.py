"""The fused decode-attention op (``llamalab::decode_attention``: RoPE + cache append + GQA for one token):
the C++ op against the model's own unfused path (rope.rotate, KVCache.plan + write_layer, SDPA with
enable_gqa) on random inputs — MHA / MQA / GQA, odd head sizes, first and last slot, several rows at an
offset, every ISA path — the cache left exactly as write_layer leaves it, the pure-PyTorch fallback, and
through the model: greedy generation (plain, speculative, chat, saved + loaded) with the fused ops on and
off gives the same tokens, logits within 1e-5, and the op is used exactly on the eager decode path."""

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
from llamalab.generation.speculative import early_exit_draft
from llamalab.kernels.attention import decode_attention_reference
from llamalab.model.kv_cache import KVCache, write_layer
from llamalab.model.rope import RotaryEmbedding, rotate


@pytest.fixture(scope="module")
def native():
    if not kernels.load():
        pytest.skip(f"C++ kernels unavailable here ({kernels._state.get('reason')}); the fallback is tested below")
    yield
    kernels.set_isa(None)


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
from llamalab.kernels.attention import decode_attention_reference
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
"""


def test_fallback_defines_the_op_without_the_cpp_build(tmp_path):
    env = {**os.environ, "LLAMALAB_KERNELS": "0", "LLAMALAB_KERNEL_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "native False fused False" in res.stdout and "equal True (2, 1, 48)" in res.stdout


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
def _op_calls(fn) -> tuple[object, int]:
    """fn()'s result and how many times it ran llamalab::decode_attention."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "llamalab::decode_attention")


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
    ids = torch.tensor([[5, 6, 7, 8]])
    cache = KVCache.from_config(model.config, batch_size=2, max_seq_len=32)
    with torch.no_grad():
        _, n = _op_calls(lambda: model(ids, cache=cache, cache_rows=slice(0, 1)))  # prefill (T > 1)
        assert n == 0
        cache.lengths[1] = 2  # ragged rows: a masked step
        cache.valid[1, :2] = True
        _, n = _op_calls(lambda: model(torch.tensor([[1], [2]]), cache=cache, cache_rows=slice(0, 2)))
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
