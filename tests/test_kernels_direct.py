"""The ops called unboxed (kernels.OPS, direct.cpp's ``_llamalab_direct``): each returns exactly what
torch.ops.llamalab returns for the same arguments (decode attention leaving the caches the same), errors come
back as Python exceptions with the kernel's message, and the model's eager forward calls them while a compiled
graph keeps torch.ops."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from llamalab import kernels
from llamalab.quantization.blocks import BlockQuantLinear


@pytest.fixture(scope="module")
def direct(native):
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        pytest.skip("no Python headers here: the ops are called through torch.ops (tested everywhere else)")
    return kernels.OPS


def test_direct_calls_are_built_where_python_headers_are(direct):
    """Where the headers exist the library has the module, and OPS holds its functions, not torch.ops."""
    assert kernels._state["direct"] is True
    for name in kernels.EAGER_OPS:
        fn = getattr(direct, name)
        assert fn is not getattr(torch.ops.llamalab, name).default, name
        assert type(fn).__name__ == "builtin_function_or_method", name


def _same(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("rows", [1, 3])
def test_block_linears_equal_torch_ops(direct, kind, rows):
    g = torch.Generator().manual_seed(rows)
    layer = BlockQuantLinear.from_float(torch.randn(40, 96, generator=g), kind)
    args = layer._args
    x = torch.randn(rows, 96, generator=g)
    _same(getattr(direct, f"{kind}_linear")(x, *args), getattr(torch.ops.llamalab, f"{kind}_linear")(x, *args))


def test_kquant_linears_equal_torch_ops(direct):
    g = torch.Generator().manual_seed(3)
    for kind, sb in (("q4_k", 144), ("q6_k", 210)):
        kq = torch.randint(0, 256, (8, 2 * sb), dtype=torch.uint8, generator=g)
        if kind == "q4_k":  # finite fp16 scales (d, dmin) at each super-block's start
            kq.view(8, 2, sb)[:, :, :4] = torch.tensor([0, 0x20, 0, 0x20], dtype=torch.uint8)
        else:
            kq.view(8, 2, sb)[:, :, -2:] = torch.tensor([0, 0x20], dtype=torch.uint8)
        x = torch.randn(2, 512, generator=g)
        _same(getattr(direct, f"{kind}_linear")(x, kq), getattr(torch.ops.llamalab, f"{kind}_linear")(x, kq))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_norm_and_swiglu_equal_torch_ops(direct, dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 64, generator=g).to(dtype)
    r = torch.randn(1, 1, 64, generator=g).to(dtype)
    w = torch.randn(48, 64, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    gain = torch.rand(64, generator=g).to(dtype)
    ops = torch.ops.llamalab
    _same(direct.dense_linear(x, w), ops.dense_linear(x, w))
    _same(direct.dense_linear(x, w, b), ops.dense_linear(x, w, b))
    _same(direct.dense_linear(x, w, bias=None), ops.dense_linear(x, w, None))
    _same(direct.rms_norm(x, gain, 1e-5), ops.rms_norm(x, gain, 1e-5))
    _same(direct.add_rms_norm(x, r, gain, 1e-6), ops.add_rms_norm(x, r, gain, 1e-6))
    _same(direct.silu_mul(x, r), ops.silu_mul(x, r))


def test_decode_attention_equals_torch_ops_and_writes_the_same_cache(direct):
    from llamalab.model.kv_cache import KVCache
    from llamalab.model.rope import RotaryEmbedding

    g = torch.Generator().manual_seed(5)
    B, H, KV, D, S, start = 2, 6, 2, 32, 16, 5
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, 1, KV, D, generator=g).transpose(1, 2)
    v = torch.randn(B, 1, KV, D, generator=g).transpose(1, 2)
    cos, sin = RotaryEmbedding(D, 10000.0, None, 64).tables(torch.full((B, 1), start))
    caches = []
    for _ in range(2):
        c = KVCache(1, B, KV, S, D)
        c.k_layers[0].copy_(torch.randn(B, KV, S, D, generator=torch.Generator().manual_seed(6)))
        c.v_layers[0].copy_(torch.randn(B, KV, S, D, generator=torch.Generator().manual_seed(7)))
        caches.append(c)
    a = direct.decode_attention(q, k, v, cos, sin, caches[0].k_layers[0], caches[0].v_layers[0], 0, start)
    b = torch.ops.llamalab.decode_attention(q, k, v, cos, sin, caches[1].k_layers[0], caches[1].v_layers[0], 0, start)
    _same(a, b)
    _same(caches[0].k_layers[0], caches[1].k_layers[0])
    _same(caches[0].v_layers[0], caches[1].v_layers[0])
    rows, slots = torch.tensor([1, 0]), torch.tensor([7, 3])
    a = direct.decode_attention_rows(q, k, v, cos, sin, caches[0].k_layers[0], caches[0].v_layers[0], rows, slots)
    b = torch.ops.llamalab.decode_attention_rows(q, k, v, cos, sin, caches[1].k_layers[0], caches[1].v_layers[0],
                                                 rows, slots)
    _same(a, b)
    _same(caches[0].k_layers[0], caches[1].k_layers[0])


def test_bad_arguments_raise_the_kernels_message(direct):
    x, w = torch.randn(1, 64), torch.randn(48, 32)
    with pytest.raises(RuntimeError) as direct_err:
        direct.dense_linear(x, w)
    with pytest.raises(RuntimeError) as boxed_err:
        torch.ops.llamalab.dense_linear(x, w)
    assert str(direct_err.value).splitlines()[0] == str(boxed_err.value).splitlines()[0]
    with pytest.raises(TypeError):
        direct.rms_norm(x, "not a tensor", 1e-5)


def test_the_eager_forward_calls_them_and_compile_keeps_torch_ops(direct, monkeypatch):
    """A block linear's eager forward goes through OPS (counted through a wrapper), and a compiled call of the
    same layer does not (the graph holds the registered op), with equal outputs."""
    layer = BlockQuantLinear.from_float(torch.randn(32, 64, generator=torch.Generator().manual_seed(8)), "q8_0")
    calls = []
    real = layer._eager
    monkeypatch.setattr(layer, "_eager", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 64)
    with torch.inference_mode():
        eager = layer(x)
        assert calls == [1]
        compiled = torch.compile(layer, backend="eager", fullgraph=True)(x)
        assert calls == [1]
    _same(eager, compiled)


_FAILED_DIRECT_CHILD = r"""
import shutil, sys
from pathlib import Path
import torch
from llamalab import kernels
built = Path(sys.argv[1])  # a library this machine built (the kernels with direct.cpp)
calls = []
def fake_build(path):
    calls.append([s.name for s in kernels._sources()])
    if len(calls) == 1:  # the build with direct.cpp: a compiler error in it
        raise RuntimeError("compiler exited with 1: direct.cpp:12:10: fatal error: Python.h: No such file")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, path)  # the kernels alone (any library of the same ops loads the same)
    return path
