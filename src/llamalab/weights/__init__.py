"""Checkpoint formats: Hugging Face safetensors directories (hf.py) and GGUF files (gguf.py)."""
