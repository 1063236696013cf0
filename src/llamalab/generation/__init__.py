"""Producing text: sampling (sampling.py), the prefill/decode runner over one KV cache (runner.py), the state of one
sequence being generated (sequence.py, with the detokenizer and stop strings of text.py), the generation loop with
streaming and ragged batches (generate.py) and speculative decoding (speculative.py)."""
