"""Fine-tuning data: chat JSONL -> tokenized examples with a loss mask -> padded or packed batches.

Data: JSONL, one example per line, either a conversation ``{"messages": [{"role": "system"|"user"|
"assistant", "content": "..."}, ...]}`` (OpenAI style) or a pair ``{"prompt": "...", "completion":
"..."}`` (taken as one user turn and one assistant turn). Conversations are rendered with the
model's chat template; a tokenizer without one falls back to ``prompt + completion + EOS``.

Loss mask: each assistant turn's tokens (its content and the end-of-turn marker the template puts
after it) are trained; system/user text and the template's role headers are not (label ``IGNORE``).
The split is found by rendering the conversation incrementally: for assistant message i, the text of
messages[:i] with the generation prompt is a prefix of the text of messages[:i+1]; what it adds is the
assistant's part.

Batches (:class:`SFTBatches`): padding (right-padded rows, padded positions masked out of the loss;
causal attention means real tokens never see the padding after them) or packing (several examples per
row of ``seq_len`` with a block-diagonal causal mask and positions restarting at 0 for each example, so
examples never attend to each other — exactly as if each ran alone). The recipe that trains on them is
:mod:`llamalab.training.finetune`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llamalab.errors import DataError, TokenizerError
from llamalab.jsonio import iter_jsonl

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.tokenization.protocol import TokenizerProtocol


IGNORE = -100
ROLES = ("system", "user", "assistant")


# =============================================================================================== reading
def read_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file; any malformed line is reported as ``file:line: problem``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such data file: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory; fine-tuning data is one JSONL file ({JSONL_HINT})")
    try:
        out = [to_messages(obj, f"{path}:{n}") for n, obj in iter_jsonl(path, DataError)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): is this a JSONL file? ({JSONL_HINT})") from None
    except DataError as e:
        if f"{path}:1:" in str(e) and ("not valid JSON" in str(e) or "not valid UTF-8" in str(e)):
            raise DataError(f"{e}: is this a JSONL file? ({JSONL_HINT})") from None
        raise
    if not out:
        raise DataError(f"{path}: no examples")
    return out


JSONL_HINT = 'one {"messages": [...]} or {"prompt": ..., "completion": ...} object per line'


def to_messages(obj: Any, where: str = "example") -> list[dict[str, str]]:
    """Check one example and return it as a list of {role, content} messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: message {i} needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {i} content must be a string")
            clean.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in clean):
            raise DataError(f"{where}: no assistant message to learn from")
        return clean
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise DataError(f"{where}: expected 'messages' or 'prompt' + 'completion' keys, got {sorted(obj)}")


# =============================================================================================== encoding
@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # = ids where trained, IGNORE elsewhere (aligned with ids; shifted in the loss)

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _segments(tok: TokenizerProtocol, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces."""
    if not getattr(tok, "chat_template", None):
        prompt = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        return [(prompt, False), (answer + (tok.decode([tok.eos_token_id]) if tok.eos_token_id is not None else ""),
                                  True)]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise TokenizerError("the chat template does not render conversations incrementally; cannot find the "
                                 "assistant's tokens")
        pieces.append((prefix[len(done):], False))
        pieces.append((full[len(prefix):], True))
        done = full
    return [(t, trained) for t, trained in pieces if t]


def encode_example(tok: TokenizerProtocol, messages: list[dict[str, str]], max_len: int | None = None) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    for j, (text, trained) in enumerate(_segments(tok, messages)):
        piece = tok.encode(text, add_bos=None if j == 0 else False)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if max_len is not None and len(ids) > max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return Example(ids, labels)


def encode_all(tok: TokenizerProtocol, conversations: Sequence[list[dict[str, str]]], max_len: int) -> list[Example]:
    out = [encode_example(tok, c, max_len) for c in conversations]
    kept = [e for e in out if e.n_trained > 0 and len(e.ids) > 1]
    if not kept:
        raise DataError(f"no example keeps any assistant token within max_len {max_len}")
    return kept


# =============================================================================================== batches
class SFTBatches:
    """Shuffled epochs of fine-tuning batches, with ``state_dict`` for exact resume.

    ``packing=False``: (input_ids, labels) right-padded to the longest row.
    ``packing=True``: (input_ids, labels, position_ids, mask) rows of ``seq_len`` holding several
    examples, ``mask`` (B, 1, T, T) block-diagonal causal."""

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, packing: bool = False,
                 seq_len: int = 512, seed: int = 0) -> None:
        self.examples, self.batch_size, self.pad_id = list(examples), batch_size, pad_id
        self.packing, self.seq_len, self.seed = packing, seq_len, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def _peek(self) -> Example:
        if self.pos >= len(self._order):  # next epoch, freshly shuffled
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._shuffle()
        return self.examples[self._order[self.pos]]

    def _take(self) -> Example:
        ex = self._peek()
        self.pos += 1
        return ex

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if not self.packing:
            return pad_batch([self._take() for _ in range(self.batch_size)], self.pad_id)
        rows: list[list[Example]] = []
        for _ in range(self.batch_size):
            row, used = [], 0
            while True:
                if row and used + len(self._peek().ids) > self.seq_len:
                    break
                ex = self._take()
                row.append(ex)
                used += len(ex.ids)
                if used >= self.seq_len:
                    break
            rows.append(row)
        return pack_batch(rows, self.seq_len, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self.seed = state["epoch"], state["pos"], state["seed"]
        self._order = self._shuffle()


def pad_batch(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def pack_batch(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    doc = torch.full((B, seq_len), -1, dtype=torch.long)  # which example each slot holds (-1: padding)
    for b, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row):
            n = min(len(e.ids), seq_len - at)
            if n <= 0:
                break
            ids[b, at:at + n] = torch.tensor(e.ids[:n])
            labels[b, at:at + n] = torch.tensor(e.labels[:n])
            pos[b, at:at + n] = torch.arange(n)
            doc[b, at:at + n] = k
            at += n
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    same = doc[:, :, None] == doc[:, None, :]
    eye = torch.eye(seq_len, dtype=torch.bool)
    mask = ((same & causal[None]) | eye[None])[:, None]  # (B, 1, T, T)
    return ids, labels, pos, mask
