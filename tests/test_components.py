"""Properties of the components: RoPE, RMSNorm, grouped-query attention and the KV cache masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llamalab import Llama, LlamaConfig
from llamalab.model.attention import GroupedQueryAttention
from llamalab.model.rmsnorm import RMSNorm
from llamalab.model.rope import RotaryEmbedding, apply_rope, compute_inv_freq

ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def _rotate(x: torch.Tensor, pos: int, rope: RotaryEmbedding) -> torch.Tensor:
    cos, sin = rope(torch.tensor([[pos]]))
    return apply_rope(x.view(1, 1, 1, -1), cos, sin).view(-1)


@pytest.mark.parametrize("rope_type", list(ROPE_SCALINGS))
def test_rope_score_depends_only_on_relative_position(rope_type):
    torch.manual_seed(0)
    rope = RotaryEmbedding(64, 10000.0, ROPE_SCALINGS[rope_type], 256)
    q, k = torch.randn(64, dtype=torch.float64).float(), torch.randn(64).float()
    for m, n in [(5, 2), (40, 7), (100, 100), (3, 90)]:
        base = _rotate(q, m, rope) @ _rotate(k, n, rope)
        for shift in (1, 17, 120):
            shifted = _rotate(q, m + shift, rope) @ _rotate(k, n + shift, rope)
            assert torch.allclose(base, shifted, atol=1e-4, rtol=1e-4), (m, n, shift)
    # and it does depend on the distance
    assert not torch.allclose(_rotate(q, 10, rope) @ _rotate(k, 0, rope), _rotate(q, 0, rope) @ _rotate(k, 0, rope))


@pytest.mark.parametrize("rope_type", ["default", "linear", "llama3", "dynamic"])
def test_rope_preserves_norms(rope_type):
    torch.manual_seed(1)
    rope = RotaryEmbedding(32, 500000.0, ROPE_SCALINGS[rope_type], 256)
    x = torch.randn(2, 4, 50, 32)
    cos, sin = rope(torch.arange(50)[None].expand(2, 50) * 997)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(x, y)


def test_rope_angles_are_float32_for_bf16_inputs():
    rope = RotaryEmbedding(64, 500000.0, None, 131072)
    cos, sin = rope(torch.tensor([[100_000]]))
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    inv_freq, _ = compute_inv_freq(64, 500000.0)
    exact = torch.tensor(100_000.0, dtype=torch.float64) * inv_freq.double()
    assert torch.allclose(cos[0, 0, :32].double(), exact.cos(), atol=2e-3)
    x = torch.randn(1, 1, 1, 64).bfloat16()
    assert apply_rope(x, cos, sin).dtype == torch.bfloat16


def test_llama3_frequencies_match_published_formula():
    """Meta's Llama 3.1 reference: apply_scaling(freqs) with factor 8, low 1, high 4, old context 8192."""
    theta, dim = 500000.0, 128
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    ours, att = compute_inv_freq(dim, theta, scaling)
    assert att == 1.0
    expected = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            expected.append(freq)
        elif wavelen > 8192 / 1.0:
            expected.append(freq / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * freq / 8.0 + smooth * freq)
    assert torch.allclose(ours.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)
    # high frequencies untouched, lowest divided by the factor
    base, _ = compute_inv_freq(dim, theta)
    assert ours[0] == base[0] and torch.isclose(ours[-1], base[-1] / 8.0)


