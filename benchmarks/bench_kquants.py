"""Time llamalab::q4_k_linear / q6_k_linear against F.linear on the float32 weight, one activation row, one thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_kquants.py [--reps 200]

Prints µs per call (median of interleaved repetitions) and the weight bytes read per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llamalab import kernels
from llamalab.kernels import kquants as kqops

SHAPES = [(1536, 768), (768, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]  # (N out, K in)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not kernels.load() or not hasattr(torch.ops.llamalab, "q4_k_linear"):
        raise SystemExit("the C++ k-quant kernels are not available")
    print(f"isa {kernels.active_isa()}, 1 thread, batch 1")
    print(f"{'kind':5} {'N x K':>11} {'kquant µs':>10} {'GB/s':>6} {'f32 µs':>8} {'GB/s':>6} {'speed-up':>8}")
    gen = torch.Generator().manual_seed(0)
    for kind in ("q4_k", "q6_k"):
        op = getattr(torch.ops.llamalab, f"{kind}_linear")
        for n, k in SHAPES:
            nb = kqops.SB_BYTES[kind]
            kq = torch.randint(0, 256, (n, k // 256, nb), dtype=torch.uint8, generator=gen)
            h = (torch.rand(n, k // 256, 2, generator=gen) * 0.01).half().view(torch.uint8).reshape(n, -1, 4)
            if kind == "q4_k":
                kq[..., 0:4] = h
            else:
                kq[..., 208:210] = h[..., :2]
            kq = kq.reshape(n, -1).contiguous()
            w = kqops.dequantize(kind, kq)
            x = torch.randn(1, k, generator=gen)
            fns = {"kq": lambda op=op, x=x, kq=kq: op(x, kq), "f32": lambda x=x, w=w: F.linear(x, w)}
            times = {name: [] for name in fns}
            for _ in range(5):
                for fn in fns.values():
                    fn()
            for _ in range(args.reps):
                for name, fn in fns.items():  # interleaved: both see the same machine state
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
            tq, tf = (statistics.median(times[nm]) for nm in ("kq", "f32"))
            print(f"{kind:5} {n:>5}x{k:<5} {tq * 1e6:10.1f} {kq.numel() / tq / 1e9:6.1f} {tf * 1e6:8.1f} "
                  f"{w.numel() * 4 / tf / 1e9:6.1f} {tf / tq:7.2f}x")


if __name__ == "__main__":
    main()
