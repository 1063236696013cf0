"""Weights in transparent huge pages (llamalab.kernels.hugepages): same values, same model, 2 MB pages."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from llamalab.kernels import hugepages

needs_thp = pytest.mark.skipif(not hugepages.huge_pages_available(), reason="no transparent huge pages here")


def _mapping_of(ptr: int) -> dict[str, str]:
    """The /proc/self/smaps entry of the mapping holding address ``ptr``."""
    entry: dict[str, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                if entry is not None:
                    return entry
                if lo <= ptr < hi:
                    entry = {"range": head}
            elif entry is not None and ":" in head:
                entry[head.rstrip(":")] = line.split(":", 1)[1].strip()
    if entry is None:
        raise AssertionError(f"no mapping holds {ptr:#x}")
    return entry


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@needs_thp
def test_weights_move_bit_for_bit_into_huge_pages_and_the_model_is_the_same(tiny_config):
    from llamalab import Llama

    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config, tie_word_embeddings=True, vocab_size=600, hidden_size=128,
                                 intermediate_size=256)
    model = Llama(config).eval()
    x = torch.randint(0, 600, (2, 9))
    with torch.no_grad():
        before = model(x)
    state = _weights(model)
    embed = model.embed_tokens.weight
    old_ptr = embed.data_ptr()
    moved = hugepages.use_huge_pages(model, min_bytes=1 << 12)
    assert moved >= state["embed_tokens.weight"].numel() * 4
    assert model.embed_tokens.weight is embed  # the same Parameter object, new storage
    assert embed.data_ptr() != old_ptr
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()  # still tied
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), before)
    m = _mapping_of(embed.data_ptr())
    assert int(m["AnonHugePages"].split()[0]) >= 2048, m  # one whole 2 MB page at least
    assert "hg" in m.get("VmFlags", "")  # advised MADV_HUGEPAGE
    # each weight has a storage of its own, 64-byte aligned
    w = model.layers[0].self_attn.q_proj.weight
    assert w.untyped_storage().nbytes() == w.numel() * 4
    assert w.data_ptr() % 64 == 0
    # training still works on the moved parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = model(x)[..., 0].float().pow(2).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(model.embed_tokens.weight, state["embed_tokens.weight"])


@needs_thp
def test_save_and_load_of_a_model_in_huge_pages(tmp_path, monkeypatch):
    import llamalab
    from llamalab import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, n_layers=2, n_heads=4,
                         n_kv_heads=2, max_position_embeddings=64)
    Llama(config).save_pretrained(tmp_path / "m")
    loaded, _ = llamalab.load(tmp_path / "m")
    assert getattr(loaded, "_llamalab_huge_pages", False)
    w = loaded.layers[1].mlp.down_proj.weight  # 256 x 512 float32: 512 KB, moved
    assert int(_mapping_of(w.data_ptr())["AnonHugePages"].split()[0]) > 0
    monkeypatch.setenv("LLAMALAB_HUGEPAGES", "0")
    plain, _ = llamalab.load(tmp_path / "m")  # the same load, its weights left where they were read
    monkeypatch.undo()
    assert not getattr(plain, "_llamalab_huge_pages", False)
    x = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))
    loaded.save_pretrained(tmp_path / "again")
    again, _ = llamalab.load(tmp_path / "again")
    for (k, v), (k2, v2) in zip(loaded.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@needs_thp
def test_quantize_repacks_and_gives_the_old_pages_back():
    from llamalab import Llama, LlamaConfig
    from llamalab.quantization.quantize import quantize_model

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, n_layers=2, n_heads=4,
                         n_kv_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Llama(config).eval()
    assert hugepages.use_huge_pages(model) > 0
    old = _mapping_of(model.layers[0].mlp.gate_proj.weight.data_ptr())["range"]
    quantize_model(model, "int8")
    q = model.layers[0].mlp.gate_proj
    tensors = [t for t in q.state_dict().values() if t.numel() * t.element_size() >= hugepages.MIN_BYTES]
    assert tensors, "the quantized layer holds a tensor big enough to move"
    assert int(_mapping_of(tensors[0].data_ptr())["AnonHugePages"].split()[0]) > 0
    with open("/proc/self/maps") as f:
        ranges = {line.split()[0] for line in f}
    assert old not in ranges  # the float32 mapping is unmapped once nothing lives in it


def test_off_switch_and_no_thp_leave_the_weights_where_they_are(monkeypatch, tiny_model):
    ptr = tiny_model.embed_tokens.weight.data_ptr()
    monkeypatch.setenv("LLAMALAB_HUGEPAGES", "0")
    assert not hugepages.huge_pages_available()
    assert hugepages.use_huge_pages(tiny_model, min_bytes=1) == 0
    monkeypatch.setenv("LLAMALAB_HUGEPAGES", "1")
    monkeypatch.setattr(hugepages, "_THP_SETTING", hugepages.Path("/nonexistent/thp"))
    assert hugepages.use_huge_pages(tiny_model, min_bytes=1) == 0
    assert tiny_model.embed_tokens.weight.data_ptr() == ptr
    assert not getattr(tiny_model, "_llamalab_huge_pages", False)


@needs_thp
def test_the_bundled_model_loads_into_huge_pages_in_a_fresh_process(smollm2_path):
    code = ("import llamalab, sys\n"
            "m, t = llamalab.load(sys.argv[1])\n"
            "w = m.layers[0].mlp.down_proj\n"
            "ptrs = [v.data_ptr() for v in w.state_dict().values()]\n"
            "print(m._llamalab_huge_pages, sum(1 for p in ptrs))\n"
            "import re; s = open('/proc/self/smaps_rollup').read()\n"
            "print(int(re.search(r'AnonHugePages:\\s+(\\d+)', s).group(1)))\n")
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    flag, huge_kb = out.stdout.split("\n")[0], int(out.stdout.split("\n")[1])
    assert flag.startswith("True")
    assert huge_kb >= 64 * 1024  # most of the ~100 MB of weights
