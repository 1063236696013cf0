"""Training throughput: llamalab vs transformers.LlamaForCausalLM, side by side.

One optimiser step = forward + backward + AdamW step (grad clipping included) on the same config,
the same weights, batch, sequence length and precision (bf16 autocast over fp32 master weights where
the CPU has bf16, else fp32). The two are interleaved (A, B, A, B, ...) so that machine noise hits
both alike; we report medians, the ratio, MFU (against a matmul peak measured here) and peak memory
(on CPU: the resident-set growth during one step after warm-up, sampled every 2 ms; on GPU:
torch.cuda.max_memory_allocated).

    .venv/bin/python benchmarks/bench_train.py                      # ~20M and ~110M GQA, bf16
    .venv/bin/python benchmarks/bench_train.py --sizes 20m --precision fp32 --reps 5 --compile
    .venv/bin/python benchmarks/bench_train.py --reps 3 --write docs/benchmarks.md     # its section of that page
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import _report
from llamalab.config import LlamaConfig
from llamalab.model.llama import Llama
from llamalab.training.loop import measured_peak_flops, model_flops_per_token
from llamalab.training.precision import resolve_precision

SIZES = {"20m": "llamalab-20m", "110m": "llamalab-110m"}


def hf_copy(model: Llama):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from llamalab.formats.hf import hf_state_dict

    hf = LlamaForCausalLM(HFConfig(**model.config.to_hf_dict()))
    hf.load_state_dict(hf_state_dict(model), strict=False)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf.train()


def make_step(model: torch.nn.Module, kind: str, precision: str, device: torch.device, compile_: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    fwd = torch.compile(model) if compile_ else model
    ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with ac:
            if kind == "llamalab":
                logits = fwd(x)
            else:
                logits = fwd(input_ids=x).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Samples the resident set size in a thread: peak minus the size at entry (CPU peak memory of a step)."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.base = self.peak = rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def mb(self) -> float:
        return self.peak - self.base


def bench(size: str, batch: int, seq: int, precision: str, reps: int, warmup: int, compile_: bool,
          compile_hf: bool, device: torch.device) -> dict:
    cfg = LlamaConfig.from_preset(SIZES[size], max_position_embeddings=max(seq, 256))
    torch.manual_seed(0)
    ours = Llama(cfg).to(device).train()
    theirs = hf_copy(ours).to(device)
    steps = {"llamalab": make_step(ours, "llamalab", precision, device, compile_),
             "transformers": make_step(theirs, "transformers", precision, device, compile_hf)}
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    x, y = x[:, :-1], x[:, 1:]
    times: dict[str, list[float]] = {k: [] for k in steps}
    mem: dict[str, float] = {}
    for name, step in steps.items():  # warm up (and compile) each, measure its peak memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step(x, y)
        gc.collect()
        with PeakRSS() as p:  # one more step, sampled: activations + gradients + optimizer state growth
            step(x, y)
        mem[name] = (torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else p.mb
    for _ in range(reps):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    peak = measured_peak_flops(device, precision)
    fpt = model_flops_per_token(ours, seq)
    out = {"size": size, "params_m": ours.num_parameters() / 1e6, "peak_gflops": peak / 1e9}
    for name in steps:
        med = statistics.median(times[name])
        tps = batch * seq / med
        out[name] = {"step_s": med, "tok_s": tps, "mfu": tps * fpt / peak, "mem_mb": mem[name]}
    out["ratio"] = out["llamalab"]["tok_s"] / out["transformers"]["tok_s"]
    del ours, theirs, steps
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["20m", "110m"], choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile llamalab (the llamalab train option)")
    ap.add_argument("--compile-hf", action="store_true", help="torch.compile transformers too")
    ap.add_argument("--threads", type=int, default=0)
    _report.add_args(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(args.precision, device)
    head = (f"device {device}, {torch.get_num_threads()} threads, precision {precision}, "
            f"batch {args.batch}x{args.seq}, {args.reps} interleaved reps (medians), "
            f"llamalab compile={args.compile}, transformers compile={args.compile_hf}")
    lines = [head + "; one step = forward + backward + AdamW (grad clipping included), same weights.", "",
             "| model | params | llamalab tok/s | transformers tok/s | ratio | MFU llamalab | MFU transformers | "
             "peak mem llamalab / transformers |", "|---|---|---|---|---|---|---|---|"]
    print(head)
    print("\n".join(lines[2:]))
    for size in args.sizes:
        r = bench(size, args.batch, args.seq, precision, args.reps, args.warmup, args.compile, args.compile_hf,
                  device)
        a, b = r["llamalab"], r["transformers"]
        lines.append(f"| {SIZES[size]} | {r['params_m']:.1f}M | {a['tok_s']:,.0f} | {b['tok_s']:,.0f} | "
                     f"**{r['ratio']:.2f}x** | {100 * a['mfu']:.1f}% | {100 * b['mfu']:.1f}% | "
                     f"{a['mem_mb']:,.0f} / {b['mem_mb']:,.0f} MB |")
        print(lines[-1], flush=True)
    lines += ["", f"(MFU against a measured {precision} matmul peak of {r['peak_gflops']:.0f} GFLOP/s)"]
    print(lines[-1])
    _report.emit(args, "bench_train", "Training throughput: llamalab vs transformers", lines)


if __name__ == "__main__":
    main()
