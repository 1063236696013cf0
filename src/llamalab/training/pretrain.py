"""The from-scratch recipe behind ``llamalab train``: config -> tokenizer -> shards -> model -> loop -> run dir.

A **run dir** is ``out_dir/name``; the name is a plain directory name (no ``/`` or ``\\``, not ``.`` or
``..``) that stays inside ``out_dir``. A directory is a run when it holds ``train_config.toml`` (the
marker); ``--overwrite`` deletes only such a directory, never anything else.

**Resume** continues what the run was trained on: the base config is the run's own
``train_config.toml`` (a config file given again must agree with it), the tokenizer is the one saved
in the checkpoint, and overrides may lengthen the run or change logging, evaluation, checkpointing or
devices, but an override that changes the model, the data or the tokenizer (:data:`IDENTITY_KEYS`,
the ``[model]`` section) is a one-line error. A finished run says so and re-exports ``final/`` when
it is missing. ``heldout.json`` records the validation split for ``llamalab eval RUN``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib
import torch
import torch.nn.functional as F
from torch import nn

from llamalab.errors import ConfigError, LlamalabError
from llamalab.formats.files import atomic_write_text
from llamalab.training.callbacks import standard_callbacks
from llamalab.training.checkpoint import (
    Checkpointer,
    checkpoint_steps,
    latest_valid_checkpoint,
    read_trainer_state,
    remove_path,
    verify_checkpoint,
    write_json_atomic,
)
from llamalab.training.config import load_config, model_config_from, to_toml, validate
from llamalab.training.loop import LoopConfig, model_flops_per_token, train_loop
from llamalab.training.precision import resolve_precision

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.model.llama import Llama
    from llamalab.tokenization.protocol import TokenizerProtocol


RUN_MARKER = "train_config.toml"
# what a run was trained on: changing any of these (or anything in [model]) makes it another run
IDENTITY_KEYS = ("seed", "data.corpus", "data.tokenizer", "data.vocab_size", "data.val_fraction", "train.seq_len")


# =============================================================================================== run dirs
def run_dir_for(cfg: dict) -> Path:
    """``out_dir / name``, after checking that the name is plain and stays inside ``out_dir``."""
    name, out = cfg["name"], Path(cfg["out_dir"])
    if name in ("", ".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        raise ConfigError(f"run name {name!r} must be a plain directory name (no '/' or '\\', no control "
                          "characters, not '.' or '..')")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise ConfigError(f"run name {name[:40]!r}... is longer than a directory name can be (255 bytes)")
    run = out / name
    if run.resolve().parent != out.resolve():
        raise ConfigError(f"run name {name!r} resolves outside {out} (to {run.resolve()})")
    return run


def is_run_dir(path: Path) -> bool:
    return (path / RUN_MARKER).is_file()


def check_writable(directory: Path) -> None:
    """Raise a one-line error when files cannot be created in ``directory`` (read-only or full)."""
    probe = directory / f".llamalab_write_probe_{os.getpid()}"
    try:
        remove_path(probe)  # a symlink planted here must not send the probe's bytes outside the run dir
        with probe.open("xb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise LlamalabError(f"cannot write to the run dir {directory} ({e.strerror or e}); nothing was "
                            "changed") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _normalized(cfg: dict) -> dict:
    """The config with corpus and tokenizer paths made absolute (builtin corpus names stay names)."""
    from llamalab.data.corpora import BUILTIN_CORPORA

    cfg = copy.deepcopy(cfg)
    d = cfg["data"]
    if str(d["corpus"]) not in BUILTIN_CORPORA:
        d["corpus"] = str(Path(d["corpus"]).expanduser().resolve())
    if d["tokenizer"] != "bpe":
        d["tokenizer"] = str(Path(d["tokenizer"]).expanduser().resolve())
    return cfg


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def identity_difference(saved: dict, requested: dict) -> str | None:
    """The first thing ``requested`` changes about what the run was trained on, as a sentence (None: same)."""
    saved, requested = _normalized(saved), _normalized(requested)
    for key in IDENTITY_KEYS:
        if _get(saved, key) != _get(requested, key):
            return f"{key} = {_get(requested, key)!r}, but the run was trained with {_get(saved, key)!r}"

    def model(c: dict) -> dict:
        m = {k: v for k, v in c["model"].items() if v is not None}
        m.setdefault("preset", "tiny")
        return m

    a, b = model(saved), model(requested)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"model.{key} = {b.get(key)!r}, but the run was trained with {a.get(key)!r}"
    return None


def resume_config(run_dir: Path, requested: dict, config_given: bool, overrides: Any, kwargs: dict) -> dict:
    """The config a resumed run continues with: its own saved config plus the allowed overrides."""
    saved_path = run_dir / RUN_MARKER
    try:
        saved = load_config(tomllib.loads(saved_path.read_text(encoding="utf-8")))
    except (ValueError, RecursionError) as e:  # bad TOML or UTF-8, a 5000-digit integer, nesting
        raise ConfigError(f"{saved_path}: unreadable ({str(e)[:200] or type(e).__name__})") from None
    cfg = requested if config_given else load_config(saved, overrides, **kwargs)
    cfg["name"], cfg["out_dir"] = requested["name"], requested["out_dir"]
    problem = identity_difference(saved, cfg)
    if problem:
        hint = f"; or resume without the config file (llamalab train --resume --name {run_dir.name})" \
            if config_given else ""
        raise ConfigError(f"cannot resume {run_dir}: {problem}; that would be another run (start it with "
                          f"another --name){hint}")
    cfg["data"]["corpus"], cfg["data"]["tokenizer"] = saved["data"]["corpus"], saved["data"]["tokenizer"]
    return cfg


# =============================================================================================== recipe parts
def build_tokenizer(cfg: dict, resume_from: Path | None = None):
    """(tokenizer, documents or None): the checkpoint's on resume, a given one, or BPE trained on the train split."""
    from llamalab.data import corpora as data
    from llamalab.tokenization import bpe
    from llamalab.tokenization.tokenizer import load_tokenizer

    d = cfg["data"]
    if resume_from is not None and (resume_from / "tokenizer.json").exists():
        return load_tokenizer(resume_from), None
    if d["tokenizer"] != "bpe":
        p = Path(d["tokenizer"])
        if p.suffix == ".gguf":
            from llamalab.loading import load

            _, tok = load(p)
        else:
            tok = load_tokenizer(p)
        if tok is None:
            raise ConfigError(f"no tokenizer found in {p}")
        return tok, None
    docs = data.load_documents(d["corpus"])
    train_docs, _ = data.split_documents(docs, d["val_fraction"])
    key = data.corpus_key(d["corpus"], d["val_fraction"])
    tok = bpe.cached_tokenizer(key, [doc.text for doc in train_docs], d["vocab_size"], d["cache_dir"])
    return tok, docs


