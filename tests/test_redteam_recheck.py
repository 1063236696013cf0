"""A second red-team pass over run dirs, checkpoints and requests: what the first hostile suites did not try.

* a run dir someone hands you may hold symlinks at the temporary names a run writes through
  (``.tmp_step_N``, ``log.jsonl.tmp``, ``heldout.json.tmp``, ...): resuming it writes nothing outside it;
* checkpoint JSON with numbers Python cannot hold (``Infinity``, a 5000-digit integer) means "skip this
  checkpoint", not an internal error;
* a checkpoint's optimizer cannot switch the algorithm (``amsgrad``, ``capturable``, ``maximize``) or
  carry state of the wrong shape into ``optimizer.step()``; a data position that is negative or missing
  is one line;
* a negative seed, a run name with control characters or longer than a directory name: one line;
* TOML past Python's limits (config file, ``--set``, a run's saved config), a malformed ``summary.json``
  or ``log.jsonl``, a manifest-less checkpoint's malformed ``trainer.json``: one line, or ignored;
* a request's ``1e999`` (valid JSON, infinity) is named as not finite; an API key beyond ASCII can be sent;
  a stream the client leaves unread is disconnected at the write deadline.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import copy_run, rewrite_manifest, server_tiny, train_finished, wait_until, write_corpus
from helpers import llamalab_cli as cli
from helpers import loop_batches as tiny_batches
from helpers import loop_model as tiny_model
from llamalab import training as train
from llamalab.errors import LlamalabError
from llamalab.training.callbacks import standard_callbacks
from llamalab.training.checkpoint import Checkpointer, checkpoint_steps, latest_valid_checkpoint, verify_checkpoint


# --------------------------------------------------------------------------- the loop, in this process
def run_loop(run: Path, steps: int, resume: bool = False, batches=None):
    cfg = train.LoopConfig(steps=steps, lr=1e-2, warmup_steps=1, precision="fp32", log_every=1, ckpt_every=1)
    model = tiny_model()
    return model, train.train_loop(model, batches or tiny_batches(), cfg, checkpointer=Checkpointer(run, keep=1),
                                   resume=resume, callbacks=standard_callbacks(run, progress=False))


def patch_optimizer(ckpt: Path, change) -> None:
    path = ckpt / "state" / "optim.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    rewrite_manifest(ckpt)


def test_loop_temporaries_never_write_through_a_planted_symlink(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text("precious")
    (victim / "notes.txt").write_text("precious")
    run_loop(run, 2)
    (run / "checkpoints" / ".tmp_step_3").symlink_to(victim)
    (run / "checkpoints" / "step_3").symlink_to(victim)  # a rename target that is a link: unlinked, not followed
    (run / "log.jsonl.tmp").symlink_to(victim / "notes.txt")
    (run / "loss.tmp.png").symlink_to(victim / "notes.txt")
    _, res = run_loop(run, 4, resume=True)
    assert res.step == 4 and verify_checkpoint(run / "checkpoints" / "step_4") is None
    assert sorted(p.name for p in victim.iterdir()) == ["config.json", "notes.txt"]
    assert (victim / "config.json").read_text() == "precious" == (victim / "notes.txt").read_text()


def test_a_linked_checkpoints_folder_is_never_written_or_rotated_through(tmp_path):
    """A run dir whose checkpoints/ links to another run's: saving (and its keep= rotation) would write and
    delete there, outside the run dir. One line instead, and the other run's checkpoints stay."""
    other, run = tmp_path / "other", tmp_path / "run"
    run_loop(other, 3)
    kept = [p.name for _, p in checkpoint_steps(other)]
    run.mkdir()
    (run / "checkpoints").symlink_to(other / "checkpoints")
    with pytest.raises(LlamalabError, match="only inside the run dir"):
        run_loop(run, 5, resume=True)
    assert [p.name for _, p in checkpoint_steps(other)] == kept
    assert verify_checkpoint(other / "checkpoints" / kept[-1]) is None


def test_a_checkpoint_cannot_choose_the_optimizer_algorithm(tmp_path):
    run = tmp_path / "run"
    run_loop(run, 2)
    ckpt = run / "checkpoints" / "step_2"
    reference = tmp_path / "reference"
    shutil.copytree(run, reference)
    _, clean = run_loop(reference, 3, resume=True)

    def flags(tensors, meta):
        groups = json.loads(meta["param_groups"])
        for g in groups:
            g.update(amsgrad=True, capturable=True, maximize="yes", foreach="x", differentiable=True)
        meta["param_groups"] = json.dumps(groups)

    patch_optimizer(ckpt, flags)
    model, res = run_loop(run, 3, resume=True)  # amsgrad without its state, capturable on CPU: both used to fail
    assert res.losses == clean.losses  # and maximize would have turned descent into ascent


@pytest.mark.parametrize("bad", ["shape", "step"])
def test_optimizer_state_of_the_wrong_shape_is_one_line(tmp_path, bad):
    run = tmp_path / "run"
    run_loop(run, 2)

    def reshape(tensors, meta):
        for k in tensors:
            if k.endswith("/exp_avg" if bad == "shape" else "/step"):
                tensors[k] = torch.zeros(3)

    patch_optimizer(run / "checkpoints" / "step_2", reshape)
    with pytest.raises(LlamalabError, match="does not fit this model and optimizer: optimizer state"):
        run_loop(run, 3, resume=True)


