"""Parity with Hugging Face transformers' LlamaForCausalLM, both directions, float32 logits to 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llamalab import Llama, LlamaConfig  # noqa: E402

ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}
SHAPES = {  # n_heads, n_kv_heads, head_dim (None = hidden/heads)
    "mha": (4, 4, None),
    "gqa": (4, 2, None),
    "mqa-headdim": (4, 1, 24),
}
SEQ = 48  # longer than max_position_embeddings=32, so dynamic NTK and the scaled types are exercised


def _config(rope: str, shape: str, tied: bool) -> LlamaConfig:
    h, kv, hd = SHAPES[shape]
    return LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=112, n_layers=2, n_heads=h, n_kv_heads=kv,
                       head_dim=hd, max_position_embeddings=32, rope_theta=300.0, rope_scaling=ROPE[rope],
                       tie_word_embeddings=tied, rms_norm_eps=1e-6)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("rope", list(ROPE))
def test_ours_to_hf(tmp_path, rope, shape, tied):
    torch.manual_seed(0)
    model = Llama(_config(rope, shape, tied)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 101, (2, SEQ))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("rope", list(ROPE))
def test_hf_to_ours(tmp_path, rope, shape):
    torch.manual_seed(1)
    cfg = _config(rope, shape, tied=shape == "gqa")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                         if k not in ("architectures", "torch_dtype")})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF inits norms to 1; perturb them so the test sees their use
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)  # transformers >= 5 writes `rope_parameters`: the other config shape
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved or "rope_theta" in saved
    model = Llama.from_pretrained(tmp_path)
    ids = torch.randint(0, 101, (3, SEQ))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rope", ["default", "llama3", "yarn", "linear"])
def test_incremental_decoding_equals_full_forward(rope):
    torch.manual_seed(2)
    model = Llama(_config(rope, "gqa", False)).eval()
    ids = torch.randint(0, 101, (2, SEQ))
    with torch.no_grad():
        full = model(ids)
        for chunks in ([1] * SEQ, [7] * (SEQ // 7) + [SEQ % 7], [20, 1, 27]):
            cache = model.new_cache(2, 64)
            outs, t = [], 0
            for c in chunks:
                outs.append(model(ids[:, t:t + c], cache=cache))
                t += c
            assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-4, chunks


def test_dynamic_ntk_incremental_within_context():
    """Dynamic NTK changes the frequencies with the sequence length, so the cache is only exact while the
    sequence fits max_position_embeddings (HF behaves the same)."""
    torch.manual_seed(3)
    model = Llama(_config("dynamic", "gqa", False)).eval()
    ids = torch.randint(0, 101, (1, 32))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 64)
        inc = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(32)], 1)
    assert (inc - full).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_hf(tmp_path):
    torch.manual_seed(4)
    model = Llama(_config("llama3", "gqa", True)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(1, 101, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask).logits
    assert (ours[mask.bool()] - ref[mask.bool()]).abs().max().item() <= 1e-4


def test_sharded_bf16_save_loads_in_transformers(tmp_path):
    torch.manual_seed(5)
    model = Llama(_config("default", "gqa", False)).eval()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    back = Llama.from_pretrained(tmp_path)
    ids = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
        assert torch.equal(model(ids), back(ids))
    # bfloat16 / float16 loading
    for dtype in (torch.bfloat16, torch.float16):
        low = Llama.from_pretrained(tmp_path, dtype=dtype)
        assert low.dtype == dtype and low.lm_head.weight.dtype == dtype
    bf = Llama.from_pretrained(tmp_path, dtype="bfloat16")
    with torch.no_grad():
        assert (bf(ids) - model(ids)).abs().max().item() < 0.1


def test_tied_weights_written_once_and_retied(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(6)
    model = Llama(_config("default", "gqa", True))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    back = Llama.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.embed_tokens.weight
