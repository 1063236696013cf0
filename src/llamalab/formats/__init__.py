"""Checkpoint formats: files.py (the one atomic writer); Hugging Face safetensors directories (hf.py); GGUF files —
gguf_reader.py (the container), gguf_tensors.py (names, types, dequantization, q/k layout), gguf_config.py (config
from metadata), gguf.py (loading and export)."""
