"""Fine-tuning: JSONL checks, assistant-only loss masks, padding/packing masks, a tiny run learns."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab.data.sft import IGNORE, encode_example, pack_batch, pad_batch, read_jsonl
from llamalab.data.sft import SFTBatches as Batches
from llamalab.errors import DataError
from llamalab.training.finetune import FinetuneConfig, finetune, masked_loss


@pytest.fixture
def one_thread():
    """Tiny models train far faster on one thread (no thread sync on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _conv(q: str, a: str) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": q},
            {"role": "assistant", "content": a}]


def test_malformed_jsonl_lines_are_reported_with_line_numbers(tmp_path):
    good = json.dumps({"prompt": "a", "completion": "b"})
    cases = {
        "{not json": "not valid JSON",
        json.dumps({"text": "x"}): "expected 'messages' or 'prompt'",
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}): "role 'wizard'",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}): "no assistant message",
        json.dumps([1, 2]): "expected a JSON object",
    }
    for bad, msg in cases.items():
        f = tmp_path / "d.jsonl"
        f.write_text(f"{good}\n\n{good}\n{bad}\n{good}\n")
        with pytest.raises(DataError, match=rf"d\.jsonl:4: .*{msg}"):
            read_jsonl(f)
    f.write_text(f"{good}\n" + json.dumps({"messages": _conv("q", "a")}) + "\n")
    convs = read_jsonl(f)
    assert convs[0] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert len(convs[1]) == 3


def test_loss_mask_covers_only_assistant_tokens(tiny_tok):
    msgs = _conv("what is the capital of france", "paris") + [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]
    ex = encode_example(tiny_tok, msgs)
    assert tiny_tok.decode(ex.ids) == tiny_tok.apply_chat_template(msgs, add_generation_prompt=False)
    trained = [i for i, t in zip(ex.ids, ex.labels) if t != IGNORE]
    spans, cur = [], []
    for i, t in zip(ex.ids, ex.labels):  # contiguous trained spans
        if t != IGNORE:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tiny_tok.decode(s) for s in spans] == ["paris<|im_end|>\n", "hello world<|im_end|>\n"]
    assert all(t == i for i, t in zip(ex.ids, ex.labels) if t != IGNORE)
    assert len(trained) < len(ex.ids)


def test_padding_and_packing_give_each_example_its_own_loss(tiny_model, one_thread):
    from llamalab.data.sft import Example

    gen = torch.Generator().manual_seed(0)
    exs = []
    for n in (5, 9, 3):
        ids = torch.randint(0, tiny_model.config.vocab_size, (n,), generator=gen).tolist()
        exs.append(Example(ids, [IGNORE] * 2 + ids[2:]))
    with torch.no_grad():
        alone = [masked_loss(tiny_model, pad_batch([e], 0), reduction="sum") for e in exs]
        padded = masked_loss(tiny_model, pad_batch(exs, 0), reduction="sum")
        packed = masked_loss(tiny_model, pack_batch([exs], 20, 0), reduction="sum")
    torch.testing.assert_close(padded, sum(alone), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed, sum(alone), atol=1e-4, rtol=1e-5)
    ids, labels, pos, mask = pack_batch([exs], 20, 0)
    assert pos[0, :5].tolist() == list(range(5)) and pos[0, 5:14].tolist() == list(range(9))
    assert not mask[0, 0, 6, :5].any() and mask[0, 0, 6, 5:7].all()  # no attention across examples
    assert (labels[0, 17:] == IGNORE).all()  # padding is never trained


def test_batches_resume_exactly():
    from llamalab.data.sft import Example

    exs = [Example([i, i + 1, i + 2], [IGNORE, i + 1, i + 2]) for i in range(7)]
    a = Batches(exs, 3, 0, seed=5)
    for _ in range(4):
        next(a)
    b = Batches(exs, 3, 0, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(next(a), next(b)))
    packed = Batches(exs, 2, 0, packing=True, seq_len=8, seed=1)
    ids, labels, pos, mask = next(packed)
    assert ids.shape == (2, 8) and mask.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("method,packing", [("lora", False), ("full", True)])
def test_tiny_finetune_drives_loss_down(tiny_tok, tmp_path, method, packing, one_thread):
    from llamalab import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=64, intermediate_size=96, n_layers=2,
                         n_heads=4, n_kv_heads=2, max_position_embeddings=128, initializer_range=0.1)
    model = Llama(config)
    data = [{"messages": _conv("what is the capital of france", "paris")},
            {"prompt": "hello", "completion": "world"},
            {"messages": _conv("hello world", "hello")},
            {"prompt": "capital of france", "completion": "paris paris"}]
    cfg = FinetuneConfig(method=method, steps=25, lr=1e-2 if method == "lora" else 3e-3, batch_size=4, r=4,
                         alpha=8, dropout=0.0, target_modules="all-linear", val_fraction=0.0, packing=packing,
                         max_len=64, warmup_steps=2, precision="fp32")
    res = finetune(model, tiny_tok, data, tmp_path / "run", cfg, progress=False, base_path="smollm2")
    assert res.losses[-1] < 0.5 * res.losses[0]
    assert res.steps == 25
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["mfu"] > 0 for r in rows if "loss" in r)  # measured, not 0.0%
    if method == "lora":
        assert (res.final_dir / "adapter_model.safetensors").exists()
        assert res.trainable_parameters < res.total_parameters
        adapter = json.loads((res.final_dir / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == "smollm2"  # the bundled name, not <cwd>/smollm2
    else:
        assert (res.final_dir / "config.json").exists()
        assert res.trainable_parameters == res.total_parameters


def test_finetune_cli_errors_are_one_line(tmp_path, capsys):
    from llamalab.cli.main import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    rc = main(["finetune", "--model", "tiny", "--data", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl:2" in err and "Traceback" not in err


def test_finetune_outputs_never_write_through_planted_symlinks(tiny_tok, tmp_path, one_thread):
    """A run dir handed to `finetune` may hold links at `final`, `merged` and the summary: the outputs replace
    the links and nothing is written where they point."""
    from llamalab import Llama, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tiny_tok.vocab_size, hidden_size=32, intermediate_size=64, n_layers=1,
                         n_heads=2, n_kv_heads=1, max_position_embeddings=64)
    run, victim = tmp_path / "run", tmp_path / "victim"
    run.mkdir()
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    for name in ("final", "merged"):
        (run / name).symlink_to(victim)
    (run / "finetune_summary.json").symlink_to(victim / "keep.txt")
    cfg = FinetuneConfig(method="lora", steps=2, batch_size=2, r=2, val_fraction=0.0, max_len=32, precision="fp32",
                         merge=True)
    res = finetune(Llama(config), tiny_tok, [{"prompt": "hi", "completion": "there"}] * 4, run, cfg, progress=False)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"] and (victim / "keep.txt").read_text() == "mine"
    for name in ("final", "merged", "finetune_summary.json"):
        assert not (run / name).is_symlink()
    assert (res.final_dir / "adapter_model.safetensors").exists()
    assert json.loads((run / "finetune_summary.json").read_text())["steps"] == 2
