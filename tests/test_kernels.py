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


@pytest.fixture(scope="module")
def native():
    if not kernels.load():
        pytest.skip(f"C++ kernels unavailable here ({kernels._state.get('reason')}); the fallback is tested below")
    yield
    kernels.set_isa(None)


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