class KeyedBatches:
    """Batches whose position is keyed like fine-tuning's (epoch, pos)."""

    def __init__(self) -> None:
        self.inner = tiny_batches()

    def __next__(self):
        return next(self.inner)

    def state_dict(self) -> dict:
        return {"epoch": 0, "pos": self.inner.served}

    def load_state_dict(self, state: dict) -> None:
        self.inner.served = state["pos"]


@pytest.mark.parametrize("position", [{"served": -5, "seed": 0, "seq_len": 8}, {"seed": 0}, "keyed"])
def test_a_hostile_data_position_is_one_line(tmp_path, position):
    run = tmp_path / "run"
    keyed = position == "keyed"
    run_loop(run, 2, batches=KeyedBatches() if keyed else None)
    ckpt = run / "checkpoints" / "step_2"
    state = json.loads((ckpt / "trainer.json").read_text())
    state["data"] = {"epoch": 0} if keyed else position
    (ckpt / "trainer.json").write_text(json.dumps(state))
    rewrite_manifest(ckpt)
    with pytest.raises(LlamalabError, match="data position"):
        run_loop(run, 3, resume=True, batches=KeyedBatches() if keyed else None)


@pytest.mark.parametrize("file,text", [
    ("trainer.json", None),  # "tokens": Infinity
    ("tokenizer_config.json", '{"model_max_length": ' + "9" * 5000 + "}"),
    ("generation_config.json", "[" * 100_000 + "]" * 100_000),
])
def test_unrepresentable_numbers_in_checkpoint_json_mean_skip_it(tmp_path, file, text):
    run = tmp_path / "run"
    run_loop(run, 2)
    keep = tmp_path / "older"
    shutil.copytree(run / "checkpoints" / "step_2", keep)
    ckpt = run / "checkpoints" / "step_2"
    if text is None:
        text = (ckpt / "trainer.json").read_text().replace('"tokens": ', '"tokens": Infinity, "was": ', 1)
    (ckpt / file).write_text(text)
    rewrite_manifest(ckpt)
    problem = verify_checkpoint(ckpt)
    assert problem is not None and file in problem
    shutil.copytree(keep, run / "checkpoints" / "step_1")
    assert latest_valid_checkpoint(run, lambda msg: None) == run / "checkpoints" / "step_1"


