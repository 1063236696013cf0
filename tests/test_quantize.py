"""Weight-only quantization: error bounds, kernel == fallback, model logits, save/load, GGUF blocks, CLI."""

from __future__ import annotations

import copy

import pytest
import torch

from llamalab.quantization.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_model,
    model_bytes,
    quantize_model,
    save_quantized,
)


def _weight(out_f: int = 96, in_f: int = 128, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    w[3] *= 20  # an outlier row: per-channel / per-group scales must keep the others precise
    return w


def test_int8_error_bound_is_half_a_step_per_channel():
    w = _weight()
    q = Int8Linear.from_float(w)
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (96,)
    err = (q.dequantize() - w).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()
    assert err[3].max() > 10 * err[0].max()  # the outlier row pays only for itself


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_error_bound_is_half_a_step_per_group(group_size, symmetric):
    w = _weight()
    q = Int4Linear.from_float(w, group_size, symmetric=symmetric)
    qweight, scales, zeros = q.portable()
    assert qweight.dtype == torch.uint8 and qweight.shape == (96, 64)
    assert scales.shape == zeros.shape == (96, 128 // group_size)
    if symmetric:
        assert (zeros == 0).all()
    err = (q.dequantize() - w).abs().view(96, -1, group_size)
    assert (err <= scales.float()[..., None] * (0.5 + 1e-3) + 1e-6).all()


@pytest.mark.parametrize("make", [lambda w: Int8Linear.from_float(w), lambda w: Int4Linear.from_float(w, 32)])
def test_kernel_path_equals_fallback_path(make):
    w = _weight(64, 96, seed=1)
    layer = make(w)
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(3))
    y_kernel = layer(x)
    layer.use_kernel = False
    y_fallback = layer(x)
    layer.use_kernel = True
    # the kernel multiplies bf16 activations; the fallback float32 ones: equal to bf16 rounding
    assert (y_kernel - y_fallback).abs().max() <= 1e-2 * y_fallback.abs().max()
    torch.testing.assert_close(y_fallback, x @ layer.dequantize().t(), atol=1e-4, rtol=1e-4)
    assert y_kernel.shape == (3, 5, 64) and y_kernel.dtype == torch.float32


def test_from_blocks_matches_gguf_formulas():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 2, 32, generator=gen) * 0.05  # (rows, blocks of 32, 32) as GGUF stores them
    # GGUF Q4_1 blocks: d = (max - min) / 15, m = min (float16), q = round((w - m) / d)
    d = ((w.amax(-1) - w.amin(-1)) / 15).half()
    m = w.amin(-1).half()
    q4 = ((w - m.float()[..., None]) / d.float()[..., None]).round().clamp(0, 15).to(torch.uint8).view(32, 64)
    dd, mm = d.float().repeat_interleave(32, 1), m.float().repeat_interleave(32, 1)
    # scales and zeros are held in bfloat16 (what the CPU kernel reads): a few % of one step d
    q4_1 = Int4Linear.from_blocks(q4, d, mins=m, group_size=32)  # Q4_1: w = q*d + m
    assert ((q4_1.dequantize() - (q4.float() * dd + mm)).abs() / dd).max() < 0.05
    q4_0 = Int4Linear.from_blocks(q4, d, group_size=32)  # Q4_0: w = (q-8)*d
    assert ((q4_0.dequantize() - (q4.float() - 8) * dd).abs() / dd).max() < 0.05
    q8 = torch.randint(-127, 128, (32, 64), generator=gen, dtype=torch.int8)
    q8_0 = Int8Linear.from_blocks(q8, d, group_size=32)  # Q8_0: w = q*d, exact
    torch.testing.assert_close(q8_0.dequantize(), q8.float() * dd)
    per_channel = Int8Linear.from_blocks(q8, d, group_size=32, per_channel=True)
    assert per_channel.group_size is None
    torch.testing.assert_close(per_channel.dequantize(), q8.float() * dd, atol=per_channel.scales.max().item(),
                               rtol=0)


@pytest.mark.parametrize("method,tol", [("int8", 0.05), ("int4", 0.3)])
def test_quantized_model_logits_close_and_save_load_round_trip(tiny_model, tmp_path, method, tol):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = tiny_model(ids)
        q = quantize_model(copy.deepcopy(tiny_model), method, group_size=32)
        out = q(ids)
    assert (out - ref).abs().max() < tol * ref.abs().max()
    assert not any(type(m) is torch.nn.Linear for n, m in q.named_modules() if n.startswith("layers."))
    assert model_bytes(q) < model_bytes(tiny_model)
    save_quantized(q, tmp_path / "q")
    import llamalab

    loaded, _ = llamalab.load(tmp_path / "q")  # through Llama.from_pretrained
    assert loaded.config.quantization["method"] == method
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), out)
    again = llamalab.Llama.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), out)
    deq = dequantize_model(loaded)
    with torch.no_grad():
        torch.testing.assert_close(deq(ids), out, atol=tol * ref.abs().max().item(), rtol=0)


