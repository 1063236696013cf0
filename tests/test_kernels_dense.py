"""The dense float kernel (``llamalab::dense_linear``, dense.cpp) on odd shapes, on every ISA path of this CPU.

K is chosen around the kernels' steps (16 / 32 values per vector step, 8 on AVX2, masked tails; 4 KB of
weight per prefetch segment), N around nothing in particular, 1..8 activation rows (the kernel's own chunk
is 8 on AVX-512, 4 on AVX2), with and without a bias, for float32 / bfloat16 / float16 weights and
activations. Every result is compared with the float64 product of the same values: only the order of the
float32 sums may differ.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

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


@pytest.mark.parametrize("wdtype", WDTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_the_prefetch_mode_changes_no_bit(dense_rows_lifted, wdtype):
    """The weight prefetch mode (far: 16-bit weights also prefetched 4 KB ahead, non-temporal) forced to each
    mode: the same bits on every ISA, at 1..5 rows, for K around the kernels' steps and the 4 KB distance,
    with weights whose rows end just before NaN (the prefetch reads ahead; the loads must not)."""
    gen = torch.Generator().manual_seed(16)
    try:
        for n, k in [(3, 17), (9, 583), (5, 2049), (2, 4100)]:
            wbuf = torch.full((n * k + 64,), float("nan")).to(wdtype)
            wbuf[: n * k] = torch.randn(n * k, generator=gen).to(wdtype)
            w = wbuf[: n * k].view(n, k)
            x = torch.randn(5, k, generator=gen).to(wdtype if wdtype != torch.float16 else torch.float32)
            for isa in kernels.available_isas():
                kernels.set_isa(isa)
                for m in (1, 2, 5):
                    got = {}
                    for mode in kernels.PREFETCH_MODES:
                        kernels.set_block_prefetch(mode)
                        got[mode] = kernels.dense_linear(x[:m], w)
                    assert torch.isfinite(got["far"]).all()
                    for mode in ("off", "near"):
                        assert torch.equal(got[mode], got["far"]), (wdtype, isa, n, k, m, mode)
    finally:
        kernels.set_block_prefetch(None)


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


# --------------------------------------------------------------- float32 batches through oneDNN (non-Intel x86)
needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                       and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                                  reason="this torch has no oneDNN linear op")


def _ops_run(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_float32_batches_take_onednn_where_chosen_and_equal_f_linear(native, monkeypatch, bias):
    from llamalab.kernels import dense

    torch.manual_seed(0)
    lin = torch.nn.Linear(583, 130, bias=bias)
    lin.__class__ = dense.DenseLinear
    rows = kernels.DENSE_ROWS[torch.float32] + 5
    x = torch.randn(2, rows, 583)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    for chosen in (True, False):
        monkeypatch.setattr(dense, "BATCH_F32_ONEDNN", chosen)
        with torch.no_grad():
            got = lin(x)
            names = _ops_run(lambda: lin(x))
        assert got.shape == want.shape
        assert _err(got, x, lin.weight, lin.bias) < 2e-6
        assert ("mkldnn::_linear_pointwise" in names) is chosen, names
    # gradients wanted, or few rows, or another dtype: never oneDNN
    monkeypatch.setattr(dense, "BATCH_F32_ONEDNN", True)
    xg = x.clone().requires_grad_()
    assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: lin(xg).sum().backward())
    assert xg.grad is not None and xg.grad.shape == x.shape
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: lin(x[:, :1]))
        lin16 = torch.nn.Linear(583, 130, bias=bias).bfloat16()
        lin16.__class__ = dense.DenseLinear
        assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: lin16(x.bfloat16()))


@needs_onednn
def test_onednn_choice_follows_the_cpu_and_the_env_in_a_fresh_process():
    code = "from llamalab.kernels import dense; print(dense.BATCH_F32_ONEDNN)"
    env_runs = {}
    for value in ("0", "1", None):
        env = {k: v for k, v in os.environ.items() if k != "LLAMALAB_ONEDNN_F32"}
        if value is not None:
            env["LLAMALAB_ONEDNN_F32"] = value
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        env_runs[value] = out.stdout.strip()
    assert env_runs["0"] == "False" and env_runs["1"] == "True"
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert env_runs[None] == str(x86 and not intel)


@needs_onednn
def test_a_loaded_model_prefills_the_same_with_and_without_onednn(native, monkeypatch):
    import llamalab
    from llamalab.kernels import dense

    model, _ = llamalab.load("gqa-125m", dtype="float32")
    ids = torch.randint(0, model.config.vocab_size, (1, kernels.DENSE_ROWS[torch.float32] + 40))
    got = {}
    for chosen in (False, True):
        monkeypatch.setattr(dense, "BATCH_F32_ONEDNN", chosen)
        with torch.inference_mode():
            got[chosen] = model(ids)
    scale = got[False].abs().max()
    assert (got[True] - got[False]).abs().max() <= 1e-5 * scale
    assert torch.equal(got[True][0, -1].argmax(), got[False][0, -1].argmax())
