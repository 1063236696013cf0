"""The own-text journey through the CLI: `llamalab train mytext/` (one .txt file) -> resume without repeating
the data -> the run keeps its corpus, tokenizer and config; a changed model on resume is refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import tomllib

from llamalab.data import corpora as data

TINY = ["--set", "data.vocab_size=300", "--set", "data.val_fraction=0.1", "--set", "model.hidden_size=32",
        "--set", "model.intermediate_size=64", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
        "--set", "model.n_kv_heads=2", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
        "--set", "train.warmup_steps=2", "--set", "eval.every=3", "--set", "eval.tokens=512",
        "--set", "checkpoint.every=3", "--set", "log.every=1", "--set", "sample.max_new_tokens=8",
        "--set", "sample.count=2", "--set", "train.max_minutes=5"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamalab", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def val_losses(run: Path) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "val_loss" in r]


def test_own_text_train_resume_keeps_its_corpus(tmp_path):
    mytext = tmp_path / "mytext"
    mytext.mkdir()
    book = "".join(d.text[:8000] for d in data.load_documents("shakespeare")[10:16])  # ONE document
    (mytext / "book.txt").write_text(book)
    common = ["--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", "--no-progress"]
    res = cli("train", "mytext/", "--steps", "6", *TINY, *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "mytext"
    saved = tomllib.loads((run / "train_config.toml").read_text())
    assert saved["data"]["corpus"] == str(mytext.resolve()) and saved["sample"]["prompts"] == []
    # one document still gets a validation split (its tail), recorded for eval
    heldout = json.loads((run / "heldout.json").read_text())
    assert heldout["corpus"] == str(mytext.resolve()) and heldout["n_docs"] == 1 and heldout["n_tokens"] > 32
    assert heldout["val_doc_ids"] == ["book.txt#val"] and all(Path(p).is_file() for p in heldout["val_shards"])
    val_text = data.heldout_documents(mytext, 0.1)[0].text
    assert len(val_text) > 0.09 * len(book) and data.load_documents(mytext)[0].text.endswith(val_text)
    first = val_losses(run)
    assert len(first) == 2  # step 3 and the final eval (step 6)
    # samples start from the corpus's own held-out text, not the recipe's "ROMEO."
    prompts = [line.split("(prompt ", 1)[1][:-1] for line in (run / "samples.txt").read_text().splitlines()
               if line.startswith("--- sample")]
    assert len(prompts) == 2 and all(eval(p) in val_text for p in prompts)  # noqa: S307 - our own repr()

    # a changed model or corpus on resume is refused in one line, and nothing is touched
    config_bytes = (run / "train_config.toml").read_bytes()
    for change, key in ((["--set", "model.n_layers=3"], "model.n_layers = 3"),
                        (["--set", 'data.corpus="shakespeare"'], "data.corpus = 'shakespeare'")):
        res = cli("train", "--resume", "--name", "mytext", *change, *common, cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"llamalab train: error: cannot resume runs/mytext: {key}, but "
                                                   "the run was trained with")
    assert (run / "train_config.toml").read_bytes() == config_bytes

    # the earlier session used up a long time: max_minutes counts only this process's time
    ckpt = run / "checkpoints" / "step_6"
    trainer = json.loads((ckpt / "trainer.json").read_text())
    (ckpt / "trainer.json").write_text(json.dumps(dict(trainer, elapsed_s=1e6)))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["trainer.json"] = {"size": (ckpt / "trainer.json").stat().st_size,
                                         "sha256": hashlib.sha256((ckpt / "trainer.json").read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))

    # resume without repeating the data: continues on mytext with the run's tokenizer
    res = cli("train", "--resume", "--name", "mytext", "--steps", "9", *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"corpus {mytext.resolve()}:" in res.stdout and "resumed from" in res.stderr
    assert tomllib.loads((run / "train_config.toml").read_text())["data"] == saved["data"]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 10))
    after = val_losses(run)
    assert after[:2] == first and len(after) == 3
    assert after[-1] < first[-1] + 0.05  # same data, same tokenizer: no jump (a different corpus gives +3 nats)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 9 and summary["tokens_per_s"] > 0


def test_data_flag_names_the_run_and_a_tiny_validation_split_warns(tmp_path, capsys):
    from llamalab import training as train
    from llamalab.cli.main import main

    book = tmp_path / "My Notes.txt"
    book.write_text("".join(d.text[:1500] for d in data.load_documents("shakespeare")[:2]))
    assert main(["train", "--data", str(book), "--print-config"]) == 0
    cfg = tomllib.loads(capsys.readouterr().out)
    assert cfg["name"] == "My-Notes" and cfg["data"]["corpus"] == str(book.resolve()) and cfg["sample"]["prompts"] == []
    assert main(["train", str(tmp_path), "--print-config"]) == 0  # a folder as the positional means --data
    cfg = tomllib.loads(capsys.readouterr().out)
    assert cfg["name"] == tmp_path.name and cfg["data"]["corpus"] == str(tmp_path.resolve())
    # 1% of 3,000 characters is less than one validation window: trained, with a warning
    over = {"data.val_fraction": 0.01, "data.vocab_size": 300, "data.cache_dir": str(tmp_path / "cache"),
            "out_dir": str(tmp_path / "runs"), "model.hidden_size": 32, "model.intermediate_size": 64,
            "model.n_layers": 1, "model.n_heads": 4, "model.n_kv_heads": 2, "train.steps": 2,
            "train.batch_size": 2, "train.seq_len": 32, "train.warmup_steps": 1, "sample.count": 1,
            "sample.max_new_tokens": 2, "checkpoint.every": 0, "eval.every": 0}
    train.train("tiny", over, progress=False, name="notes", data__corpus=str(book))
    out = capsys.readouterr().out
    assert "warning: the validation split holds " in out and "there will be no validation loss" in out
