"""Weights placed in transparent huge pages (llamalab.kernels.hugepages): same model, same numbers, saved and
loaded again, trained, quantized; and the pages really are huge where this kernel gives them."""

from __future__ import annotations

import ctypes
import mmap
import re

import pytest
import torch

import helpers
from llamalab.kernels import hugepages

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="this kernel offers no transparent huge pages")


def _tensors(model):
    return [*model.parameters(), *model.buffers()]


def _span(model) -> tuple[int, int]:
    """The lowest and highest byte address of the model's tensors."""
    ts = _tensors(model)
    return (min(t.data_ptr() for t in ts),
            max(t.data_ptr() + t.numel() * t.element_size() for t in ts))


def _anon_huge_kb(lo: int, hi: int) -> int:
    """AnonHugePages of the mappings of this process that overlap [lo, hi)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                inside = start < hi and lo < end
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


def _kernel_gives_huge_pages() -> bool:
    """A control: a private anonymous mapping advised and touched here gets a huge page (none where the machine
    has no free 2 MB of contiguous memory, a state of the machine, not of llamalab)."""
    region = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    region.write(b"\1" * len(region))
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    try:
        return _anon_huge_kb(base, base + len(region)) > 0
    finally:
        del base
        region.close()


@needs_thp
def test_placed_model_is_the_same_model(tiny_model, monkeypatch):
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    before = tiny_model(ids)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tied_before = tiny_model.lm_head.weight is tiny_model.embed_tokens.weight
    placed = hugepages.place_in_huge_pages(tiny_model)
    assert placed >= sum(v.numel() * v.element_size() for v in state.values()) // 2
    lo, hi = _span(tiny_model)
    assert hi - lo <= placed + 64 * len(state)  # all in one region, one after another
    assert all(t.data_ptr() % 64 == 0 for t in _tensors(tiny_model))
    after = tiny_model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert (tiny_model.lm_head.weight is tiny_model.embed_tokens.weight) == tied_before
    assert torch.equal(tiny_model(ids), before)
    # placing again moves it all into one new region (what quantize_model relies on), values unchanged
    assert hugepages.place_in_huge_pages(tiny_model) == placed
    lo2, hi2 = _span(tiny_model)
    assert hi2 - lo2 == hi - lo and (lo2, hi2) != (lo, hi)
    assert torch.equal(tiny_model(ids), before)


def test_switched_off_places_nothing(tiny_model, monkeypatch):
    monkeypatch.setenv("LLAMALAB_HUGEPAGES", "0")
    ptrs = [t.data_ptr() for t in _tensors(tiny_model)]
    assert hugepages.place_in_huge_pages(tiny_model) == 0
    assert [t.data_ptr() for t in _tensors(tiny_model)] == ptrs


@needs_thp
def test_tied_weights_stay_tied(tiny_tok):
    model = helpers.tiny_llama(tiny_tok, tie_word_embeddings=True)
    assert model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()
    hugepages.place_in_huge_pages(model)
    assert model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()
    with torch.no_grad():
        model.embed_tokens.weight[0, 0] = 7.0
    assert model.lm_head.weight[0, 0].item() == 7.0


@needs_thp
def test_loaded_model_saves_loads_and_trains(tmp_path, tiny_tok):
    """The path users take: load (placed), save, load again in a fresh process; a training step still learns."""
    import llamalab

    src = helpers.save_chat_model(tmp_path / "src", tiny_tok)
    model, _ = llamalab.load(src)
    lo, hi = _span(model)
    assert hi - lo < 2 * sum(t.numel() * t.element_size() for t in _tensors(model)) + (2 << 20)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = model(ids)
    model.save_pretrained(tmp_path / "again")  # safetensors refuses tensors that share a storage
    tiny_tok.save(tmp_path / "again")
    out = helpers.llamalab_cli("generate", str(tmp_path / "again"), "--prompt", "hello", "--max-new-tokens", "4",
                               "--temperature", "0")
    assert out.returncode == 0, out.stderr
    again, _ = llamalab.load(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(ids), ref)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w0 = model.embed_tokens.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert not torch.equal(model.embed_tokens.weight.detach(), w0)


@needs_thp
def test_quantizing_a_placed_model_leaves_no_old_region(tiny_tok):
    """quantize_model places the quantized model anew, all of it: nothing keeps the float model's region alive."""
    from llamalab.quantization.quantize import quantize_model

    model = helpers.tiny_llama(tiny_tok, hidden_size=64, intermediate_size=128)
    hugepages.place_in_huge_pages(model)
    quantize_model(model, "int8")
    lo, hi = _span(model)
    assert hi - lo <= sum(-(-t.numel() * t.element_size() // 64) * 64 for t in _tensors(model))


@needs_thp
def test_smollm2_weights_are_in_huge_pages(smollm2):
    """The bundled model as loaded lies in 2 MB pages (where the kernel has any to give)."""
    if not _kernel_gives_huge_pages():
        pytest.skip("the kernel gave even a plain advised mapping no huge page (memory fragmented)")
    model, _ = smollm2
    lo, hi = _span(model)
    assert _anon_huge_kb(lo, hi) * 1024 >= (hi - lo) // 2
