"""Checkpoints and run dirs under hostile or unlucky input: pickle payloads never run, --name never deletes
outside the run dir, finished runs and malformed manifests are handled, read-only run dirs fail in one line."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import copy_run, rewrite_manifest, tiny_run_cfg, train_finished, write_corpus
from helpers import llamalab_cli as cli
from llamalab import training as train
from llamalab.training.checkpoint import checkpoint_steps, verify_checkpoint


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs=6, chars=6000)


def tiny_cfg(corpus: Path, out: Path) -> dict:
    """A 4-step run with checkpoints at steps 2 and 4; the token cache beside the runs folder, not in it."""
    return tiny_run_cfg(corpus, out, cache=out.parent / "cache", steps=4)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_dir) -> tuple[Path, Path]:
    """(config file, run dir) of a finished 4-step run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("sec")
    cfg = tiny_cfg(corpus_dir, root / "runs")
    return train_finished(cfg, root)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("llamalab train: error: ")
    return last


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def poison(ckpt: Path, marker: Path) -> None:
    """Every file of the checkpoint becomes a pickle that creates `marker` when unpickled, plus the files of the
    older pickle-based format (rng_rank0.pt, state/.metadata, a .distcp shard); the manifest is recomputed."""
    payload = pickle.dumps(_Payload(marker))
    for p in ckpt.rglob("*"):
        if p.is_file():
            p.write_bytes(payload)
    for rel in ("rng_rank0.pt", "state/.metadata", "state/__0_0.distcp"):
        (ckpt / rel).write_bytes(payload)
    rewrite_manifest(ckpt)
    assert verify_checkpoint(ckpt) is not None


def test_pickle_payload_checkpoints_are_never_unpickled(tmp_path, finished):
    _, run = copy_run(finished, tmp_path, drop_final=True)
    marker = tmp_path / "PWNED"
    poison(run / "checkpoints" / "step_4", marker)
    assert "older pickle-based checkpoint format" in verify_checkpoint(run / "checkpoints" / "step_4")
    # the newest checkpoint is refused; resume falls back to the intact one and finishes
    res = cli("train", str(tmp_path / "cfg.toml"), "--resume", "--no-progress", "--steps", "6")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "checkpoints/step_4 is unusable: it holds rng_rank0.pt" in res.stderr
    assert "resumed from" in res.stderr and "step_2" in res.stderr
    assert not marker.exists()
    # every checkpoint poisoned: one line, nothing run, nothing changed
    for _, ckpt in checkpoint_steps(run):
        poison(ckpt, marker)
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    res = cli("train", str(tmp_path / "cfg.toml"), "--resume", "--no-progress", "--steps", "8")
    assert res.stderr.strip().splitlines() == [
        f"llamalab train: error: no usable checkpoint in {run / 'checkpoints'} to resume from (3 checked; the "
        "newest, step_6: it holds rng_rank0.pt: an older pickle-based checkpoint format, which is never loaded "
        "(unpickling can run code)); nothing was changed"]
    assert res.returncode == 2
    assert not marker.exists()
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
    # exporting a poisoned checkpoint: refused, nothing run
    from llamalab.errors import LlamalabError
    from llamalab.training.distributed import export_distributed_checkpoint

    with pytest.raises(LlamalabError, match="unusable"):
        export_distributed_checkpoint(run / "checkpoints" / "step_6", tmp_path / "hf")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["ABS", ".", "..", "a/b", "a\\b"])
