"""GGUF Q4_K / Q6_K super-blocks kept as stored (KQuantLinear) and the llamalab::q4_k_linear / q6_k_linear ops."""

from __future__ import annotations

import gguf.quants as gq
import pytest
import torch
from gguf import GGMLQuantizationType

from llamalab import kernels
from llamalab.errors import WeightsError
from llamalab.kernels import kquants as kqops

GGML = {"q4_k": GGMLQuantizationType.Q4_K, "q6_k": GGMLQuantizationType.Q6_K}
KINDS = tuple(GGML)
# (M, N, K): batch 1 and several rows, N not a multiple of 4, one or several super-blocks
SHAPES = [(1, 13, 256), (7, 37, 512), (3, 5, 1536), (16, 1, 768)]


def random_kq(kind: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random super-blocks: random codes and scale bytes, finite positive fp16 d (and dmin)."""
    nb = kqops.SB_BYTES[kind]
    raw = torch.randint(0, 256, (n, k // 256, nb), dtype=torch.uint8, generator=gen)
    h = (torch.rand(n, k // 256, 2, generator=gen) * 0.01 + 1e-4).half().view(torch.uint8).reshape(n, k // 256, 4)
    if kind == "q4_k":
        raw[..., 0:4] = h
    else:
        raw[..., 208:210] = h[..., 0:2]
    return raw.reshape(n, -1).contiguous()


def _op(kind: str):
    if not hasattr(torch.ops.llamalab, f"{kind}_linear"):
        pytest.skip("the k-quant ops are not registered in this build")
    return getattr(torch.ops.llamalab, f"{kind}_linear")


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_equals_gguf_package(kind):
    gen = torch.Generator().manual_seed(1)
    for n, k in ((3, 256), (37, 1024)):
        kq = random_kq(kind, n, k, gen)
        want = torch.from_numpy(gq.dequantize(kq.numpy(), GGML[kind])).reshape(n, k)
        assert torch.equal(kqops.dequantize(kind, kq), want)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_matches_reference_every_isa(native, kind):
    """Against the kernel's own arithmetic (activation int8 per 32, exact products, float64 sums): only
    float32 accumulation rounding remains, ~1e-7 relative here, so 1e-5 of the largest output is tight
    (float F.linear differs by ~5e-3 of it: the activation's int8 rounding)."""
    op = _op(kind)
    gen = torch.Generator().manual_seed(2)
    for m, n, k in SHAPES:
        kq = random_kq(kind, n, k, gen)
        x = torch.randn(m, k, generator=gen)
        want = kqops.linear_reference(kind, x, kq)
        for isa in kernels.available_isas():
            kernels.set_isa(isa)
            got = op(x, kq)
            assert got.shape == (m, n) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                       msg=f"{kind} {isa} {(m, n, k)}")
            rows = torch.cat([op(x[i:i + 1], kq) for i in range(m)])
            assert torch.equal(rows, got), f"{kind} {isa}: a batch row differs from the row alone"
    kernels.set_isa(None)


@pytest.mark.parametrize("kind", KINDS)
def test_many_rows_gemm_and_dtypes(native, kind):
    op = _op(kind)
    gen = torch.Generator().manual_seed(3)
    kq = random_kq(kind, 19, 512, gen)
    x = torch.randn(2, 20, 512, generator=gen)  # 40 rows: the dequantize + GEMM path
    torch.testing.assert_close(op(x, kq), x @ kqops.dequantize(kind, kq).t(), rtol=1e-5, atol=1e-5)
    xb = x[0, :3].bfloat16()
    y = op(xb, kq)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 19)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_forward_fallback_and_permute(native, kind):
    from llamalab.quantization.kquants import KQuantLinear

    gen = torch.Generator().manual_seed(4)
    kq = random_kq(kind, 9, 512, gen)
    _op(kind)
    layer = KQuantLinear(kind, kq, 512)
    x = torch.randn(2, 512, generator=gen)
    w = layer.dequantize()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), kqops.linear_reference(kind, x, kq), rtol=1e-5, atol=1e-4)
    xg = x.clone().requires_grad_(True)  # a gradient to the input: the float product
    torch.testing.assert_close(layer(xg), x @ w.t())
    lib = torch.library.Library("llamalab_kq_test", "DEF")  # the pure-PyTorch fallback of the op
    kqops.define_fallback(lib)
    torch.testing.assert_close(getattr(torch.ops.llamalab_kq_test, f"{kind}_linear")(x, kq), x @ w.t())
    idx = torch.tensor([3, 1, 0, 2, 8, 7, 6, 5, 4])
    assert torch.equal(layer.permute_rows(idx).dequantize(), w[idx])
    assert layer.weight_nbytes == kq.numel()
    with pytest.raises(WeightsError):
        KQuantLinear(kind, kq[:, :-1], 512)
    with pytest.raises(WeightsError):
        KQuantLinear(kind, kq, 500)