def test_yarn_frequencies_match_published_formula():
    """YaRN (Peng et al. 2023): pairs that rotate more than beta_fast=32 times over the original context keep
    their frequency, fewer than beta_slow=1 are divided by the factor, a linear ramp over the pair index
    in between (the paper's reference code), and cos/sin are scaled by 0.1·ln(s)+1."""
    theta, dim, s, L = 10000.0, 64, 4.0, 2048
    ours, att = compute_inv_freq(dim, theta, {"rope_type": "yarn", "factor": s,
                                              "original_max_position_embeddings": L})
    assert att == pytest.approx(0.1 * math.log(s) + 1.0)
    base = [1.0 / theta ** (2 * i / dim) for i in range(dim // 2)]

    def corr_dim(rot):
        return dim * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(corr_dim(32)), 0), min(math.ceil(corr_dim(1)), dim - 1)
    for i, f in enumerate(base):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        expected = f / s * ramp + f * (1 - ramp)
        assert ours[i].item() == pytest.approx(expected, rel=1e-5)
        rotations = L * f / (2 * math.pi)
        if rotations > 32 * 1.5:
            assert ours[i].item() == pytest.approx(f, rel=1e-6)
        if rotations < 0.5:
            assert ours[i].item() == pytest.approx(f / s, rel=1e-6)


def test_dynamic_ntk_only_changes_past_the_context():
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    short, _ = compute_inv_freq(64, 10000.0, scaling, 128, seq_len=100)
    plain, _ = compute_inv_freq(64, 10000.0, None, 128)
    assert torch.equal(short, plain)
    long, _ = compute_inv_freq(64, 10000.0, scaling, 128, seq_len=512)
    base = 10000.0 * ((2.0 * 512 / 128) - 1.0) ** (64 / 62)
    assert torch.allclose(long, compute_inv_freq(64, base)[0])
    assert (long[1:] < plain[1:]).all()


# ------------------------------------------------------------------------------------------------ RMSNorm
def test_rmsnorm_matches_definition_and_invariances():
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    x = torch.randn(3, 7, 48)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert torch.allclose(norm(x * 37.5), norm(x), atol=1e-5)  # scale invariance
    unit = RMSNorm(48, eps=1e-6)
    rms = unit(x).pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    assert not torch.allclose(norm(x + 3.0), norm(x) + 3.0)  # no re-centring: it is not LayerNorm


def test_rmsnorm_computes_in_float32_for_bf16_inputs():
    torch.manual_seed(0)
    norm = RMSNorm(256, eps=1e-5).bfloat16()
    x = (torch.randn(4, 256) * 300).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    x32 = x.float()
    ref = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert (y.float() - ref).abs().max() < 1e-2  # only the final bf16 rounding


def test_rmsnorm_eps_comes_from_config():
    cfg = LlamaConfig.from_preset("tiny", rms_norm_eps=0.123)
    model = Llama(cfg)
    assert all(m.eps == 0.123 for m in model.modules() if isinstance(m, RMSNorm))


# ------------------------------------------------------------------------------------------------ GQA
def _reference_attention(attn: GroupedQueryAttention, x, cos, sin):
    """Textbook attention with K/V heads explicitly repeated (what GQA saves us from doing)."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.n_rep, dim=1)
    v = v.repeat_interleave(attn.n_rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = F.softmax(scores, dim=-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 8), (8, 2), (8, 1)])
def test_gqa_equals_attention_with_repeated_kv_heads(n_heads, n_kv_heads):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(64, n_heads, n_kv_heads, 16)
    rope = RotaryEmbedding(16, 10000.0, None, 128)
    x = torch.randn(2, 12, 64)
    cos, sin = rope(torch.arange(12)[None].expand(2, 12))
    ref = _reference_attention(attn, x, cos, sin)
    assert torch.allclose(attn(x, cos, sin), ref, atol=1e-5)
    # masked (grouped-view) path gives the same result
    mask = torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    assert torch.allclose(attn(x, cos, sin, mask=mask), ref, atol=1e-5)
    assert attn.k_proj.weight.shape[0] == n_kv_heads * 16


def test_kv_cache_holds_only_kv_heads(tiny_model):
    cache = tiny_model.new_cache(batch_size=2, max_seq_len=32)
    cfg = tiny_model.config
    assert cache.k.shape == (cfg.n_layers, 2, cfg.n_kv_heads, 32, cfg.head_dim)
    assert cfg.n_kv_heads < cfg.n_heads
    assert 2 * tiny_model.memory_report(32)["kv_cache_bytes"] == cache.nbytes()  # batch of 2


# ------------------------------------------------------------------------------------------------ masks
def test_chunks_on_a_cache_equal_full_forward(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = tiny_model(ids)
        for chunks in ([40], [1] * 40, [9, 1, 1, 13, 16], [3, 37]):
            cache = tiny_model.new_cache(2, 64)
            outs, t = [], 0
            for c in chunks:
                outs.append(tiny_model(ids[:, t:t + c], cache=cache))
                t += c
            assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5), chunks
            assert cache.lengths.tolist() == [40, 40]


def test_left_padding_no_nan_and_same_logits(tiny_model):
    torch.manual_seed(0)
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    with torch.no_grad():
        out = tiny_model(batch, attention_mask=mask)
        assert torch.isfinite(out).all()
        assert torch.allclose(out[0], tiny_model(a)[0], atol=1e-5)
        assert torch.allclose(out[1, 7:], tiny_model(b)[0], atol=1e-5)
        # the same left-padded batch through the cache, then decode one token each
        cache = tiny_model.new_cache(2, 32)
        pre = tiny_model(batch, attention_mask=mask, cache=cache)
        assert torch.isfinite(pre).all()
        nxt = torch.tensor([[3], [4]])
        step = tiny_model(nxt, cache=cache)
        ref_a = tiny_model(torch.cat([a, nxt[:1]], 1))[0, -1]
        ref_b = tiny_model(torch.cat([b, nxt[1:]], 1))[0, -1]
    assert torch.allclose(step[0, 0], ref_a, atol=1e-5)
    assert torch.allclose(step[1, 0], ref_b, atol=1e-5)


def test_ragged_cache_rows_decode_like_single_sequences(tiny_model):
    torch.manual_seed(0)
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 4))
    cache = tiny_model.new_cache(2, 32)
    with torch.no_grad():
        tiny_model(a, cache=cache, cache_rows=slice(0, 1))
        tiny_model(b, cache=cache, cache_rows=slice(1, 2))
        assert cache.lengths.tolist() == [9, 4]
        nxt = torch.tensor([[5], [6]])
        step = tiny_model(nxt, cache=cache)
        ref_a = tiny_model(torch.cat([a, nxt[:1]], 1))[0, -1]
        ref_b = tiny_model(torch.cat([b, nxt[1:]], 1))[0, -1]
        # a subset of rows given as an index tensor
        step2 = tiny_model(torch.tensor([[7]]), cache=cache, cache_rows=torch.tensor([1]))
        ref_b2 = tiny_model(torch.cat([b, nxt[1:], torch.tensor([[7]])], 1))[0, -1]
    assert torch.allclose(step[0, 0], ref_a, atol=1e-5)
    assert torch.allclose(step[1, 0], ref_b, atol=1e-5)
    assert torch.allclose(step2[0, 0], ref_b2, atol=1e-5)
    assert cache.lengths.tolist() == [10, 6]
    with pytest.raises(ValueError, match="KV cache full"):
        tiny_model(torch.zeros(2, 30, dtype=torch.long), cache=cache)


def test_explicit_position_ids_shift_rope(tiny_model):
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        plain = tiny_model(ids)
        same = tiny_model(ids, position_ids=torch.arange(6)[None])
        shifted = tiny_model(ids, position_ids=torch.arange(6)[None] + 50)
    assert torch.equal(plain, same)
    # RoPE is relative: a uniform shift changes nothing but rounding
    assert torch.allclose(plain, shifted, atol=1e-4)


# ------------------------------------------------------------------------------------------------ meta
def test_meta_model_reports_size_without_allocating():
    cfg = LlamaConfig.from_preset("llama3.1-8b")
    with torch.device("meta"):
        model = Llama(cfg).to(torch.bfloat16)
    assert model.num_parameters() == cfg.num_parameters() == 8_030_261_248  # Llama 3.1 8B's published count
    report = model.memory_report(context_len=8192)
    assert report["weight_bytes"] == 2 * 8_030_261_248
    assert report["kv_cache_bytes_per_token"] == 2 * 32 * 8 * 128 * 2  # K+V, layers, kv heads, head_dim, bf16
    tied = LlamaConfig.from_preset("llama3.2-1b")
    with torch.device("meta"):
        m1 = Llama(tied)
    assert m1.num_parameters() == tied.num_parameters() == 1_235_814_400  # Llama 3.2 1B, tied embeddings


def test_a_uniform_decode_plan_is_the_general_plan():
    """KVCache.plan's short path for one token per row of equal lengths plans what the general path plans."""
    from llamalab.model.kv_cache import KVCache

    fast, general = (KVCache(2, 4, 2, 16, 8) for _ in range(2))
    for cache in (fast, general):
        cache.commit(cache.plan(slice(0, 3), 3, 5))  # three rows of five tokens, row 3 empty
    for _ in range(3):
        a = fast.plan(slice(0, 3), 3, 1)
        b = general.plan(torch.tensor([0, 1, 2]), 3, 1)  # rows as indices: the general path
        assert (a.start, a.kv_len, a.mask, a.lengths_only) == (b.start, b.kv_len, b.mask, b.lengths_only)
        for name in ("slots", "position_ids", "row_index"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(fast.valid, general.valid)
        fast.commit(a)
        general.commit(b)
        assert torch.equal(fast.lengths, general.lengths)
        assert a.slots.data_ptr() != fast.lengths.data_ptr()  # the step keeps its slots when lengths move on


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                     {"rope_type": "dynamic", "factor": 2.0}])
def test_rope_tables_of_single_positions_are_what_the_call_computes(scaling):
    """RotaryEmbedding.tables keeps the tables of single positions (decode): a kept one is bit for bit what
    the computation gives, in every grad mode, and batches / dynamic NTK are computed as before."""
    from llamalab.model.rope import rope_tables

    rot = RotaryEmbedding(16, 10000.0, scaling, 64)
    for ctx in (torch.inference_mode, torch.no_grad, torch.enable_grad):
        with ctx():
            for pos in (0, 3, 63, 3, 200, 0):
                ids = torch.tensor([[pos]])
                got, want = rot.tables(ids), rope_tables(*rot(ids))
                assert all(torch.equal(a, b) for a, b in zip(got, want)), (scaling, pos)
            ids = torch.tensor([[1, 2, 3]])
            assert all(torch.equal(a, b) for a, b in zip(rot.tables(ids), rope_tables(*rot(ids))))
    assert (len(rot.__dict__.get("_decode_tables", {})) == 0) == (scaling is not None
                                                                   and scaling["rope_type"] == "dynamic")
