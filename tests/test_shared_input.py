"""q|k|v and gate|up in one kernel call (llamalab::block_linears, model/shared_input.py).

The joint call must give each layer's own output bit for bit, be taken on the default quantized path, and
step aside for everything nn.Module.__call__ exists for (hooks, global hooks, module.compile()), for
adapters, for mixed kinds, and for grad mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llamalab
from llamalab import Llama, LlamaConfig, kernels
from llamalab.kernels.attention import decode_attention_reference
from llamalab.kernels.reference import KINDS
from llamalab.lora import LoraConfig, LoRALinear, apply_lora
from llamalab.model import shared_input
from llamalab.quantization.blocks import BlockQuantLinear
from llamalab.quantization.quantize import quantize_model

pytestmark = pytest.mark.skipif(not kernels.native(), reason="the C++ kernels are not built here")


def _available_isas() -> list[str]:
    return [isa for isa in kernels.ISAS if torch.ops.llamalab.isa_supported(kernels.ISAS.index(isa))]


def _model(method: str | None = "int4", seed: int = 0) -> Llama:
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_position_embeddings=64)
    torch.manual_seed(seed)
    model = Llama(cfg)
    model.init_weights(seed)
    if method:
        quantize_model(model, method)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.tensor([[3, 14, 15, 92, 65, 35]])


class _JointCalls:
    """Counts the joint calls, by the number of weights in each: 3 for block_linears (q|k|v), 2 for block_swiglu
    (gate|up)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_width: dict[int, int] = {}
        for name in ("block_linears", "block_swiglu"):
            real = getattr(kernels.OPS, name)

            def counting(x, qs, d, m, kind, _real=real):
                self.by_width[len(qs)] = self.by_width.get(len(qs), 0) + 1
                return _real(x, qs, d, m, kind)

            monkeypatch.setattr(kernels.OPS, name, counting)


def _greedy(model: Llama, n: int = 8) -> list[int]:
    cache = model.new_cache(1, 32)
    ids = _ids()
    out: list[int] = []
    with torch.inference_mode():
        logits = model(ids, cache=cache)
        for _ in range(n):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache=cache)
    return out


@pytest.mark.parametrize("isa", _available_isas())
@pytest.mark.parametrize("kind", KINDS)
def test_block_linears_equal_each_layer_alone(isa, kind):
    """Random blocks, odd widths and row counts, float32 and bfloat16, both call paths, every ISA here."""
    old = kernels.set_isa(isa)
    try:
        gen = torch.Generator().manual_seed(1)
        for K in (32, 96, 576):
            layers = [BlockQuantLinear.from_float(torch.randn(n, K, generator=gen), kind) for n in (63, 64, 5)]
            args = ([m.qs for m in layers], [m.d for m in layers], [m.m for m in layers if m.m is not None],
                    KINDS.index(kind))
            for shape in ((1, 1, K), (3, K), (2, 8, K), (23, K), (kernels.GEMM_ROWS + 3, K)):
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(*shape, generator=gen).to(dtype)
                    for ys in (kernels.OPS.block_linears(x, *args), torch.ops.llamalab.block_linears(x, *args)):
                        assert len(ys) == len(layers)
                        for y, layer in zip(ys, layers):
                            alone = layer(x)
                            assert y.dtype == alone.dtype and y.shape == alone.shape
                            assert torch.equal(y, alone), (K, shape, dtype)
    finally:
        kernels.set_isa(old)


