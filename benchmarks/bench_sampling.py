"""Greedy token choice: ``llamalab.generation.sampling.argmax`` against torch's ``Tensor.argmax``, side by side.

A decode step picks its token from one row of logits per sequence (SmolLM2: 49,152). Both are timed on the
same logits, alternating within every round, and their results are checked equal; µs per call (median over
rounds of the mean of ``--calls`` calls), one thread by default.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py --vocab 128256 --rows 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()

    from llamalab.generation.sampling import argmax

    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0))
    cases = {"llamalab argmax": lambda: argmax(logits), "torch Tensor.argmax": lambda: logits.argmax(dim=-1)}
    if not torch.equal(cases["llamalab argmax"](), cases["torch Tensor.argmax"]()):
        raise SystemExit("the two argmaxes disagree")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, f in cases.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                f()
            times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"argmax over {args.rows} x {args.vocab} float32 logits, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} rounds x {args.calls} calls:")
    for name, us in med.items():
        print(f"  {name:22s} {us:8.1f} us")
    print(f"  llamalab / torch: {med['torch Tensor.argmax'] / med['llamalab argmax']:.1f}x faster")


if __name__ == "__main__":
    main()
