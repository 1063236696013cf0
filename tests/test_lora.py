"""LoRA: parameter counts, zero-init identity, merge equivalence, PEFT layout and interop, loading."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llamalab import LlamaConfig
from llamalab.errors import ConfigError, WeightsError
from llamalab.lora import (
    ALL_LINEAR,
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    trainable_parameters,
)


def _expected_lora_params(config: LlamaConfig, r: int, targets: tuple[str, ...]) -> int:
    h, q, kv, i = config.hidden_size, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, \
        config.intermediate_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
              "up_proj": (h, i), "down_proj": (i, h)}
    return config.n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def _randomize_b(model) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("r,targets", [(4, ("q_proj", "v_proj")), (2, ALL_LINEAR)])
def test_rank_r_adds_exact_parameters_and_zero_b_is_identity(tiny_model, r, targets):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    ref = tiny_model(ids)
    before = sum(p.numel() for p in tiny_model.parameters())
    apply_lora(tiny_model, LoraConfig(r=r, alpha=2 * r, target_modules=targets))
    expected = _expected_lora_params(tiny_model.config, r, targets)
    assert trainable_parameters(tiny_model) == expected
    assert sum(p.numel() for p in tiny_model.parameters()) == before + expected
    assert all(not p.requires_grad for n, p in tiny_model.named_parameters() if "lora_" not in n)
    assert torch.equal(tiny_model(ids), ref)  # B = 0 at step 0: exactly the base model


def test_merged_equals_base_plus_adapter(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    base_w = tiny_model.layers[1].mlp.down_proj.weight.detach().clone()
    apply_lora(tiny_model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomize_b(tiny_model)
    lora_out = tiny_model(ids)
    m = tiny_model.layers[1].mlp.down_proj
    assert isinstance(m, LoRALinear)
    expected_w = base_w + (m.lora_B.weight @ m.lora_A.weight) * (8 / 4)
    merge_lora(tiny_model)
    assert type(tiny_model.layers[1].mlp.down_proj) is torch.nn.Linear
    torch.testing.assert_close(tiny_model.layers[1].mlp.down_proj.weight, expected_w)
    torch.testing.assert_close(tiny_model(ids), lora_out, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(mod, LoRALinear) for mod in tiny_model.modules())


def test_gradients_reach_only_adapters(tiny_model):
    apply_lora(tiny_model, LoraConfig(r=2, target_modules=("q_proj", "down_proj")))
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 8))
    tiny_model.train()
    tiny_model(ids).logsumexp(-1).mean().backward()
    for name, p in tiny_model.named_parameters():
        if "lora_A" in name:  # B = 0, so A's gradient is zero at step 0; B's is not
            continue
        if "lora_B" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_peft_layout_and_reload(tiny_model, tmp_path):
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 7))
    base = copy.deepcopy(tiny_model)
    apply_lora(tiny_model, LoraConfig(r=4, alpha=16, target_modules=("q_proj", "v_proj")))
    _randomize_b(tiny_model)
    out = tiny_model(ids)
    save_adapter(tiny_model, tmp_path / "ad", base_model_name_or_path="base")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * tiny_model.config.n_layers
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    torch.testing.assert_close(reloaded(ids), out)
    merged = load_adapter(copy.deepcopy(base), tmp_path / "ad", merge=True)
    torch.testing.assert_close(merged(ids), out, atol=1e-5, rtol=1e-5)


def test_llamalab_load_with_adapter(tiny_model, tmp_path):
    import llamalab

    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 6))
    tiny_model.save_pretrained(tmp_path / "base")
    apply_lora(tiny_model, LoraConfig(r=2, target_modules=("o_proj",)))
    _randomize_b(tiny_model)
    out = tiny_model(ids)
    save_adapter(tiny_model, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    m1, _ = llamalab.load(tmp_path / "base", adapter=tmp_path / "ad")
    m2, _ = llamalab.load(tmp_path / "ad")  # the adapter dir names its base
    for m in (m1, m2):
        torch.testing.assert_close(m(ids), out, atol=1e-5, rtol=1e-5)


def test_adapter_errors(tiny_model, tmp_path):
    with pytest.raises(ConfigError):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="unknown LoRA target"):
        LoraConfig(target_modules=("qkv",))
    with pytest.raises(WeightsError, match="adapter_config.json"):
        load_adapter(tiny_model, tmp_path)
    other = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2)
    from llamalab import Llama

    small = Llama(other)
    apply_lora(small, LoraConfig(r=2))
    save_adapter(small, tmp_path / "ad")
    with pytest.raises(WeightsError, match="shape"):
        load_adapter(tiny_model, tmp_path / "ad")


def test_lora_on_int8_base_trains_and_merges(tiny_model):
    from llamalab.quantization.blocks import BlockQuantLinear
    from llamalab.quantization.quantize import quantize_model

    quantize_model(tiny_model, "int8")  # Q8_0 blocks
    apply_lora(tiny_model, LoraConfig(r=2, target_modules=("q_proj", "gate_proj")))
    base = tiny_model.layers[0].self_attn.q_proj.base
    assert isinstance(base, BlockQuantLinear) and base.kind == "q8_0"
    _randomize_b(tiny_model)
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 6))
    tiny_model.train()
    tiny_model(ids).logsumexp(-1).mean().backward()  # gradient flows through the int8 base
    assert tiny_model.layers[0].self_attn.q_proj.lora_B.weight.grad is not None
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model(ids)
        merge_lora(tiny_model)
        assert type(tiny_model.layers[0].self_attn.q_proj) is torch.nn.Linear
        # merged layers compute in float32 while int8 layers use bf16 activations: close, not equal
        torch.testing.assert_close(tiny_model(ids), out, atol=0.05, rtol=0.05)


def test_peft_loads_our_adapter_on_transformers(tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 8))
    tiny_model.save_pretrained(tmp_path / "base")
    apply_lora(tiny_model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomize_b(tiny_model)
    ours = tiny_model(ids)
    save_adapter(tiny_model, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = pm(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # and an adapter PEFT writes loads into ours
    pm.save_pretrained(tmp_path / "peft_saved")
    from llamalab import Llama

    again = load_adapter(Llama.from_pretrained(tmp_path / "base"), tmp_path / "peft_saved")
    torch.testing.assert_close(again(ids), ours, atol=1e-5, rtol=1e-5)


def test_adapter_records_a_bundled_base_by_name_and_a_path_absolute(tmp_path, monkeypatch):
    from llamalab.lora import adapter_base, base_model_reference

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    assert base_model_reference("smollm2") == "smollm2"  # not <cwd>/smollm2
    assert base_model_reference("base") == str(tmp_path / "base")  # works from any directory
    for recorded, resolved in (("smollm2", "smollm2"), ("/gone/elsewhere/smollm2", "smollm2"),
                               (str(tmp_path / "base"), str(tmp_path / "base"))):
        (tmp_path / "ad").mkdir(exist_ok=True)
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": recorded}))
        assert str(adapter_base(tmp_path / "ad")) == resolved


def test_adapter_of_bundled_smollm2_runs_from_the_cli(smollm2_path, tmp_path):
    """`llamalab generate|info -m ADAPTER` for an adapter whose base is the bundled name `smollm2`."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    from llamalab import Llama
    from llamalab.formats.gguf_config import config_from_metadata
    from llamalab.formats.gguf_reader import read_gguf
    from llamalab.lora import _peft_key, lora_modules

    g = read_gguf(smollm2_path)
    meta = apply_lora(Llama.on_meta(config_from_metadata(g.metadata, g.tensors)), LoraConfig(r=2))
    tensors = {}
    for name, m in lora_modules(meta).items():  # B = 0: the adapted model answers as its base
        tensors[_peft_key(name, "lora_A")] = torch.full((2, m.in_features), 0.01)
        tensors[_peft_key(name, "lora_B")] = torch.zeros(m.out_features, 2)
    (tmp_path / "ad").mkdir()
    save_file(tensors, tmp_path / "ad" / "adapter_model.safetensors")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(LoraConfig(r=2).to_peft("smollm2")))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "llamalab", *args], capture_output=True, text=True, timeout=300,
                           env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    greedy = ("-p", "The capital of France is", "--max-new-tokens", "4", "--temperature", "0")
    assert run("generate", "-m", "ad", *greedy) == run("generate", "-m", "smollm2", *greedy)
    assert json.loads(run("info", "ad", "--json"))["n_layers"] == meta.config.n_layers


def test_merge_keeps_the_quantization_record_of_remaining_gguf_blocks(tiny_model):
    """Merging an adapter into some layers leaves the others' GGUF blocks, so the model stays recorded as
    quantized (save_pretrained must write the blocks, llamalab.load read them back)."""
    from llamalab.quantization.blocks import BlockQuantLinear
    from llamalab.quantization.quantize import replace_linear

    mlp = tiny_model.layers[0].mlp
    replace_linear(tiny_model, "layers.0.mlp.gate_proj", BlockQuantLinear.from_float(mlp.gate_proj, "q8_0"))
    tiny_model.config.quantization = {"method": "gguf", "kinds": ["q8_0"], "group_size": 32, "lm_head": False,
                                      "format": 1}
    apply_lora(tiny_model, LoraConfig(r=2, target_modules=("q_proj",)))
    merge_lora(tiny_model)
    assert isinstance(tiny_model.layers[0].mlp.gate_proj, BlockQuantLinear)
    assert tiny_model.config.quantization["method"] == "gguf"
