"""Where evaluation text comes from: a file, a folder, a JSONL file, a bundled corpus's held-out split,
or strings given directly — always as a list of :class:`llamalab.data.Document`.

The bundled corpora (``shakespeare``, ``tang``, ``python``) are read and cleaned by
:mod:`llamalab.data`, and evaluation uses exactly the validation documents its split holds out
from training (``split_documents``, whole documents, ``val_fraction`` of the characters), so a
model trained with ``llamalab train`` on a corpus is scored on text it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llamalab.data import BUILTIN_CORPORA, Document, load_documents, split_documents
from llamalab.errors import LlamalabError

DEFAULT_VAL_FRACTION = 0.05


def documents(source: str | Path | Sequence[str] | Sequence[Document], split: str = "validation",
              val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[str, list[Document]]:
    """(label, documents) for a corpus name, a path, or a list of strings / documents.

    ``split`` applies to the bundled corpora only: ``validation`` (default), ``train`` or ``all``.
    """
    if isinstance(source, (list, tuple)):
        docs = [d if isinstance(d, Document) else Document(f"text:{i}", str(d)) for i, d in enumerate(source)]
        if not docs:
            raise LlamalabError("no texts to evaluate")
        return "texts", docs
    name = str(source)
    if name in BUILTIN_CORPORA:
        docs = load_documents(name)
        if split == "all":
            return name, docs
        train, val = split_documents(docs, val_fraction)
        if split not in ("validation", "train"):
            raise LlamalabError(f"split must be validation, train or all, got {split!r}")
        return f"{name}:{split}", val if split == "validation" else train
    path = Path(name).expanduser()
    if not path.exists():
        raise LlamalabError(f"no such text source: {name} (a file, folder, .jsonl, or one of "
                            f"{', '.join(BUILTIN_CORPORA)})")
    return path.name or name, load_documents(path)
