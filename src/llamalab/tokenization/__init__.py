"""Text to token ids and back: the Tokenizer (tokenizer.py), chat templates (chat_template.py) and byte-level BPE
training (bpe.py)."""
