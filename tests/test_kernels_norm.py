"""The fused norm ops (``llamalab::rms_norm``, ``add_rms_norm``, ``silu_mul``): the C++ op against the plain
PyTorch expressions on every ISA path of this CPU (float32, bfloat16, float16; odd sizes, leading dims,
non-contiguous input), the pure-PyTorch fallback definitions, the fakes under torch.compile, and the model
with the fused ops on vs off (logits, greedy tokens, a saved and loaded model through llamalab.load +
llamalab.generate), and training still differentiable while they are on."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from helpers import make_tokenizer, rand_llama, reference_greedy, save_chat_model
from llamalab import kernels
from llamalab.kernels import norm as knorm

SHAPES = [(7,), (1, 1, 33), (3, 5, 577), (2, 576), (4, 1536), (1, 1, 1), (2, 3, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def isas() -> list[str]:
    return kernels.available_isas() if kernels.load() else []


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place of a's dtype between a and b (same dtype, finite)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.float32:
        return int(((a - b).abs() / torch.finfo(a.dtype).eps / b.abs().clamp_min(1e-30)).max()) if a.numel() else 0
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    # sign-magnitude to a monotone integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max().clamp_min(1e-30)))
    else:
        # the normalised value and its product with the gain are each rounded to 16 bits: a float32 tie
        # in the first rounding can become 2 ulps after the second (seen in float16)
        assert ulps_apart(got, want) <= 2, (got - want).abs().max()
        # most elements identical: an off-by-one is a float32 rounding tie, not a different formula
        assert (got != want).float().mean() < 0.02


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_plain(native, shape, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype))).encode()))  # same every run
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype)
    w = (torch.randn(shape[-1], generator=gen) + 1).to(dtype)
    want = knorm.rms_norm_reference(x, w, 1e-5)
    for isa in isas():
        kernels.set_isa(isa)
        assert_matches(torch.ops.llamalab.rms_norm(x, w, 1e-5), want)
    kernels.set_isa(None)


@pytest.mark.parametrize("xdt,wdt", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                     (torch.float16, torch.float32), (torch.bfloat16, torch.float16)])
def test_rms_norm_mixed_dtypes(native, xdt, wdt):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 577, generator=gen).to(xdt)
    w = (torch.randn(577, generator=gen) + 1).to(wdt)
    got = torch.ops.llamalab.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.promote_types(xdt, wdt)
    assert_matches(got, knorm.rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_non_contiguous_and_big_eps(native, dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 7, 66, generator=gen).to(dtype).transpose(0, 1)[..., ::2]  # (7, 5, 33), strided
    w = (torch.randn(66, generator=gen).to(dtype))[::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    for eps in (1e-6, 0.5):
        assert_matches(torch.ops.llamalab.rms_norm(x, w, eps), knorm.rms_norm_reference(x, w, eps))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_plain(native, shape, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen).to(dtype)
    r = (torch.randn(shape, generator=gen) * 2).to(dtype)
    w = (torch.randn(shape[-1], generator=gen) + 1).to(dtype)
    want_s, want_y = knorm.add_rms_norm_reference(x, r, w, 1e-5)
    for isa in isas():
        kernels.set_isa(isa)
        s, y = torch.ops.llamalab.add_rms_norm(x, r, w, 1e-5)
        assert torch.equal(s, want_s)  # one rounded float32 sum: exact
        assert_matches(y, want_y)
    kernels.set_isa(None)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_plain(native, shape, dtype):
    gen = torch.Generator().manual_seed(6)
    g = (torch.randn(shape, generator=gen) * 4).to(dtype)
    u = torch.randn(shape, generator=gen).to(dtype)
    want = F.silu(g) * u
    for isa in isas():
        kernels.set_isa(isa)
        assert_matches(torch.ops.llamalab.silu_mul(g, u), want)
    kernels.set_isa(None)


def test_silu_mul_extremes_and_strides(native):
    g = torch.tensor([-200.0, -100.0, -88.5, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.5, 100.0, 1e30, float("-inf"),
                      float("nan"), float("inf")])
    u = torch.full_like(g, 1.5)
    for isa in isas():
        kernels.set_isa(isa)
        torch.testing.assert_close(torch.ops.llamalab.silu_mul(g, u), F.silu(g) * u, rtol=1e-6, atol=1e-30,
                                   equal_nan=True)
    kernels.set_isa(None)
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(6, 3, 40, generator=gen).transpose(0, 2)
    u = torch.randn(40, 3, 6, generator=gen)
    assert_matches(torch.ops.llamalab.silu_mul(g, u), F.silu(g) * u)
    # shapes that broadcast go through ATen: still torch's answer
    assert_matches(torch.ops.llamalab.silu_mul(g, u[:1]), F.silu(g) * u[:1])


def test_fallback_definitions():
    """The pure-PyTorch fallback defines the same ops (on a fresh namespace) with the plain expressions."""
    lib = torch.library.Library("llamalab_test_norm", "DEF")
    knorm.define_fallback(lib)
    knorm.register_fakes("llamalab_test_norm")
    ops = torch.ops.llamalab_test_norm
    gen = torch.Generator().manual_seed(8)
    for dtype in DTYPES:
        x = torch.randn(3, 5, 33, generator=gen).to(dtype)
        r = torch.randn(3, 5, 33, generator=gen).to(dtype)
        w = torch.randn(33, generator=gen).to(dtype)
        assert torch.equal(ops.rms_norm(x, w, 1e-5), knorm.rms_norm_reference(x, w, 1e-5))
        s, y = ops.add_rms_norm(x, r, w, 1e-5)
        assert torch.equal(s, x + r) and torch.equal(y, knorm.rms_norm_reference(x + r, w, 1e-5))
        assert torch.equal(ops.silu_mul(x, r), F.silu(x) * r)
    # the reference is RMSNorm's documented math
    x = torch.randn(4, 33, dtype=torch.float64, generator=gen)
    w = torch.randn(33, dtype=torch.float64, generator=gen)
    x32, w32 = x.float(), w.float()
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(knorm.rms_norm_reference(x32, w32, 1e-5), want.float(), rtol=1e-6, atol=1e-6)
    # the fakes give the shapes / dtypes the ops return
    with torch._subclasses.fake_tensor.FakeTensorMode():
        xb = torch.empty(2, 9, dtype=torch.bfloat16)
        out = ops.rms_norm(xb, torch.empty(9), 1e-5)
        assert out.shape == (2, 9) and out.dtype == torch.float32
        s, y = ops.add_rms_norm(xb, xb, torch.empty(9, dtype=torch.bfloat16), 1e-5)
        assert s.dtype == y.dtype == torch.bfloat16 and y.shape == (2, 9)
        assert ops.silu_mul(xb, xb).shape == (2, 9)


def test_ops_in_compiled_graph(native):
    """The fakes let torch.compile keep the ops as calls (fullgraph: no graph break)."""
    def f(x, w, g, u):
        s, y = torch.ops.llamalab.add_rms_norm(x, x, w, 1e-5)
        return torch.ops.llamalab.rms_norm(s, w, 1e-5) + y, torch.ops.llamalab.silu_mul(g, u)

    gen = torch.Generator().manual_seed(9)
    args = (torch.randn(2, 3, 33, generator=gen), torch.randn(33, generator=gen), torch.randn(2, 65, generator=gen),
            torch.randn(2, 65, generator=gen))
    want = f(*args)
    got = torch.compile(f, backend="eager", fullgraph=True)(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_fused_on_vs_off(native, dtype):
    model = rand_llama().to(dtype)
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(10))
    old = kernels.set_fused(True)
    try:
        assert kernels.fused()
        on = _logits(model, ids)
        tok_on = reference_greedy(model, [5, 17, 33], 12)
        kernels.set_fused(False)
        off = _logits(model, ids)
        tok_off = reference_greedy(model, [5, 17, 33], 12)
    finally:
        kernels.set_fused(old)
    if dtype == torch.float32:
        torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(on.float(), off.float(), rtol=0.05, atol=0.05)  # a few bf16 ulps at most
    if dtype == torch.float32:
        assert tok_on == tok_off


def test_fused_ops_are_called(native, monkeypatch):
    """With fused() on the eager inference forward really goes through the ops (and not with it off)."""
    calls: list[str] = []
    ops = kernels.OPS  # (what the eager forward calls: the ops unboxed, or torch.ops)
    for name in ("rms_norm", "add_rms_norm", "silu_mul"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1], raising=False)
    model = rand_llama()
    ids = torch.tensor([[1, 2, 3]])
    old = kernels.set_fused(True)
    try:
        _logits(model, ids)
        assert calls.count("silu_mul") == 3 and calls.count("rms_norm") + calls.count("add_rms_norm") == 7
        calls.clear()
        kernels.set_fused(False)
        _logits(model, ids)
        assert calls == []
    finally:
        kernels.set_fused(old)


def test_training_still_differentiable(native):
    """Grad mode with parameters that require grad: the plain ops run and every norm / MLP weight gets a grad."""
    model = rand_llama().train()
    old = kernels.set_fused(True)
    try:
        ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(11))
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
    finally:
        kernels.set_fused(old)
    block = model.layers[0]
    for p in (block.input_layernorm.weight, block.post_attention_layernorm.weight, model.norm.weight,
              block.mlp.gate_proj.weight, block.mlp.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the fused forward under no_grad is the same function the gradient was taken of
    with torch.no_grad():
        kernels.set_fused(True)
        try:
            on = model(ids)
        finally:
            kernels.set_fused(old)
        kernels.set_fused(False)
        try:
            off = model(ids)
        finally:
            kernels.set_fused(old)
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)


def test_saved_model_load_generate(native, tmp_path):
    """The path users take: a saved model through llamalab.load + llamalab.generate, fused on vs off."""
    import llamalab

    tok = make_tokenizer()
    save_chat_model(tmp_path / "m", tok, initializer_range=0.1)
    model, tok2 = llamalab.load(tmp_path / "m")
    old = kernels.set_fused(True)
    try:
        on = llamalab.generate(model, tok2, "the quick brown fox", max_new_tokens=16, temperature=0.0)
        kernels.set_fused(False)
        off = llamalab.generate(model, tok2, "the quick brown fox", max_new_tokens=16, temperature=0.0)
    finally:
        kernels.set_fused(old)
    assert on == off and len(on) > 0


_FALLBACK_CHILD = """
import torch, torch.nn.functional as F
from llamalab import kernels
from llamalab.kernels.norm import rms_norm_reference
print("native", kernels.load(), "fused", kernels.fused())
x, w = torch.randn(3, 5, 33).bfloat16(), torch.randn(33).bfloat16()
ok = torch.equal(torch.ops.llamalab.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
s, y = torch.ops.llamalab.add_rms_norm(x, x, w, 1e-5)
ok = ok and torch.equal(s, x + x) and torch.equal(y, rms_norm_reference(x + x, w, 1e-5))
ok = ok and torch.equal(torch.ops.llamalab.silu_mul(x, x), F.silu(x) * x)
print("same", ok)
"""


def test_fallback_process_without_the_cpp_build(tmp_path):
    """LLAMALAB_KERNELS=0: the ops exist as the Python fallback (the plain expressions) and fused() is off."""
    env = {**os.environ, "LLAMALAB_KERNELS": "0", "LLAMALAB_KERNEL_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", _FALLBACK_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "native False fused False" in res.stdout and "same True" in res.stdout
