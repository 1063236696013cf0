"""Supervised fine-tuning on chat data: LoRA or full, loss on the assistant's tokens only.

Data (chat JSONL, the assistant-only loss mask, padded or packed batches) is :mod:`llamalab.data.sft`.
The objective is the mean next-token cross-entropy over trained tokens,

    L = − Σ_t m_t log p(x_t | x_<t) / Σ_t m_t,       m_t = 1 on assistant tokens.

Training reuses :func:`llamalab.training.loop.train_loop` (AdamW, warmup + cosine, clipping, bf16 autocast),
with a :class:`~llamalab.training.checkpoint.Checkpointer` (checkpoints, exact resume) and the standard
callbacks (log.jsonl, progress bar, loss.png). LoRA saves PEFT adapters (:mod:`llamalab.lora`); full
fine-tuning saves an HF directory. Run dir::

    out/final/       the adapter (PEFT layout) or the full model, + tokenizer: llamalab.load("out/final")
    out/merged/      with merge=True (LoRA): base + adapter folded into one HF model directory
    out/checkpoints/ out/log.jsonl out/loss.png  (as llamalab train writes them)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.data.sft import IGNORE, Example, SFTBatches, encode_all, pad_batch, read_jsonl, to_messages
from llamalab.errors import ConfigError, DataError, TokenizerError
from llamalab.training.checkpoint import write_json_atomic

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.model.llama import Llama
    from llamalab.tokenization.protocol import TokenizerProtocol



def masked_loss(model: Llama, batch: Sequence[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
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


def evaluate_loss(model: Llama, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean loss per trained token over ``examples``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = pad_batch(examples[i:i + batch_size], pad_id)
            batch = tuple(t.to(_device(model)) for t in batch)
            total += float(masked_loss(model, batch, reduction="sum"))
            count += int((batch[1][:, 1:] != IGNORE).sum())
    return total / max(count, 1)


def _device(model: Llama) -> torch.device:
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


def flops_per_token(model: Llama, seq_len: int, method: str) -> float:
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


def finetune(model: Llama, tok: TokenizerProtocol, data: str | Path | Sequence[Any], out_dir: str | Path,
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
    from llamalab.training.callbacks import standard_callbacks
    from llamalab.training.checkpoint import Checkpointer
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
    batches = SFTBatches(train_ex, cfg.batch_size, pad_id, packing=cfg.packing, seq_len=cfg.max_len, seed=cfg.seed)
    mean_len = cfg.max_len if cfg.packing else sum(len(e.ids) for e in train_ex) / len(train_ex)
    checkpointer = Checkpointer(out_dir, tokenizer=tok, save_fn=save_fn, extra={"finetune": _jsonable(asdict(cfg))})
    result = train_loop(model, batches, loop, loss_fn=masked_loss, eval_fn=eval_fn, checkpointer=checkpointer,
                        resume=resume, flops_per_token=flops_per_token(model, round(mean_len), cfg.method),
                        callbacks=standard_callbacks(out_dir, progress=progress))
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
