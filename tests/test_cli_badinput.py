"""Bad command-line input gives one line `llamalab <cmd>: error: …` and exit 2, never a traceback; and every
command does what it prints (model positional or --model, chat's shown defaults, info's dtypes, eval's split).

Everything runs through the CLI in a subprocess, on a tiny random model saved to a temporary dir.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
GARBAGE = bytes(range(128, 256)) * 4 + b"\xff\xfe\x00\x01"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    tok = make_tokenizer(bos_token="<|endoftext|>")
    model = tiny_llama(tok, hidden_size=32, intermediate_size=64)
    model.save_pretrained(root / "m")
    tok.save(root / "m")
    model.save_pretrained(root / "bf16", dtype=torch.bfloat16)
    tok.save(root / "bf16")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: the quick brown fox jumps over the lazy dog.\n" * 4)
    run = root / "run"
    model.save_pretrained(run / "final")
    tok.save(run / "final")
    (run / "train_config.toml").write_text(f'[data]\ncorpus = "{corpus}"\nval_fraction = 0.25\n')
    (root / "binary.txt").write_bytes(GARBAGE)
    return {"model": str(root / "m"), "bf16": str(root / "bf16"), "run": str(run), "corpus": corpus,
            "binary": str(root / "binary.txt"), "root": root}


def _run(*args: str, stdin: bytes | None = None, env: dict | None = None, stdout=subprocess.PIPE,
         ) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    full_env.pop("LLAMALAB_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "llamalab", *args], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=180, env=full_env, cwd=ROOT)


def _one_line_error(r: subprocess.CompletedProcess, command: str, *words: str) -> str:
    err = r.stderr.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    assert r.returncode == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"llamalab {command}: error:"), err
    for w in words:
        assert w in lines[0], err
    return lines[0]


def test_generate_binary_stdin(dirs):
    _one_line_error(_run("generate", dirs["model"], "-n", "2", stdin=GARBAGE), "generate", "UTF-8")


@pytest.mark.parametrize("env", [{}, {"LC_ALL": "C", "LANG": "C"}])
def test_chat_binary_stdin_any_locale(dirs, env):
    _one_line_error(_run("chat", dirs["model"], "-n", "2", stdin=GARBAGE + b"\n", env=env), "chat", "UTF-8")


def test_generate_utf8_stdin_under_c_locale(dirs):
    r = _run("generate", dirs["model"], "-n", "2", stdin="héllo 明月\n".encode(), env={"LC_ALL": "C", "LANG": "C"})
    assert r.returncode == 0, r.stderr.decode()


def test_generate_to_an_ascii_only_stdout(dirs):
    r = _run("generate", dirs["model"], "-p", "明月", "-n", "4", env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode()


@pytest.mark.parametrize("args, words", [
    (["--seed", str(2**70)], ["--seed"]),
    (["--seed", "-1"], ["--seed"]),
    (["--device", "tpu"], ["tpu"]),
    (["--draft-layers", "0"], ["--draft-layers"]),
    (["--draft-layers", "2"], ["--draft-layers", "2 layers"]),
    (["--max-new-tokens", "zero"], ["--max-new-tokens"]),
    (["--no-such-option"], ["--no-such-option"]),
])
def test_generate_bad_options(dirs, args, words):
    _one_line_error(_run("generate", dirs["model"], "-p", "Hi", *args), "generate", *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(dirs):
    _one_line_error(_run("generate", dirs["model"], "-p", "Hi", "--device", "cuda"), "generate", "CUDA")
    _one_line_error(_run("eval", dirs["model"], "--device", "cuda"), "eval", "CUDA")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_generate_to_a_full_disk(dirs):
    with open("/dev/full", "wb") as full:
        r = _run("generate", dirs["model"], "-p", "Hi", "-n", "4", stdout=full)
    _one_line_error(r, "generate", "No space left")


def test_non_utf8_command_line_argument(dirs):
    r = subprocess.run([sys.executable, "-m", "llamalab", "generate", dirs["model"], "-p", b"\xff\xfe"],
                       capture_output=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    _one_line_error(r, "generate", "--prompt", "UTF-8")


def test_writing_where_no_file_can_be_is_one_line(dirs):
    blocker = dirs["root"] / "a_file"
    blocker.write_text("x")
    _one_line_error(_run("convert", dirs["model"], str(blocker / "out")), "convert", "a_file")


def test_eval_binary_data(dirs):
    _one_line_error(_run("eval", dirs["model"], "--data", dirs["binary"]), "eval", "UTF-8")


def test_info_negative_context(dirs):
    _one_line_error(_run("info", dirs["model"], "--context", "-1"), "info", "--context")


def test_model_positional_or_option(dirs):
    pos = _run("generate", dirs["model"], "-p", "Hi", "-n", "4")
    opt = _run("generate", "--model", dirs["model"], "-p", "Hi", "-n", "4")
    assert pos.returncode == 0 and opt.returncode == 0, pos.stderr.decode() + opt.stderr.decode()
    assert pos.stdout == opt.stdout
    _one_line_error(_run("generate", dirs["model"], "-m", dirs["bf16"], "-p", "Hi"), "generate", "two models")
    _one_line_error(_run("generate", "-p", "Hi"), "generate", "which model")


def test_smollm2_shape_preset_is_named_as_such():
    line = _one_line_error(_run("convert", "smollm2-135m", "out.gguf"), "convert", "random-init", "`smollm2`")
    assert "no such model" not in line
    r = _run("info", "smollm2-135m")
    assert r.returncode == 0 and b"random-init shape preset" in r.stdout and b"smollm2" in r.stdout


@pytest.mark.slow
def test_convert_bundled_smollm2(tmp_path):
    out = tmp_path / "smollm2.gguf"
    r = _run("convert", "smollm2", str(out), "--type", "f16")
    assert r.returncode == 0, r.stderr.decode()
    assert out.stat().st_size > 200 * 2**20 and out.read_bytes()[:4] == b"GGUF"


def test_chat_help_shows_the_defaults_it_uses():
    from llamalab.cli import chat
    from llamalab.cli.main import build_parser

    r = _run("chat", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.decode().split("options:", 1)[1].split())  # the option list, not the usage line
    shown_n = int(re.search(r"-n MAX_NEW_TOKENS [^(]*\(default (\d+)\)", text).group(1))
    shown_t = float(re.search(r"-t TEMPERATURE [^(]*\(default ([0-9.]+)\)", text).group(1))
    parser, _ = build_parser()
    args = parser.parse_args(["chat", "m"])
    assert (shown_n, shown_t) == (args.max_new_tokens, args.temperature) == (chat.MAX_NEW_TOKENS, chat.TEMPERATURE)
    assert chat.sampling_params(args).temperature == shown_t  # what the replies are sampled with


def test_info_names_the_stored_and_loaded_dtype(dirs):
    r = _run("info", dirs["bf16"], "--json")
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    assert info["loaded_dtype"] == "bfloat16" and info["stored"]["dtypes"] == {"bf16": info["parameters"]}
    assert info["weight_bytes"] == 2 * info["parameters"]
    text = _run("info", dirs["bf16"]).stdout.decode()
    assert "bf16" in text and "bfloat16" in text and "float32" not in text


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_info_counts_quantized_weights_as_parameters(dirs, tmp_path, method):
    import llamalab
    from llamalab.quantization.quantize import quantize_model, save_quantized

    model, tok = llamalab.load(dirs["model"])
    n = model.num_parameters()
    quantize_model(model, method, group_size=32)
    save_quantized(model, tmp_path / method)
    r = _run("info", str(tmp_path / method), "--json")
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    assert info["parameters"] == n and info["quantization"]
    assert info["stored"]["file_bytes"] < 4 * n  # smaller than the float32 weights


@pytest.mark.parametrize("tied", [False, True])
def test_info_of_a_q8_0_gguf_names_its_stored_type(dirs, tmp_path, tied):
    import llamalab
    from llamalab.formats.gguf import save_gguf

    model, tok = llamalab.load(dirs["model"])
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    n = model.num_parameters()
    path = save_gguf(model, tok, tmp_path / "m.gguf", type="q8_0")
    r = _run("info", str(path), "--json")
    assert r.returncode == 0, r.stderr.decode()
    info = json.loads(r.stdout)
    assert info["parameters"] == n and "q8_0" in info["stored"]["dtypes"]
    assert info["stored"]["file_bytes"] == path.stat().st_size
    assert "q8_0" in _run("info", str(path)).stdout.decode()


def test_eval_run_dir_scores_its_own_validation_split(dirs):
    from llamalab.data.corpora import load_documents, split_documents

    r = _run("eval", dirs["run"], "--json", "--max-length", "32")
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)
    _, val = split_documents(load_documents(dirs["corpus"]), 0.25)
    (ppl,) = res["perplexity"]
    assert ppl["source"] == "corpus:validation" and ppl["documents"] == len(val)
    assert "validation split" in res["settings"]["scored"] and "shakespeare" not in r.stdout.decode()


def test_eval_split_of_a_path_is_honoured(dirs):
    from llamalab.data.corpora import load_documents, split_documents

    docs = load_documents(dirs["corpus"])
    _, val = split_documents(docs, 0.05)
    for split, n in (("validation", len(val)), ("all", len(docs)), (None, len(docs))):
        args = ["eval", dirs["model"], "--data", str(dirs["corpus"]), "--max-length", "32", "--max-tokens", "0"]
        r = _run(*args, *(["--split", split] if split else []))
        assert r.returncode == 0, r.stderr.decode()
        header = r.stdout.decode().splitlines()[1]
        assert ("corpus:validation" in header) == (split == "validation") and "every token" in header
        assert re.search(rf"corpus\S*\s+{n}\s", r.stdout.decode()), r.stdout.decode()


def test_eval_progress_is_plain_lines_off_a_terminal(dirs):
    r = _run("eval", dirs["model"], "--data", str(dirs["corpus"]), "--max-length", "32")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "\r" not in err and "100%" in err


def test_max_tokens_zero_means_all_in_api_and_cli(dirs):
    import llamalab
    from llamalab.eval import perplexity

    model, tok = llamalab.load(dirs["model"])
    texts = [p.read_text() for p in sorted(dirs["corpus"].iterdir())]
    assert perplexity(model, tok, texts, max_tokens=0).tokens == perplexity(model, tok, texts).tokens
    r = _run("eval", dirs["model"], "--data", str(dirs["corpus"]), "--max-tokens", "0", "--json")
    assert json.loads(r.stdout)["perplexity"][0]["tokens"] == perplexity(model, tok, str(dirs["corpus"])).tokens


def test_parser_builds_without_torch():
    code = "import sys, llamalab.cli.main; llamalab.cli.main.build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
