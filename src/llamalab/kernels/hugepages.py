"""Weights in transparent huge pages: :func:`place_in_huge_pages`.

Decode reads every weight once per token, so its speed is the speed of streaming the weights from memory.
With 4 KB pages that stream crosses a page every 4 KB, and every page is a TLB entry: a 100 MB model is
25,600 of them against a data TLB of ~1.5-3 K entries, so each page costs a page-table walk and the
hardware prefetchers restart at each page boundary. With 2 MB pages the same model is 50 entries.

Linux gives an anonymous mapping 2 MB pages where the mapping asks for them (``madvise(MADV_HUGEPAGE)``;
``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise`` or ``always``), and torch's allocator does
not ask (it would only for single tensors of 2 MB and more, under ``THP_MEM_ALLOC_ENABLE=1``); a model's
weights are mostly smaller tensors. So :func:`place_in_huge_pages` maps one region for all of a model's
CPU parameters and buffers, advises it, copies each tensor in at a 64-byte-aligned offset in module order
(the order decode reads them), and points the module at the copy (``Module._apply``, so modules that
cache their tensors refresh them). Each copy is its own storage (``torch.frombuffer``), so saving, tied
weights, optimizers and ``.to()`` see ordinary tensors; the region lives as long as any of them.

``llamalab.load`` calls it for CPU models; ``LLAMALAB_HUGEPAGES=0`` switches it off. Where the kernel
does not offer huge pages (another OS, THP ``never``) it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # every tensor starts on a cache line
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this process can ask for huge pages: Linux with THP ``madvise`` or ``always``, not switched off."""
    if os.environ.get("LLAMALAB_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = _THP_MODE.read_text()
    except OSError:
        return False
    return "[never]" not in mode


def _own_storage(t: torch.Tensor) -> bool:
    """A CPU tensor that is the whole of its storage (so a copy elsewhere changes no other tensor's view)."""
    return (t.device.type == "cpu" and t.numel() > 0 and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def place_in_huge_pages(model: nn.Module) -> int:
    """Move `model`'s CPU parameters and buffers (each the whole of its storage) into one huge-page region.

    Values, dtypes, shapes, ``requires_grad`` and tied weights are unchanged. Returns the bytes placed (0 where
    :func:`available` is false or there is nothing to place)."""
    if not available():
        return 0
    tensors: dict[int, torch.Tensor] = {}
    for t in (*model.parameters(), *model.buffers()):
        if _own_storage(t):
            tensors.setdefault(t.data_ptr(), t)
    total = sum(_padded(t.numel() * t.element_size()) for t in tensors.values())
    if total == 0:
        return 0
    # private anonymous memory (a shared mapping would be shmem, with THP settings of its own); no page is
    # touched before the copies, so each 2 MB of it is faulted in as one huge page
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    start = offset = (-base) % HUGE_PAGE  # the first 2 MB boundary
    end = start + total
    placed: dict[int, torch.Tensor] = {}

    def place(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        if base + start <= t.data_ptr() < base + end:
            return t  # already placed (a tied weight met again)
        if t.data_ptr() in placed:
            return placed[t.data_ptr()]
        n = t.numel() * t.element_size()
        if not _own_storage(t) or offset + n > end:
            return t
        copy = torch.frombuffer(region, dtype=torch.uint8, count=n, offset=offset).view(t.dtype).view(t.shape)
        copy.copy_(t)
        placed[t.data_ptr()] = copy
        offset += _padded(n)
        return copy

    with torch.no_grad():
        model._apply(place)
    return offset - start
