"""LlamaConfig reads both config.json shapes; bad configs and bad files give one-line errors naming the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llamalab import ConfigError, Llama, LlamaConfig, WeightsError, load

HUB_LLAMA31 = {  # the shape of meta-llama/Llama-3.1-8B's config.json (transformers 4.x era)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def test_reads_hub_shape_and_matches_preset():
    cfg = LlamaConfig.from_hf_dict(HUB_LLAMA31)
    assert cfg == LlamaConfig.from_preset("llama3.1-8b")
    assert cfg.stop_token_ids == [128001, 128008, 128009]
    assert cfg.n_rep == 4 and cfg.head_dim == 128


def test_reads_transformers5_rope_parameters_shape():
    d = {k: v for k, v in HUB_LLAMA31.items() if k not in ("rope_theta", "rope_scaling")}
    d["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert LlamaConfig.from_hf_dict(d) == LlamaConfig.from_hf_dict(HUB_LLAMA31)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = LlamaConfig.from_hf_dict(d)
    assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0


def test_old_type_key_and_round_trip(tmp_path):
    d = dict(HUB_LLAMA31, rope_scaling={"type": "linear", "factor": 4.0})
    cfg = LlamaConfig.from_hf_dict(d)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    cfg.save(tmp_path)
    assert LlamaConfig.from_json(tmp_path) == cfg


@pytest.mark.parametrize("change,message", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "unknown rope_type 'longrope'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -1}}, "factor must be a positive number"),
    ({"num_key_value_heads": 5}, "multiple of n_kv_heads"),
    ({"hidden_size": "big"}, "hidden_size"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message) as info:
        LlamaConfig.from_hf_dict(dict(HUB_LLAMA31, **change))
    assert "\n" not in str(info.value)


def test_missing_key_named():
    d = dict(HUB_LLAMA31)
    del d["num_hidden_layers"]
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        LlamaConfig.from_hf_dict(d)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig.from_preset("tiny", vocab_size=64)
    Llama(cfg).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(WeightsError, match="has no config.json"):
        Llama.from_pretrained(saved)


def test_missing_tensor_named(saved):
    from safetensors.torch import load_file, save_file

    sd = load_file(saved / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        Llama.from_pretrained(saved)


def test_misshaped_tensor_names_both_shapes(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"mlp\.gate_proj\.weight has shape \(176, 64\), config expects \(200, 64\)"):
        Llama.from_pretrained(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated safetensors"):
        Llama.from_pretrained(saved)


def test_garbage_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        Llama.from_pretrained(saved)


def test_unsupported_architecture_file(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        Llama.from_pretrained(saved)


def test_unknown_path_and_preset():
    with pytest.raises(WeightsError, match="no such model"):
        load("/nonexistent/model")


def test_legacy_bin_is_loaded_without_unpickling(tmp_path, saved):
    """pytorch_model.bin is read with torch.load(weights_only=True): plain tensors load, pickled code does not."""
    from safetensors.torch import load_file

    sd = load_file(saved / "model.safetensors")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((saved / "config.json").read_text())
    torch.save(sd, legacy / "pytorch_model.bin")
    model = Llama.from_pretrained(legacy)
    assert model.num_parameters() > 0

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, legacy / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="cannot read"):
        Llama.from_pretrained(legacy)


def test_cli_bad_path_is_one_line():
    r = subprocess.run([sys.executable, "-m", "llamalab", "info", "/no/such/dir"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "error: no such model" in r.stderr
    assert "Traceback" not in r.stderr


def test_bundled_smollm2_name_resolves_to_the_package_file():
    from llamalab.bundled import BUNDLED, smollm2_path

    path = BUNDLED["smollm2"]()
    assert path == smollm2_path() and path.suffix == ".gguf" and path.stat().st_size > 50_000_000