def make_eval_fn(corpus, seq_len: int, batch_size: int, max_tokens: int, ctx: Any) -> Callable[[nn.Module], dict]:
    from llamalab.data.corpora import iter_eval_batches

    def eval_fn(model: Llama) -> dict:
        total = torch.zeros(2, dtype=torch.float64)
        for x, y in iter_eval_batches(corpus.val, seq_len, batch_size, max_tokens, ctx.rank, ctx.world):
            logits = model(x.to(ctx.device))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(ctx.device).reshape(-1),
                                   reduction="sum")
            total += torch.tensor([float(loss), y.numel()], dtype=torch.float64)
        total = ctx.all_reduce_sum(total)
        if total[1] == 0:
            return {}
        val_loss = float(total[0] / total[1])
        return {"val_loss": val_loss, "val_bpc": corpus.bits_per_char(val_loss)}

    return eval_fn


def write_heldout_record(run_dir: Path, cfg: dict, corpus: Any) -> None:
    """``heldout.json``: the validation split of this run, as ``llamalab eval RUN`` scores it."""
    d = cfg["data"]
    record = {"corpus": d["corpus"], "val_fraction": d["val_fraction"], "split": "validation",
              "tokenizer": "final/ (the run's own tokenizer)", "shard_dir": str(Path(corpus.directory).resolve()),
              "val_shards": [str((Path(corpus.directory) / f).resolve()) for f in corpus.meta["val"]["files"]],
              "dtype": corpus.meta["dtype"], "n_tokens": corpus.val.n_tokens, "n_chars": corpus.val.n_chars,
              "n_bytes": corpus.val.n_bytes, "n_docs": corpus.val.n_docs,
              "val_doc_ids": corpus.meta.get("val_doc_ids", [])}
    write_json_atomic(run_dir / "heldout.json", record)


