"""The block-quantized linears: the C++ op against its pure-PyTorch reference on every ISA path of this CPU,
the reference against gguf's own dequantize-then-matmul, the fallbacks, torch.compile, save/load."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llamalab import kernels
from llamalab.kernels.reference import KINDS, block_linear_reference, dequantize
from llamalab.quantization.blocks import GGML_TYPES, BlockQuantLinear

# (M, N, K): batch 1 and 7, N not a multiple of 4/8/16, K a multiple of 32 only (odd block counts too)
SHAPES = [(1, 13, 32), (7, 37, 96), (1, 23, 576), (7, 5, 160), (3, 1, 1536)]


def random_blocks(kind: str, n: int, k: int, gen: torch.Generator):
    if kind == "q8_0":
        qs = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    else:
        qs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half()
    m = (torch.randn(n, k // 32, generator=gen) * 0.05).half() if kind == "q4_1" else None
    return qs, d, m


@pytest.mark.parametrize("kind", KINDS)
def test_op_equals_reference_on_every_isa(native, kind):
    gen = torch.Generator().manual_seed(0)
    isas = kernels.available_isas()
    assert isas[0] == "scalar" and len(isas) >= 1
    for m, n, k in SHAPES:
        qs, d, mins = random_blocks(kind, n, k, gen)
        x = torch.randn(m, k, generator=gen)
        want = block_linear_reference(kind, x, qs, d, mins)
        for isa in isas:
            assert kernels.set_isa(isa) == isa
            got = kernels.block_linear(kind, x, qs, d, mins)
            assert got.shape == (m, n) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                       msg=f"{kind} {isa} {(m, n, k)}")
    kernels.set_isa(None)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_rows_1_to_17_and_odd_block_counts(native, kind):
    """Every activation-row count 1..17 through the integer kernel (the GEMM threshold lifted), on shapes
    whose block counts end every loop early: K = 32 (one block), 160 (5), 544 (16 + 1), 1056 (32 + 1);
    N not a multiple of the 4-row tile."""
    gen = torch.Generator().manual_seed(5)
    torch.ops.llamalab.configure(64, kernels.gemm_bf16())
    try:
        for n, k in [(13, 32), (9, 160), (6, 544), (5, 1056)]:
            qs, d, mins = random_blocks(kind, n, k, gen)
            for m in range(1, 18):
                x = torch.randn(m, k, generator=gen)
                want = block_linear_reference(kind, x, qs, d, mins)
                for isa in kernels.available_isas():
                    kernels.set_isa(isa)
                    got = kernels.block_linear(kind, x, qs, d, mins)
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                               msg=f"{kind} {isa} {(m, n, k)}")
    finally:
        torch.ops.llamalab.configure(kernels.GEMM_ROWS, kernels.gemm_bf16())
        kernels.set_isa(None)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_rows_are_bit_identical_to_each_row_alone(native, kind):
    """Every row of a batch of M = 1..16 activation rows (below GEMM_ROWS: the integer kernel) is bit for bit
    that row multiplied alone, on every ISA path: the batched kernels sum each output in the batch-1 order.
    N not a multiple of the 4-row tile (a tile's leftover rows too), K = 32 · odd (partial block groups)."""
    assert kernels.GEMM_ROWS > 16
    gen = torch.Generator().manual_seed(11)
    for n, k in [(13, 32), (9, 160), (6, 544), (5, 1056), (37, 672)]:
        qs, d, mins = random_blocks(kind, n, k, gen)
        # rows of different scales, so their int8 blocks' scales differ too
        x = torch.randn(16, k, generator=gen) * (torch.rand(16, 1, generator=gen) * 4 + 0.1)
        for isa in kernels.available_isas():
            kernels.set_isa(isa)
            alone = torch.cat([kernels.block_linear(kind, x[i:i + 1], qs, d, mins) for i in range(16)])
            for m in range(2, 17):
                got = kernels.block_linear(kind, x[:m], qs, d, mins)
                assert torch.equal(got, alone[:m]), f"{kind} {isa} {(m, n, k)}"
                assert torch.equal(kernels.block_linear(kind, x[16 - m:].view(m, 1, k), qs, d, mins)[:, 0],
                                   alone[16 - m:]), f"{kind} {isa} {(m, n, k)} (the last rows, 3-d)"
    kernels.set_isa(None)


def _decode_batched_and_alone(model, prompts, steps):
    """Greedy-decode `prompts` together in one Runner and each alone in its own: logits per step, both ways."""
    from llamalab.generation.runner import Runner

    batched = Runner(model, len(prompts), 64, compile=False)
    alone = [Runner(model, 1, 64, compile=False) for _ in prompts]
    for i, p in enumerate(prompts):
        batched.prefill(i, p)
        alone[i].prefill(0, p)
    toks, out = [p[-1] for p in prompts], []
    for _ in range(steps):
        lb = batched.decode(list(range(len(prompts))), toks)
        la = torch.stack([alone[i].decode([0], [t])[0] for i, t in enumerate(toks)])
        out.append((lb, la))
        toks = lb.argmax(-1).tolist()
    return out


def _assert_batched_decode_is_alone(model, fused, rows):
    from llamalab.quantization.blocks import BlockQuantLinear

    assert sum(isinstance(mod, BlockQuantLinear) for mod in model.modules()) > 0
    gen = torch.Generator().manual_seed(12)
    # prompts of one length: every decode step is a plain slice of cache rows, one write slot
    prompts = [torch.randint(0, model.config.vocab_size, (6,), generator=gen).tolist() for _ in range(rows)]
    old = kernels.set_fused(fused)
    # Unfused, attention is PyTorch's CPU SDPA with a mask, which is batch-invariant only on one thread
    # (measured on AMD Zen 4, 2 threads: a batch of 4 differs from each row alone by ~1e-7, which an int8
    # activation block can round the other way); the fused ops are batch-invariant at any thread count.
    threads = torch.get_num_threads()
    if not fused:
        torch.set_num_threads(1)
    try:
        for step, (lb, la) in enumerate(_decode_batched_and_alone(model, prompts, 4)):
            assert torch.equal(lb, la), f"step {step}: max |batched - alone| {(lb - la).abs().max().item():.3g}"
    finally:
        kernels.set_fused(old)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_model_decodes_a_batch_as_each_row_alone(native, method, fused):
    """A model quantized to GGUF blocks (int4: Q4_1 layers, int8: Q8_0; the head Q8_0), 2-4 rows decoded in one
    Runner: every step's logits are bit for bit each row's logits decoded alone."""
    from llamalab.quantization.quantize import quantize_model

    model = quantize_model(_tiny_llama(seed=5).eval(), method)
    for rows in (2, 3, 4):
        _assert_batched_decode_is_alone(model, fused, rows)


@pytest.fixture(scope="module")
def smollm2_blocks(native):
    """llamalab.load("smollm2") as users get it: the GGUF's blocks kept (the session fixture is float32)."""
    import llamalab

    return llamalab.load("smollm2")[0]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_smollm2_decodes_a_batch_as_each_row_alone(smollm2_blocks, fused):
    """The shipped SmolLM2 GGUF (Q4_1 blocks, Q8_0 head): 4 rows decoded together give each row's logits
    exactly (before the batched kernel summed in the batch-1 order they differed by up to ~1 in a logit)."""
    _assert_batched_decode_is_alone(smollm2_blocks, fused, 4)


def test_best_isa_follows_cpu_flags(native):
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    best = kernels.best_isa()
    if " avx512_vnni" in flags and " avx512bw" in flags:
        assert best == "avx512vnni"
    elif " avx_vnni" in flags:
        assert best == "avxvnni"
    elif " avx2" in flags:
        assert best == "avx2"
    assert kernels.active_isa() == best


@pytest.mark.parametrize("kind", KINDS)
def test_reference_equals_gguf_dequantize_then_matmul(kind):
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    rng = np.random.default_rng(1)
    w = rng.standard_normal((19, 128)).astype(np.float32)
    qtype = GGMLQuantizationType(GGML_TYPES[kind])
    raw = quants.quantize(w, qtype)
    want_w = torch.from_numpy(np.asarray(quants.dequantize(raw, qtype), dtype=np.float32))
    layer = BlockQuantLinear.from_gguf(raw.reshape(-1), GGML_TYPES[kind], w.shape)
    assert torch.equal(layer.dequantize(), want_w)  # the blocks are used exactly as stored
    assert all(t.data_ptr() % 64 == 0 for t in (layer.qs, layer.d, layer.m) if t is not None)  # cache-line aligned
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(2))
    exact = x @ want_w.t()
    ref = block_linear_reference(kind, x, layer.qs, layer.d, layer.m)
    # the only difference is the activation rounded to int8 per 32-block: |err| <= Σ|w|·dx/2 per output
    bound = (want_w.abs() @ (x.abs().view(7, -1, 32).amax(-1) / 127 / 2).repeat_interleave(32, -1).t()).t()
    assert ((ref - exact).abs() <= bound + 1e-5).all()
    assert (ref - exact).abs().max() > 0  # (it is a different computation, not a copy)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k", [(21, 96), (300, 2048)], ids=["one-tile", "tiles"])  # tiles of ~1 MB of weights
