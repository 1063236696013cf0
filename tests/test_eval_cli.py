"""`llamalab eval`: table and JSON output, KL against a reference, tasks, prompts, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab import Llama, LlamaConfig
from llamalab.cli.main import main

TEXT = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n") * 3


def _save(tok, path, seed: int):
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=64, n_layers=1, n_heads=4,
                      n_kv_heads=2, max_position_embeddings=128, rope_theta=500.0)
    torch.manual_seed(seed)
    Llama(cfg).save_pretrained(path)
    tok.save(path)
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from llamalab.tokenization.bpe import train_tokenizer

    root = tmp_path_factory.mktemp("evalcli")
    tok = train_tokenizer([TEXT], vocab_size=280)
    other = train_tokenizer(["an entirely different corpus, numbers 0123456789 " * 40], vocab_size=280)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT.split("\n") if t))
    (root / "task.jsonl").write_text(json.dumps({"context": "Now is the winter of our ",
                                                 "choices": ["discontent", "cheese"], "answer": 0}) + "\n")
    (root / "prompts.txt").write_text("Now is the\nMade glorious\n")
    return {"model": _save(tok, root / "m", 0), "ref": _save(tok, root / "r", 1), "other": _save(other, root / "o", 2),
            "root": root}


def _run(capsys, *argv):
    code = main(["eval", *map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_perplexity_json_matches_api(dirs, capsys):
    import llamalab
    from llamalab.eval import perplexity

    code, out, _ = _run(capsys, dirs["model"], "--data", dirs["root"] / "text.txt", dirs["root"] / "docs.jsonl",
                        "--max-length", 32, "--stride", 16, "--json")
    assert code == 0
    res = json.loads(out)
    assert [r["documents"] for r in res["perplexity"]] == [1, 12]
    model, tok = llamalab.load(dirs["model"])
    api = perplexity(model, tok, str(dirs["root"] / "text.txt"), max_length=32, stride=16)
    first = res["perplexity"][0]
    assert first["perplexity"] == pytest.approx(api.perplexity, rel=1e-6)
    assert first["bytes"] == len(TEXT.encode()) and first["tokens"] == api.tokens
    assert res["settings"]["max_length"] == 32 and res["settings"]["stride"] == 16


def test_table_with_reference_tasks_and_prompts(dirs, capsys):
    code, out, _ = _run(capsys, dirs["model"], "--data", dirs["root"] / "text.txt", "--reference", dirs["ref"],
                        "--tasks", dirs["root"] / "task.jsonl", "--prompts", dirs["root"] / "prompts.txt",
                        "--max-new-tokens", 8, "--max-length", 64)
    assert code == 0, out
    for header in ("perplexity [95% CI]", "bits/byte", "mean KL", "same top-1", "acc/byte", "distinct-2",
                   "PPL under reference"):
        assert header in out
    assert "task" in out and "text.txt" in out


def test_kl_against_itself_is_zero_via_cli(dirs, capsys):
    code, out, _ = _run(capsys, dirs["model"], "--data", dirs["root"] / "text.txt", "--reference", dirs["model"],
                        "--max-length", 64, "--json")
    assert code == 0
    kl = json.loads(out)["kl"][0]
    assert kl["kl_mean"] == pytest.approx(0.0, abs=1e-6) and kl["top1_agreement"] == 1.0
    # the same weights run in bfloat16, judged against float32: a small, positive divergence
    code, out, _ = _run(capsys, dirs["model"], "--data", dirs["root"] / "text.txt", "--reference", dirs["model"],
                        "--dtype", "bf16", "--max-length", 64, "--json")
    res = json.loads(out)
    assert code == 0 and res["settings"]["dtype"] == "bfloat16" and res["settings"]["reference_dtype"] == "float32"
    assert 0 < res["kl"][0]["kl_mean"] < 0.05


@pytest.mark.parametrize("argv,message", [
    (["--data", "MISSING.txt"], "no such text source"),
    (["--data", "TEXT", "--stride", "0"], "--stride must be a positive integer"),
    (["--data", "TEXT", "--max-length", "16", "--stride", "32"], "stride must be between 1 and max_length"),
    (["--data", "TEXT", "--max-length", "4096"], "exceeds the model's context"),
    (["--data", "TEXT", "--reference", "OTHER"], "do not share a tokenizer"),
    (["--tasks", "no_such_task"], "no such task"),
    (["--prompts", "MISSING.txt"], "no such prompts file"),
    (["--data", "TEXT", "--dtype", "float7"], "unknown dtype"),
])
def test_bad_input_is_one_line(dirs, capsys, argv, message):
    subst = {"TEXT": str(dirs["root"] / "text.txt"), "OTHER": dirs["other"],
             "MISSING.txt": str(dirs["root"] / "missing.txt")}
    code, _, err = _run(capsys, dirs["model"], *[subst.get(a, a) for a in argv])
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_model_is_one_line(capsys, tmp_path):
    code, _, err = _run(capsys, tmp_path / "nope", "--data", "shakespeare")
    assert code == 2 and "no such model" in err


def test_limit_applies_to_prompts(dirs, capsys):
    code, out, _ = _run(capsys, dirs["model"], "--prompts", dirs["root"] / "prompts.txt", "--limit", 1,
                        "--max-new-tokens", 4, "--json")
    assert code == 0
    assert json.loads(out)["generation"]["prompts"] == 1  # the file has two
