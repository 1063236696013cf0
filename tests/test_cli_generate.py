"""`llamalab generate` and `llamalab chat` driven through a subprocess on a tiny local model dir."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_generate import SONG, make_parrot


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = make_parrot()
    d = tmp_path_factory.mktemp("parrot")
    model.save_pretrained(d)
    tok.save(d)
    return d


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "llamalab", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env=env)


def test_generate_streams_and_stops(model_dir):
    r = _run("generate", "--model", str(model_dir), "--prompt", "Hello", "--stop", "明月", "--stats")
    assert r.returncode == 0, r.stderr
    assert SONG.startswith("Hello" + r.stdout.rstrip("\n"))
    assert r.stdout.rstrip("\n").endswith("床前")
    assert "tok/s" in r.stderr and "finish: stop" in r.stderr


def test_generate_sampling_options_and_speculative(model_dir):
    r = _run("generate", "-m", str(model_dir), "-p", "Hello", "-n", "5", "-t", "0.8", "--top-k", "5", "--top-p",
             "0.9", "--min-p", "0.05", "--repetition-penalty", "1.1", "--presence-penalty", "0.1",
             "--frequency-penalty", "0.1", "--logit-bias", "3=-100", "--seed", "1", "--decode-dtype", "float16")
    assert r.returncode == 0, r.stderr
    r2 = _run("generate", "-m", str(model_dir), "-p", "Hello", "--draft-layers", "1", "--stats")
    assert r2.returncode == 0, r2.stderr
    assert "Hello" + r2.stdout.rstrip("\n") == SONG and "acceptance" in r2.stderr


@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--logit-bias", "abc"], "ID=BIAS"),
])
def test_generate_bad_options_one_line(model_dir, args, words):
    r = _run("generate", "--model", str(model_dir), "--prompt", "x", *args)
    assert r.returncode == 2
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_generate_unknown_model_one_line(tmp_path):
    r = _run("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 2 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_chat_from_a_pipe(model_dir):
    r = _run("chat", "--model", str(model_dir), "--system", "Be brief.", "-t", "0", "-n", "8",
             stdin="Hi\n/reset\nHello there\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2  # two replies, nothing after /exit
    r2 = _run("chat", "--model", str(model_dir), "-t", "0", "-n", "8", stdin="Hi\n")
    assert r2.returncode == 0 and len(r2.stdout.splitlines()) == 1
