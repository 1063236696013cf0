"""Training data: corpora -> token shards -> batches for pretraining (corpora.py); chat JSONL -> masked
examples -> padded or packed batches for fine-tuning (sft.py)."""