def test_overwrite_with_a_non_plain_name_is_refused_and_deletes_nothing(tmp_path, corpus_dir, name, capsys):
    from llamalab.cli.main import main

    runs = tmp_path / "runs"
    (runs / "other").mkdir(parents=True)
    (runs / "other" / "train_config.toml").write_text("name = 'other'\n")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "train_config.toml").write_text("name = 'victim'\n")  # looks like a run: still never deleted
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(train.to_toml(tiny_cfg(corpus_dir, runs)))
    before = sorted(p.as_posix() for p in tmp_path.rglob("*"))
    arg = str(victim) if name == "ABS" else name
    assert main(["train", str(cfg), "--name", arg, "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llamalab train: error: run name ")
    assert sorted(p.as_posix() for p in tmp_path.rglob("*")) == before


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(tmp_path, corpus_dir):
    runs = tmp_path / "runs"
    precious = runs / "notes" / "thesis.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("years of work")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "train_config.toml").write_text("name = 'x'\n")
    (runs / "link").symlink_to(outside)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(train.to_toml(tiny_cfg(corpus_dir, runs)))
    res = cli("train", str(cfg), "--name", "notes", "--overwrite")
    assert one_error_line(res) == (f"llamalab train: error: {runs / 'notes'} exists and is not a llamalab run "
                                   "(no train_config.toml): not deleting it; choose another --name")
    assert precious.read_text() == "years of work"
    res = cli("train", str(cfg), "--name", "link", "--overwrite")
    assert "resolves outside" in one_error_line(res)
    assert (outside / "train_config.toml").exists()


def test_resume_of_a_finished_run_says_complete_and_reexports_final(tmp_path, finished):
    _, src = finished
    cfg, run = copy_run(finished, tmp_path)
    runs = run.parent
    res = cli("train", str(cfg), "--resume", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"run {runs / 't'} is already complete (4 of 4 steps)" in res.stdout
    # a kill during the final export: final/ is missing (a half-written .tmp_final left behind)
    shutil.rmtree(runs / "t" / "final")
    (runs / "t" / ".tmp_final").mkdir()
    res = cli("train", "--resume", "--name", "t", "--set", f"out_dir={json.dumps(str(runs))}", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already complete (4 of 4 steps); re-exporting" in res.stdout
    a = load_file(str(src / "final" / "model.safetensors"))
    b = load_file(str(runs / "t" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not (runs / "t" / ".tmp_final").exists()


@pytest.mark.parametrize("manifest, problem", [
    ("[]", "malformed manifest.json (expected an object with a \"files\" object)"),
    ('{"files": 3}', "malformed manifest.json (expected an object with a \"files\" object)"),
    ('{"files": {"trainer.json": 3}}', "malformed manifest.json (entry for 'trainer.json' needs an integer size "
                                      "and a sha256 string)"),
    ('{"files": {"../../etc/passwd": {"size": 1, "sha256": "x"}}}',
     "malformed manifest.json (path '../../etc/passwd' is not inside the checkpoint)"),
    ("{not json", "unreadable manifest.json"),
])
def test_malformed_manifest_means_skip_this_checkpoint(tmp_path, finished, manifest, problem):
    _, src = finished
    run = tmp_path / "t"
    shutil.copytree(src, run)
    (run / "checkpoints" / "step_4" / "manifest.json").write_text(manifest)
    assert verify_checkpoint(run / "checkpoints" / "step_4").startswith(problem)
    warnings: list[str] = []
    assert train.latest_valid_checkpoint(run, warnings.append) == run / "checkpoints" / "step_2"
    assert len(warnings) == 1 and problem in warnings[0]


def _read_only(run: Path) -> list[str] | None:
    """A command prefix that runs a command with `run` mounted read-only, or None where that is impossible."""
    if os.geteuid() != 0:
        for p in [run, *run.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {run} {run}"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{run}" "{run}" && exec "$0" "$@"']


def test_resume_on_a_read_only_run_dir_is_one_line_and_loses_nothing(tmp_path, finished):
    cfg, run = copy_run(finished, tmp_path)
    before = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    prefix = _read_only(run)
    if prefix is None:
        pytest.skip("cannot make a read-only directory here (root without unshare)")
    try:
        res = cli("train", str(cfg), "--resume", "--steps", "6", "--no-progress", prefix=prefix)
    finally:
        for p in [run, *run.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    assert one_error_line(res).startswith(f"llamalab train: error: cannot write to the run dir {run} (")
    assert res.stderr.strip().endswith("); nothing was changed")
    after = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_well_formed_but_hostile_checkpoint_contents_are_refused(tmp_path, finished):
    from safetensors.torch import save_file

    cfg, run = copy_run(finished, tmp_path)
    step2, step4 = run / "checkpoints" / "step_2", run / "checkpoints" / "step_4"
    trainer = json.loads((step2 / "trainer.json").read_text())
    for bad, problem in (({"step": -1}, "trainer.json has no non-negative integer step"),
                         ({"data": {"served": "x"}}, "trainer.json has a data position that is not an object of "
                                                     "integers")):
        (step2 / "trainer.json").write_text(json.dumps(dict(trainer, **bad)))
        rewrite_manifest(step2)
        assert verify_checkpoint(step2) == problem
    # valid safetensors whose tensors do not fit the model: one line on resume
    import torch

    save_file({"embed_tokens.weight": torch.zeros(3, 3)}, str(step4 / "state" / "model.safetensors"))
    rewrite_manifest(step4)
    assert verify_checkpoint(step4) is None
    res = cli("train", str(cfg), "--resume", "--steps", "6", "--no-progress")
    assert one_error_line(res).startswith(f"llamalab train: error: checkpoint {step4} does not fit this model and "
                                          "optimizer: ")


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints_written(tmp_path, corpus_dir):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare (a user mount namespace) to mount a small tmpfs")
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    runs.mkdir()
    kept.mkdir()
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(train.to_toml(tiny_cfg(corpus_dir, runs)))
    # room for one checkpoint (~550 KB) but not two; the run dir is copied out before the tmpfs goes away
    script = (f'mount -t tmpfs -o size=900k tmpfs "{runs}" && "$0" "$@"; rc=$?; cp -a "{runs}/t" "{kept}/"; '
              'exit $rc')
    res = cli("train", str(cfg), "--no-progress", prefix=["unshare", "-rm", "sh", "-c", script])
    assert one_error_line(res) == (f"llamalab train: error: cannot write the step 4 checkpoint in {runs / 't'}/"
                                   "checkpoints (No space left on device (os error 28)); the checkpoints written "
                                   "before it are intact: free space or fix permissions, then --resume")
    run = kept / "t"
    assert [s for s, _ in checkpoint_steps(run)] == [2]
    assert verify_checkpoint(run / "checkpoints" / "step_2") is None
    assert not (run / "checkpoints" / ".tmp_step_4").exists()
    # with room again, the run resumes from what was kept
    res = cli("train", str(cfg), "--resume", "--no-progress", "--set", f"out_dir={json.dumps(str(kept))}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stderr and (run / "final" / "model.safetensors").exists()
