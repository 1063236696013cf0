"""The four components of a Llama block, one module each: RoPE, RMSNorm, GQA attention, SwiGLU."""

from llamalab.components.attention import GroupedQueryAttention, KVCache
from llamalab.components.mlp import SwiGLU
from llamalab.components.rmsnorm import RMSNorm
from llamalab.components.rope import RotaryEmbedding, apply_rope, compute_inv_freq

__all__ = ["GroupedQueryAttention", "KVCache", "SwiGLU", "RMSNorm", "RotaryEmbedding", "apply_rope",
           "compute_inv_freq"]
