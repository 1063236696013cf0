"""Training beyond one process on PyTorch's own engine: ``torchrun`` + DDP or FSDP2.

Launch: ``torchrun --nproc-per-node N -m llamalab train CONFIG`` (several machines: add
``--nnodes M --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT``). torchrun sets
RANK / WORLD_SIZE / LOCAL_RANK; :func:`init` reads them, picks ``nccl`` when CUDA is present and
``gloo`` otherwise, and sets a collective timeout so that a dead rank ends the job with an error
instead of a hang.

Strategies (``[distributed] strategy`` in the config):

* ``ddp`` — DistributedDataParallel: every rank holds the whole model, gradients are averaged by
  all-reduce during backward (bucketed); on non-final gradient-accumulation micro-steps the
  all-reduce is skipped (``no_sync``) and happens once at the last micro-step.
* ``fsdp`` — FSDP2 (``torch.distributed.fsdp.fully_shard``): every parameter is a DTensor sharded
  on dim 0 across ranks; each transformer block is its own unit (all-gathered just before its
  forward/backward, freed after, gradients reduce-scattered), then the root (embeddings, final
  norm, head). A :class:`MixedPrecisionPolicy` computes in bf16 and reduces in fp32 over fp32 master
  weights when the run's precision is bf16. Gradient sync is turned off on non-final micro-steps
  (``set_requires_gradient_sync(False)``).

Both can add activation checkpointing per block (recompute the block in backward instead of storing
its activations) and ``torch.compile`` per block.

Data: :class:`llamalab.data.corpora.Batches` gives rank r rows ``[r·b, (r+1)·b)`` of every global batch,
so the global batch, LR schedule and token count are the same for any number of processes.

Checkpoints (:mod:`llamalab.training.checkpoint`) hold the full model and optimizer state as safetensors,
gathered to rank 0 when saving; on load every rank keeps its own shard of the full tensors, so a
checkpoint resumes at any number of processes. Nothing in them is unpickled.
:func:`export_distributed_checkpoint` turns one into a plain HF directory.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llamalab.errors import LlamalabError

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DistContext:
    """Where this process stands: rank, world size, device and strategy (world 1 = plain single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: float | torch.Tensor) -> float:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world
        return float(t)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.to(self.device if self.backend == "nccl" else "cpu")
            dist.all_reduce(t)
        return t

    def broadcast_str(self, s: str) -> str:
        if not self.distributed:
            return s
        obj = [s]
        dist.broadcast_object_list(obj, src=0)
        return str(obj[0])


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(strategy: str = "auto", device: str = "auto", backend: str = "auto", timeout_s: float = 300) -> DistContext:
    """Initialise the process group when launched by torchrun (several processes), else a 1-process context."""
    if strategy not in STRATEGIES:
        raise LlamalabError(f"unknown distributed strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not launched_by_torchrun():
        dev = torch.device("cuda" if cuda else ("cpu" if device == "auto" else device))
        return DistContext(device=dev, strategy="none")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    be = backend if backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(be, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if be == "nccl" else None)
    strat = "ddp" if strategy in ("auto", "none") else strategy
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=dev, strategy=strat, backend=be)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.destroy_process_group()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (saves memory: one block's activations at a time)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def compile_blocks(model: nn.Module) -> None:
    for block in model.layers:
        block.compile()


def wrap(model: nn.Module, ctx: DistContext, *, bf16: bool = False, activation_checkpointing: bool = False,
         compile_per_block: bool = False) -> nn.Module:
    """Apply activation checkpointing / per-block compile, then DDP or FSDP2 per the context's strategy."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_per_block:
        compile_blocks(model)
    if not ctx.distributed:
        return model
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Llama inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return getattr(model, "module", model)


@contextmanager
def no_grad_sync(model: nn.Module, ctx: DistContext, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on non-final accumulation micro-steps."""
    if sync or not ctx.distributed:
        if ctx.distributed and ctx.strategy == "fsdp":
            model.set_requires_gradient_sync(True)
        yield
        return
    if ctx.strategy == "ddp":
        with model.no_sync():
            yield
    elif ctx.strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        yield
    else:
        with nullcontext():
            yield


def export_distributed_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """A training checkpoint (``checkpoints/step_N``, single or multi-process) -> a plain HF directory.

    Reads ``state/model.safetensors`` and ``trainer.json`` only (no process group, nothing unpickled);
    a checkpoint of the older pickle-based format is refused.
    """
    import json

    from llamalab.config import LlamaConfig
    from llamalab.model.llama import Llama
    from llamalab.training.checkpoint import full_model_state, verify_checkpoint

    ckpt = Path(ckpt_dir)
    if ckpt.name == "state" and (ckpt.parent / "trainer.json").exists():
        ckpt = ckpt.parent
    problem = verify_checkpoint(ckpt) if (ckpt / "manifest.json").exists() else None
    if problem:
        raise LlamalabError(f"checkpoint {ckpt} is unusable: {problem}")
    model_state = full_model_state(ckpt)
    try:
        trainer = json.loads((ckpt / "trainer.json").read_text()) if (ckpt / "trainer.json").exists() else {}
    except (ValueError, RecursionError) as e:  # malformed JSON, bad UTF-8, nesting or numbers past Python's limits
        raise LlamalabError(f"{ckpt}/trainer.json is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(trainer, dict) or "model_config" not in trainer:
        raise LlamalabError(f"{ckpt} has no trainer.json with the model config")
    config = LlamaConfig.from_hf_dict(trainer["model_config"])
    model = Llama.from_state_dict(config, {k: v for k, v in model_state.items()
                                           if not (k == "lm_head.weight" and config.tie_word_embeddings)},
                                  dtype=torch.float32, source=str(ckpt))
    out = Path(out_dir)
    model.save_pretrained(out, dtype=dtype)
    from llamalab.tokenization.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt) if (ckpt / "tokenizer.json").exists() else None
    if tok is not None:
        tok.save(out)
    return out