def write_samples(model: Llama, tok: TokenizerProtocol, cfg: dict, path: Path,
                  heldout_prompts: list[str] | None = None) -> str:
    """Sample ``sample.count`` texts; prompts from the config, else from the corpus's held-out text."""
    from llamalab.generation.generate import generate

    s = cfg["sample"]
    model.eval()
    texts = []
    prompts = list(s["prompts"]) or list(heldout_prompts or []) or ["\n"]
    for i in range(s["count"]):
        prompt = prompts[i % len(prompts)]
        out = generate(model, tok, prompt, max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                       top_k=s["top_k"], seed=cfg["seed"] + i)
        texts.append(f"--- sample {i + 1} (prompt {prompt!r})\n{prompt}{out}\n")
    text = "\n".join(texts)
    atomic_write_text(path, text)
    return text


def export_final(run_dir: Path, ckpt: Path) -> Path:
    """Copy a checkpoint's HF part to ``run_dir/final`` (via ``.tmp_final``, renamed when complete)."""
    final, tmp = run_dir / "final", run_dir / ".tmp_final"
    remove_path(tmp)
    shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns("state", "rng_rank*", "manifest.json"))
    remove_path(final)  # a symlink there is unlinked, never followed
    os.replace(tmp, final)
    return final


def _finish(run_dir: Path, cfg: dict, ckpt: Path, summary: dict, say: Callable, heldout: list[str] | None,
            val: dict) -> None:
    """final/, summary.json and samples.txt from the last checkpoint (rank 0)."""
    from llamalab.loading import load

    final = export_final(run_dir, ckpt)
    write_json_atomic(run_dir / "summary.json", summary)
    final_model, final_tok = load(final)
    text = write_samples(final_model, final_tok, cfg, run_dir / "samples.txt", heldout)
    say(f"\ndone: {summary['step']} steps in {summary.get('minutes', 0.0):.1f} min"
        + (f", val loss {val['val_loss']:.3f}, {val['val_bpc']:.3f} bits/char" if "val_bpc" in val else ""))
    say(text)
    say(f"run dir: {run_dir}\n  loss curve: {run_dir / 'loss.png'}\n  samples:    {run_dir / 'samples.txt'}\n"
        f"  model:      {final}  (llamalab generate --model {run_dir} --prompt ...)")


def _already_complete(run_dir: Path, cfg: dict, ckpt: Path, state: dict, say: Callable) -> Path:
    step = int(state["step"])
    if (run_dir / "final" / "config.json").is_file() and (run_dir / "summary.json").is_file():
        say(f"run {run_dir} is already complete ({step} of {cfg['train']['steps']} steps); the model is in "
            f"{run_dir / 'final'} (pass a larger --steps to train further)")
        return run_dir
    check_writable(run_dir)
    say(f"run {run_dir} is already complete ({step} of {cfg['train']['steps']} steps); re-exporting "
        f"{run_dir / 'final'} from {ckpt}")
    try:  # the summary of the session that finished the run, when it got that far
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError, RecursionError):
        summary = None
    if not isinstance(summary, dict) or summary.get("step") != step:
        summary = {"step": step, "minutes": round(float(state.get("elapsed_s", 0.0)) / 60, 2)}
    _finish(run_dir, cfg, ckpt, summary, say, None, {})
    return run_dir


