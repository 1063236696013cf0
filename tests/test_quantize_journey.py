"""Journeys through the CLI, each step in a new process: quantize int8/int4 -> load -> generate a
multi-token prompt -> chat -> eval -> info; fine-tune -> every printed "next, try" line runs
(chat / generate with RUN/final, merge, convert to GGUF). Tiny local models, a few steps."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from helpers import WORDS, save_chat_model
from helpers import llamalab_cli as _run


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer and a ChatML template, saved as an HF dir."""
    d = save_chat_model(tmp_path_factory.mktemp("tiny"))
    (d.parent / "text.txt").write_text(("\n".join(WORDS) + "\n") * 4)
    return d


def misalign_qweights(path: Path, residue: int = 56) -> None:
    """Rewrite a safetensors file (padding its header metadata) so that every memory-mapped
    ``qweight`` (packed int8) or ``qs`` (Q8_0 blocks) starts at ``data_ptr() % 64 == residue`` — where
    SmolLM2's int8 file puts them."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)

    def residues() -> set[int]:
        with safe_open(str(path), framework="pt") as f:
            return {f.get_tensor(k).data_ptr() % 64 for k in f.keys() if k.endswith((".qweight", ".qs"))}

    for n in range(64):
        save_file(tensors, str(path), metadata={"format": "pt", "padding": "x" * n})
        if residues() == {residue}:
            return
    pytest.fail(f"could not place the qweights of {path} at offset {residue} mod 64")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_dir_generates_chats_evals_in_new_processes(model_dir, tmp_path, method):
    out = tmp_path / f"q-{method}"
    _ok(_run("quantize", "--model", str(model_dir), "--to", method, "--out", str(out)))
    if method == "int8":
        misalign_qweights(out / "model.safetensors")  # the layout that crashed the int8 kernel (SIGSEGV)
    text = _ok(_run("generate", "-m", str(out), "-p", "once upon a time there was a king", "--max-new-tokens", "6",
                    "--temperature", "0"))
    assert text.strip()
    if method == "int8":  # chat decodes through the same layers as generate; once is enough
        _ok(_run("chat", "-m", str(out), "--max-new-tokens", "4", stdin="hello world, what is the capital?\n"))
    _ok(_run("eval", str(out), "--data", str(model_dir.parent / "text.txt"), "--max-tokens", "200", "--no-progress"))
    info = json.loads(_ok(_run("info", str(out), "--json")))
    import llamalab

    base, _ = llamalab.load(model_dir)
    assert info["parameters"] == base.num_parameters()  # quantized weights are parameters too


def _next_commands(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    assert "next, try:" in lines, stdout
    return [ln.strip() for ln in lines[lines.index("next, try:") + 1:] if ln.startswith("  llamalab ")]


def test_finetune_prints_a_summary_whose_next_commands_all_run(model_dir, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is the capital of france {i}", "completion": "paris"}) + "\n"
                            for i in range(6)))
    run = tmp_path / "run"
    stdout = _ok(_run("finetune", "--model", str(model_dir), "--data", str(data), "--out", str(run), "--steps", "3",
                      "--batch-size", "2", "--max-len", "32", "--no-progress", cwd=tmp_path))
    assert not stdout.lstrip().startswith("{")  # a summary for people, not raw JSON
    assert "done: 3 steps" in stdout and "trainable" in stdout
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model_dir.resolve())
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["mfu"] > 0 for r in rows if "mfu" in r)  # the bar's MFU is measured, not 0.0%
    commands = _next_commands(stdout)
    assert any(c.startswith("llamalab chat") for c in commands)
    assert any(".gguf" in c for c in commands)
    for cmd in commands:
        argv = shlex.split(cmd, comments=True)[1:]
        if argv[0] in ("chat", "generate"):
            argv += ["--max-new-tokens", "3"]
        _ok(_run(*argv, stdin="hello\n", cwd=tmp_path))
    assert (run / "merged" / "config.json").exists() and (run / "model.gguf").stat().st_size > 0


@pytest.mark.parametrize("data", [b"\x00\xff\xfe binary \x89PNG\r\n", b"just some plain text\nnot jsonl\n", None])
def test_finetune_bad_data_is_one_line(model_dir, tmp_path, capsys, data):
    from llamalab.cli.main import main

    path = tmp_path / "data.jsonl"
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    assert main(["finetune", "--model", str(model_dir), "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llamalab finetune: error:") and "JSONL" in err[0], err
    assert not (tmp_path / "run").exists()
