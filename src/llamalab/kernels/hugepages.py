"""A model's weights in transparent huge pages: fewer TLB misses when a decode step streams them.

A batch-1 decode step reads every weight once, front to back, at the memory's read bandwidth. With 4 KB
pages each 4 KB of weight needs its own TLB entry, and a TLB miss is a page walk (two-dimensional under
a hypervisor, as on cloud machines). With 2 MB pages one entry covers 512 times as much. Linux gives a
region 2 MB pages when it is advised so (``madvise(MADV_HUGEPAGE)``, which works when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``) and is aligned to 2 MB.

:func:`use_huge_pages` copies a model's CPU weights, bit for bit, into one anonymous mapping aligned to
2 MB and so advised. Each tensor keeps a storage of its own (``torch.frombuffer`` over its own range of
the mapping) and its ``Parameter`` / buffer object: only ``.data`` changes, so tied weights stay tied,
hooks, adapters, optimizers, ``state_dict`` and saving see the same model, and every result is the
same to the bit. The mapping is released when the last tensor that lives in it is freed (a weight
replaced later, by a quantization say, keeps its part until all the others go too). Off with
``LLAMALAB_HUGEPAGES=0``; a no-op where the kernel or Python has no huge pages.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each storage starts on a 64-byte boundary, as torch's CPU allocator gives
MIN_BYTES = 64 << 10  # storages smaller than this (norm gains, say) stay where they are
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """True on Linux with transparent huge pages for advised regions, unless ``LLAMALAB_HUGEPAGES=0``."""
    if os.environ.get("LLAMALAB_HUGEPAGES", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def huge_page_buffer(nbytes: int) -> tuple[mmap.mmap, int]:
    """An anonymous mapping with ``nbytes`` from a 2 MB boundary advised as huge pages: (mapping, offset)."""
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    buf = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    offset = -base % HUGE_PAGE
    buf.madvise(mmap.MADV_HUGEPAGE, offset, span)
    return buf, offset


def _weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's CPU parameters and buffers, each once (a tied weight is one tensor)."""
    seen: set[int] = set()
    found = []
    for module in model.modules():
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is None or id(t) in seen or t.device.type != "cpu" or t.is_sparse or t.is_quantized:
                continue
            seen.add(id(t))
            found.append(t)
    return found


def use_huge_pages(model: nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Move ``model``'s CPU parameters and buffers of at least ``min_bytes`` into huge pages, in place.

    Returns how many bytes were moved (0 where huge pages are not available or nothing is that big).
    Views of one storage stay views of one (new) storage. Calling it again repacks every weight into a
    new mapping, so that the parts of the old one whose tensors were replaced are given back.
    """
    if not huge_pages_available():
        return 0
    model._llamalab_huge_pages = True  # a later quantization repacks it (repack_if_in_huge_pages)
    by_storage: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for t in _weight_tensors(model):
        storage = t.untyped_storage()
        if storage.nbytes() < min_bytes:
            continue
        key = storage.data_ptr()
        if key not in by_storage:
            by_storage[key] = (storage, [])
        by_storage[key][1].append(t)
    if not by_storage:
        return 0
    offsets, total = {}, 0
    for key, (storage, _) in by_storage.items():
        offsets[key] = total
        total += -(-storage.nbytes() // ALIGN) * ALIGN
    buf, start = huge_page_buffer(total)
    with torch.no_grad():
        for key in list(by_storage):
            storage, tensors = by_storage.pop(key)  # the old storage is freed as soon as its tensors move
            new = torch.frombuffer(buf, dtype=torch.uint8, count=storage.nbytes(),
                                   offset=start + offsets[key]).untyped_storage()
            new.copy_(storage)
            del storage
            for t in tensors:
                t.data = torch.empty(0, dtype=t.dtype).set_(new, t.storage_offset(), t.size(), t.stride())
            del tensors
    return total


def repack_if_in_huge_pages(model: nn.Module) -> int:
    """After weights were replaced (a quantization, say): repack a model :func:`use_huge_pages` placed."""
    return use_huge_pages(model) if getattr(model, "_llamalab_huge_pages", False) else 0
