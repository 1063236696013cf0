"""The dense float kernel (``llamalab::dense_linear``, dense.cpp) on odd shapes, on every ISA path of this CPU.

K is chosen around the kernels' steps (16 / 32 values per vector step, 8 on AVX2, masked tails; 4 KB of
weight per prefetch segment), N around nothing in particular, 1..8 activation rows (the kernel's own chunk
is 8 on AVX-512, 4 on AVX2), with and without a bias, for float32 / bfloat16 / float16 weights and
activations. Every result is compared with the float64 product of the same values: only the order of the
float32 sums may differ.
"""

from __future__ import annotations

import pytest
import torch

from llamalab import kernels

KS = [1, 7, 15, 16, 17, 31, 32, 33, 63, 65, 100, 576, 583, 1041, 2047, 2049, 4100]
NS = [1, 5, 23, 130]
WDTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _err(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> float:
    """Largest |got - exact| relative to Σ|x|·|w| + 1 (the scale of a float32 summation-order error)."""
    xd, wd = x.double(), w.double()
    want = xd @ wd.t() + (0 if b is None else b.double())
    scale = xd.abs() @ wd.abs().t() + 1
    return ((got.double() - want).abs() / scale).max().item()


@pytest.mark.parametrize("wdtype", WDTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_odd_shapes_equal_float64_on_every_isa(dense_rows_lifted, wdtype):
    gen = torch.Generator().manual_seed(11)
    isas = kernels.available_isas()
    assert "scalar" in isas
    for k in KS:
        for n in NS:
            w = torch.randn(n, k, generator=gen).to(wdtype)
            b = torch.randn(n, generator=gen)
            x = torch.randn(8, k, generator=gen)
            for isa in isas:
                kernels.set_isa(isa)
                for m in range(1, 9):
                    for bias in (None, b):
                        got = kernels.dense_linear(x[:m], w, bias)
                        assert got.shape == (m, n) and got.dtype == torch.float32
                        err = _err(got, x[:m], w, bias)
                        assert err < 2e-6, f"{wdtype} {isa} m={m} n={n} k={k} bias={bias is not None}: {err:.2e}"


@pytest.mark.parametrize("wdtype", WDTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_each_row_of_a_batch_is_the_row_alone(dense_rows_lifted, wdtype):
    """1..8 rows (and 9..17, over the 8-row chunk): every row bit for bit what it is alone, on every ISA."""
    gen = torch.Generator().manual_seed(12)
    for n, k in [(23, 583), (7, 33), (5, 2079), (130, 64)]:
        w = torch.randn(n, k, generator=gen).to(wdtype)
        b = torch.randn(n, generator=gen)
        x = torch.randn(17, k, generator=gen)
        for isa in kernels.available_isas():
            kernels.set_isa(isa)
            alone = torch.cat([kernels.dense_linear(x[i:i + 1], w, b) for i in range(17)])
            assert _err(alone, x, w, b) < 2e-6
            for m in range(2, 18):
                assert torch.equal(kernels.dense_linear(x[:m], w, b), alone[:m]), f"{wdtype} {isa} {(m, n, k)}"


@pytest.mark.parametrize("wdtype", WDTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_no_reads_past_the_weight_or_the_activation(dense_rows_lifted, wdtype):
    """Weight and activation as views at the start of larger buffers whose rest is NaN: the tails are masked."""
    gen = torch.Generator().manual_seed(13)
    for n, k in [(3, 17), (5, 33), (4, 583), (2, 1)]:
        wbuf = torch.full((n * k + 64,), float("nan")).to(wdtype)
        wbuf[: n * k] = torch.randn(n * k, generator=gen).to(wdtype)
        w = wbuf[: n * k].view(n, k)
        for m in (1, 3, 8):
            xbuf = torch.full((m * k + 64,), float("nan"))
            xbuf[: m * k] = torch.randn(m * k, generator=gen)
            x = xbuf[: m * k].view(m, k)
            for isa in kernels.available_isas():
                kernels.set_isa(isa)
                got = kernels.dense_linear(x, w)
                assert torch.isfinite(got).all(), f"{wdtype} {isa} {(m, n, k)}"
                assert _err(got, x, w, None) < 2e-6


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_activations_are_the_float32_product_rounded(dense_rows_lifted, xdtype):
    """A 16-bit activation: the float32 result for the same (widened) values, rounded as Tensor.to."""
    gen = torch.Generator().manual_seed(14)
    for wdtype in WDTYPES:
        for n, k in [(9, 583), (33, 64), (4, 31)]:
            w = torch.randn(n, k, generator=gen).to(wdtype)
            x = torch.randn(5, k, generator=gen).to(xdtype)
            for isa in kernels.available_isas():
                kernels.set_isa(isa)
                for m in (1, 2, 5):
                    got = kernels.dense_linear(x[:m], w)
                    assert got.dtype == xdtype
                    assert torch.equal(got, kernels.dense_linear(x[:m].float(), w).to(xdtype)), f"{wdtype} {isa}"
