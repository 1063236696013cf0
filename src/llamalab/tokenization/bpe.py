"""Byte-level BPE tokenizer training (Sennrich et al., 2016; byte-level as in GPT-2, Radford et al., 2019).

Text is first mapped to its UTF-8 bytes (so every string is encodable, nothing is ever unknown), split
by the GPT-2 pre-tokenizer regex (words, numbers, punctuation runs, whitespace), then BPE repeatedly
merges the most frequent adjacent pair of symbols within those pieces until the vocabulary reaches
``vocab_size``: 256 byte symbols + the special tokens + the merges. The trainer is Hugging Face
``tokenizers`` (Rust); the result is wrapped in llamalab's shared :class:`llamalab.tokenization.tokenizer.Tokenizer`
and saved as ``tokenizer.json``.

Special tokens: ``<|endoftext|>`` (id 0, the EOS that separates documents) and the ChatML pair
``<|im_start|>`` / ``<|im_end|>`` (ids 1, 2) so that a model pretrained here can later be fine-tuned
for chat without growing its embedding. No BOS is added: documents are separated by EOS.

Trained tokenizers are cached under ``<cache>/tokenizers/<corpus>-<vocab>-<hash>/`` (keyed by the
corpus, its split and the vocabulary size), so a second run reuses the first one's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llamalab.errors import TokenizerError

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_hf(texts: Iterable[str] | Iterable[list[str]], vocab_size: int, min_frequency: int = 2,
                 length: int | None = None):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on an iterable of strings (or lists of strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise TokenizerError(f"vocab_size {vocab_size} is too small for a byte-level BPE (at least {min_vocab})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def wrap(hf_tokenizer) -> Any:
    """The shared llamalab Tokenizer around a trained ``tokenizers.Tokenizer``."""
    from llamalab.tokenization.tokenizer import Tokenizer

    return Tokenizer.from_hf(hf_tokenizer, bos_token=None, eos_token=EOS_TOKEN, chat_template=CHATML_TEMPLATE,
                             add_bos=False, extra_stop_tokens=("<|im_end|>",))


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    return wrap(train_bpe_hf(texts, vocab_size, min_frequency))


def cached_tokenizer(corpus_id: str, train_texts: list[str], vocab_size: int,
                     cache_dir: str | Path) -> Any:
    """Train (or reuse) a BPE tokenizer for ``corpus_id``; returns the shared Tokenizer."""
    from llamalab.tokenization.tokenizer import load_tokenizer

    key = hashlib.sha256(f"{corpus_id}|{vocab_size}|bpe-v1".encode()).hexdigest()[:12]
    directory = Path(cache_dir) / "tokenizers" / f"{corpus_id[:40]}-v{vocab_size}-{key}"
    if (directory / "tokenizer.json").exists():
        tok = load_tokenizer(directory)
        if tok is not None:
            return tok
    tok = train_tokenizer(train_texts, vocab_size)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return tok
