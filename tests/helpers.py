"""Builders shared by the tests (importable as plain functions; conftest.py wraps the common ones as fixtures).

* :func:`make_tokenizer`: the one small byte-level BPE tokenizer with a ChatML template, trained here in
  milliseconds on :data:`WORDS` (every line a test prompts with);
* :func:`tiny_llama` / :func:`save_chat_model`: a random-init tiny Llama for a tokenizer (in memory, or
  saved with its tokenizer as an HF dir);
* :func:`rand_llama` / :func:`reference_greedy`: the tokenizer-less random model the decode-path tests
  share, and the plain cache-free greedy loop their expectations come from;
* :func:`llamalab_cli`: the command line in a new process;
* :func:`write_corpus` / :func:`tiny_run_cfg` / :func:`train_finished` / :func:`copy_run` /
  :func:`rewrite_manifest`: a tiny ``llamalab train`` run's corpus, config, the finished run, a throw-away
  copy of it, and a checkpoint manifest recomputed after its files were changed;
* :func:`wait_until` / :func:`free_port` / :func:`llamalab_serve`: a ``llamalab serve`` process on a free
  loopback port, up before the block runs and stopped after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHATML_TURNS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
CHATML = CHATML_TURNS + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
# ids 0..3, in this order: <|endoftext|> and <|im_end|> are both stop tokens (ids 0 and 2)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")
WORDS = (  # no Chinese: Chinese characters stay single-byte tokens, 3 per character
    "the quick brown fox jumps over the lazy dog",
    "The quick brown fox jumps over the lazy dog.",
    "hello world, how are you today? fine, thanks.",
    "Hello world, hello llama!",
    "to be or not to be, that is the question",
    "To be, or not to be, that is the question.",
    "all the world's a stage, and all the men and women merely players",
    "a rose by any other name would smell as sweet",
    "A stop word: STOP here and nowhere else.",
    "user assistant system hello world what is the capital of france paris once upon a time there was a king",
)
VOCAB_SIZE = 420


def make_tokenizer(corpus: Sequence[str] = WORDS, *, vocab_size: int = VOCAB_SIZE, bos_token: str | None = None,
                   eos_token: str = "<|im_end|>", chat_template: str | None = CHATML):
    """A fresh byte-level BPE tokenizer (specials :data:`SPECIALS`, a ChatML template, no BOS added)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llamalab.tokenization.tokenizer import Tokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(corpus), trainer)
    return Tokenizer.from_hf(backend, bos_token=bos_token, eos_token=eos_token, chat_template=chat_template)


def tiny_llama(tok, *, seed: int = 0, **config: Any):
    """A random-init tiny Llama (eval mode) sized for ``tok``; ``config`` overrides the LlamaConfig fields."""
    from llamalab import Llama, LlamaConfig

    kw: dict[str, Any] = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, n_layers=2,
                              n_heads=4, n_kv_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id)
    kw.update(config)
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**kw)).eval()


def save_chat_model(d: Path, tok=None, **config: Any) -> Path:
    """:func:`tiny_llama` (tied embeddings, rope_theta 1000) and its tokenizer, saved as an HF dir ``d``."""
    tok = tok or make_tokenizer()
    tiny_llama(tok, **{"rope_theta": 1000.0, "tie_word_embeddings": True, **config}).save_pretrained(d)
    tok.save(d)
    return d


def server_tiny(context: int = 192):
    """(model, tok) of the server tests: the shared tokenizer with ``<|endoftext|>`` as EOS (so ``<|im_end|>``
    is a stop token that is not EOS) and a tiny model with a wide init (greedy text that varies)."""
    tok = make_tokenizer(eos_token="<|endoftext|>")
    return tiny_llama(tok, max_position_embeddings=context, initializer_range=0.1), tok


def rand_llama():
    """The tokenizer-less random model (vocab 101, context 96, seed 1) of the decode-path tests."""
    from llamalab import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, n_layers=3, n_heads=4, n_kv_heads=2,
                      max_position_embeddings=96, rope_theta=500.0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(1)
    return Llama(cfg).eval()


