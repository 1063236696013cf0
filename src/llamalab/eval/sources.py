"""Where evaluation text comes from: a file, a folder, a JSONL file, a bundled corpus's held-out split,
or strings given directly — always as a list of :class:`llamalab.data.corpora.Document`.

The bundled corpora (``shakespeare``, ``tang``, ``python``) are read and cleaned by
:mod:`llamalab.data.corpora`, and evaluation uses exactly the validation documents its split holds out
from training (``split_documents``, ``val_fraction`` of the characters), so a model trained with
``llamalab train`` on a corpus is scored on text it never saw. A path is scored whole unless a
split is asked for (then it is the split training takes of that path), and a training run dir
names its own corpus and ``val_fraction`` in ``train_config.toml`` (:func:`run_validation`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import tomllib

from llamalab.data.corpora import BUILTIN_CORPORA, Document, load_documents, split_documents
from llamalab.errors import LlamalabError

DEFAULT_VAL_FRACTION = 0.05
SPLITS = ("validation", "train", "all")


def _split(name: str, docs: list[Document], split: str, val_fraction: float) -> tuple[str, list[Document]]:
    if split not in SPLITS:
        raise LlamalabError(f"split must be validation, train or all, got {split!r}")
    if split == "all":
        return name, docs
    train, val = split_documents(docs, val_fraction)
    chosen = val if split == "validation" else train
    if not chosen:
        raise LlamalabError(f"{name}: its {split} split is empty ({len(docs)} document(s), val_fraction "
                            f"{val_fraction}); score all of it with split 'all'")
    return f"{name}:{split}", chosen


def documents(source: str | Path | Sequence[str] | Sequence[Document], split: str | None = None,
              val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[str, list[Document]]:
    """(label, documents) for a corpus name, a path, or a list of strings / documents.

    ``split`` is ``validation``, ``train`` or ``all``; None (the default) means ``validation`` for a
    bundled corpus and ``all`` for a path. A split of a path is the one ``llamalab train`` holds out
    when trained on that path (:func:`llamalab.data.corpora.split_documents`). The label says what was
    taken: ``shakespeare:validation``, ``notes.txt:train``, ``notes.txt`` (all of it).
    """
    if isinstance(source, (list, tuple)):
        docs = [d if isinstance(d, Document) else Document(f"text:{i}", str(d)) for i, d in enumerate(source)]
        if not docs:
            raise LlamalabError("no texts to evaluate")
        return "texts", docs
    name = str(source)
    if name in BUILTIN_CORPORA:
        return _split(name, load_documents(name), split or "validation", val_fraction)
    path = Path(name).expanduser()
    if not path.exists():
        raise LlamalabError(f"no such text source: {name} (a file, folder, .jsonl, or one of "
                            f"{', '.join(BUILTIN_CORPORA)})")
    return _split(path.name or name, load_documents(path), split or "all", val_fraction)


def training_run_dir(model: str | Path) -> Path | None:
    """The llamalab training run a model path belongs to (RUN, RUN/final, RUN/checkpoints/step_N), or None."""
    p = Path(model).expanduser()
    if not p.is_dir():
        return None
    for d in (p, p.parent, p.parent.parent):
        if (d / "train_config.toml").is_file():
            return d
    return None


def _heldout_record(run_dir: Path) -> dict:
    """``heldout.json`` (written by training: corpus, val_fraction, val_doc_ids), or {} when absent/unreadable."""
    from llamalab.jsonio import read_json_object

    path = run_dir / "heldout.json"
    if not path.is_file():
        return {}
    try:
        return read_json_object(path)
    except (LlamalabError, OSError):
        return {}


def run_data(run_dir: Path) -> tuple[str, float]:
    """(corpus, val_fraction) a training run was trained on: from its heldout.json, else train_config.toml."""
    record = _heldout_record(run_dir)
    try:
        if isinstance(record.get("corpus"), str) and isinstance(record.get("val_fraction"), (int, float)):
            corpus, val_fraction = record["corpus"], float(record["val_fraction"])
        else:
            data = tomllib.loads((run_dir / "train_config.toml").read_text(encoding="utf-8"))["data"]
            corpus, val_fraction = str(data["corpus"]), float(data.get("val_fraction", DEFAULT_VAL_FRACTION))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise LlamalabError(f"{run_dir}/train_config.toml does not say what the run was trained on ({e}); "
                            "pass --data") from None
    if corpus not in BUILTIN_CORPORA and not Path(corpus).expanduser().exists():
        raise LlamalabError(f"{run_dir} was trained on {corpus}, which is not found from here; pass --data")
    return corpus, val_fraction


def run_validation(run_dir: Path) -> tuple[str, list[Document]]:
    """The documents a training run held out for validation: its own corpus and val_fraction."""
    corpus, val_fraction = run_data(run_dir)
    label, docs = documents(corpus, "validation", val_fraction)
    recorded = _heldout_record(run_dir).get("val_doc_ids")
    if isinstance(recorded, list) and recorded and [d.doc_id for d in docs][:len(recorded)] != recorded:
        print(f"warning: {corpus} has changed since {run_dir} was trained: its validation documents now differ "
              "from those training held out", file=sys.stderr)
    return label, docs