@pytest.mark.parametrize("kind", KINDS)
def test_block_swiglu_is_silu_mul_of_the_two_layers(kind):
    gen = torch.Generator().manual_seed(2)
    gate, up = (BlockQuantLinear.from_float(torch.randn(72, 96, generator=gen), kind) for _ in range(2))
    args = ([gate.qs, up.qs], [gate.d, up.d], [m for m in (gate.m, up.m) if m is not None], KINDS.index(kind))
    for shape in ((1, 1, 96), (5, 96), (kernels.GEMM_ROWS + 1, 96)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(*shape, generator=gen).to(dtype)
            want = kernels.OPS.silu_mul(gate(x), up(x))
            for got in (kernels.OPS.block_swiglu(x, *args), torch.ops.llamalab.block_swiglu(x, *args)):
                assert got.dtype == want.dtype and torch.equal(got, want), (shape, dtype)
    with pytest.raises(RuntimeError, match="two weights"):
        torch.ops.llamalab.block_swiglu(x, [gate.qs], [gate.d], [gate.m] if gate.m is not None else [], args[3])


def test_block_linears_reject_mismatched_weights():
    a = BlockQuantLinear.from_float(torch.randn(8, 64), "q4_1")
    b = BlockQuantLinear.from_float(torch.randn(8, 96), "q4_1")
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="qs must be"):
        torch.ops.llamalab.block_linears(x, [a.qs, b.qs], [a.d, b.d], [a.m, b.m], KINDS.index("q4_1"))
    with pytest.raises(RuntimeError, match="as many d"):
        torch.ops.llamalab.block_linears(x, [a.qs], [a.d], [], KINDS.index("q4_1"))


