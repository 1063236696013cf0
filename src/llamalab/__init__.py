"""llamalab — a readable, exact Llama: build, train, run, evaluate, serve and explain it.

Public API::

    model, tok = llamalab.load(path_or_name)       # HF dir, .gguf file, run dir, or a preset name
    model = llamalab.Llama.from_pretrained(dir)    # config.json + *.safetensors
    model.save_pretrained(dir)                     # loadable by transformers
    logits = model(input_ids)                      # (B, T) -> (B, T, vocab) float32
    text = llamalab.generate(model, tok, prompt, max_new_tokens=64, temperature=0.0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llamalab.errors import ConfigError, LlamalabError, TokenizerError, WeightsError

__version__ = "0.1.0"

__all__ = ["Llama", "LlamaConfig", "PRESETS", "load", "generate", "stream", "ConfigError", "LlamalabError",
           "TokenizerError", "WeightsError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from llamalab.config import PRESETS, LlamaConfig
    from llamalab.generation.generate import generate, stream
    from llamalab.loading import load
    from llamalab.model.llama import Llama

# torch and the model code load on first use, so `import llamalab` (and `llamalab --help`) stays fast
_LAZY = {"Llama": "llamalab.model.llama", "LlamaConfig": "llamalab.config", "PRESETS": "llamalab.config",
         "load": "llamalab.loading", "generate": "llamalab.generation.generate",
         "stream": "llamalab.generation.generate"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llamalab' has no attribute {name!r}")
