"""torchrun on CPU with gloo, 2 processes: DDP and FSDP2 match one process; checkpoints resume across process
counts; a dead rank ends the job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamalab import training as train
from llamalab.data import corpora as data


def _cfg(corpus: Path, out: Path, cache: Path) -> dict:
    return {"name": "ref", "out_dir": str(out), "seed": 0,
            "data": {"corpus": str(corpus), "vocab_size": 300, "cache_dir": str(cache), "val_fraction": 0.1},
            "model": {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "n_layers": 2, "n_heads": 4,
                      "n_kv_heads": 2, "max_position_embeddings": 64},
            "train": {"steps": 4, "batch_size": 4, "seq_len": 32, "grad_accum": 2, "warmup_steps": 2,
                      "precision": "fp32"},
            "eval": {"every": 0, "tokens": 512, "batch_size": 8}, "checkpoint": {"every": 2, "keep": 5},
            "log": {"every": 1}, "sample": {"max_new_tokens": 4, "count": 1},
            "distributed": {"timeout_s": 30}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus"
    corpus.mkdir()
    for doc in data.load_documents("shakespeare")[:12]:
        (corpus / f"{doc.doc_id}.txt").write_text(doc.text[:12000])
    cfg = _cfg(corpus, root / "runs", root / "cache")
    path = root / "cfg.toml"
    path.write_text(train.to_toml(cfg))
    ref = train.train(cfg, progress=False)  # one process: the reference
    return path, root / "runs", ref


def torchrun(config: Path, *sets: str, env: dict | None = None, timeout: float = 240,
             resume: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "llamalab",
           "train", str(config), "--no-progress", *[f"--set={s}" for s in sets]]
    cmd += ["--resume"] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, strategy):
    config, runs, ref = setup
    res = torchrun(config, f'name="{strategy}"', f'distributed.strategy="{strategy}"')
    assert res.returncode == 0, res.stderr[-3000:]
    run = runs / strategy
    assert losses(run) == pytest.approx(losses(ref), abs=1e-5)
    assert_same_weights(ref, run)
    ckpt = run / "checkpoints" / "step_4"
    files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert [f for f in files if f.startswith(("rng_", "state/"))] == [  # every rank wrote its RNG state
        "rng_rank0.safetensors", "rng_rank1.safetensors", "state/model.safetensors", "state/optim.safetensors"]
    assert train.verify_checkpoint(ckpt) is None
    assert json.loads((run / "checkpoints" / "step_4" / "trainer.json").read_text())["world"] == 2


def _truncate_to_step(src: Path, dst: Path, step: int) -> None:
    """A copy of a run as it stood after its checkpoint at `step` (later checkpoints and the final model gone)."""
    shutil.copytree(src, dst)
    for s, d in train.checkpoint_steps(dst):
        if s > step:
            shutil.rmtree(d)
    shutil.rmtree(dst / "final")


def test_resume_with_a_different_number_of_processes(setup):
    config, runs, ref = setup
    if not (runs / "fsdp" / "checkpoints" / "step_2").exists():
        pytest.fail("needs test_two_processes_match_one[fsdp] to run first")
    # 2 processes (FSDP shards) -> 1 process
    _truncate_to_step(runs / "fsdp", runs / "two2one", 2)
    train.train(config, progress=False, resume=True, name="two2one")
    assert losses(runs / "two2one") == pytest.approx(losses(ref), abs=1e-5)
    assert_same_weights(ref, runs / "two2one")
    # 1 process -> 2 processes (FSDP)
    _truncate_to_step(ref, runs / "one2two", 2)
    res = torchrun(config, 'name="one2two"', 'distributed.strategy="fsdp"', resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr + res.stdout
    assert losses(runs / "one2two") == pytest.approx(losses(ref), abs=1e-5)
    assert_same_weights(ref, runs / "one2two")


def test_a_dead_rank_ends_the_job(setup):
    config, runs, _ = setup
    res = torchrun(config, 'name="dead"', 'distributed.strategy="ddp"', "train.steps=50",
                   env={"LLAMALAB_DEBUG_KILL_AT_STEP": "2", "LLAMALAB_DEBUG_KILL_RANK": "1"}, timeout=200)
    print(res.returncode, res.stderr[-3000:])
    assert res.returncode == 1
    assert "exitcode  : -9" in res.stderr