def test_quantize_lm_head_and_cache_decode(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 8))
    q = quantize_model(copy.deepcopy(tiny_model), "int8", include_lm_head=True)
    assert isinstance(q.lm_head, Int8Linear)
    with torch.no_grad():
        full = q(ids)
        cache = q.new_cache(1, 16)
        q(ids[:, :6], cache=cache)
        step = torch.cat([q(ids[:, 6:7], cache=cache), q(ids[:, 7:8], cache=cache)], dim=1)
    torch.testing.assert_close(step, full[:, 6:], atol=1e-3, rtol=1e-3)


def test_quantize_errors(tiny_model, tmp_path):
    from llamalab.errors import ConfigError, WeightsError

    with pytest.raises(ConfigError, match="unknown quantization"):
        quantize_model(copy.deepcopy(tiny_model), "int3")
    q = quantize_model(copy.deepcopy(tiny_model), "int4", group_size=32)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(q, "int8")
    save_quantized(q, tmp_path / "q")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "q" / "model.safetensors")
    tensors.pop("model.layers.0.mlp.up_proj.zeros")
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    import llamalab

    with pytest.raises(WeightsError, match="up_proj.zeros"):
        llamalab.load(tmp_path / "q")


def test_quantize_cli(tiny_model, tmp_path, capsys):
    from llamalab.cli.main import main

    tiny_model.save_pretrained(tmp_path / "m")
    rc = main(["quantize", "--model", str(tmp_path / "m"), "--to", "int4", "--group-size", "64",
               "--out", str(tmp_path / "q4")])
    assert rc == 0 and "int4" in capsys.readouterr().out
    import llamalab

    m, _ = llamalab.load(tmp_path / "q4")
    assert isinstance(m.layers[0].mlp.down_proj, Int4Linear) and m.layers[0].mlp.down_proj.group_size == 32
    assert m.layers[0].mlp.gate_proj.group_size == 64
    rc = main(["quantize", "--model", str(tmp_path / "nope"), "--to", "int8", "--out", str(tmp_path / "x")])
    assert rc == 2


MISALIGNED_INT8 = """
import torch
from llamalab.quantization.quantize import Int8Linear
torch.manual_seed(0)
n, k = 64, 64
store = torch.randint(-127, 128, (n * k + 64,), dtype=torch.int8)
start = next(i for i in range(64) if (store.data_ptr() + i) % 64 == 56)
qweight = store[start:start + n * k].view(n, k)  # where memory-mapped safetensors put SmolLM2's
assert qweight.data_ptr() % 64 == 56
layer = Int8Linear(qweight, torch.rand(n) / 100)
xs = torch.randn(4 * k + 32, dtype=torch.bfloat16)
x = xs[4:4 + 4 * k].view(1, 4, k)  # a misaligned activation of 4 tokens
y = layer(x)  # without aligned copies: SIGSEGV
assert layer.qweight.data_ptr() % 64 == 0 and layer._scales_bf16.data_ptr() % 64 == 0
layer.use_kernel = False
torch.testing.assert_close(y.float(), layer(x).float(), atol=0.05, rtol=0.02)
layer.load_state_dict({"qweight": qweight, "scales": layer.scales}, assign=True)  # a misaligned one again
assert layer.qweight.data_ptr() % 64 == 0
layer.use_kernel = True
torch.testing.assert_close(layer(x), y)
print("ok")
"""


def test_int8_kernel_gets_64_byte_aligned_operands():
    """torch._weight_int8pack_mm segfaults on operands off a 64-byte boundary: copy them once at load."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", MISALIGNED_INT8], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", f"exit {r.returncode}: {r.stderr[-2000:]}"


def test_loaded_int8_buffers_are_aligned(tiny_model, tmp_path):
    save_quantized(quantize_model(copy.deepcopy(tiny_model), "int8"), tmp_path / "q")
    import llamalab

    loaded, _ = llamalab.load(tmp_path / "q")
    layers = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.qweight.data_ptr() % 64 == 0 and m._kernel_ready for m in layers)


@pytest.mark.parametrize("out_f,in_f", [(96, 128), (48, 64), (576, 192), (32, 1536)])
def test_int4_kernel_layout_reads_back_exact_codes(out_f, in_f):
    """The codes are read back from the kernel's packed weight by a learned permutation, exactly."""
    from llamalab.quantization.quantize import _int4pack_order, _unpack_nibbles

    codes = torch.randint(0, 16, (out_f, in_f), generator=torch.Generator().manual_seed(out_f), dtype=torch.uint8)
    scales = torch.rand(out_f, in_f // 32) + 0.5
    layer = Int4Linear(codes, scales, torch.zeros_like(scales), 32)
    assert layer.in_kernel_layout and "qweight" not in layer._buffers  # codes held once, in the kernel's layout
    order = _int4pack_order(out_f, in_f)
    assert order is not None and torch.equal(torch.sort(order).values, torch.arange(out_f * in_f))
    qweight, s, z = layer.portable()
    assert torch.equal(_unpack_nibbles(qweight), codes)
    torch.testing.assert_close(s.float(), scales.to(torch.bfloat16).float())
    again = Int4Linear.from_packed(qweight, s, z)
    x = torch.randn(3, in_f)
    torch.testing.assert_close(again(x), layer(x))
