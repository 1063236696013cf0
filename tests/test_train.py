"""Training from scratch: config errors, schedule, optimizer groups, checkpoints, exact resume after SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_run_cfg as tiny_cfg
from helpers import write_corpus
from llamalab import training as train
from llamalab.data import corpora as data
from llamalab.errors import ConfigError


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A small real corpus: the opening of 12 plays, one file each."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs=12, chars=12000)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("override, message", [
    ({"train.bogus": 1}, "unknown config key 'train.bogus'"),
    ({"model.n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"model.hidden_size": 30}, "not divisible by n_heads"),
    ({"train.seq_len": 128}, "max_position_embeddings"),
    ({"data.corpus": "/nonexistent/corpus"}, "corpus not found"),
    ({"train.batch_size": 5, "train.grad_accum": 2}, "divisible"),
    ({"train.lr": "fast"}, "must be a number"),
])
def test_bad_config_is_one_line_error_before_work(tmp_path, corpus_dir, override, message, capsys):
    cfg = tiny_cfg(corpus_dir, tmp_path)
    with pytest.raises(ConfigError, match=message):
        train.train(cfg, override)
    assert not (tmp_path / "t").exists() and not (tmp_path / "cache").exists()
    from llamalab.cli.main import main

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(train.to_toml(cfg))
    args = [f"--set={k}={v!r}" if isinstance(v, str) else f"--set={k}={v}" for k, v in override.items()]
    assert main(["train", str(cfg_path), *[a.replace("'", '"') for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llamalab train: error:")


def test_overrides_and_toml_roundtrip(tmp_path):
    cfg = train.load_config(None, ["train.lr=1e-3", "model.n_layers=3", 'data.corpus="tang"'], steps=7)
    assert cfg["train"]["lr"] == 1e-3 and cfg["model"]["n_layers"] == 3 and cfg["train"]["steps"] == 7
    assert cfg["data"]["corpus"] == "tang"
    p = tmp_path / "x.toml"
    p.write_text(train.to_toml(cfg))
    assert cfg["name"] == "run" and train.load_config(p) == cfg  # the file names its run: the stem is not used
    with pytest.raises(ConfigError, match="ambiguous|unknown"):
        train.load_config(None, every=3)


def test_warmup_cosine_schedule():
    c = train.LoopConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [c.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert c.lr_at(100) == pytest.approx(0.1) and c.lr_at(55) == pytest.approx(0.55)


def test_weight_decay_only_on_matrices(tiny_model):
    opt = train.make_optimizer(None, tiny_model, train.LoopConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == tiny_model.num_parameters()


def test_grad_accumulation_matches_full_batch(tmp_path, tiny_config):
    from llamalab import Llama

    split = data.Split("train", [torch.randint(0, 97, (4000,)).numpy().astype("uint16")], 4000, 4000, 4000, 1)
    losses = []
    weights = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = Llama(tiny_config)
        cfg = train.LoopConfig(steps=3, lr=1e-2, warmup_steps=1, grad_accum=accum, precision="fp32", log_every=1)
        batches = data.Batches(split, 8 // accum, 16, seed=0)
        res = train.train_loop(model, batches, cfg)
        losses.append(res.losses)
        weights.append(model.state_dict())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=1e-5, rtol=1e-4)


def _train_proc(config: Path, resume: bool, env: dict | None = None) -> subprocess.CompletedProcess:
    """`train()` in a fresh process (lighter than the full CLI, which imports every command)."""
    code = f"from llamalab.training import train; train({str(config)!r}, resume={resume}, progress=False)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_sigkill_then_resume_gives_identical_weights(tmp_path, corpus_dir, cache_dir):
    cfg = tiny_cfg(corpus_dir, tmp_path, cache_dir, steps=8)
    ref = train.train(cfg, progress=False, name="ref")
    p = tmp_path / "cfg.toml"
    p.write_text(train.to_toml(dict(cfg, name="killed")))
    killed = _train_proc(p, False, {"LLAMALAB_DEBUG_KILL_AT_STEP": "5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "killed"
    assert [s for s, _ in train.checkpoint_steps(run)] == [2, 4]
    assert not (run / "final").exists()
    # a partial checkpoint left by a crash is never picked
    (run / "checkpoints" / ".tmp_step_6").mkdir()
    resumed = _train_proc(p, True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [__import__("json").loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    assert (run / "loss.png").stat().st_size > 0 and (run / "samples.txt").read_text().strip()


def test_corrupt_checkpoint_falls_back_to_last_good_one(tmp_path, corpus_dir, cache_dir, capsys):
    run = train.train(tiny_cfg(corpus_dir, tmp_path, cache_dir, steps=4), progress=False)  # step_2, step_4
    ckpt = run / "checkpoints" / "step_4"
    shard = ckpt / "state" / "optim.safetensors"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[-1] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(flipped))
    assert train.verify_checkpoint(ckpt) == "state/optim.safetensors is corrupt (checksum mismatch)"
    shard.write_bytes(original[: len(original) // 2])
    assert train.verify_checkpoint(ckpt) == \
        f"state/optim.safetensors has {len(original) // 2} bytes, expected {len(original)}"
    assert train.latest_valid_checkpoint(run, print) == run / "checkpoints" / "step_2"
    assert "unusable" in capsys.readouterr().out


def test_run_dir_loads_with_llamalab_and_transformers_and_exports(tmp_path, corpus_dir, cache_dir):
    from safetensors.torch import load_file

    import llamalab
    from llamalab.training.distributed import export_distributed_checkpoint

    run = train.train(tiny_cfg(corpus_dir, tmp_path, cache_dir, steps=2), progress=False)
    model, tok = llamalab.load(run)
    assert tok is not None and model.config.vocab_size == tok.vocab_size == 300
    ids = torch.tensor([tok.encode("To be, or not to be")])
    ours = model(ids)
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(run / "final").eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # an existing run is never silently overwritten
    with pytest.raises(llamalab.LlamalabError, match="--resume"):
        train.train(tiny_cfg(corpus_dir, tmp_path, cache_dir, steps=2), progress=False)
    # the distributed (DCP) checkpoint exports to the same HF weights
    out = export_distributed_checkpoint(run / "checkpoints" / "step_2", tmp_path / "hf")
    a = final_weights(run)
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tokenizer.json").exists()
