"""Supervised fine-tuning on chat data: LoRA or full, loss on the assistant's tokens only.

Data: JSONL, one example per line, either a conversation ``{"messages": [{"role": "system"|"user"|
"assistant", "content": "..."}, ...]}`` (OpenAI style) or a pair ``{"prompt": "...", "completion":
"..."}`` (taken as one user turn and one assistant turn). Conversations are rendered with the
model's chat template; a tokenizer without one falls back to ``prompt + completion + EOS``.

Loss mask: each assistant turn's tokens (its content and the end-of-turn marker the template puts
after it) are trained; system/user text and the template's role headers are not. The split is found
by rendering the conversation incrementally: for assistant message i, the text of messages[:i] with
the generation prompt is a prefix of the text of messages[:i+1]; what it adds is the assistant's
part. The objective is the mean next-token cross-entropy over trained tokens,

    L = − Σ_t m_t log p(x_t | x_<t) / Σ_t m_t,       m_t = 1 on assistant tokens.

Batches: padding (right-padded rows, padded positions masked out of the loss; causal attention means
real tokens never see the padding after them) or packing (several examples per row of ``seq_len``
with a block-diagonal causal mask and positions restarting at 0 for each example, so examples never
attend to each other — exactly as if each ran alone).

Training reuses :func:`llamalab.training.loop.train_loop` (AdamW, warmup + cosine, clipping, bf16 autocast,
checkpoints, exact resume, progress bar). LoRA saves PEFT adapters (:mod:`llamalab.lora`); full
fine-tuning saves an HF directory. Run dir::

    out/final/       the adapter (PEFT layout) or the full model, + tokenizer: llamalab.load("out/final")
    out/merged/      with merge=True (LoRA): base + adapter folded into one HF model directory
    out/checkpoints/ out/log.jsonl out/loss.png  (as llamalab train writes them)
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.errors import ConfigError, LlamalabError, TokenizerError
from llamalab.jsonio import iter_jsonl
from llamalab.training.checkpoint import write_json_atomic

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(LlamalabError):
    """A malformed fine-tuning data file (reported with its line number)."""


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


def _segments(tok: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
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


def encode_example(tok: Any, messages: list[dict[str, str]], max_len: int | None = None) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    for j, (text, trained) in enumerate(_segments(tok, messages)):
        piece = tok.encode(text, add_bos=None if j == 0 else False)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if max_len is not None and len(ids) > max_len:
        ids, labels = ids[:max_len], labels[:max_len]
    return Example(ids, labels)


def encode_all(tok: Any, conversations: Sequence[list[dict[str, str]]], max_len: int) -> list[Example]:
    out = [encode_example(tok, c, max_len) for c in conversations]
    kept = [e for e in out if e.n_trained > 0 and len(e.ids) > 1]
    if not kept:
        raise DataError(f"no example keeps any assistant token within max_len {max_len}")
    return kept


# =============================================================================================== batches
class Batches:
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


def masked_loss(model: nn.Module, batch: Sequence[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the trained (assistant) tokens of a batch."""
    if len(batch) == 2:
        ids, labels = batch
        logits = model(ids)
    else:
        ids, labels, pos, mask = batch
        logits = model(ids, attention_mask=mask, position_ids=pos)
    target = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target, ignore_index=IGNORE,
                           reduction=reduction)


def evaluate_loss(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean loss per trained token over ``examples``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = pad_batch(examples[i:i + batch_size], pad_id)
            batch = tuple(t.to(_device(model)) for t in batch)
            total += float(masked_loss(model, batch, reduction="sum"))
            count += int((batch[1][:, 1:] != IGNORE).sum())
    return total / max(count, 1)


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


# =============================================================================================== the recipe
@dataclass
class FinetuneConfig:
    method: str = "lora"  # lora | full
    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 512
    packing: bool = False
    val_fraction: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    precision: str = "auto"
    eval_every: int = 0
    ckpt_every: int = 0
    max_minutes: float = 0.0
    seed: int = 0
    # LoRA
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    int8_base: bool = False
    merge: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ConfigError(f"method must be 'lora' or 'full', got {self.method!r}")
        if self.int8_base and self.method != "lora":
            raise ConfigError("an int8 base is only for LoRA (full fine-tuning trains the float weights)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("steps", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class FinetuneResult:
    run_dir: Path
    final_dir: Path
    merged_dir: Path | None
    trainable_parameters: int
    total_parameters: int
    adapter_bytes: int
    n_train: int
    n_val: int
    losses: list[float]
    val_loss_before: float | None
    val_loss_after: float | None
    steps: int
    minutes: float
    method: str = "lora"
    base_model: str | None = None  # what the adapter records as its base (a bundled name or a path)
    tokens_per_s: float = 0.0


def flops_per_token(model: nn.Module, seq_len: int, method: str) -> float:
    """Matmul FLOPs per trained token (forward + backward), the numerator of MFU.

    Full fine-tuning: 6 per weight (PaLM's estimate, as :func:`llamalab.training.loop.model_flops_per_token`).
    LoRA: the frozen weights cost 2 forward + 2 backward (the gradient to the input, none to the
    weight), the adapters 6 each; attention 12·layers·heads·head_dim·seq_len either way."""
    from llamalab.lora import LoRALinear
    from llamalab.quantization.quantize import QuantizedLinear

    frozen, trained, seen = 0, 0, set()
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            trained += mod.lora_A.weight.numel() + mod.lora_B.weight.numel()
        elif isinstance(mod, QuantizedLinear) or (isinstance(mod, nn.Linear) and ".lora_" not in f".{name}"):
            weight = getattr(mod, "weight", None)
            if weight is not None and id(weight) in seen:
                continue
            seen.add(id(weight))
            n = mod.in_features * mod.out_features
            if method == "full":
                trained += n
            else:
                frozen += n
    cfg = model.config
    return 4 * frozen + 6 * trained + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(examples) * val_fraction))
    if val_fraction > 0 and len(examples) >= 2:
        n_val = max(1, n_val)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