def reference_greedy(model, ids: Sequence[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids``, recomputing the whole sequence each step (no cache, no batching)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[-n:]


def llamalab_cli(*args: str, stdin: str | None = None, cwd: Path | None = None, prefix: Sequence[str] = (),
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m llamalab *args`` in a new process (after ``prefix``, e.g. an ``unshare`` wrapper), one
    thread, text output captured."""
    return subprocess.run([*prefix, sys.executable, "-m", "llamalab", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


# --------------------------------------------------------------------------- tiny training runs
def write_corpus(d: Path, docs: int, chars: int) -> Path:
    """The openings (``chars`` characters) of the first ``docs`` Shakespeare plays, one file each, in ``d``."""
    from llamalab.data import corpora

    d.mkdir(parents=True, exist_ok=True)
    for doc in corpora.load_documents("shakespeare")[:docs]:
        (d / f"{doc.doc_id}.txt").write_text(doc.text[:chars])
    return d


def tiny_run_cfg(corpus: Path, out: Path, cache: Path | None = None, name: str = "t", **train_over: Any) -> dict:
    """A ``llamalab train`` config: a 2-layer model, 6 steps (``train_over`` overrides [train]), a checkpoint
    every 2 steps; the token cache in ``cache`` (default ``out/cache``)."""
    t = {"steps": 6, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
         "precision": "fp32"}
    t.update(train_over)
    return {"name": name, "out_dir": str(out), "seed": 0,
            "data": {"corpus": str(corpus), "vocab_size": 300, "cache_dir": str(cache or out / "cache"),
                     "val_fraction": 0.1},
            "model": {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "n_layers": 2, "n_heads": 4,
                      "n_kv_heads": 2, "max_position_embeddings": 64},
            "train": t, "eval": {"every": 0, "tokens": 512, "batch_size": 8},
            "checkpoint": {"every": 2, "keep": 5}, "log": {"every": 1},
            "sample": {"max_new_tokens": 8, "count": 1}}


def train_finished(cfg: dict, root: Path) -> tuple[Path, Path]:
    """(config file, run dir): ``cfg`` trained to the end in this process, its config saved as ``root/cfg.toml``."""
    from llamalab import training

    run = training.train(cfg, progress=False)
    path = root / "cfg.toml"
    path.write_text(training.to_toml(cfg))
    return path, run


def copy_run(finished: tuple[Path, Path], tmp_path: Path, drop_final: bool = False) -> tuple[Path, Path]:
    """(config file, run dir): a copy of a finished run at ``tmp_path/runs/<name>`` (without ``final/`` when
    ``drop_final``) and its config, pointed at that copy, in ``tmp_path/cfg.toml``."""
    from llamalab import training

    config, src = finished
    runs = tmp_path / "runs"
    run = runs / src.name
    shutil.copytree(src, run, symlinks=True)
    if drop_final:
        shutil.rmtree(run / "final")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(training.to_toml(dict(training.load_config(config), out_dir=str(runs))))
    return cfg, run


def rewrite_manifest(ckpt: Path) -> None:
    """Recompute manifest.json over the files now in a checkpoint (what an attacker would do)."""
    files = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size,
                                              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps({"step": 0, "files": files}))


# --------------------------------------------------------------------------- a served model
def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` seconds pass (its last value): a limit, not a speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A running ``llamalab serve`` process: its URL, port, log file and process."""

    url: str
    port: int
    log: Path
    proc: subprocess.Popen
    baseline: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def llamalab_serve(model_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                   preexec_fn: Callable[[], None] | None = None, timeout: float = 120.0) -> Iterator[Served]:
    """``llamalab serve --model model_dir --port <free> *args`` with its output in ``log``; the block runs once
    /health answers 200 (a test failure, with the log, if the process exits or ``timeout`` passes first),
    and the server is stopped with SIGINT (killed if it has not exited 15 s later) after it."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llamalab", "serve", "--model", str(model_dir),
                                 "--port", str(port), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=preexec_fn)
    srv = Served(f"http://127.0.0.1:{port}", port, log, proc)

    def up() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(srv.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(up, timeout=timeout), "the server did not come up:\n" + srv.log_text()
        assert proc.poll() is None, "the server exited:\n" + srv.log_text()
        yield srv
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def loop_model():
    """A one-layer Llama for driving the training loop itself (seeded)."""
    from llamalab.config import LlamaConfig
    from llamalab.model.llama import Llama

    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, n_layers=1, n_heads=2,
                             n_kv_heads=1, max_position_embeddings=32))


def loop_batches():
    """Resumable batches (4 x 8 tokens) over 2,000 seeded random tokens, for :func:`loop_model`."""
    from llamalab.data import corpora as data

    split = data.Split("train", [torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(0))
                                 .numpy().astype("uint16")], 2000, 2000, 2000, 1)
    return data.Batches(split, 4, 8, seed=0)