def heldout_prompts(split: Any, tok: TokenizerProtocol, count: int, chars: int = 24) -> list[str]:
    """Prompts cut from the held-out text: the start of a line at evenly spaced validation windows."""
    import numpy as np

    total = split.n_tokens
    if total == 0 or count <= 0:
        return []
    ends = np.cumsum([len(s) for s in split.shards])
    prompts = []
    for i in range(count):
        pos = int(i * max(1, total - 64) / max(1, count))
        k = int(np.searchsorted(ends, pos, side="right"))
        offset = pos - (int(ends[k - 1]) if k else 0)
        text = tok.decode([int(t) for t in split.shards[k][offset:offset + 64]])
        lines = [ln for ln in text.split("\n") if ln.strip()]
        line = (lines[1] if len(lines) > 2 else (lines[0] if lines else "")).strip()
        if line:
            prompts.append(line[:chars])
    return prompts


# =============================================================================================== the recipe
def train(config: str | Path | dict | None = None, overrides: list[str] | dict | None = None, *,
          resume: bool = False, overwrite: bool = False, progress: bool = True, **kwargs: Any) -> Path:
    """Train a Llama from scratch as a config describes; returns the run dir (see :func:`train_loop`)."""
    from llamalab.training import distributed

    requested = load_config(config, overrides, **kwargs)
    run_dir = run_dir_for(requested)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    say = print if rank0 else (lambda *a, **k: None)
    resume_from = None
    if resume and is_run_dir(run_dir):
        cfg = resume_config(run_dir, requested, config is not None, overrides, kwargs)
        skipped: list[str] = []
        resume_from = latest_valid_checkpoint(run_dir, skipped.append)
        steps = checkpoint_steps(run_dir)
        if resume_from is None and steps:
            newest = steps[-1][1]
            raise LlamalabError(f"no usable checkpoint in {run_dir / 'checkpoints'} to resume from ({len(steps)} "
                                f"checked; the newest, {newest.name}: {verify_checkpoint(newest)}); nothing was "
                                "changed")
        for msg in skipped:
            say(msg, file=sys.stderr)
    else:
        cfg = requested
        if run_dir.exists() and not is_run_dir(run_dir) and any(run_dir.iterdir()):
            raise LlamalabError(f"{run_dir} exists and is not a llamalab run (no {RUN_MARKER}): not "
                                f"{'deleting' if overwrite else 'writing into'} it; choose another --name")
        if not resume and checkpoint_steps(run_dir) and not overwrite:
            raise LlamalabError(f"run dir {run_dir} already has checkpoints: pass --resume to continue it, "
                                "--overwrite to start again, or choose another name (--name ...)")
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed.launched_by_torchrun() else 1
    validate(cfg, world)
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        if int(state["step"]) >= cfg["train"]["steps"]:
            return _already_complete(run_dir, cfg, resume_from, state, say) if rank0 else run_dir
    if run_dir.is_dir() and (resume or not overwrite):
        check_writable(run_dir)
    dcfg, t = cfg["distributed"], cfg["train"]
    ctx = distributed.init(dcfg["strategy"], t["device"], dcfg["backend"], dcfg["timeout_s"])
    try:
        return _train(cfg, ctx, run_dir, resume, overwrite, progress, resume_from)
    finally:
        distributed.shutdown(ctx)


