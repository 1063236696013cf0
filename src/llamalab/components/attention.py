"""Grouped-query attention (Ainslie et al., 2023, "GQA", arXiv:2305.13245) with a KV cache.

For each of the n_heads query heads h, with kv head g(h) = h // (n_heads / n_kv_heads):

    Attention(Q_h, K_g, V_g) = softmax(Q_h K_gᵀ / sqrt(head_dim) + M) V_g

where Q and K have been rotated by RoPE (see rope.py) and M is the causal mask (0 where a query may
look, -inf elsewhere). Groups of n_heads/n_kv_heads query heads share one key/value head, so the
K/V projections and — what matters at inference — the KV cache shrink by that factor.
Multi-head attention (n_kv_heads = n_heads) and multi-query attention (Shazeer, 2019; n_kv_heads = 1)
are the two edge cases. The cache stores only the n_kv_heads heads; K/V are never copied per query
head: SDPA's ``enable_gqa`` handles the causal path, and masked paths use a grouped view of the
queries, (B, n_kv_heads, n_rep·T, head_dim), against the un-repeated keys.

The cache (:class:`KVCache`) is preallocated (static shapes) and keeps one fill length per row, so
rows of a batch may hold prompts of different lengths (ragged batches, continuous batching), and a
validity mask per slot for left-padded inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.components.rope import apply_rope


class KVCache:
    """Preallocated keys/values for every layer: k, v of shape (n_layers, B, n_kv_heads, max_seq_len, head_dim).

    ``lengths[b]`` is how many slots row b has filled; new tokens of row b are written at slots
    lengths[b], lengths[b]+1, …  ``valid[b, s]`` is False for slots that hold padding.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.has_padding = False  # set once a padded token is written; enables the per-slot validity mask

    @classmethod
    def from_config(cls, config, batch_size: int = 1, max_seq_len: int | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> KVCache:
        return cls(config.n_layers, batch_size, config.n_kv_heads, max_seq_len or config.max_position_embeddings,
                   config.head_dim, dtype, device)

    def reset(self, rows: slice | list[int] | torch.Tensor | None = None) -> None:
        """Empty the cache (or some rows of it)."""
        if rows is None:
            rows = slice(None)
        self.lengths[rows] = 0
        self.valid[rows] = False
        if isinstance(rows, slice) and rows == slice(None):
            self.has_padding = False

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class CacheStep:
    """Where one forward call writes into and reads from the cache (computed once, shared by all layers)."""

    cache: KVCache
    rows: slice | torch.Tensor  # which cache rows the batch's rows are
    start: int | None  # uniform write offset (all rows equal lengths), else None
    slots: torch.Tensor  # (B, T) slot index of each new token
    kv_len: int  # keys to attend over: slots [0, kv_len)
    mask: torch.Tensor | None  # (B, 1, T, kv_len) bool, True = may attend; None = attend to all kv_len


class GroupedQueryAttention(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.n_rep = n_heads // n_kv_heads
        self.q_proj = nn.Linear(hidden_size, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        step: CacheStep | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if step is not None:
            k, v = self._update_cache(step, layer_idx, k, v)
            mask = step.mask
            causal = False
        else:
            causal = mask is None

        if causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_rep > 1)
        else:
            out = self._grouped_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _grouped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
        """Attention with an explicit mask, queries viewed as (B, n_kv_heads, n_rep·T, D): no K/V copies."""
        B, H, T, D = q.shape
        if self.n_rep == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        qg = q.reshape(B, self.n_kv_heads, self.n_rep * T, D)
        if mask is not None:
            S = mask.shape[-1]
            mask = mask.view(mask.shape[0], 1, 1, T, S).expand(mask.shape[0], 1, self.n_rep, T, S)
            mask = mask.reshape(mask.shape[0], 1, self.n_rep * T, S)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
        return out.view(B, H, T, D)

    @staticmethod
    def _update_cache(step: CacheStep, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        cache = step.cache
        ck, cv = cache.k[layer_idx], cache.v[layer_idx]  # (Bc, Hkv, S, D) views
        T = k.shape[2]
        if isinstance(step.rows, slice) and step.start is not None:
            ck[step.rows, :, step.start:step.start + T] = k
            cv[step.rows, :, step.start:step.start + T] = v
            return ck[step.rows, :, :step.kv_len], cv[step.rows, :, :step.kv_len]
        rows = step.rows
        if isinstance(rows, slice):
            rows = torch.arange(cache.batch_size, device=k.device)[rows]
        r = rows[:, None].expand_as(step.slots)
        ck[r, :, step.slots] = k.permute(0, 2, 1, 3).to(ck.dtype)
        cv[r, :, step.slots] = v.permute(0, 2, 1, 3).to(cv.dtype)
        return ck[rows, :, :step.kv_len], cv[rows, :, :step.kv_len]
