"""The Llama model: token embedding → N pre-norm blocks → RMSNorm → output head.

    h = embed_tokens(ids)
    for each block:  h = h + Attention(RMSNorm(h))      # GQA, RoPE on q and k (components/attention.py)
                     h = h + SwiGLU(RMSNorm(h))         # components/mlp.py
    logits = lm_head(RMSNorm(h))                        # lm_head shares embed_tokens' matrix when tied

Module names follow Hugging Face's LlamaForCausalLM (minus its ``model.`` prefix), so a state dict
maps to HF keys by prefixing ``model.`` to everything but ``lm_head.weight``
(:func:`llamalab.weights.hf.to_hf_key`), and adapters that name ``q_proj`` etc. match.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from llamalab.components.attention import CacheStep, GroupedQueryAttention, KVCache
from llamalab.components.mlp import SwiGLU
from llamalab.components.rmsnorm import make_norm
from llamalab.components.rope import RotaryEmbedding
from llamalab.config import LlamaConfig


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.self_attn = GroupedQueryAttention(config.hidden_size, config.n_heads, config.n_kv_heads, config.head_dim)
        self.post_attention_layernorm = make_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                step: CacheStep | None = None, layer_idx: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, step=step, layer_idx=layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    # ----------------------------------------------------------------- setup
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for the norm gains (as HF does)."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.config.tie_word_embeddings:
                    continue
                w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                with torch.no_grad():
                    module.weight.copy_(w)
            elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
                with torch.no_grad():
                    module.weight.fill_(1.0)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()

    @classmethod
    def on_meta(cls, config: LlamaConfig) -> Llama:
        """The model's structure on the ``meta`` device: no storage, no init (the loaders assign weights)."""
        with torch.device("meta"), _skip_reset_parameters():
            return cls(config)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def num_parameters(self) -> int:
        """Parameters, each shared tensor counted once (works on the meta device too)."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    def memory_report(self, context_len: int | None = None, kv_dtype: torch.dtype | None = None) -> dict[str, int]:
        """Bytes for the weights and for the KV cache (per token and at a context length); no allocation."""
        weight_bytes = 0
        seen: set[int] = set()
        for t in list(self.parameters()) + list(self.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                weight_bytes += t.numel() * t.element_size()
        elem = torch.empty((), dtype=kv_dtype or self.dtype).element_size()
        per_token = self.config.kv_cache_bytes_per_token(elem)
        ctx = context_len or self.config.max_position_embeddings
        return {"parameters": self.num_parameters(), "weight_bytes": weight_bytes,
                "kv_cache_bytes_per_token": per_token, "context_len": ctx, "kv_cache_bytes": per_token * ctx}

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        return KVCache.from_config(self.config, batch_size, max_seq_len or self.config.max_position_embeddings,
                                   dtype or self.dtype, self.device)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_rows: slice | torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 (B, 1, vocab) with ``last_only``).

        * ``attention_mask`` (B, T): 1 for real tokens, 0 for padding (e.g. left-padded batches); or a
          boolean (B, 1, T, T) mask, True where a query may attend (with explicit ``position_ids``).
        * ``position_ids`` (B, T): explicit RoPE positions; by default they count real tokens.
        * ``cache``: write these tokens' keys/values after what each cache row already holds and attend
          over everything there (prefill, then one or more tokens per call). ``cache_rows`` selects
          which cache rows the batch rows are (default: all, in order).
        """
        h = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, cache_rows=cache_rows)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.norm(h)).float()

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the last block (before the final norm)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        h = self.embed_tokens(input_ids)
        mask = None
        step = None
        if cache is None:
            if attention_mask is not None and attention_mask.dim() == 4:
                # an explicit (B, 1, T, T) boolean mask, True = may attend (e.g. block-diagonal for packed
                # sequences); position_ids then come from the caller
                mask = attention_mask.to(torch.bool)
                if position_ids is None:
                    raise ValueError("a 4-D attention_mask needs explicit position_ids")
            elif attention_mask is not None:
                am = attention_mask.to(torch.bool)
                if position_ids is None:
                    position_ids = (am.long().cumsum(-1) - 1).clamp_min(0)
                causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
                eye = torch.eye(T, dtype=torch.bool, device=h.device)
                mask = ((causal[None] & am[:, None, :]) | eye[None])[:, None]  # (B, 1, T, T)
            elif position_ids is None:
                position_ids = torch.arange(T, device=h.device)[None].expand(B, T)
        else:
            step, position_ids = _plan_cache_step(cache, cache_rows, B, T, attention_mask, position_ids, h.device)
        cos, sin = self.rotary(position_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask=mask, step=step, layer_idx=i)
        if step is not None:
            cache.lengths[step.rows] += T
        return h

    # ----------------------------------------------------------------- weights
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu") -> Llama:
        from llamalab.weights.hf import load_hf

        return load_hf(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "2GB",
                        dtype: torch.dtype | str | None = None) -> Path:
        from llamalab.weights.hf import save_hf

        return save_hf(self, path, max_shard_size=max_shard_size, dtype=dtype)


@contextmanager
def _skip_reset_parameters() -> Iterator[None]:
    """Skip nn.Linear/nn.Embedding's random init (pointless on meta, and its first call imports torch._dynamo)."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None  # type: ignore[method-assign]
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn  # type: ignore[method-assign]


def _plan_cache_step(cache: KVCache, cache_rows, B: int, T: int, attention_mask, position_ids, device):
    rows = slice(0, B) if cache_rows is None else cache_rows
    lengths = cache.lengths[rows]
    if lengths.shape[0] != B:
        raise ValueError(f"batch of {B} rows but the cache selection has {lengths.shape[0]} rows")
    lo, hi = int(lengths.min()), int(lengths.max())
    if hi + T > cache.max_seq_len:
        raise ValueError(f"KV cache full: {hi} + {T} tokens exceed its {cache.max_seq_len} slots")
    arange = torch.arange(T, device=device)
    slots = lengths[:, None] + arange[None]
    new_valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None \
        else attention_mask.to(torch.bool)
    padded = attention_mask is not None and not bool(new_valid.all())
    if padded:
        cache.has_padding = True
    has_padding = cache.has_padding
    if position_ids is None:
        if has_padding:
            before = cache.valid[rows].sum(-1) if lo > 0 or hi > 0 else torch.zeros(B, dtype=torch.long,
                                                                                   device=device)
            position_ids = (before[:, None] + new_valid.long().cumsum(-1) - 1).clamp_min(0)
        else:
            position_ids = slots
    row_idx = rows if isinstance(rows, torch.Tensor) else torch.arange(cache.batch_size, device=device)[rows]
    cache.valid[row_idx[:, None].expand(B, T), slots] = new_valid
    kv_len = hi + T
    uniform = lo == hi
    if uniform and not has_padding:
        mask = None
        if T > 1:
            j = torch.arange(kv_len, device=device)
            mask = (j[None, :] <= (lo + arange)[:, None])[None, None]  # (1, 1, T, kv_len)
    else:
        j = torch.arange(kv_len, device=device)
        q_slot = slots[:, :, None]
        valid = cache.valid[rows][:, :kv_len]
        mask = ((j[None, None, :] <= q_slot) & valid[:, None, :]) | (j[None, None, :] == q_slot)
        mask = mask[:, None]  # (B, 1, T, kv_len)
    step = CacheStep(cache=cache, rows=rows, start=lo if uniform else None, slots=slots, kv_len=kv_len, mask=mask)
    return step, position_ids