@pytest.mark.parametrize("op", ["block_linears", "block_swiglu"])
def test_the_fakes_match_the_kernels(op):
    layers = [BlockQuantLinear.from_float(torch.randn(16, 64), "q8_0") for _ in range(2)]
    torch.library.opcheck(getattr(torch.ops.llamalab, op).default,
                          (torch.randn(2, 3, 64), [m.qs for m in layers], [m.d for m in layers], [], 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_decode_attention_takes_the_projections_as_they_come():
    """q, k, v as (B, 1, heads·D) give what their (B, heads, 1, D) views give, and write the same cache."""
    gen = torch.Generator().manual_seed(3)
    B, H, KV, D, S = 2, 6, 2, 16, 9
    q, k, v = (torch.randn(B, 1, n * D, generator=gen) for n in (H, KV, KV))
    cos, sin = torch.randn(1, 1, 1, D, generator=gen), torch.randn(1, 1, 1, D, generator=gen)
    caches = [tuple(torch.randn(B + 1, KV, S, D, generator=torch.Generator().manual_seed(4)) for _ in range(2))
              for _ in range(2)]
    heads = [t.view(B, t.shape[-1] // D, 1, D) for t in (q, k, v)]
    flat = kernels.OPS.decode_attention(q, k, v, cos, sin, *caches[0], 1, 5)
    four = kernels.OPS.decode_attention(*heads, cos, sin, *caches[1], 1, 5)
    assert torch.equal(flat, four)
    assert all(torch.equal(a, b) for a, b in zip(caches[0], caches[1]))
    rows, slots = torch.tensor([2, 0]), torch.tensor([3, 7])
    assert torch.equal(kernels.OPS.decode_attention_rows(q, k, v, cos, sin, *caches[0], rows, slots),
                       kernels.OPS.decode_attention_rows(*heads, cos, sin, *caches[1], rows, slots))
    # the pure-PyTorch fallback and the fake take both layouts too
    ref = [tuple(c.clone() for c in caches[1]) for _ in range(2)]
    assert torch.equal(decode_attention_reference(q, k, v, cos, sin, *ref[0], 1, 5),
                       decode_attention_reference(*heads, cos, sin, *ref[1], 1, 5))
    assert all(torch.equal(a, b) for a, b in zip(*ref))
    torch.library.opcheck(torch.ops.llamalab.decode_attention.default, (q, k, v, cos, sin, *ref[0], 1, 5),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="heads·D"):
        kernels.OPS.decode_attention(q[:, :, :-1], k, v, cos, sin, *caches[0], 1, 5)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_decode_takes_the_joint_call_and_keeps_the_tokens(monkeypatch, method):
    model = _model(method)
    joint = _JointCalls(monkeypatch)
    tokens = _greedy(model)
    n = model.config.n_layers * 9  # prefill + 8 decode steps, every layer: one q|k|v call, one gate|up call
    assert joint.by_width == {3: n, 2: n}
    # the same model through each module's own call (a no-op pre-hook on every linear forces that)
    for mod in model.modules():
        if isinstance(mod, BlockQuantLinear):
            mod.register_forward_pre_hook(lambda m, a: None)
    joint.by_width.clear()
    assert _greedy(model) == tokens
    assert joint.by_width == {}


def test_logits_equal_the_separate_calls_bit_for_bit(monkeypatch):
    model = _model("int4")
    with torch.inference_mode():
        joint = model(_ids())
    monkeypatch.setattr(kernels.OPS, "block_linears", None)  # any joint call would now fail
    monkeypatch.setattr(kernels.OPS, "block_swiglu", None)
    monkeypatch.setattr(shared_input._Plan, "check", lambda plan, modules: False)  # each module called
    with torch.inference_mode():
        separate = model(_ids())
    assert torch.equal(joint, separate)


def test_hooks_on_one_projection_see_the_same_forward(monkeypatch):
    model = _model("int4")
    attn = model.layers[1].self_attn
    with torch.inference_mode():
        plain = model(_ids())
    seen: list[tuple[int, ...]] = []
    handle = attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    joint = _JointCalls(monkeypatch)
    with torch.inference_mode():
        hooked = model(_ids())
    assert seen == [(1, 6, attn.n_kv_heads * attn.head_dim)]
    assert torch.equal(hooked, plain)
    assert joint.by_width == {3: 1, 2: 2}  # layer 1's q|k|v took the modules' own calls
    handle.remove()
    replaced = attn.v_proj.register_forward_hook(lambda m, a, out: out * 0)  # a hook that replaces the output
    with torch.inference_mode():
        assert not torch.equal(model(_ids()), plain)
    replaced.remove()
    joint.by_width.clear()
    with torch.inference_mode():
        assert torch.equal(model(_ids()), plain)  # the joint call is back once the hooks are gone
    assert joint.by_width == {3: 2, 2: 2}


def test_a_global_hook_sees_every_projection(monkeypatch):
    model = _model("int8")
    names = {id(m): n for n, m in model.named_modules()}
    seen: list[str] = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, a, out: seen.append(names.get(id(m), "")))
    try:
        with torch.inference_mode():
            model(_ids())
    finally:
        handle.remove()
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert f"layers.0.self_attn.{proj}" in seen or f"layers.0.mlp.{proj}" in seen


def test_adapters_mixed_kinds_and_grad_mode_take_each_module(monkeypatch):
    model = _model("int4")
    joint = _JointCalls(monkeypatch)
    with torch.inference_mode():
        base = model(_ids())
    assert joint.by_width == {3: 2, 2: 2}
    # an adapter on q_proj / v_proj replaces those modules: q|k|v is no longer one kind of block linear
    apply_lora(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            nn.init.normal_(mod.lora_B.weight)
    joint.by_width.clear()
    with torch.inference_mode():
        adapted = model(_ids())
    assert joint.by_width == {2: 2}
    assert not torch.equal(adapted, base)  # the adapters' updates are in the forward
    # mixed kinds: q_proj as Q8_0 beside Q4_1 k / v
    other = _model("int4")
    attn = other.layers[0].self_attn
    attn.q_proj = BlockQuantLinear.from_float(attn.q_proj.dequantize(), "q8_0")
    joint.by_width.clear()
    with torch.inference_mode():
        other(_ids())
    assert joint.by_width == {3: 1, 2: 2}
    # grad mode: nothing joint (the modules' own calls, through nn.Module.__call__)
    joint.by_width.clear()
    model(_ids())
    assert joint.by_width == {}


def test_new_weights_after_the_first_call_are_the_ones_used():
    """load_state_dict / .to() refresh a block linear's tensors: the joint call follows them."""
    a, b = _model("int4", seed=0), _model("int4", seed=1)
    with torch.inference_mode():
        a(_ids())  # a's plan is made
        want = b(_ids())
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(_ids()), want)


def test_joint_calls_after_a_save_and_a_load(tmp_path, monkeypatch):
    model = _model("int4")
    model.save_pretrained(tmp_path / "m")
    loaded, _ = llamalab.load(tmp_path / "m")
    joint = _JointCalls(monkeypatch)
    tokens = _greedy(loaded)
    assert joint.by_width.get(3) and joint.by_width.get(2)
    assert tokens == _greedy(model)


# ---------------------------------------------------------------------------------------- dense (float) weights
class _DenseJointCalls:
    """Counts the joint dense calls (dense_linears for q|k|v, dense_swiglu for gate|up) by their op's name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_op: dict[str, int] = {}
        for name in ("dense_linears", "dense_swiglu"):
            real = getattr(kernels.OPS, name)

            def counting(x, ws, _real=real, _name=name):
                self.by_op[_name] = self.by_op.get(_name, 0) + 1
                return _real(x, ws)

            monkeypatch.setattr(kernels.OPS, name, counting)


def _dense_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> Llama:
    from llamalab.kernels.dense import use_dense_kernels

    model = _model(None, seed).to(dtype)
    assert use_dense_kernels(model) == 2 * 7 + 1
    return model


@pytest.mark.parametrize("isa", _available_isas())
def test_dense_linears_equal_each_weight_alone(isa):
    """Random weights of odd widths and row counts, every weight dtype, 1..DENSE_ROWS+1 activation rows (the
    last one past the kernel: a GEMM per weight), both call paths, every ISA here: each output is dense_linear's
    bit for bit, and dense_swiglu is silu_mul of the two."""
    old = kernels.set_isa(isa)
    try:
        gen = torch.Generator().manual_seed(4)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for K in (7, 64, 200):
                ws = [torch.randn(n, K, generator=gen).to(dtype) for n in (63, 5, 63)]
                for rows in range(1, kernels.DENSE_ROWS[dtype] + 2, 2 if dtype == torch.float16 else 1):
                    for xdtype in {dtype, torch.float32}:
                        x = torch.randn(rows, 1, K, generator=gen).to(xdtype)
                        alone = [kernels.OPS.dense_linear(x, w) for w in ws]
                        for ys in (kernels.OPS.dense_linears(x, ws), torch.ops.llamalab.dense_linears(x, ws)):
                            assert len(ys) == 3
                            for y, want in zip(ys, alone):
                                assert y.dtype == want.dtype == xdtype and y.shape == want.shape
                                assert torch.equal(y, want), (dtype, K, rows, xdtype)
                        want = kernels.OPS.silu_mul(alone[0], alone[2])
                        for got in (kernels.OPS.dense_swiglu(x, ws[::2]), torch.ops.llamalab.dense_swiglu(x, ws[::2])):
                            assert torch.equal(got, want), (dtype, K, rows)
    finally:
        kernels.set_isa(old)


def test_dense_joint_ops_check_their_weights():
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="every weight must be 2-D"):
        kernels.OPS.dense_linears(x, [torch.randn(8, 64), torch.randn(8, 32)])
    with pytest.raises(RuntimeError, match="every weight must be 2-D"):
        kernels.OPS.dense_linears(x, [torch.randn(8, 64), torch.randn(8, 64, dtype=torch.bfloat16)])
    with pytest.raises(RuntimeError, match="two weights"):
        kernels.OPS.dense_swiglu(x, [torch.randn(8, 64)])
    with pytest.raises(RuntimeError, match="at least one weight"):
        kernels.OPS.dense_linears(x, [])


@pytest.mark.parametrize("op", ["dense_linears", "dense_swiglu"])
def test_the_dense_fakes_match_the_kernels(op):
    ws = [torch.randn(16, 64), torch.randn(16, 64)]
    torch.library.opcheck(getattr(torch.ops.llamalab, op).default, (torch.randn(2, 1, 64), ws),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_decode_takes_the_joint_calls_bit_for_bit(monkeypatch, dtype):
    """A float model on the dense kernel decodes through one q|k|v and one gate|up call a layer, with the
    logits and tokens of each module's own call; a prefill (more rows than the kernel takes) calls each module."""
    model = _dense_model(dtype)
    joint = _DenseJointCalls(monkeypatch)
    tokens = _greedy(model)
    n = model.config.n_layers * 8  # 8 decode steps (the 6-token prefill is past DENSE_ROWS rows)
    assert joint.by_op == {"dense_linears": n, "dense_swiglu": n}
    with torch.inference_mode():
        joint_logits = model(_ids()[:, :1])
    monkeypatch.setattr(kernels.OPS, "dense_linears", None)  # any joint call would now fail
    monkeypatch.setattr(kernels.OPS, "dense_swiglu", None)
    monkeypatch.setattr(shared_input._Plan, "check", lambda plan, modules: False)  # each module called
    with torch.inference_mode():
        assert torch.equal(model(_ids()[:, :1]), joint_logits)
    assert _greedy(model) == tokens


def test_float_joint_calls_step_aside_for_hooks_adapters_and_grad(monkeypatch):
    model = _dense_model()
    joint = _DenseJointCalls(monkeypatch)
    one = _ids()[:, :1]
    with torch.inference_mode():
        base = model(one)
    assert joint.by_op == {"dense_linears": 2, "dense_swiglu": 2}
    seen: list[tuple[int, ...]] = []
    handle = model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    joint.by_op.clear()
    with torch.inference_mode():
        assert torch.equal(model(one), base)
    assert seen == [(1, 1, model.config.intermediate_size)] and joint.by_op == {"dense_linears": 2, "dense_swiglu": 1}
    handle.remove()
    apply_lora(model, LoraConfig(r=4, target_modules=("v_proj",)))
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            nn.init.normal_(mod.lora_B.weight)
    joint.by_op.clear()
    with torch.inference_mode():
        adapted = model(one)
    assert joint.by_op == {"dense_swiglu": 2} and not torch.equal(adapted, base)
    joint.by_op.clear()
    model(one)  # grad mode: each module through nn.Module.__call__
    assert joint.by_op == {}


def test_float_joint_calls_follow_new_weights(monkeypatch):
    a, b = _dense_model(seed=0), _dense_model(seed=1)
    one = _ids()[:, :1]
    with torch.inference_mode():
        a(one)  # a's plans are made
        want = b(one)
        a.load_state_dict(b.state_dict())  # copied in place: the same Parameters, new values
        assert torch.equal(a(one), want)
        for layer_a, layer_b in zip(a.layers, b.layers):  # new Parameters: new plans
            doubled = layer_b.self_attn.v_proj.weight * 2
            layer_a.self_attn.v_proj.weight = nn.Parameter(doubled.clone())
            layer_b.self_attn.v_proj.weight = nn.Parameter(doubled.clone())
        got = a(one)
        assert torch.equal(got, b(one)) and not torch.equal(got, want)
        for layer in a.layers:  # a bias given to a projection after the plan was made: it is in the forward
            layer.mlp.up_proj.bias = nn.Parameter(torch.randn(layer.mlp.up_proj.out_features))
        with_bias = a(one)
        assert not torch.equal(with_bias, got)
        monkeypatch.setattr(shared_input._Plan, "check", lambda plan, modules: False)  # each module called
        assert torch.equal(a(one), with_bias)


def test_float_joint_calls_after_a_save_and_a_load(tmp_path, monkeypatch):
    """llamalab.load of a saved float32 model: its decode takes the joint dense calls, with the tokens of the
    model it was saved from."""
    model = _model(None)
    model.save_pretrained(tmp_path / "m")
    loaded, _ = llamalab.load(tmp_path / "m")
    joint = _DenseJointCalls(monkeypatch)
    tokens = _greedy(loaded)
    assert joint.by_op.get("dense_linears") and joint.by_op.get("dense_swiglu")
    assert tokens == _greedy(model)
