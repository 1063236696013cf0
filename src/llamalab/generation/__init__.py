"""Producing text: sampling (sampling.py), the prefill/decode runner over one KV cache (runner.py), the generation
loop with stops and streaming (generate.py) and speculative decoding (speculative.py)."""