def test_many_rows_use_the_gemm_close_to_float(kind, n, k):
    gen = torch.Generator().manual_seed(3)
    qs, d, m = random_blocks(kind, n, k, gen)
    layer = BlockQuantLinear(kind, qs, d, m)
    x = torch.randn(2, kernels.GEMM_ROWS, k, generator=gen)
    exact = x @ dequantize(kind, qs, d, m).t()
    torch.testing.assert_close(layer(x), exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())
    want = dequantize(kind, qs, d, m)
    for isa in kernels.available_isas() or [None]:  # (the C++ dequantize has a vector path and a plain one)
        if isa:
            kernels.set_isa(isa)
        assert torch.equal(layer.dequantize(), want)
        assert torch.equal(layer.dequantize(torch.bfloat16), want.bfloat16())
        y = layer(x.bfloat16())  # any float activation dtype in, the same dtype out
        assert y.dtype == torch.bfloat16 and y.shape == (2, kernels.GEMM_ROWS, n)
    if kernels.available_isas():
        kernels.set_isa(None)


def test_from_float_cat_and_grad_path():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(10, 64, generator=gen)
    # half a step, except Q4_0's one clamped code at the far end of the grid (llama.cpp's choice): a step
    for kind, step in (("q8_0", 0.5 / 127), ("q4_0", 1 / 8), ("q4_1", 0.5 / 15)):
        layer = BlockQuantLinear.from_float(w, kind)
        wb = w.view(10, 2, 32)
        rng = wb.amax(-1) - wb.amin(-1) if kind == "q4_1" else wb.abs().amax(-1)
        err = (layer.dequantize() - w).view(10, 2, 32).abs().amax(-1)
        assert (err <= rng * step * 1.02 + 1e-3).all(), kind
    a, b = BlockQuantLinear.from_float(w[:3], "q4_1"), BlockQuantLinear.from_float(w[3:], "q4_1")
    fused = BlockQuantLinear.cat([a, b])
    x = torch.randn(1, 64, generator=gen)
    torch.testing.assert_close(fused(x), torch.cat([a(x), b(x)], -1))
    xg = x.clone().requires_grad_(True)  # a gradient to the input goes through the dequantized weight
    fused(xg).sum().backward()
    torch.testing.assert_close(xg.grad, fused.dequantize().sum(0, keepdim=True))


