"""The KV cache: one object that owns every write into it.

Keys and values live in preallocated tensors, one pair per layer, of shape
(batch, n_kv_heads, slots, head_dim) — static shapes, so a decode step over them can be compiled
once; separate per-layer tensors let a compiled step update each in place (a single 5-D tensor
written layer by layer made Inductor copy the whole cache every step). Each row keeps its own
fill length (``lengths``), so rows hold sequences of different lengths side by side (ragged batches,
continuous batching), and a validity mask per slot (``valid``) for left-padded inputs.

A forward call over the cache goes in three moves, all made here:

* :meth:`KVCache.plan` — where this call's tokens go (slots per row), their RoPE positions and the
  attention mask; computed once per call, shared by all layers (a :class:`CacheStep`);
* :func:`write_layer` — called by attention layer ``i`` with its new keys and values and its cache
  tensors (:meth:`KVCache.layer` ``(i)``, handed over by the model); returns the keys and values to
  attend over;
* :meth:`KVCache.commit` — advance the rows' lengths once every layer has written.

:meth:`KVCache.plan_decode` plans a one-token step over *every* row with shapes that depend only
on the cache (batch rows × all slots): the compiled decode step. Rows that take no part write into
a scratch slot past the end that is never valid. :meth:`truncate`, :meth:`copy_row` and
:meth:`reset` are the other edits (speculative rollback, n > 1 choices, freeing a row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llamalab.errors import LlamalabError


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class CacheStep:
    """Where one forward call writes into and reads from the cache (computed once, shared by all layers)."""

    rows: slice | torch.Tensor  # which cache rows the batch's rows are
    start: int | None  # uniform write offset (all rows equal lengths), else None
    slots: torch.Tensor  # (B, T) slot index of each new token
    kv_len: int  # keys to attend over: slots [0, kv_len)
    mask: torch.Tensor | None  # (B, 1, T, kv_len) bool, True = may attend; None = attend to all kv_len
    position_ids: torch.Tensor  # (B, T) RoPE positions of the new tokens
    every_row: bool = False  # a plan_decode step: the batch is all cache rows, in order, over all slots
    row_index: torch.Tensor | None = None  # (B,) the rows as indices
    whole: bool = False  # rows is the slice of every cache row
    # a plan() step over a cache with no padded slot: each new token at slot s of its row attends to exactly
    # slots 0..s of that row (the mask, if any, is causal by length and nothing else)
    lengths_only: bool = False


class KVCache:
    """Preallocated keys/values, per layer: ``k_layers[i]``, ``v_layers[i]`` of shape (B, n_kv_heads, slots,
    head_dim); :attr:`k` / :attr:`v` stack them (a copy, for reading).

    ``lengths[b]`` is how many slots row b has filled; new tokens of row b are written at slots
    lengths[b], lengths[b]+1, …  ``valid[b, s]`` is False for slots that hold padding.
    ``scratch_slot=True`` adds one slot past ``max_seq_len`` that idle rows of a
    :meth:`plan_decode` step write into.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 scratch_slot: bool = False) -> None:
        if max_seq_len < 1 or batch_size < 1:
            raise ValueError(f"a KV cache needs at least one row and one slot, got {batch_size} x {max_seq_len}")
        slots = max_seq_len + int(scratch_slot)
        shape = (n_layers, batch_size, n_kv_heads, slots, head_dim)
        nbytes = 2 * n_layers * batch_size * n_kv_heads * slots * head_dim * torch.empty((), dtype=dtype).element_size()
        limit = _physical_memory()
        if limit is not None and nbytes > limit and torch.device(device or "cpu").type == "cpu":
            raise LlamalabError(f"a KV cache of {batch_size} x {max_seq_len} tokens needs {nbytes / 2**30:.1f} GiB, "
                             f"more than this machine's {limit / 2**30:.1f} GiB: use a shorter context")
        self.k_layers = [torch.zeros(shape[1:], dtype=dtype, device=device) for _ in range(n_layers)]
        self.v_layers = [torch.zeros(shape[1:], dtype=dtype, device=device) for _ in range(n_layers)]
        self.dtype = dtype
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, slots, dtype=torch.bool, device=device)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.n_layers = n_layers
        self.scratch = max_seq_len if scratch_slot else None
        self.has_padding = False  # set once a padded token is written; enables the per-slot validity mask
        self._all_rows = torch.arange(batch_size, device=device)
        self._every_row = slice(0, batch_size)

    @classmethod
    def from_config(cls, config, batch_size: int = 1, max_seq_len: int | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                    scratch_slot: bool = False) -> KVCache:
        return cls(config.n_layers, batch_size, config.n_kv_heads, max_seq_len or config.max_position_embeddings,
                   config.head_dim, dtype, device, scratch_slot)

    @property
    def device(self) -> torch.device:
        return self.k_layers[0].device

    @property
    def k(self) -> torch.Tensor:
        """All layers' keys, (n_layers, B, n_kv_heads, slots, head_dim): a stacked copy (write via k_layers)."""
        return torch.stack(self.k_layers)

    @property
    def v(self) -> torch.Tensor:
        return torch.stack(self.v_layers)

    def nbytes(self) -> int:
        t = self.k_layers[0]
        return t.numel() * t.element_size() * 2 * self.n_layers

    # ----------------------------------------------------------------- edits
    def reset(self, rows: slice | list[int] | torch.Tensor | None = None) -> None:
        """Empty the cache (or some rows of it)."""
        if rows is None:
            rows = slice(None)
        self.lengths[rows] = 0
        self.valid[rows] = False
        if isinstance(rows, slice) and rows == slice(None):
            self.has_padding = False

    def truncate(self, row: int, length: int) -> None:
        """Forget everything row ``row`` holds after its first ``length`` tokens (speculative rollback)."""
        self.lengths[row] = length
        self.valid[row, length:] = False

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` hold exactly what row ``src`` holds (a prompt shared by n choices)."""
        for ck, cv in zip(self.k_layers, self.v_layers):
            ck[dst] = ck[src]
            cv[dst] = cv[src]
        self.lengths[dst] = self.lengths[src]
        self.valid[dst] = self.valid[src]

    def length(self, row: int) -> int:
        return int(self.lengths[row])

    # ----------------------------------------------------------------- a forward call
    def plan(self, rows: slice | torch.Tensor | None, B: int, T: int, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> CacheStep:
        """Plan writing T new tokens for each of B rows after what each row holds (marks their slots valid)."""
        device = self.device
        rows = slice(0, B) if rows is None else rows
        lengths = self.lengths[rows]
        if lengths.shape[0] != B:
            raise ValueError(f"batch of {B} rows but the cache selection has {lengths.shape[0]} rows")
        filled = lengths.tolist()  # (one call, where min() and max() would be two reductions and two reads)
        lo, hi = min(filled), max(filled)
        if hi + T > self.max_seq_len:
            raise ValueError(f"KV cache full: {hi} + {T} tokens exceed its {self.max_seq_len} slots")
        if T == 1 and lo == hi and attention_mask is None and position_ids is None and not self.has_padding \
                and isinstance(rows, slice):
            # a decode step of rows of one length (generate, chat): what the general path below computes for
            # it, in three tensor calls instead of about twelve
            slots = lengths[:, None].clone()
            self.valid[rows, lo] = True
            return CacheStep(rows=rows, start=lo, slots=slots, kv_len=hi + 1, mask=None, position_ids=slots,
                             row_index=self._all_rows[rows], whole=rows == self._every_row, lengths_only=True)
        arange = torch.arange(T, device=device)
        slots = lengths[:, None] + arange[None]
        new_valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None \
            else attention_mask.to(torch.bool)
        if attention_mask is not None and not bool(new_valid.all()):
            self.has_padding = True
        if position_ids is None:
            if self.has_padding:
                before = self.valid[rows].sum(-1) if hi > 0 else torch.zeros(B, dtype=torch.long, device=device)
                position_ids = (before[:, None] + new_valid.long().cumsum(-1) - 1).clamp_min(0)
            else:
                position_ids = slots
        row_idx = rows if isinstance(rows, torch.Tensor) else self._all_rows[rows]
        self.valid[row_idx[:, None].expand(B, T), slots] = new_valid
        kv_len = hi + T
        uniform = lo == hi
        j = torch.arange(kv_len, device=device)
        if uniform and not self.has_padding:
            mask = None if T == 1 else (j[None, :] <= (lo + arange)[:, None])[None, None]  # (1, 1, T, kv_len)
        else:
            q_slot = slots[:, :, None]
            valid = self.valid[rows][:, :kv_len]
            mask = (((j[None, None, :] <= q_slot) & valid[:, None, :]) | (j[None, None, :] == q_slot))[:, None]
        return CacheStep(rows=rows, start=lo if uniform else None, slots=slots, kv_len=kv_len, mask=mask,
                         position_ids=position_ids, row_index=row_idx, whole=rows == self._every_row,
                         lengths_only=not self.has_padding)

    def plan_decode(self, rows: torch.Tensor) -> CacheStep:
        """Plan one token for every cache row over all slots (static shapes); only ``rows`` (unpadded,
        each with room for a token) take part, the others write into the scratch slot."""
        if self.scratch is None:
            raise ValueError("plan_decode needs a cache made with scratch_slot=True")
        lengths = self.lengths
        active = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        active[rows] = True
        slots = torch.where(active, lengths, self.scratch)
        if bool((active & (lengths >= self.max_seq_len)).any()):
            raise ValueError(f"KV cache full: a row holds {self.max_seq_len} tokens already")
        self.valid[rows, lengths[rows]] = True
        j = torch.arange(self.max_seq_len + 1, device=self.device)
        mask = (self.valid | (j[None] == slots[:, None]))[:, None, None]  # (Bc, 1, 1, S+1); scratch attends itself
        position_ids = torch.where(active, lengths, 0)[:, None]
        return CacheStep(rows=self._all_rows, start=None, slots=slots[:, None], kv_len=self.max_seq_len + 1,
                         mask=mask, position_ids=position_ids, every_row=True,
                         row_index=self._all_rows, whole=True)

    def layer(self, layer_idx: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s key and value tensors (B, Hkv, S, D): what its attention writes through
        :func:`write_layer` (tensors, not an index, so one compiled block serves every layer)."""
        if layer_idx is None:
            raise ValueError("this attention layer has no layer index: it cannot use a KV cache")
        return self.k_layers[layer_idx], self.v_layers[layer_idx]

    def write(self, step: CacheStep, layer_idx: int | None, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer ``layer_idx``'s new keys/values (B, Hkv, T, D); returns those to attend over."""
        return write_layer(step, self.layer(layer_idx), k, v)

    def commit(self, step: CacheStep, rows: torch.Tensor | None = None) -> None:
        """Advance the lengths of the rows a step wrote (of ``rows`` only, for a :meth:`plan_decode` step)."""
        if step.every_row:
            self.lengths[rows] += 1
        elif isinstance(step.rows, slice):  # a view of the rows' lengths, advanced in place (one call fewer)
            self.lengths[step.rows].add_(step.slots.shape[1])
        else:
            self.lengths[step.rows] += step.slots.shape[1]


def write_layer(step: CacheStep, kv: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Store one layer's new keys/values (B, Hkv, T, D) into its cache tensors ``kv`` (:meth:`KVCache.layer`)
    where ``step`` says; returns the keys and values to attend over."""
    ck, cv = kv  # (Bc, Hkv, S, D)
    if step.every_row:
        r = step.row_index[:, None]
        ck[r, :, step.slots] = k.permute(0, 2, 1, 3).to(ck.dtype)
        cv[r, :, step.slots] = v.permute(0, 2, 1, 3).to(cv.dtype)
        return ck, cv
    if step.start is not None and isinstance(step.rows, slice):
        if not step.whole:  # (all rows: no row slice, one op fewer per tensor and layer)
            ck, cv = ck[step.rows], cv[step.rows]
        T = k.shape[2]
        ck.narrow(2, step.start, T).copy_(k)
        cv.narrow(2, step.start, T).copy_(v)
        return ck.narrow(2, 0, step.kv_len), cv.narrow(2, 0, step.kv_len)
    rows = step.row_index
    r = rows[:, None].expand_as(step.slots)
    ck[r, :, step.slots] = k.permute(0, 2, 1, 3).to(ck.dtype)
    cv[r, :, step.slots] = v.permute(0, 2, 1, 3).to(cv.dtype)
    return ck[rows, :, :step.kv_len], cv[rows, :, :step.kv_len]
