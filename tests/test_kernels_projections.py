"""One op call for several linears of one activation (kernels/projections.py: q|k|v, gate|up): the outputs are
bit for bit the modules' own, on every kind / dtype / ISA / batch; hooks, LoRA and anything unusual fall back
to the module calls; the ops' fallbacks and fakes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers import tiny_llama
from llamalab import kernels
from llamalab.kernels.dense import DenseLinear, use_dense_kernels
from llamalab.kernels.projections import linears, set_enabled
from llamalab.model.attention import GroupedQueryAttention
from llamalab.model.mlp import SwiGLU
from llamalab.quantization.blocks import BlockQuantLinear

# SmolLM2's q|k|v (576 -> 576, 192, 192) and gate|up (576 -> 1536), and odd ones (K = 3 / 5 blocks, N % 4 != 0)
SHAPES = {"qkv": (576, (576, 192, 192)), "gate_up": (576, (1536, 1536)), "odd3": (96, (37, 5, 64)),
          "odd5": (160, (13, 1))}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _blocks(kinds, k, ns, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [BlockQuantLinear.from_float(torch.randn(n, k, generator=g) * 0.05, kind) for kind, n in zip(kinds, ns)]


def _denses(dtype, k, ns, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for n in ns:
        m = nn.Linear(k, n, bias=False).to(dtype)
        with torch.no_grad():
            m.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        m.__class__ = DenseLinear
        mods.append(m)
    return mods


def _check(x, mods, expect_fused=True):
    with torch.no_grad():
        want = [m(x) for m in mods]
        got = linears(x, mods)
    if not expect_fused:
        assert got is None
        return
    assert got is not None and len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.fixture
def isas(native):
    return kernels.available_isas()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kinds", [("q8_0",), ("q4_0",), ("q4_1",), ("q8_0", "q4_1", "q4_0")],
                         ids=["q8_0", "q4_0", "q4_1", "mixed"])
def test_block_linears_bit_identical(isas, shape, kinds):
    k, ns = SHAPES[shape]
    mods = _blocks([kinds[i % len(kinds)] for i in range(len(ns))], k, ns)
    g = torch.Generator().manual_seed(1)
    try:
        for isa in isas:
            kernels.set_isa(isa)
            for lead in ((1, 1), (5, 1), (1, 5), (30,)):  # batch 1, batch 5, a 5-token prompt, past GEMM_ROWS
                for dtype in DTYPES:
                    _check((torch.randn(*lead, k, generator=g) * 2).to(dtype), mods)
    finally:
        kernels.set_isa(None)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_linears_bit_identical(isas, shape, dtype):
    k, ns = SHAPES[shape]
    mods = _denses(dtype, k, ns)
    g = torch.Generator().manual_seed(2)
    try:
        for isa in isas:
            kernels.set_isa(isa)
            for lead in ((1, 1), (5, 1), (1, 3), (2, 2)):
                x = torch.randn(*lead, k, generator=g).to(dtype)
                # past the dtype's kernel rows the module is F.linear: linears leaves it to the modules
                _check(x, mods, expect_fused=x.numel() <= kernels.DENSE_ROWS[dtype] * k)
    finally:
        kernels.set_isa(None)


def test_ops_directly_match_the_single_ops(native):
    """The C++ ops on their own, including what linears never hands them: more rows than the dense kernel takes,
    a non-contiguous activation or weight, float64 activations, empty batches."""
    ops = torch.ops.llamalab
    g = torch.Generator().manual_seed(3)
    blocks = _blocks(("q8_0", "q4_0", "q4_1"), 96, (37, 5, 64))
    qs, d, m = [b.qs for b in blocks], [b.d for b in blocks], [b.m for b in blocks]
    single = [lambda x, b=b: b._op(x, *b._args) for b in blocks]
    denses = [w.weight.detach() for w in _denses(torch.bfloat16, 96, (37, 5, 64))]
    denses[1] = denses[1].t().contiguous().t()  # non-contiguous: at::linear in both
    for x in (torch.randn(3, 96, generator=g), torch.randn(96, 7, generator=g).t(), torch.randn(0, 96),
              torch.randn(2, 96, generator=g, dtype=torch.float64), torch.randn(40, 96, generator=g)):
        for a, f in zip(ops.block_linears(x, qs, d, m), single):
            assert torch.equal(a, f(x))
        xb = x.to(torch.bfloat16)
        for a, w in zip(ops.dense_linears(xb, denses), denses):
            assert torch.equal(a, ops.dense_linear(xb, w))
    assert ops.block_linears(torch.randn(1, 96), [], [], []) == []
    with pytest.raises(RuntimeError, match="one length"):
        ops.block_linears(torch.randn(1, 96), qs, d[:2], m)
    with pytest.raises(RuntimeError, match="int8"):
        ops.block_linears(torch.randn(1, 96), [qs[0]], [d[0]], [m[2]])
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.block_linears(torch.randn(1, 95), qs, d, m)
    with pytest.raises(RuntimeError, match="last dimension"):
        ops.dense_linears(torch.randn(1, 95), denses)


def _attn_mlp(kind):
    torch.manual_seed(4)
    attn, mlp = GroupedQueryAttention(576, 9, 3, 64).eval(), SwiGLU(576, 1536).eval()
    for parent, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj",
                                                                                     "down_proj"))):
        for name in names:
            lin = getattr(parent, name)
            if kind in ("float32", "bfloat16"):
                lin.to(getattr(torch, kind))
            else:
                setattr(parent, name, BlockQuantLinear.from_float(lin, kind))
    use_dense_kernels(attn)
    use_dense_kernels(mlp)
    return attn, mlp


def _rope(T):
    return torch.randn(1, T, 64), torch.randn(1, T, 64)


def _counting(monkeypatch):
    """Count the grouped op calls (wrapping the two ops linears calls)."""
    seen: list[str] = []
    real = (torch.ops.llamalab.block_linears.default, torch.ops.llamalab.dense_linears.default)
    ops = [lambda *a: (seen.append("blocks"), real[0](*a))[1], lambda *a: (seen.append("dense"), real[1](*a))[1]]
    monkeypatch.setattr("llamalab.kernels.projections._ops", ops)
    return seen


@pytest.mark.parametrize("kind", ["q8_0", "q4_1", "float32", "bfloat16"])
def test_modules_take_one_call_with_the_same_outputs(native, monkeypatch, kind):
    """GroupedQueryAttention / SwiGLU forwards: one call each, outputs equal to the module-by-module forward."""
    attn, mlp = _attn_mlp(kind)
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    x = torch.randn(5 if kind.startswith("q") else 3, 1, 576).to(dtype)  # (dense: within DENSE_ROWS)
    cos, sin = _rope(1)
    seen = _counting(monkeypatch)
    with torch.no_grad():
        a_on, m_on = attn(x, cos, sin), mlp(x)
        assert len(seen) == 2
        old = set_enabled(False)
        try:
            a_off, m_off = attn(x, cos, sin), mlp(x)
        finally:
            set_enabled(old)
    assert len(seen) == 2
    assert torch.equal(a_on, a_off) and torch.equal(m_on, m_off)


@pytest.mark.parametrize("kind", ["q4_1", "float32"])
def test_hooks_and_lora_see_their_call(native, kind):
    attn, mlp = _attn_mlp(kind)
    x = torch.randn(1, 3, 576)  # (3 tokens: with one, attention's output would not depend on q)
    cos, sin = _rope(3)
    k, v, up = attn.k_proj, attn.v_proj, mlp.up_proj
    _check(x, (attn.q_proj, k, v))
    _check(x, (mlp.gate_proj, up))
    # a forward hook (or pre-hook) on q_proj: it fires, and the grouped call does not run
    got = []
    h = attn.q_proj.register_forward_hook(lambda mod, i, o: got.append(o))
    _check(x, (attn.q_proj, k, v), expect_fused=False)
    with torch.no_grad():
        attn(x, cos, sin)
    assert len(got) == 2
    h.remove()
    h = mlp.gate_proj.register_forward_pre_hook(lambda mod, i: got.append(i))
    _check(x, (mlp.gate_proj, up), expect_fused=False)
    h.remove()
    # a global hook, use_kernel off, a forward set on the instance, a subclass: module calls
    h = nn.modules.module.register_module_forward_hook(lambda mod, i, o: None)
    _check(x, (attn.q_proj, k, v), expect_fused=False)
    h.remove()
    if kind == "q4_1":
        k.use_kernel = False
        _check(x, (attn.q_proj, k, v), expect_fused=False)
        k.use_kernel = True
    v.forward = v.forward
    _check(x, (attn.q_proj, k, v), expect_fused=False)
    del v.forward
    _check(x, (attn.q_proj, k, v))
    # LoRA on q_proj: the wrapper is called, its delta is in the output
    from llamalab.lora import LoRALinear

    base = attn.q_proj
    lora = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    attn.q_proj = lora
    calls = []
    lora.register_forward_hook(lambda mod, i, o: calls.append(o))
    _check(x, (attn.q_proj, k, v), expect_fused=False)
    with torch.no_grad():
        out = attn(x, cos, sin)
        attn.q_proj = base
        plain = attn(x, cos, sin)
    assert len(calls) == 2 and not torch.equal(out, plain)


def test_not_taken_outside_fused_inference(native):
    attn, _ = _attn_mlp("q8_0")
    x = torch.randn(1, 1, 576)
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert linears(x, mods) is None  # grad mode on
    old = kernels.set_fused(False)
    try:
        with torch.no_grad():
            assert linears(x, mods) is None
    finally:
        kernels.set_fused(old)
    with torch.no_grad():
        assert linears(x, (mods[0], nn.Linear(576, 8))) is None  # mixed classes
        assert linears(x, (nn.Linear(576, 8), mods[0])) is None
        dense = _denses(torch.float32, 576, (8, 8))
        assert linears(x.bfloat16(), dense) is None  # the dense forward would not take the kernel either
        assert linears(x, (dense[0], _denses(torch.bfloat16, 576, (8,))[0])) is None
        assert linears(x, (mods[0], _blocks(("q8_0",), 64, (8,))[0])) is None  # widths differ


def test_model_decode_identical_on_and_off(native, tiny_tok, monkeypatch):
    """A whole tiny model, float32, bfloat16 and Q8_0: logits and cached greedy decode (a batch of two prompts)
    identical with the grouping on and off."""
    from llamalab.generation.generate import generate
    from llamalab.quantization.quantize import quantize_model

    seen = _counting(monkeypatch)
    for variant in ("float32", "bfloat16", "int8"):
        model = tiny_llama(tiny_tok, intermediate_size=96)
        if variant == "bfloat16":
            model.to(torch.bfloat16)
        use_dense_kernels(model)
        if variant == "int8":
            quantize_model(model, "int8")
        ids = torch.tensor([[5, 17, 33, 2, 9]])
        outs = []
        for on in (True, False):
            old = set_enabled(on)
            try:
                with torch.inference_mode():
                    logits = model(ids)
                text = generate(model, tiny_tok, ["the cat", "a dog sat on"], max_new_tokens=8, compile=False)
                outs.append((logits, text))
            finally:
                set_enabled(old)
        assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
        assert seen.count("dense" if variant != "int8" else "blocks") >= 2 * 2 * 7  # 2 layers, 2 calls, 7 steps
        seen.clear()


def test_fakes_give_the_shapes(native):
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(2, 3, 64, dtype=torch.bfloat16)
        ys = torch.ops.llamalab.block_linears(x, [torch.empty(7, 64, dtype=torch.int8), torch.empty(5, 32,
                                                                                                   dtype=torch.uint8)],
                                              [torch.empty(7, 2, dtype=torch.float16)] * 2, [None, None])
        assert [tuple(y.shape) for y in ys] == [(2, 3, 7), (2, 3, 5)] and ys[0].dtype == torch.bfloat16
        ys = torch.ops.llamalab.dense_linears(x, [torch.empty(9, 64, dtype=torch.bfloat16)])
        assert [tuple(y.shape) for y in ys] == [(2, 3, 9)]


_CHILD = r"""
import torch
import torch.nn.functional as F
from llamalab import kernels
from llamalab.kernels.reference import dequantize
from llamalab.quantization.blocks import BlockQuantLinear
assert not kernels.load()
g = torch.Generator().manual_seed(0)
w = torch.randn(7, 64, generator=g)
layers = [BlockQuantLinear.from_float(w, k) for k in ("q8_0", "q4_0", "q4_1")]
x = torch.randn(2, 64, generator=g)
ys = torch.ops.llamalab.block_linears(x, [l.qs for l in layers], [l.d for l in layers], [l.m for l in layers])
assert all(torch.equal(y, l(x)) for y, l in zip(ys, layers))
ys = torch.ops.llamalab.dense_linears(x.bfloat16(), [w.bfloat16(), w[:3].bfloat16()])
assert torch.equal(ys[0], F.linear(x.bfloat16(), w.bfloat16())) and ys[1].shape == (2, 3)
from llamalab.kernels.projections import linears
with torch.no_grad():
    assert linears(x, layers) is None
print("ok")
"""


def test_fallback_ops_without_the_cpp_build(tmp_path):
    env = {**os.environ, "LLAMALAB_KERNELS": "0", "LLAMALAB_KERNEL_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok" in res.stdout
