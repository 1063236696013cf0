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


# ---------------------------------------------------------------------------------------------- GGUF end to end
# a Q4_K_M-like mix: Q4_K for q / k / gate / up, Q6_K for v / down and the (tied) token_embd, Q8_0 for o
MIX = {"attn_q": "q4_k", "attn_k": "q4_k", "attn_v": "q6_k", "attn_output": "q8_0", "ffn_gate": "q4_k",
       "ffn_up": "q4_k", "ffn_down": "q6_k"}
# fp16 d (and dmin) giving weights of ~0.03 (Q4_K: d·sc·q, sc and q up to 63 / 15; Q6_K: d·sc·(q − 32))
SCALE = {"q4_k": 6e-5, "q6_k": 6e-5}


def _kq_gguf(path, tok, gen: torch.Generator, monkeypatch):
    """A tiny llama GGUF (hidden 256, 2 layers, tied head) written by save_gguf's GGUFWriter, its matrices
    replaced by random but valid Q4_K / Q6_K super-blocks (and a real Q8_0 quantization for attn_output)."""
    import gguf
    from gguf import quants

    from helpers import tiny_llama
    from llamalab.formats.gguf import save_gguf

    model = tiny_llama(tok, hidden_size=256, intermediate_size=512, n_layers=2, n_heads=4, n_kv_heads=2,
                       tie_word_embeddings=True)
    add_tensor = gguf.GGUFWriter.add_tensor

    def swapped(self, name, tensor, *args, raw_dtype=None, **kwargs):
        part = "token_embd" if name == "token_embd.weight" else name.split(".")[-2]
        kind = "q6_k" if part == "token_embd" else MIX.get(part)
        if kind == "q8_0":
            return add_tensor(self, name, quants.quantize(tensor, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        if kind is not None:
            kq = random_kq(kind, tensor.shape[0], tensor.shape[1], gen)
            blk = kq.view(tensor.shape[0], -1, kqops.SB_BYTES[kind])
            d = torch.full(blk.shape[:2], SCALE[kind]).half().view(torch.uint8).view(*blk.shape[:2], 2)
            if kind == "q4_k":
                blk[..., 0:2], blk[..., 2:4] = d, d
            else:
                blk[..., 192:208] = torch.randint(-24, 25, (*blk.shape[:2], 16), generator=gen).to(torch.int8).view(
                    torch.uint8)
                blk[..., 208:210] = d
            return add_tensor(self, name, kq.numpy(), raw_dtype=GGML[kind])
        return add_tensor(self, name, tensor, *args, raw_dtype=raw_dtype, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "add_tensor", swapped)
        return save_gguf(model, tok, path, "f32")


def _int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x with each 32-block rounded to int8 steps as the kernels do (``dx = max|x| / 127``, ``round(x · (1/dx))``)."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    dx = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(dx != 0, 1.0 / dx, torch.zeros(()))
    return ((xb * inv).round().clamp(-127, 127) * dx).reshape(x.shape).to(x.dtype)


def test_gguf_q4_k_q6_k_kept_saved_reloaded_and_generated(native, tiny_tok, tmp_path, monkeypatch, capsys):
    """Q4_K / Q6_K matrices load as KQuantLinear (Q8_0 beside them as BlockQuantLinear), give the logits of the
    dequantized float32 load up to the int8 rounding of the activations, survive save_quantized + load bit for
    bit, and the CLI generates from the file."""
    import subprocess
    import sys

    import llamalab
    from llamalab.cli.info import quantized_layers
    from llamalab.cli.main import main
    from llamalab.quantization.blocks import BlockQuantLinear
    from llamalab.quantization.kquants import KQuantLinear
    from llamalab.quantization.quantize import dequantize_model, model_bytes, save_quantized

    path = _kq_gguf(tmp_path / "m.gguf", tiny_tok, torch.Generator().manual_seed(5), monkeypatch)
    kept, tok = llamalab.load(path)
    deq, _ = llamalab.load(path, dtype="float32")
    attn, mlp = kept.layers[1].self_attn, kept.layers[1].mlp
    for layer, kind in ((attn.q_proj, "q4_k"), (attn.k_proj, "q4_k"), (attn.v_proj, "q6_k"),
                        (mlp.gate_proj, "q4_k"), (mlp.up_proj, "q4_k"), (mlp.down_proj, "q6_k"),
                        (kept.lm_head, "q6_k")):
        assert isinstance(layer, KQuantLinear) and layer.kind == kind
    assert isinstance(attn.o_proj, BlockQuantLinear) and attn.o_proj.kind == "q8_0"
    assert kept.config.quantization["kinds"] == ["q4_k", "q6_k", "q8_0"]
    assert quantized_layers(kept) == {"q4_k": 8, "q6_k": 5, "q8_0": 2}
    assert kept.logical_parameters() == deq.logical_parameters()
    assert model_bytes(kept) < model_bytes(deq) / 3
    # the same weights, q/k rows permuted alike: the kept layers' weights are the float load's, exactly
    for name in ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.1.mlp.down_proj", "lm_head"):
        assert torch.equal(kept.get_submodule(name).dequantize(), deq.get_submodule(name).weight), name
    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        want, got = deq(ids), kept(ids)
    # the kept layers multiply int8-rounded activations (per 32 inputs, ~1/254 of a block's largest value):
    # measured max |Δ| 1.5e-2 against the float32 load here, on logits of std 0.26 / range 2.3 ...
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2)
    # ... and that rounding is all of it: the float32 load with the same rounding before each of those layers
    # gives the kept logits to float32 accumulation order (measured 4e-7)
    for name, m in kept.named_modules():
        if isinstance(m, (KQuantLinear, BlockQuantLinear)):
            deq.get_submodule(name).register_forward_pre_hook(lambda _m, args: (_int8_rounded(args[0]),))
    with torch.no_grad():
        torch.testing.assert_close(got, deq(ids), rtol=0, atol=1e-5)
    save_quantized(kept, tmp_path / "q")
    tok.save(tmp_path / "q")
    back, _ = llamalab.load(tmp_path / "q")
    assert isinstance(back.layers[1].mlp.down_proj, KQuantLinear) and isinstance(back.lm_head, KQuantLinear)
    assert torch.equal(back.lm_head.kq, kept.lm_head.kq)
    kept.save_pretrained(tmp_path / "p")
    again, _ = llamalab.load(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(back(ids), got) and torch.equal(again(ids), got)
    with torch.no_grad():
        torch.testing.assert_close(dequantize_model(back)(ids), want, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file, save_file  # a row of super-blocks cut short: a one-line error

    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.kq"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(WeightsError, match=r"k-quant layers\.0\.mlp\.up_proj\.kq is torch\.uint8 \(512, 143\)"):
        llamalab.load(tmp_path / "q")
    r = subprocess.run([sys.executable, "-m", "llamalab", "generate", str(path), "--prompt", "the quick", "-n", "4",
                        "--stats"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gguf linears (Q4_K x8, Q6_K x5, Q8_0 x2)" in out, out
