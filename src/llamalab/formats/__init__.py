"""Checkpoint formats: Hugging Face safetensors directories (hf.py) and GGUF files (gguf_reader.py: the container;
gguf.py: the Llama mapping, dequantization and export)."""
