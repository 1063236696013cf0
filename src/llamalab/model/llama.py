"""The Llama model: token embedding → N pre-norm blocks → RMSNorm → output head.

    h = embed_tokens(ids)
    for each block:  h = h + Attention(RMSNorm(h))      # GQA, RoPE on q and k (model/attention.py)
                     h = h + SwiGLU(RMSNorm(h))         # model/mlp.py
    logits = lm_head(RMSNorm(h))                        # lm_head shares embed_tokens' matrix when tied

Module names follow Hugging Face's LlamaForCausalLM (minus its ``model.`` prefix), so a state dict
maps to HF keys by prefixing ``model.`` to everything but ``lm_head.weight``
(:func:`llamalab.formats.hf.to_hf_key`), and adapters that name ``q_proj`` etc. match.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from llamalab import kernels
from llamalab.config import LlamaConfig
from llamalab.model.attention import GroupedQueryAttention
from llamalab.model.kv_cache import CacheStep, KVCache
from llamalab.model.mlp import SwiGLU
from llamalab.model.rmsnorm import RMSNorm
from llamalab.model.rope import RotaryEmbedding
from llamalab.module_call import DirectCall


class Block(DirectCall, nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GroupedQueryAttention(config.hidden_size, config.n_heads, config.n_kv_heads, config.head_dim,
                                               layer_idx=layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, mask: torch.Tensor | None = None,
                step: CacheStep | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, hidden); ``cos`` / ``signed_sin`` from :meth:`RotaryEmbedding.tables`; ``kv``: this
        layer's cache tensors (:meth:`KVCache.layer`) when ``step`` writes a cache. Where the fused CPU ops
        apply (:func:`llamalab.kernels.fused_for`) the residual add and the second norm are one call of
        ``llamalab::add_rms_norm``, the same math."""
        # (the submodules from _modules, where nn.Module.__getattr__ finds them: the same modules, without the
        # failed attribute look-up and Python frame it costs, 1-2 µs each, ~10 a layer per decode step)
        m = self._modules
        h = m["self_attn"](m["input_layernorm"](x), cos, signed_sin, mask=mask, step=step, kv=kv)
        norm = m["post_attention_layernorm"]
        if type(norm) is RMSNorm and kernels.fused_for(x, w := norm._parameters["weight"], h):
            # x + h and its norm in one pass (llamalab::add_rms_norm: the same math as the two lines below)
            x, normed = kernels.OPS.add_rms_norm(x, h, w, norm.eps)
            return x + m["mlp"](normed)
        x = x + h
        return x + m["mlp"](norm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
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

    def logical_parameters(self) -> int:
        """Parameters, counting each quantized linear's packed weight (int8, int4, GGUF blocks) as the in × out
        values it stands for; a quantized copy of a tied output head is the embedding again, not more."""
        from llamalab.quantization.quantize import QuantizedLinear

        total = self.num_parameters()
        for name, m in self.named_modules():
            if isinstance(m, QuantizedLinear) and not (self.config.tie_word_embeddings and name == "lm_head"):
                total += m.in_features * m.out_features
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
                  dtype: torch.dtype | None = None, scratch_slot: bool = False) -> KVCache:
        """A KV cache for this model: ``max_seq_len`` slots per row (default: the model's context)."""
        return KVCache.from_config(self.config, batch_size, max_seq_len or self.config.max_position_embeddings,
                                   dtype or self.dtype, self.device, scratch_slot)

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
        if cache is not None:
            B, T = _check_ids(input_ids)
            step = cache.plan(cache_rows, B, T, attention_mask, position_ids)
            logits = self.forward_step(input_ids, cache, step, last_only)
            cache.commit(step)
            return logits
        h = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.norm(h)).float()

    def forward_step(self, input_ids: torch.Tensor, cache: KVCache, step: CacheStep,
                     last_only: bool = False, block=None) -> torch.Tensor:
        """Logits (B, T or 1, vocab) float32 for tokens planned into ``cache`` by ``step``
        (:meth:`KVCache.plan` / :meth:`KVCache.plan_decode`); the caller commits. This is the decode
        step that :mod:`llamalab.generation.runner` runs eagerly or compiles (whole, or per block:
        ``block(layer, h, cos, signed_sin, mask, step, kv)`` then runs each layer, e.g. a compiled
        ``Block.forward``; default: the layer itself)."""
        h = self._blocks(self.embed_tokens(input_ids), step.position_ids, step.mask, step, cache, block)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.norm(h)).float()

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      cache_rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the last block (before the final norm)."""
        B, T = _check_ids(input_ids)
        if cache is not None:
            step = cache.plan(cache_rows, B, T, attention_mask, position_ids)
            h = self._blocks(self.embed_tokens(input_ids), step.position_ids, step.mask, step, cache)
            cache.commit(step)
            return h
        h = self.embed_tokens(input_ids)
        mask = None
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
        return self._blocks(h, position_ids, mask, None, None)

    def _blocks(self, h: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                step: CacheStep | None, cache: KVCache | None, block=None) -> torch.Tensor:
        cos, sin = self.rotary.tables(position_ids)  # once per call, shared by every layer
        for layer in self.layers:
            kv = None if cache is None else cache.layer(layer._modules["self_attn"].layer_idx)
            h = layer(h, cos, sin, mask, step, kv) if block is None else block(layer, h, cos, sin, mask, step, kv)
        return h

    # ----------------------------------------------------------------- weights
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu") -> Llama:
        """A Llama from an HF directory (config.json + safetensors; quantized ones too), in the dtype its
        weights are stored in unless ``dtype`` says otherwise."""
        from llamalab.formats.hf import read_checkpoint, resolve_dtype, stored_dtype

        config, state = read_checkpoint(path)
        return cls.from_state_dict(config, state, dtype=resolve_dtype(dtype, default=stored_dtype(state)),
                                   device=device, source=str(path))

    @classmethod
    def from_state_dict(cls, config: LlamaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", source: str = "checkpoint") -> Llama:
        """Meta-build a Llama and assign `state` (our key names) into it, checking every name and shape.

        Saved quantized layers (``P.qweight`` / ``P.scales`` [/ ``P.zeros``] for int8 / int4, ``P.qs`` / ``P.d``
        [/ ``P.m``] for GGUF blocks, ``P.kq`` for GGUF Q4_K / Q6_K super-blocks) become the linears of
        :mod:`llamalab.quantization`; float tensors take ``dtype`` (default: as stored). This is the one place
        a checkpoint's tensors are checked."""
        from llamalab.errors import WeightsError
        from llamalab.formats.hf import IGNORED_KEY, check_layer_count, to_hf_key
        from llamalab.quantization.quantize import replace_linear
        from llamalab.quantization.saved import check_quantization, pop_quantized_layer

        check_layer_count(config, state, source)
        state = dict(state)
        model = cls.on_meta(config)
        quant_names = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".qweight", ".qs", ".kq"))})
        if quant_names:
            check_quantization(config, source)
        for name in quant_names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise WeightsError(f"{source}: unexpected quantized tensor {to_hf_key(name)}") from None
            if not isinstance(module, nn.Linear):
                raise WeightsError(f"{source}: {to_hf_key(name)} is not a linear layer")
            replace_linear(model, name, pop_quantized_layer(state, name, module, config, source).to(device))
        expected = {k: p for k, p in model.state_dict(keep_vars=True).items()
                    if k.rsplit(".", 1)[0] not in quant_names}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        missing = [k for k in expected if k not in state]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise WeightsError(f"{source}: missing tensor {to_hf_key(missing[0])}{more}")
        unexpected = [k for k in state if k not in expected and not IGNORED_KEY.match(k)
                      and not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if unexpected:
            raise WeightsError(f"{source}: unexpected tensor {to_hf_key(unexpected[0])} (not part of a Llama with "
                               "this config)")
        final: dict[str, torch.Tensor] = {}
        for name, p in expected.items():
            t = state[name]
            if tuple(t.shape) != tuple(p.shape):
                raise WeightsError(f"{source}: tensor {to_hf_key(name)} has shape {tuple(t.shape)}, config expects "
                                   f"{tuple(p.shape)}")
            final[name] = t.to(device=device, dtype=dtype or t.dtype)
        model.load_state_dict(final, strict=False, assign=True)
        if "lm_head" not in quant_names:
            model.tie_weights()
        return model.eval()

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "2GB",
                        dtype: torch.dtype | str | None = None) -> Path:
        from llamalab.formats.hf import save_hf

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


def _check_ids(input_ids: torch.Tensor) -> tuple[int, int]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    return input_ids.shape[0], input_ids.shape[1]
