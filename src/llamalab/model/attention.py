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

Each attention layer knows its index in the model (``layer_idx``); the model hands it that layer's
tensors of the :class:`~llamalab.model.kv_cache.KVCache` (``KVCache.layer``), and it passes its new
keys/values to :func:`~llamalab.model.kv_cache.write_layer`, which owns every write (kv_cache.py).

Eager CPU decode of one token per row into a uniform cache step (no mask, a slice of rows, one write slot)
takes one fused op instead, ``llamalab::decode_attention`` (kernels/attention.py): RoPE, the cache write
that write_layer would make and the attention above in one call, returning (B, 1, H·D) for o_proj. Rows of
different lengths (continuous batching; rows a slice or index tensor) whose mask is only causal by length
(no padding in the cache: ``CacheStep.lengths_only``) take its per-row sibling ``decode_attention_rows``,
which runs the same per-row arithmetic, so a row decodes bit-identically alone or in any batch. It is
used only when :func:`llamalab.kernels.fused` says so and nothing needs autograd or a compiled graph; the
plain path below is the same math (``LLAMALAB_FUSED=0`` / ``kernels.set_fused(False)`` to compare).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamalab import kernels
from llamalab.model.kv_cache import CacheStep, KVCache, write_layer
from llamalab.model.rope import rope_tables, rotate
from llamalab.model.shared_input import joint_linears
from llamalab.module_call import DirectCall

__all__ = ["CacheStep", "GroupedQueryAttention", "KVCache"]


class GroupedQueryAttention(DirectCall, nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which layer of a KVCache this attention writes (None: no cache use)
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
        signed_sin: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        step: CacheStep | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden); ``cos`` / ``signed_sin``: the call's RoPE tables (B, 1, T, head_dim) of
        :func:`~llamalab.model.rope.rope_tables`, made once for all layers — or cos / sin (B, T, head_dim)
        as :class:`~llamalab.model.rope.RotaryEmbedding` returns them, made into tables here.
        ``step`` / ``kv``: a cache step and this layer's cache tensors (:meth:`KVCache.layer`; or ``cache``,
        the whole cache, to take them from by this layer's index)."""
        if cos.dim() == 3:
            cos, signed_sin = rope_tables(cos, signed_sin)
        B, T, _ = x.shape
        qkv = joint_linears(self, _QKV, x)  # one kernel call where the three can share it (model/shared_input.py)
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        if step is not None:
            kv = kv if kv is not None else cache.layer(self.layer_idx)
            if T == 1 and (op := _decode_op(step)) and _fused_decode(q, k, v, kv[0], cos):
                # (q, k, v go in as the projections return them, (B, 1, heads·D): the op views them per head)
                if op == _SLICE:
                    out = kernels.OPS.decode_attention(q, k, v, cos, signed_sin, kv[0], kv[1], step.rows.start,
                                                       step.start)
                else:  # rows of different lengths (or given as indices): each row its own cache row and slot
                    out = kernels.OPS.decode_attention_rows(q, k, v, cos, signed_sin, kv[0], kv[1], step.row_index,
                                                            step.slots[:, 0])
                return self._modules["o_proj"](out)  # (self.o_proj without nn.Module.__getattr__, see Block)
        if T == 1:  # (B, 1, H·D) is (B, H, 1, D) in memory: one view (decode: fewer eager calls per layer)
            q = q.view(B, self.n_heads, 1, self.head_dim)
            k = k.view(B, self.n_kv_heads, 1, self.head_dim)
            v = v.view(B, self.n_kv_heads, 1, self.head_dim)
        else:
            q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, signed_sin), rotate(k, cos, signed_sin)

        if step is not None:
            k, v = write_layer(step, kv, k, v)
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


_QKV = ("q_proj", "k_proj", "v_proj")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_UNFUSED, _SLICE, _ROWS = 0, 1, 2  # the step's decode attention: plain ops, decode_attention, decode_attention_rows


def _uniform_slice(step: CacheStep) -> bool:
    """One uniform write slot for a plain slice of rows (``rows.start`` .. +B) with no mask: the step
    ``llamalab::decode_attention`` takes as (row0, start)."""
    rows = step.rows
    return (step.start is not None and step.mask is None and isinstance(rows, slice) and rows.start is not None
            and rows.start >= 0 and rows.step in (None, 1))


def _decode_op(step: CacheStep) -> int:
    """Which fused op a one-token step's layout allows (worked out once per step, kept on it for the other
    layers): not a plan_decode step (every row, scratch slot), and either a uniform unmasked slice step
    (``decode_attention``: _SLICE) or any step whose mask is only causal by length — no padded slot in the
    cache (``step.lengths_only``), rows a slice or an index tensor, of equal or different lengths
    (``decode_attention_rows``: _ROWS); else _UNFUSED."""
    op = step.__dict__.get("_decode_op")
    if op is None:
        op = (_UNFUSED if step.every_row else _SLICE if _uniform_slice(step)
              else _ROWS if step.lengths_only and step.row_index is not None else _UNFUSED)
        step.__dict__["_decode_op"] = op
    return op


def _fused_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                  cos: torch.Tensor) -> bool:
    """Whether this layer's tensors may take the fused decode op :func:`_decode_op` chose: one dtype,
    float32 RoPE tables, and :func:`llamalab.kernels.fused_for` (fused ops on, CPU, grad mode off, not
    compiled). Everything else takes the unfused path."""
    return (q.dtype == k.dtype == v.dtype == cache_k.dtype and q.dtype in _FUSED_DTYPES
            and cos.dtype == torch.float32 and kernels.fused_for(q, cache_k))