def test_state_dict_roundtrip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(5)
    layer = BlockQuantLinear(*(("q4_1",) + random_blocks("q4_1", 9, 64, gen)))
    save_file(layer.state_dict(), tmp_path / "l.safetensors")
    sd = load_file(tmp_path / "l.safetensors")
    assert set(sd) == {"qs", "d", "m"}
    again = BlockQuantLinear("q4_1", sd["qs"], sd["d"], sd["m"])
    x = torch.randn(2, 64, generator=gen)
    assert torch.equal(again(x), layer(x))
    other = BlockQuantLinear(*(("q4_1",) + random_blocks("q4_1", 9, 64, gen)))
    other.load_state_dict(sd)  # into an existing layer: forward sees the loaded blocks
    assert torch.equal(other(x), layer(x))


def test_torch_compile_keeps_the_op_in_one_graph():
    gen = torch.Generator().manual_seed(6)
    layer = BlockQuantLinear(*(("q8_0",) + random_blocks("q8_0", 11, 64, gen)))
    x = torch.randn(1, 64, generator=gen)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fails on any graph break
    torch.testing.assert_close(compiled(x), layer(x))


_CHILD = """
import torch, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s %(message)s")
from llamalab import kernels
from llamalab.kernels.reference import dequantize
from llamalab.quantization.blocks import BlockQuantLinear
print("native", kernels.load(), kernels.active_isa())
g = torch.Generator().manual_seed(0)
layer = BlockQuantLinear("q4_0", torch.randint(0, 256, (5, 48), dtype=torch.uint8, generator=g),
                         (torch.rand(5, 3, generator=g) * 0.1).half())
x = torch.randn(2, 96, generator=g)
print("close", torch.allclose(layer(x), x @ dequantize("q4_0", layer.qs, layer.d).t(), rtol=2e-2, atol=2e-2))
"""


