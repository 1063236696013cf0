"""DirectCall: inference calls of the model's modules skip nn.Module's dispatch only when it has nothing to do.

Every kind of hook, per-module compile and training must behave exactly as with ``nn.Module.__call__``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llamalab
from llamalab import Llama, LlamaConfig
from llamalab.module_call import DirectCall
from llamalab.quantization.quantize import quantize_model


def _model(seed: int = 0) -> Llama:
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_position_embeddings=64)
    torch.manual_seed(seed)
    model = Llama(cfg)
    model.init_weights(seed)
    return model.eval()


class _CallImplCount:
    """Counts nn.Module._call_impl calls made for DirectCall modules (the dispatch DirectCall may skip)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = nn.Module._call_impl

        def counting(mod, *args, **kwargs):
            if isinstance(mod, DirectCall):
                self.n += 1
            return real(mod, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "_call_impl", counting)


def _ids() -> torch.Tensor:
    return torch.tensor([[3, 14, 15, 92, 65, 35]])


@pytest.mark.parametrize("variant", ["float32", "int8", "int4"])
def test_inference_calls_skip_the_dispatch_and_keep_the_logits(monkeypatch, variant):
    model = _model()
    if variant != "float32":
        quantize_model(model, variant)
    with torch.inference_mode():
        direct = model(_ids())
    count = _CallImplCount(monkeypatch)
    with torch.inference_mode():
        model(_ids())
    assert count.n == 0  # every block, attention, norm, MLP and linear went straight to forward
    monkeypatch.setattr(DirectCall, "__call__", nn.Module.__call__)  # the plain dispatch, for comparison
    with torch.inference_mode():
        dispatched = model(_ids())
    assert count.n > 0
    assert torch.equal(direct, dispatched)


def test_grad_mode_goes_through_the_dispatch(monkeypatch):
    model = _model()
    count = _CallImplCount(monkeypatch)
    model(_ids()).sum().backward()
    # training (backward hooks, FSDP, checkpoint wrappers) keeps nn.Module.__call__: per layer the block, its
    # two norms, attention and MLP (the linears of a model built in memory are plain nn.Linear), then the final norm
    assert count.n == 5 * model.config.n_layers + 1


def test_forward_hooks_and_pre_hooks_fire_under_inference():
    model = _model()
    attn = model.layers[1].self_attn
    seen: list[tuple[str, tuple[int, ...]]] = []
    h1 = attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(("q_proj", tuple(out.shape))))
    h2 = model.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.append(("mlp", tuple(a[0].shape))))
    h3 = model.layers[0].input_layernorm.register_forward_hook(lambda m, a, out: out * 0)  # replaces the output
    with torch.inference_mode():
        hooked = model(_ids())
    for h in (h1, h2, h3):
        h.remove()
    with torch.inference_mode():
        plain = model(_ids())
    assert seen == [("mlp", (1, 6, 64)), ("q_proj", (1, 6, 64))]
    assert not torch.equal(hooked, plain)  # the replacing hook took effect


def test_a_global_forward_hook_sees_every_module_under_inference():
    model = _model()
    names = {id(m): n for n, m in model.named_modules()}
    seen: list[str] = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(names.get(id(m), "?")))
    try:
        with torch.inference_mode():
            model(_ids())
    finally:
        handle.remove()
    assert "layers.0.self_attn.k_proj" in seen and "layers.1.mlp.down_proj" in seen and "layers.1" in seen


def test_a_module_compiled_with_module_compile_runs_its_compiled_call():
    model = _model()
    block = model.layers[0]
    calls = []

    def compiled(*args, **kwargs):  # stands in for what block.compile() installs
        calls.append(1)
        return block.forward(*args, **kwargs)

    block._compiled_call_impl = compiled
    with torch.inference_mode():
        model(_ids())
    assert calls == [1]


def test_generation_with_a_hook_after_a_save_and_load_equals_without(tmp_path):
    """Through the public API after a save and a load: a no-op hook changes nothing, a counting one counts."""
    model = _model(1)
    model.save_pretrained(tmp_path / "m")
    loaded, _ = llamalab.load(tmp_path / "m")
    from llamalab.generation.runner import Runner

    def greedy(m: Llama) -> list[int]:
        runner = Runner(m, 1, 32, compile=False)
        logits = runner.prefill(0, [3, 14, 15])
        out = []
        for _ in range(8):
            out.append(int(logits.argmax()))
            logits = runner.decode([0], [out[-1]])[0]
        return out

    assert isinstance(loaded.layers[1].self_attn.o_proj, DirectCall)  # loaded float linears: DenseLinear
    plain = greedy(loaded)
    calls = []
    handle = loaded.layers[1].self_attn.o_proj.register_forward_hook(lambda m, a, out: calls.append(1))
    hooked = greedy(loaded)
    handle.remove()
    assert hooked == plain
    assert len(calls) == 1 + 8  # the prefill, then every decode step


def test_replaced_submodules_and_parametrized_weights_are_the_ones_called():
    """The eager forward looks submodules and the norm's gain up in _modules / _parameters (not through
    nn.Module.__getattr__): a module swapped in with setattr and a parametrized gain must still be what runs."""
    from torch.nn.utils import parametrize

    model = _model()
    with torch.inference_mode():
        plain = model(_ids())

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    mlp = model.layers[0].mlp
    model.layers[0].mlp = Zero()
    with torch.inference_mode():
        swapped = model(_ids())
    assert not torch.equal(swapped, plain)
    model.layers[0].mlp = mlp
    with torch.inference_mode():
        assert torch.equal(model(_ids()), plain)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    norm = model.layers[1].input_layernorm
    parametrize.register_parametrization(norm, "weight", Double())
    with torch.inference_mode():
        doubled = model(_ids())
    parametrize.remove_parametrizations(norm, "weight", leave_parametrized=False)
    with torch.no_grad():
        norm.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(model(_ids()), doubled)  # the parametrization's 2 * gain, as a plain gain of 2
    assert not torch.equal(doubled, plain)
