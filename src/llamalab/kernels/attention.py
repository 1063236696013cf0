"""Fused CPU op (attention) of the model's forward: its schema, pure-PyTorch fallback and fake implementation.

``torch.ops.llamalab.decode_attention(q, k, v, cos, signed_sin, cache_k, cache_v, row0, start)`` is one decode
step of one attention layer for B rows of one new token each — RoPE, the KV-cache append and grouped-query
attention in one call (attention.cpp has the kernel):

* q (B, H, 1, D), k / v (B, KV, 1, D): the token's projections, H a multiple of KV — or each as the
  projection returns it, (B, 1, heads·D) contiguous (the same memory; D is then the cache's);
* cos / signed_sin (B or 1, 1, 1, D) float32: the tables of ``llamalab.model.rope.rope_tables``, with which
  rot(x) = x·cos + roll(x, D/2)·signed_sin (float32, rounded to x's dtype);
* cache_k / cache_v (Bc, KV, S, D): one layer's cache tensors; the call's row b is cache row row0 + b.

It writes rot(k) and v into slot ``start`` of rows row0..row0+B (exactly what ``kv_cache.write_layer`` writes
for such a step) and returns, for each query head h with kv head g = h // (H / KV),

    softmax(rot(q_h) · K_g[0..start]ᵀ / sqrt(D)) · V_g[0..start]

as (B, 1, H·D) in q's dtype (the heads side by side, as o_proj takes them); scores, softmax and sums in
float32. q, k, v and the cache share one dtype (float32, bfloat16 or float16).

``torch.ops.llamalab.decode_attention_rows(q, k, v, cos, signed_sin, cache_k, cache_v, rows, slots)`` is the
same step for rows of different lengths (continuous batching): ``rows`` / ``slots`` (B,) int64, batch row b
writes rot(k) / v into cache row ``rows[b]`` (any order, each row once) at slot ``slots[b]`` and attends to
that row's slots 0..slots[b] — what ``write_layer`` writes for a ragged step and what its causal-by-length
mask (``CacheStep.lengths_only``) lets attention see. Both ops run the same per-(row, kv head) computation, so a
row's output is bit-identical whatever batch it is decoded in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCHEMA = ("decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor signed_sin, Tensor(a!) cache_k, "
          "Tensor(b!) cache_v, int row0, int start) -> Tensor")
ROWS_SCHEMA = ("decode_attention_rows(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor signed_sin, Tensor(a!) cache_k, "
               "Tensor(b!) cache_v, Tensor rows, Tensor slots) -> Tensor")


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x·cos + roll(x, D/2)·signed_sin in float32, in x's dtype (rope.rotate's arithmetic)."""
    x32 = x.float()
    return (x32 * cos + x32.roll(x.shape[-1] // 2, -1) * signed_sin).to(x.dtype)


def _heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor):
    """q, k, v as (B, heads, 1, D): (B, 1, heads·D) ones viewed so (D from the cache), 4-D ones as they are."""
    if q.dim() != 3:
        return q, k, v
    D = cache_k.shape[-1]
    return tuple(t.view(t.shape[0], t.shape[-1] // D, 1, D) for t in (q, k, v))


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                               signed_sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, row0: int,
                               start: int) -> torch.Tensor:
    """The op in plain PyTorch: rotate, write into the cache, SDPA over slots 0..start (the fallback)."""
    q, k, v = _heads(q, k, v, cache_k)
    B, H, _, D = q.shape
    ck, cv = cache_k.narrow(0, row0, B), cache_v.narrow(0, row0, B)
    ck.narrow(2, start, 1).copy_(_rotate(k, cos, signed_sin))
    cv.narrow(2, start, 1).copy_(v)
    out = F.scaled_dot_product_attention(_rotate(q, cos, signed_sin), ck.narrow(2, 0, start + 1),
                                         cv.narrow(2, 0, start + 1), enable_gqa=H != k.shape[1])
    return out.transpose(1, 2).reshape(B, 1, H * D)


def decode_attention_rows_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                    signed_sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                                    rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The per-row op in plain PyTorch: rotate, write row b into (rows[b], slots[b]), SDPA over slots
    0..slots[b] of each row (a mask j <= slots[b] over the longest row's slots) (the fallback)."""
    q, k, v = _heads(q, k, v, cache_k)
    B, H, _, D = q.shape
    cache_k[rows, :, slots] = _rotate(k, cos, signed_sin)[:, :, 0]
    cache_v[rows, :, slots] = v[:, :, 0]
    L = int(slots.max()) + 1 if B else 1
    mask = (torch.arange(L, device=q.device)[None] <= slots[:, None])[:, None, None]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(_rotate(q, cos, signed_sin), cache_k[rows, :, :L], cache_v[rows, :, :L],
                                         attn_mask=mask, enable_gqa=H != k.shape[1])
    return out.transpose(1, 2).reshape(B, 1, H * D)


def define_fallback(lib: torch.library.Library) -> None:
    """Define this module's ops in Python on ``lib`` (the C++ library could not be built or loaded)."""
    lib.define(SCHEMA)
    lib.impl("decode_attention", decode_attention_reference, "CompositeExplicitAutograd")
    lib.define(ROWS_SCHEMA)
    lib.impl("decode_attention_rows", decode_attention_rows_reference, "CompositeExplicitAutograd")


def register_fakes() -> None:
    """Register the fake (meta) implementations of this module's ops (torch.compile keeps them as calls)."""

    def decode_attention_fake(q, k, v, cos, signed_sin, cache_k, cache_v, row0, start):
        return q.new_empty((q.shape[0], 1, q[0].numel()))  # (B, 1, H·D) from (B, H, 1, D) or (B, 1, H·D)

    torch.library.register_fake("llamalab::decode_attention", decode_attention_fake)

    def decode_attention_rows_fake(q, k, v, cos, signed_sin, cache_k, cache_v, rows, slots):
        return q.new_empty((q.shape[0], 1, q[0].numel()))

    torch.library.register_fake("llamalab::decode_attention_rows", decode_attention_rows_fake)
