"""Corpora -> token shards -> batches (corpora.py)."""