def _train(cfg: dict, ctx: Any, run_dir: Path, resume: bool, overwrite: bool, progress: bool,
           resume_from: Path | None) -> Path:
    from llamalab.data import corpora as data
    from llamalab.model.llama import Llama
    from llamalab.training import distributed

    t, d, dcfg = cfg["train"], cfg["data"], cfg["distributed"]
    if t["threads"] > 0:
        torch.set_num_threads(t["threads"])
    say = print if ctx.is_main else (lambda *a, **k: None)
    if ctx.is_main and overwrite and not resume and is_run_dir(run_dir):
        shutil.rmtree(run_dir)
    # tokenizer + shards: rank 0 first (fills the caches), the others then read them
    tok = corpus = None
    for turn in (0, 1):
        if (turn == 0) == ctx.is_main:
            tok, docs = build_tokenizer(cfg, resume_from)
            corpus = data.prepare(d["corpus"], tok, val_fraction=d["val_fraction"], cache_dir=d["cache_dir"],
                                  progress=progress and ctx.is_main, documents=docs)
        ctx.barrier()
    assert tok is not None and corpus is not None
    mc = model_config_from(cfg, tok.vocab_size, tok.bos_token_id, tok.eos_token_id)
    precision = resolve_precision(t["precision"], ctx.device)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_MARKER, to_toml(_normalized(cfg)))
        write_heldout_record(run_dir, _normalized(cfg), corpus)
        say(f"run dir: {run_dir}  |  corpus {d['corpus']}: {corpus.train.n_tokens:,} train tokens, "
            f"{corpus.val.n_tokens:,} val tokens ({corpus.val.n_chars:,} chars), vocab {tok.vocab_size}")
        if corpus.val.n_tokens <= t["seq_len"]:
            say(f"warning: the validation split holds {corpus.val.n_tokens} tokens, fewer than one window of "
                f"{t['seq_len'] + 1}: there will be no validation loss (add text or raise data.val_fraction)")
    torch.manual_seed(cfg["seed"])
    model = Llama(mc)
    model.init_weights(seed=cfg["seed"])
    model.to(ctx.device)
    n_params = model.num_parameters()
    fpt = model_flops_per_token(model, t["seq_len"])
    say(f"model: {n_params / 1e6:.2f}M parameters ({mc.n_layers} layers, d={mc.hidden_size}, {mc.n_heads}/"
        f"{mc.n_kv_heads} heads), precision {precision}, {ctx.world} process(es)"
        + (f" [{ctx.strategy}, {ctx.backend}]" if ctx.distributed else ""))
    wrapped = distributed.wrap(model, ctx, bf16=precision == "bf16",
                               activation_checkpointing=dcfg["activation_checkpointing"],
                               compile_per_block=dcfg["compile_blocks"])
    micro_global = t["batch_size"] // t["grad_accum"]
    batches = data.Batches(corpus.train, micro_global, t["seq_len"], seed=cfg["seed"], rank=ctx.rank,
                           world=ctx.world)
    loop = LoopConfig(steps=t["steps"], lr=t["lr"], min_lr=t["min_lr"], warmup_steps=t["warmup_steps"],
                      weight_decay=t["weight_decay"], beta1=t["beta1"], beta2=t["beta2"], grad_clip=t["grad_clip"],
                      grad_accum=t["grad_accum"], precision=precision, compile=t["compile"],
                      eval_every=cfg["eval"]["every"], ckpt_every=cfg["checkpoint"]["every"],
                      log_every=cfg["log"]["every"], seed=cfg["seed"], max_minutes=t["max_minutes"])
    eval_fn = make_eval_fn(corpus, t["seq_len"], cfg["eval"]["batch_size"], cfg["eval"]["tokens"], ctx) \
        if corpus.val.n_tokens > t["seq_len"] else None
    checkpointer = Checkpointer(run_dir, ctx, tokenizer=tok, keep=cfg["checkpoint"]["keep"], model_config=mc,
                                extra={"n_params": n_params})
    result = train_loop(wrapped, batches, loop, eval_fn=eval_fn, checkpointer=checkpointer,
                        resume=resume_from if resume_from is not None else resume, ctx=ctx,
                        flops_per_token=fpt, tokens_per_step=t["batch_size"] * t["seq_len"],
                        callbacks=standard_callbacks(run_dir, progress=progress))
    if ctx.is_main:
        if result.last_checkpoint is None:
            raise LlamalabError(f"no checkpoint was written in {run_dir}")
        summary = {"step": result.step, "minutes": round(result.minutes, 2),
                   "tokens_per_s": round(result.tokens_per_s), **{k: round(v, 4) for k, v in result.val.items()}}
        prompts = heldout_prompts(corpus.val, tok, cfg["sample"]["count"]) if not cfg["sample"]["prompts"] else None
        _finish(run_dir, cfg, result.last_checkpoint, summary, say, prompts, result.val)
    ctx.barrier()
    return run_dir