@pytest.mark.parametrize("env", [{"LLAMALAB_KERNELS": "0"}, {"CXX": "/nonexistent/c++"}],
                         ids=["disabled", "no-compiler"])
def test_fallback_without_the_cpp_build(env, tmp_path):
    full = {**os.environ, "LLAMALAB_KERNEL_CACHE": str(tmp_path / "cache"), **env}
    res = subprocess.run([sys.executable, "-c", _CHILD], env=full, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "native False python" in res.stdout and "close True" in res.stdout
    logs = [line for line in res.stdout.splitlines() if line.startswith("llamalab.kernels")]
    assert len(logs) == 1 and "pure-PyTorch fallback" in logs[0]


def test_isa_forced_by_env(native):
    env = {**os.environ, "LLAMALAB_KERNEL_ISA": "scalar"}
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "native True scalar" in res.stdout and "close True" in res.stdout


# A weight (and its scales) whose last byte is the last byte of a readable page, the next page unmapped for
# reading: the kernels' loads must stay inside the arrays, while their software prefetches (up to 32 KB past
# the current step; each mode forced here, whatever this CPU's default) run past the end, which must not fault.
_GUARD_CHILD = r"""
import ctypes, mmap
import torch
from llamalab import kernels
from llamalab.kernels.reference import block_linear_reference
assert kernels.load()
libc, page, keep = ctypes.CDLL(None), mmap.PAGESIZE, []

def guarded(t):
    n = t.numel() * t.element_size()
    size = (n + page - 1) // page * page
    mm = mmap.mmap(-1, size + page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    assert libc.mprotect(ctypes.c_void_p(addr + size), ctypes.c_size_t(page), 0) == 0
    out = torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=size - n).view(t.shape)
    out.copy_(t)
    keep.append(mm)
    return out

gen = torch.Generator().manual_seed(3)
for kind in ("q8_0", "q4_0", "q4_1"):
    for n, k in [(13, 544), (8, 512), (1, 32)]:
        if kind == "q8_0":
            qs = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        else:
            qs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        d = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half()
        m = (torch.randn(n, k // 32, generator=gen) * 0.05).half() if kind == "q4_1" else None
        gq, gd, gm = guarded(qs), guarded(d), guarded(m) if m is not None else None
        for rows in (1, 3):
            x = torch.randn(rows, k, generator=gen)
            want = block_linear_reference(kind, x, qs, d, m)
            for isa in kernels.available_isas():
                kernels.set_isa(isa)
                for prefetch in kernels.PREFETCH_MODES:
                    kernels.set_block_prefetch(prefetch)
                    got = kernels.block_linear(kind, x, gq, gd, gm)
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
print("guard ok", kernels.available_isas())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through ctypes")
def test_weights_ending_at_an_unreadable_page(native):
    res = subprocess.run([sys.executable, "-c", _GUARD_CHILD], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr[-2000:]}"
    assert "guard ok" in res.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_block_prefetch_changes_no_bit(native, kind):
    """The software prefetch of the streamed weight (by CPU: near on Intel, far on AMD from Zen 5, else off)
    forced to each mode: the same bits on every ISA, batch 1 (the prefetching kernel) and 3, odd block and
    row counts."""
    gen = torch.Generator().manual_seed(11)
    default = kernels.set_block_prefetch(None)
    assert default in kernels.PREFETCH_MODES
    try:
        for n, k in [(13, 544), (9, 160), (4, 4096), (70, 1056)]:
            qs, d, mins = random_blocks(kind, n, k, gen)
            for rows in (1, 3):
                x = torch.randn(rows, k, generator=gen)
                for isa in kernels.available_isas():
                    kernels.set_isa(isa)
                    got = {}
                    for mode in kernels.PREFETCH_MODES:
                        kernels.set_block_prefetch(mode)
                        got[mode] = kernels.block_linear(kind, x, qs, d, mins)
                    assert kernels.set_block_prefetch(None) == "far"
                    for mode in ("off", "near"):
                        assert torch.equal(got[mode], got["far"]), (kind, isa, n, k, rows, mode)
    finally:
        kernels.set_block_prefetch(None)
        kernels.set_isa(None)
    assert kernels.set_block_prefetch(None) == default
    with pytest.raises(ValueError, match="prefetch mode must be one of off, near, far"):
        kernels.set_block_prefetch("sideways")
    with pytest.raises(RuntimeError, match="mode must be -1, 0, 1 or 2"):
        torch.ops.llamalab.set_block_prefetch(3)


# ----------------------------------------------------------------------------------- dense float linears
# (N, K): N odd / below a tile, K below one vector, not a multiple of 8 or 16, a multiple plus a tail
DENSE_SHAPES = [(13, 7), (37, 100), (5, 33), (64, 576), (3, 1), (9, 1041)]
DENSE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dense_exact(x, w, b=None):
    """x · wᵀ (+ b) in float64 on the weight's own values, and Σ|x|·|w| (the scale of a summation-order error)."""
    xd, wd = x.double(), w.double()
    y = xd @ wd.t() + (0 if b is None else b.double())
    return y, xd.abs() @ wd.abs().t()


@pytest.mark.parametrize("wdtype", DENSE_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_dense_op_equals_float64_on_every_isa(dense_rows_lifted, wdtype):
    """fp32 products and sums: within ~1e-6 of the exact result relative to Σ|x·w| (only the order of the sums
    differs), for activation rows 1..9, with and without a bias, on every ISA path of this CPU."""
    gen = torch.Generator().manual_seed(7)
    for n, k in DENSE_SHAPES:
        w = torch.randn(n, k, generator=gen).to(wdtype)
        b = torch.randn(n, generator=gen)
        for m in range(1, 10):
            x = torch.randn(m, k, generator=gen)
            for bias in (None, b):
                want, scale = _dense_exact(x, w, bias)
                for isa in kernels.available_isas():
                    kernels.set_isa(isa)
                    got = kernels.dense_linear(x, w, bias)
                    assert got.shape == (m, n) and got.dtype == torch.float32
                    err = ((got.double() - want).abs() / (scale + 1)).max().item()
                    assert err < 2e-6, f"{wdtype} {isa} {(m, n, k)} bias={bias is not None}: {err:.2e}"


def test_dense_rows_do_not_depend_on_their_batch(dense_rows_lifted):
    """A row's sums run in the same order whatever the batch size: each row of a batch of 1..9 is bit for bit
    the row alone (a server batch decodes what a single sequence would)."""
    gen = torch.Generator().manual_seed(10)
    for wdtype in DENSE_DTYPES:
        w = torch.randn(23, 583, generator=gen).to(wdtype)
        x = torch.randn(9, 583, generator=gen)
        for isa in kernels.available_isas():
            kernels.set_isa(isa)
            alone = torch.cat([kernels.dense_linear(x[i:i + 1], w) for i in range(9)])
            for m in range(2, 10):
                assert torch.equal(kernels.dense_linear(x[:m], w), alone[:m]), f"{wdtype} {isa} rows={m}"


def test_dense_op_within_1e5_of_f_linear(native):
    """float32 weights at the default hand-over: the kernel's rows and the GEMM's rows both match F.linear."""
    gen = torch.Generator().manual_seed(8)
    for n, k in [(37, 100), (129, 576), (11, 1536)]:
        w = torch.randn(n, k, generator=gen)
        for m in range(1, 10):
            x = torch.randn(m, k, generator=gen)
            want = torch.nn.functional.linear(x, w)
            torch.testing.assert_close(kernels.dense_linear(x, w), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_dense_op_shapes_dtypes_and_hand_over(native):
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(21, 40, generator=gen)
    x = torch.randn(2, 3, 40, generator=gen)  # leading dims kept, any float activation dtype, y in x's dtype
    for dt in DENSE_DTYPES:
        y = kernels.dense_linear(x.to(dt), w)
        assert y.shape == (2, 3, 21) and y.dtype == dt
        torch.testing.assert_close(y.float(), x.to(dt).float() @ w.t(), rtol=1e-2, atol=1e-2)
    for dt in (torch.bfloat16, torch.float16):  # 16-bit in and out: the fp32 result rounded as Tensor.to does
        xs, ws = x[0].to(dt), w.to(dt)
        assert torch.equal(kernels.dense_linear(xs, ws), kernels.dense_linear(xs.float(), ws).to(dt))
    xt = torch.randn(40, 4, generator=gen).t()  # a non-contiguous activation
    torch.testing.assert_close(kernels.dense_linear(xt, w), xt @ w.t(), rtol=1e-5, atol=1e-5)
    assert kernels.dense_linear(torch.randn(0, 40), w).shape == (0, 21)
    # K = 0: the bias alone
    assert torch.equal(kernels.dense_linear(torch.randn(2, 0), torch.randn(3, 0), torch.ones(3)), torch.ones(2, 3))
    big = torch.randn(kernels.DENSE_ROWS[torch.bfloat16] + 1, 40, generator=gen).bfloat16()  # -> the GEMM
    wb = w.bfloat16()
    assert torch.equal(kernels.dense_linear(big, wb), torch.nn.functional.linear(big, wb))
    with pytest.raises(RuntimeError, match="must be w's K"):
        kernels.dense_linear(torch.randn(1, 39), w)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        kernels.dense_linear(torch.randn(1, 40), w.double())


def test_dense_op_compiles_into_one_graph(native):
    from llamalab.kernels.dense import DenseLinear

    layer = DenseLinear(64, 33).eval()
    x = torch.randn(1, 64)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, layer.weight, layer.bias)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fails on any graph break
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)


def _tiny_llama(seed=0, tied=True):
    from llamalab import Llama, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    return Llama(cfg)


def _count_dense_products(monkeypatch) -> list[str]:
    """One entry per weight the eager forward multiplies on the dense kernel: through dense_linear (one weight)
    or the joint dense_linears (q|k|v) / dense_swiglu (gate|up) of model/shared_input.py."""
    calls: list[str] = []
    for name in ("dense_linear", "dense_linears", "dense_swiglu"):
        real = getattr(kernels.OPS, name)  # (what the eager forward calls: the op unboxed, or torch.ops)

        def counting(x, w, *rest, _real=real, _name=name):
            calls.extend([_name] * (len(w) if isinstance(w, (list, tuple)) else 1))
            return _real(x, w, *rest)

        monkeypatch.setattr(kernels.OPS, name, counting)
    return calls


def test_dense_swap_keeps_parameters_and_takes_the_kernel(native, monkeypatch):
    from llamalab.kernels.dense import DenseLinear, use_dense_kernels, use_torch_linears

    model = _tiny_llama().eval()
    keys = list(model.state_dict())
    ids = torch.randint(0, 97, (1, kernels.DENSE_ROWS[torch.float32]))  # rows the kernel takes
    with torch.inference_mode():
        want = model(ids)
    assert use_dense_kernels(model) == 2 * 7 + 1  # q k v o gate up down per block, and the head
    assert list(model.state_dict()) == keys and model.lm_head.weight is model.embed_tokens.weight
    assert isinstance(model.lm_head, torch.nn.Linear) and type(model.lm_head) is DenseLinear
    calls = _count_dense_products(monkeypatch)
    with torch.inference_mode():
        got = model(ids)
    assert len(calls) == 15
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    calls.clear()
    model(ids)  # grad enabled with parameters that want it: F.linear
    assert not calls
    assert use_torch_linears(model) == 15 and type(model.lm_head) is torch.nn.Linear


def test_a_swapped_model_trains_like_the_plain_one(native):
    from llamalab.kernels.dense import use_dense_kernels

    plain, swapped = _tiny_llama(seed=3), _tiny_llama(seed=3)
    assert use_dense_kernels(swapped) > 0
    ids = torch.randint(0, 97, (2, 9))
    for model in (plain, swapped):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
        opt.step()
    for (name, a), (_, b) in zip(plain.named_parameters(), swapped.named_parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(plain.lm_head.weight, _tiny_llama(seed=3).lm_head.weight)  # (the step did something)


def test_load_swaps_and_matches_transformers(native, tmp_path, monkeypatch):
    """llamalab.load of an HF directory runs its linears on the dense kernel; logits stay within 1e-4 of
    transformers' at decode-sized inputs (the kernel's rows)."""
    transformers = pytest.importorskip("transformers")
    import llamalab
    from llamalab.kernels.dense import DenseLinear

    _tiny_llama(seed=4, tied=False).save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model, _ = llamalab.load(tmp_path)
    assert sum(type(m) is DenseLinear for m in model.modules()) == 15
    ids = torch.randint(0, 97, (1, kernels.DENSE_ROWS[torch.float32]))
    calls = _count_dense_products(monkeypatch)
    with torch.inference_mode():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    assert len(calls) == 15


_DENSE_CHILD = """
import llamalab
from llamalab.kernels.dense import DenseLinear
m, _ = llamalab.load("llamalab-20m")
print("swapped", sum(type(x) is DenseLinear for x in m.modules()))
"""


def test_load_respects_llamalab_kernels_0(native):
    env = {**os.environ, "LLAMALAB_KERNELS": "0"}
    res = subprocess.run([sys.executable, "-c", _DENSE_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "swapped 0" in res.stdout


def test_results_do_not_depend_on_how_threads_split_a_product(native):
    """Each output element is summed by one thread: the same bits whether a product runs on one thread or is
    split into many chunks (set_min_chunk), for block, dense and k-quant linears, at one and several rows."""
    from test_kquants import random_kq

    gen = torch.Generator().manual_seed(11)
    qs, d, mins = random_blocks("q4_1", 256, 576, gen)
    w = torch.randn(256, 576, generator=gen).to(torch.bfloat16)
    kq = random_kq("q6_k", 64, 512, gen)
    cases = [(lambda x: torch.ops.llamalab.q4_1_linear(x, qs, d, mins), 576),
             (lambda x: torch.ops.llamalab.dense_linear(x, w), 576),
             (lambda x: torch.ops.llamalab.q6_k_linear(x, kq), 512)]
    threads = torch.get_num_threads()
    old = kernels.set_min_chunk(1 << 20)
    try:
        torch.set_num_threads(2)
        for op, k in cases:
            for rows in (1, 3):
                x = torch.randn(rows, k, generator=gen)
                kernels.set_min_chunk(1 << 30)  # one thread
                whole = op(x)
                kernels.set_min_chunk(512)  # a chunk per few rows of the weight
                assert torch.equal(op(x), whole)
        with pytest.raises(RuntimeError, match="positive"):
            kernels.set_min_chunk(0)
    finally:
        kernels.set_min_chunk(old)
        torch.set_num_threads(threads)
