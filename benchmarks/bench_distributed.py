"""Distributed training throughput and memory: 1 process vs 2 processes with DDP and FSDP2.

Each configuration runs in its own torchrun job (gloo on CPU, nccl on GPU) with the same global
batch: a few warm-up steps, then the median time of the measured optimiser steps (forward + backward
+ gradient sync + AdamW). Reported per configuration: global tokens/s and, per rank, the peak
memory (max RSS on CPU, max allocated on GPU) and the parameter + optimizer-state bytes a rank
holds — which FSDP divides by the number of ranks while DDP replicates it.

    .venv/bin/python benchmarks/bench_distributed.py                       # llamalab-20m, fp32
    .venv/bin/python benchmarks/bench_distributed.py --preset llamalab-110m --precision bf16 --nproc 2
    .venv/bin/python benchmarks/bench_distributed.py --write docs/benchmarks.md   # its section of that page
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import _report


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from llamalab.config import LlamaConfig
    from llamalab.model.llama import Llama
    from llamalab.training import distributed

    ctx = distributed.init(args.strategy if args.strategy != "single" else "none", timeout_s=120)
    torch.manual_seed(0)
    cfg = LlamaConfig.from_preset(args.preset, max_position_embeddings=max(args.seq, 256))
    model = Llama(cfg).to(ctx.device).train()
    bf16 = args.precision == "bf16"
    wrapped = distributed.wrap(model, ctx, bf16=bf16)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    local = args.batch // ctx.world
    gen = torch.Generator().manual_seed(1 + ctx.rank)
    x = torch.randint(0, cfg.vocab_size, (local, args.seq + 1), generator=gen).to(ctx.device)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                              enabled=bf16 and not (ctx.distributed and ctx.strategy == "fsdp"))
    times = []
    for i in range(args.warmup + args.steps):
        ctx.barrier()
        t = time.perf_counter()
        with autocast:
            logits = wrapped(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        ctx.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state_bytes = sum(local_bytes(p) for p in wrapped.parameters())
    state_bytes += sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    peak = (torch.cuda.max_memory_allocated() if ctx.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    stats = torch.tensor([peak, state_bytes], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(ctx.world)]
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_gather(gathered, stats)
    else:
        gathered = [stats]
    if ctx.is_main:
        med = statistics.median(times)
        out = {"strategy": args.strategy, "world": ctx.world, "step_s": med, "tok_s": args.batch * args.seq / med,
               "peak_mb": [float(g[0]) / 2**20 for g in gathered],
               "state_mb": [float(g[1]) / 2**20 for g in gathered], "device": str(ctx.device)}
        with open(args.out, "w") as fh:
            json.dump(out, fh)
    distributed.shutdown(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llamalab-20m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    _report.add_args(ap)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    here = os.path.abspath(__file__)
    common = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
              str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision, "--worker"]
    threads = max(1, (os.cpu_count() or 2) // args.nproc)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, n in (("single", 1), ("ddp", args.nproc), ("fsdp", args.nproc)):
            out = os.path.join(tmp, f"{strategy}.json")
            if n == 1:
                cmd = [sys.executable, here, *common, "--strategy", strategy, "--out", out]
                env = dict(os.environ)
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                       here, *common, "--strategy", strategy, "--out", out]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{strategy} x{n} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            with open(out) as fh:
                rows.append(json.load(fh))
    lines = [f"{args.preset}, global batch {args.batch}x{args.seq}, {args.precision}, median of {args.steps} steps "
             f"after {args.warmup} warm-up; {threads} thread(s) per rank with {args.nproc} ranks", "",
             "| strategy | processes | tokens/s (global) | peak memory per rank | params+optimizer state per rank |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['world']} | {r['tok_s']:,.0f} | "
                     f"{' / '.join(f'{m:,.0f}' for m in r['peak_mb'])} MB | "
                     f"{' / '.join(f'{m:,.1f}' for m in r['state_mb'])} MB |")
    print("\n".join(lines))
    _report.emit(args, "bench_distributed", "Distributed training: 1 process vs DDP vs FSDP2", lines)


if __name__ == "__main__":
    main()
