"""The Llama model — the one implementation of its forward pass — and its components, one module each:

* :mod:`~llamalab.model.llama` — ``Llama`` and ``Block``: embedding → N pre-norm blocks → RMSNorm → head;
* :mod:`~llamalab.model.rope` — rotary position embedding and its scaling registry (keyed by ``rope_type``);
* :mod:`~llamalab.model.rmsnorm` — RMSNorm, in float32;
* :mod:`~llamalab.model.attention` — grouped-query attention (MHA and MQA its edge cases);
* :mod:`~llamalab.model.mlp` — the SwiGLU feed-forward network;
* :mod:`~llamalab.model.kv_cache` — the one KV-cache object, which owns every write into it.
"""

from llamalab.model.llama import Block, Llama

__all__ = ["Block", "Llama"]