# --------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, run dir) of a finished 2-step `llamalab train` run."""
    root = tmp_path_factory.mktemp("redteam")
    corpus = write_corpus(root / "corpus", docs=4, chars=4000)
    cfg = {"name": "t", "out_dir": str(root / "runs"), "seed": 0,
           "data": {"corpus": str(corpus), "vocab_size": 280, "cache_dir": str(root / "cache"), "val_fraction": 0.1},
           "model": {"preset": "tiny", "hidden_size": 16, "intermediate_size": 32, "n_layers": 1, "n_heads": 2,
                     "n_kv_heads": 1, "max_position_embeddings": 32},
           "train": {"steps": 2, "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "precision": "fp32"},
           "eval": {"every": 0, "tokens": 64, "batch_size": 4}, "checkpoint": {"every": 1, "keep": 2},
           "log": {"every": 1}, "sample": {"max_new_tokens": 2, "count": 1, "prompts": ["a"]}}
    return train_finished(cfg, root)


def test_resuming_a_run_dir_with_planted_symlinks_writes_nothing_outside_it(tmp_path, finished):
    cfg, run = copy_run(finished, tmp_path, drop_final=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("precious")
    for name in ("train_config.toml.tmp", "heldout.json.tmp", "summary.json.tmp", "samples.txt.tmp",
                 f".llamalab_write_probe_{os.getpid()}"):
        (run / name).symlink_to(victim / "precious.txt")
    (run / ".tmp_final").symlink_to(victim)
    (run / "final").symlink_to(victim)
    (run / "checkpoints" / ".tmp_step_3").symlink_to(victim)
    res = cli("train", str(cfg), "--resume", "--steps", "3", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]
    assert (victim / "precious.txt").read_text() == "precious"
    assert not (run / "final").is_symlink() and (run / "final" / "model.safetensors").is_file()
    assert [s for s, _ in checkpoint_steps(run)] == [2, 3]


@pytest.mark.parametrize("args,message", [
    (["--set", "seed=-1"], "seed must be in 0 .. 2**63-1, got -1"),
    (["--name", "a\nb"], "run name 'a\\nb' must be a plain directory name"),
    (["--name", "x" * 300], "is longer than a directory name can be (255 bytes)"),
])
def test_bad_seed_and_run_names_are_one_line(tmp_path, finished, capsys, args, message):
    from llamalab.cli.main import main

    config, _ = finished
    runs = tmp_path / "runs"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(train.to_toml(dict(train.load_config(config), out_dir=str(runs))))
    assert main(["train", str(cfg), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llamalab train: error: ") and message in err[0], err
    assert not runs.exists() or not any(runs.iterdir())


# --------------------------------------------------------------------------- requests
def test_an_infinite_number_in_a_request_is_named_as_such():
    from llamalab.server.protocol import APIError, parse_json, parse_request

    with pytest.raises(APIError) as e:
        parse_request(parse_json(b'{"model": "m", "prompt": "x", "temperature": 1e999}'), "completion", ["m"])
    assert e.value.status == 400 and e.value.message == "'temperature' must be a finite number, got inf"


def test_an_api_key_beyond_ascii_can_be_sent():
    import httpx

    from llamalab.server.run import BackgroundServer

    model, tok = server_tiny()
    with BackgroundServer(model, tok, "m", max_batch=1, max_len=32, api_key="clé-🔑") as srv:
        def models(key: str) -> int:
            return httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}".encode()}).status_code

        assert models("clé-🔑") == 200  # the UTF-8 bytes a client sends; every such key used to get 401
        assert models("cle-🔑") == 401 and models("clé") == 401


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"step": ' + "9" * 5000 + "}", "\xff"])
def test_exporting_a_checkpoint_without_manifest_and_hostile_trainer_json_is_one_line(tmp_path, text):
    from llamalab.training.distributed import export_distributed_checkpoint

    run = tmp_path / "run"
    run_loop(run, 1)
    ckpt = run / "checkpoints" / "step_1"
    (ckpt / "manifest.json").unlink()
    (ckpt / "trainer.json").write_text(text, encoding="latin-1")
    with pytest.raises(LlamalabError, match="trainer.json is not valid JSON"):
        export_distributed_checkpoint(ckpt, tmp_path / "hf")


def test_resume_survives_a_log_with_lines_that_are_not_log_rows(tmp_path):
    run = tmp_path / "run"
    run_loop(run, 2)
    with (run / "log.jsonl").open("ab") as fh:  # the log is not in the manifest: anything may be appended to it
        fh.write(b'[1]\n5\n{"step": "x"}\n{"step": true}\n' + b"[" * 100_000 + b"\n\xff\xfe\n")
    _, res = run_loop(run, 3, resume=True)
    assert res.step == 3
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("toml", ["seed = " + "9" * 5000, "x = " + "[" * 5000 + "]" * 5000])
def test_toml_past_pythons_limits_is_one_line(tmp_path, finished, capsys, toml):
    from llamalab.cli.main import main

    config, src = finished
    bad = tmp_path / "bad.toml"
    bad.write_text(toml + "\n")
    assert main(["train", str(bad), "--no-progress"]) == 2  # a config file
    assert main(["train", str(config), "--no-progress", "--set", toml.replace(" ", "")]) == 2  # an override
    runs = tmp_path / "runs"
    shutil.copytree(src, runs / "t")
    (runs / "t" / "train_config.toml").write_text(toml + "\n")  # a run's own saved config
    assert main(["train", "--resume", "--name", "t", "--set", f"out_dir={json.dumps(str(runs))}",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("llamalab train: error: ") for line in err), err
    assert "invalid TOML" in err[0] and f"{runs / 't' / 'train_config.toml'}: unreadable" in err[2]


def test_a_finished_run_with_a_hostile_summary_still_reexports_final(tmp_path, finished):
    cfg, run = copy_run(finished, tmp_path, drop_final=True)
    (run / "summary.json").write_text('{"step": ' + "9" * 5000 + "}")
    res = cli("train", str(cfg), "--resume", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already complete" in res.stdout + res.stderr and (run / "final" / "model.safetensors").is_file()


def test_a_stream_left_unread_is_disconnected_at_the_write_deadline():
    import socket

    import httpx

    from llamalab.server.connections import ConnectionLimits
    from llamalab.server.run import BackgroundServer

    model, tok = server_tiny()
    with BackgroundServer(model, tok, "m", max_batch=8, max_len=64,
                          limits=ConnectionLimits(write_timeout=1.0)) as srv:
        srv._server.servers[0].sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted
        body = json.dumps({"model": "m", "prompt": ["hi"] * 8, "max_tokens": 40, "stream": True, "logprobs": 5,
                           "temperature": 0}).encode()  # ~300 KB of events: more than both socket buffers hold
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                      b"Content-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            mine = ("127.0.0.1", s.getsockname()[1])

            def open_on_server() -> bool:  # the server's side of this connection is still there
                try:
                    return any(c.client == mine for c in list(srv._server.server_state.connections))
                except RuntimeError:  # the set changed while it was copied: look again
                    return True

            assert wait_until(open_on_server, timeout=30), "the server never took the connection"
            # nothing is read: the server's buffer stays full, so the write deadline, and only it, drops us
            assert wait_until(lambda: not open_on_server(), timeout=60), "never disconnected at the write deadline"
            s.settimeout(10)
            received = b""
            try:
                while chunk := s.recv(1 << 16):
                    received += chunk
            except ConnectionResetError:
                pass
        assert received.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in received  # cut off mid-stream
        r = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and srv.engine.stats()["running"] == 0
