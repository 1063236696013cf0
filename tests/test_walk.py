"""Commands the guides in docs/ show, run as printed, that once failed.

* ``llamalab finetune ... --resume`` with other LoRA options than the run was started with (the guide's
  ``...`` stands for the same options) is one line that names the mismatched tensors and says what to do,
  not torch's bare heading "Error(s) in loading state_dict for Llama:".

Everything goes through the CLI in a subprocess, on a tiny random model with a ChatML template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import llamalab_cli as _run
from helpers import save_chat_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer and a ChatML template, saved as an HF dir."""
    return _save_chat_model(tmp_path_factory.mktemp("chat_model"), hidden=32, n_layers=1)


def _save_chat_model(d: Path, hidden: int, n_layers: int) -> Path:
    return save_chat_model(d, hidden_size=hidden, intermediate_size=2 * hidden, n_layers=n_layers, n_heads=2,
                           n_kv_heads=1, max_position_embeddings=64)


def test_finetune_resume_with_other_lora_options_names_the_misfit(chat_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is the capital of france {i}", "completion": "paris"}) + "\n"
                            for i in range(4)))
    common = ["--model", str(chat_model), "--data", str(data), "--out", "runs/ft", "--batch-size", "2",
              "--max-len", "32", "--no-progress"]
    first = _run("finetune", *common, "--steps", "2", "--target-modules", "all-linear", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    # the guide's `llamalab finetune ... --resume`, without repeating --target-modules
    r = _run("finetune", *common, "--steps", "3", "--resume", cwd=tmp_path)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("llamalab finetune: error:"), err
    assert "key(s)" in err[0] and "mlp" in err[0] and "options the run was started with" in err[0], err[0]
    assert "Traceback" not in r.stderr
    # the same options again resume the run
    again = _run("finetune", *common, "--steps", "3", "--target-modules", "all-linear", "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout + again.stderr


def test_convert_of_a_quantized_dir_reports_its_dtype_and_all_parameters(tmp_path):
    """quantization.md: `convert` loads an int8 dir; its summary counts the int8 weights as parameters
    and names them, as `info` does (it said "float32" and left the int8 weights out)."""
    model = _save_chat_model(tmp_path / "model", hidden=256, n_layers=2)  # 1.3M parameters, 1.2M in linears
    plain = _run("convert", str(model), "plain", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "HF dir (float32)" in plain.stdout, plain.stdout
    params = plain.stdout.split(" MiB, ")[1].split(" parameters")[0]
    q = _run("quantize", "--model", str(model), "--to", "int8", "--out", "q8", cwd=tmp_path)
    assert q.returncode == 0, q.stderr[-2000:]
    r = _run("convert", "q8", "q8hf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "int8 linears, float32 elsewhere" in r.stdout, r.stdout
    assert params == "1.3M" and f" MiB, {params} parameters" in r.stdout, (plain.stdout, r.stdout)


def test_demo_next_lines_run_from_any_folder(tmp_path):
    """`llamalab demo` printed `.venv/bin/llamalab ...` and `train configs/shakespeare.toml`, which only run
    from the repo root: each printed line's program must exist from where the demo ran, and run as printed."""
    import shlex
    import shutil

    env = dict(os.environ, OMP_NUM_THREADS="1", PATH="/usr/bin:/bin")  # llamalab not on PATH
    r = subprocess.run([sys.executable, "-m", "llamalab", "demo", "--skip-train"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    commands = [shlex.split(ln, comments=True) for ln in lines[lines.index("Next, try:") + 1:] if ln.strip()]
    assert commands and all("configs/" not in " ".join(c) for c in commands), commands
    for argv in commands:
        program = argv[0]
        assert shutil.which(program, path=env["PATH"]) or (tmp_path / program).exists(), argv
    info = next(c for c in commands if c[1] == "info")
    done = subprocess.run(info, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0 and "8030.3M parameters" in done.stdout, done.stderr[-2000:]