def finetune(model: nn.Module, tok: Any, data: str | Path | Sequence[Any], out_dir: str | Path,
             cfg: FinetuneConfig | None = None, *, base_path: str | Path | None = None,
             val_data: str | Path | Sequence[Any] | None = None, resume: bool = False,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` (in place) on ``data`` (a JSONL path or a list of examples) into ``out_dir``."""
    from llamalab.lora import (
        LoraConfig,
        apply_lora,
        base_model_reference,
        merge_lora,
        save_adapter,
        trainable_parameters,
    )
    from llamalab.training.loop import LoopConfig, train_loop

    cfg = cfg or FinetuneConfig()
    if tok is None:
        raise TokenizerError("fine-tuning needs the model's tokenizer (none found next to the weights)")
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    convs = read_jsonl(data) if isinstance(data, (str, Path)) else [to_messages(o, f"example {i}")
                                                                     for i, o in enumerate(data)]
    examples = encode_all(tok, convs, cfg.max_len)
    if val_data is not None:
        val_convs = read_jsonl(val_data) if isinstance(val_data, (str, Path)) else [
            to_messages(o, f"validation example {i}") for i, o in enumerate(val_data)]
        train_ex, val_ex = examples, encode_all(tok, val_convs, cfg.max_len)
    else:
        train_ex, val_ex = split_examples(examples, cfg.val_fraction, cfg.seed)
    if not train_ex:
        raise DataError("no training examples left after the validation split")
    pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else (tok.eos_token_id or 0)

    if cfg.method == "lora":
        if cfg.int8_base:
            from llamalab.quantization.quantize import quantize_model

            quantize_model(model, "int8")
        apply_lora(model, LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                                     target_modules=cfg.target_modules))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    from llamalab.quantization.quantize import QuantizedLinear

    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))  # int8 base
    trainable = trainable_parameters(model)
    val_before = evaluate_loss(model.eval(), val_ex, pad_id, cfg.batch_size) if val_ex else None

    base_name = base_model_reference(base_path) if base_path is not None else None

    def save_fn(m: nn.Module, directory: Path) -> None:
        if cfg.method == "lora":
            save_adapter(m, directory, base_model_name_or_path=base_name)
        else:
            m.save_pretrained(directory)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return {"val_loss": evaluate_loss(m, val_ex, pad_id, cfg.batch_size)} if val_ex else {}

    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=min(cfg.warmup_steps, cfg.steps),
                      weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum, precision=cfg.precision,
                      eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every, log_every=1,
                      max_minutes=cfg.max_minutes, seed=cfg.seed)
    batches = Batches(train_ex, cfg.batch_size, pad_id, packing=cfg.packing, seq_len=cfg.max_len, seed=cfg.seed)
    mean_len = cfg.max_len if cfg.packing else sum(len(e.ids) for e in train_ex) / len(train_ex)
    result = train_loop(model, batches, loop, out_dir, tokenizer=tok, loss_fn=masked_loss, eval_fn=eval_fn,
                        save_fn=save_fn, resume=resume, progress=progress,
                        flops_per_token=flops_per_token(model, round(mean_len), cfg.method),
                        extra_state={"finetune": _jsonable(asdict(cfg))})
    model.eval()
    final = out_dir / "final"
    _unlink_if_symlink(final)  # a link planted in a run dir must not redirect the export outside it
    save_fn(model, final)
    tok.save(final)
    adapter_bytes = (final / "adapter_model.safetensors").stat().st_size if cfg.method == "lora" else 0
    merged_dir = None
    if cfg.method == "lora" and cfg.merge:
        merge_lora(model)
        merged_dir = out_dir / "merged"
        _unlink_if_symlink(merged_dir)
        model.save_pretrained(merged_dir)
        tok.save(merged_dir)
    summary = FinetuneResult(
        run_dir=out_dir, final_dir=final, merged_dir=merged_dir, trainable_parameters=trainable,
        total_parameters=total, adapter_bytes=adapter_bytes, n_train=len(train_ex), n_val=len(val_ex),
        losses=result.losses, val_loss_before=val_before, val_loss_after=result.val.get("val_loss"),
        steps=result.step, minutes=result.minutes, method=cfg.method, base_model=base_name,
        tokens_per_s=result.tokens_per_s)
    write_json_atomic(out_dir / "finetune_summary.json", _jsonable(asdict(summary)))
    return summary


def _unlink_if_symlink(path: Path) -> None:
    if path.is_symlink():
        path.unlink()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "losses"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