kernels.build = fake_build
from llamalab.quantization.blocks import BlockQuantLinear
layer = BlockQuantLinear.from_float(torch.randn(8, 64), "q8_0")
x = torch.randn(1, 64)
print("native", kernels.load(), "direct", kernels._state["direct"], "failed", kernels._state.get("direct_failed"))
print("builds", calls)
print("boxed", kernels.OPS.rms_norm is torch.ops.llamalab.rms_norm.default)
with torch.inference_mode():
    print("close", torch.equal(layer(x), torch.ops.llamalab.q8_0_linear(x, layer.qs, layer.d)),
          torch.allclose(layer(x), x @ layer.dequantize().t(), rtol=0.05, atol=0.2))
"""


def test_a_failed_direct_build_still_builds_the_kernels(direct, tmp_path):
    """Where the build with direct.cpp fails on it (no Python headers after all, no libtorch_python), the kernels
    are built alone and the forward calls torch.ops: the C++ kernels are never lost to the pybind11 module."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LLAMALAB_KERNEL_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", _FAILED_DIRECT_CHILD, str(kernels._state["library"])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "native True direct False failed True" in out, out
    assert "builds [[" in out and "'direct.cpp']," in out and out.count("direct.cpp") == 1, out
    assert "boxed True" in out and "close True True" in out, out
