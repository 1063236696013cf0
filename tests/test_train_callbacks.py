"""train_loop's callbacks: a custom one sees every step; without callbacks or a checkpointer the loop writes
nothing; the in-memory History holds the rows log.jsonl holds."""

from __future__ import annotations

import json

import pytest

from helpers import loop_batches as tiny_batches
from helpers import loop_model as tiny_model
from llamalab import training as train
from llamalab.errors import LlamalabError
from llamalab.training.callbacks import Callback, History, JsonlLog, KillAtStep, standard_callbacks
from llamalab.training.checkpoint import Checkpointer


def loop_cfg(**kw) -> train.LoopConfig:
    return train.LoopConfig(**{"steps": 5, "lr": 1e-2, "warmup_steps": 1, "precision": "fp32", "log_every": 2,
                               "eval_every": 2, **kw})


def fake_eval(model) -> dict:
    return {"val_loss": 1.5}


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_train_start(self, state):
        self.calls.append(("start", state.step))

    def on_step_start(self, state):
        self.calls.append(("step_start", state.step))

    def on_step_end(self, state, metrics):
        self.calls.append(("step_end", dict(metrics)))

    def on_log(self, state, metrics):
        self.calls.append(("log", dict(metrics)))

    def on_eval(self, state, metrics):
        self.calls.append(("eval", state.step, dict(metrics)))

    def on_train_end(self, state):
        self.calls.append(("end", state.step))


def test_a_custom_callback_sees_every_steps_metrics():
    rec = Recorder()
    res = train.train_loop(tiny_model(), tiny_batches(), loop_cfg(), eval_fn=fake_eval, callbacks=[rec])
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("start") == kinds.count("end") == 1
    assert [c[1] for c in rec.calls if c[0] == "step_start"] == [0, 1, 2, 3, 4]
    ends = [c[1] for c in rec.calls if c[0] == "step_end"]
    assert [m["step"] for m in ends] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in ends] == res.losses and len(res.losses) == 5
    assert all({"lr", "grad_norm", "tokens", "elapsed_s"} <= m.keys() for m in ends)
    assert [m["tokens"] for m in ends] == [32, 64, 96, 128, 160]  # 4 rows x 8 tokens a step
    logs = [c[1] for c in rec.calls if c[0] == "log"]
    assert [m["step"] for m in logs] == [2, 4, 5]  # every log_every steps and the last
    assert all({"tok_per_s", "mfu"} <= m.keys() for m in logs)
    assert [(c[1], c[2]) for c in rec.calls if c[0] == "eval"] == [(2, {"val_loss": 1.5}), (4, {"val_loss": 1.5}),
                                                                  (5, {"val_loss": 1.5})]
    assert rec.calls[-1] == ("end", 5) and res.step == 5


def test_without_callbacks_or_checkpointer_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = train.train_loop(tiny_model(), tiny_batches(), loop_cfg(ckpt_every=2), eval_fn=fake_eval)
    assert res.step == 5 and res.last_checkpoint is None and res.run_dir is None
    assert list(tmp_path.iterdir()) == []


def test_resume_needs_a_checkpointer():
    with pytest.raises(LlamalabError, match="resume needs a checkpointer"):
        train.train_loop(tiny_model(), tiny_batches(), loop_cfg(), resume=True)


def test_history_holds_the_rows_of_log_jsonl(tmp_path):
    history = History()
    res = train.train_loop(tiny_model(), tiny_batches(), loop_cfg(), eval_fn=fake_eval,
                           callbacks=[JsonlLog(tmp_path), history])
    rows = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == sorted(history.logs + history.evals, key=lambda r: (r["step"], "loss" not in r))
    assert [r["loss"] for r in history.steps] == res.losses
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]  # no checkpointer: no checkpoints


def test_checkpoints_come_from_the_checkpointer(tmp_path):
    res = train.train_loop(tiny_model(), tiny_batches(), loop_cfg(ckpt_every=2), checkpointer=Checkpointer(tmp_path))
    assert [s for s, _ in train.checkpoint_steps(tmp_path)] == [4, 5]  # keep=2
    assert res.last_checkpoint == tmp_path / "checkpoints" / "step_5" and res.run_dir == tmp_path
    assert not (tmp_path / "log.jsonl").exists()


def test_the_kill_hook_is_added_only_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMALAB_DEBUG_KILL_AT_STEP", raising=False)
    assert not any(isinstance(cb, KillAtStep) for cb in standard_callbacks(tmp_path))
    monkeypatch.setenv("LLAMALAB_DEBUG_KILL_AT_STEP", "3")
    monkeypatch.setenv("LLAMALAB_DEBUG_KILL_RANK", "1")
    kill = [cb for cb in standard_callbacks(tmp_path) if isinstance(cb, KillAtStep)]
    assert len(kill) == 1 and (kill[0].step, kill[0].rank) == (3, 1)
