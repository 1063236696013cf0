"""The dense float kernel (``torch.ops.llamalab.dense_linear``) against torch's ``F.linear``, per layer shape.

For each weight dtype (float32 / bfloat16 / float16), each layer shape of SmolLM2-135M (k/v, q/o, gate/up,
down, the 49152-row head) and each activation row count, both products are timed on a weight *streamed*
from memory (copies of the weight, ~``--stream-mb`` MB in all, cycled, as a decode step reads its
weights), the two alternating within every round; the table shows the median µs per call (thread CPU time) over the
rounds and, for the kernel, the weight GB/s. The activation has the weight's dtype (what an
``nn.Linear`` of the model gets). The kernel's own hand-over to the GEMM is lifted, so every row count
here is the kernel's; ``llamalab.kernels.DENSE_ROWS`` is where it hands over.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dense.py --rows 1 2 4 8 12 16 --rounds 7

``--decode``: greedy decode tok/s of whole models instead (SmolLM2-135M-Instruct dequantized, the
``gqa-125m`` preset; ``llamalab.generation.generate.complete``, eager), with the model's linears on the
dense kernel and on ``F.linear`` (``use_dense_kernels`` / ``use_torch_linears`` on the same model,
alternating within each round, in one process), medians over the rounds:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dense.py --decode --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"k/v 192x576": (192, 576), "q/o 576x576": (576, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--stream-mb", type=float, default=96.0)
    ap.add_argument("--decode", action="store_true", help="whole-model decode tok/s, kernel vs F.linear")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gqa-125m"])
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.decode:
        return decode(args)

    from llamalab import kernels

    if not kernels.load():
        raise SystemExit(f"the C++ kernels are not available: {kernels._state.get('reason')}")
    torch.ops.llamalab.dense_configure(1 << 30, 1 << 30, 1 << 30)
    big = torch.randn(64 << 20)
    bw = statistics.median([_time(big.sum) for _ in range(5)])
    print(f"threads {torch.get_num_threads()}, isa {kernels.active_isa()}, read bandwidth (256 MB float32 .sum, "
          f"median) {big.numel() * 4 / bw / 1e9:.1f} GB/s; µs per call (thread CPU time), median "
          f"of {args.rounds} rounds, weight streamed")
    del big
    print(f"{'dtype':<9} {'layer':<17} {'rows':>4} {'dense µs':>9} {'GB/s':>5} {'F.linear µs':>11} {'speed-up':>8}")
    for dname in args.dtypes:
        dt = getattr(torch, dname)
        for label in args.shapes:
            n, k = SHAPES[label]
            nbytes = n * k * dt.itemsize
            copies = max(2, int(args.stream_mb * 1e6 // nbytes))
            ws = [torch.randn(n, k).to(dt) for _ in range(copies)]
            for m in args.rows:
                x = torch.randn(m, k).to(dt)
                ours, theirs = [], []
                for _ in range(args.rounds):
                    ours.append(_each(torch.ops.llamalab.dense_linear, x, ws))
                    theirs.append(_each(F.linear, x, ws))
                a, b = statistics.median(ours), statistics.median(theirs)
                print(f"{dname:<9} {label:<17} {m:>4} {a * 1e6:>9.0f} {nbytes / a / 1e9:>5.1f} {b * 1e6:>11.0f} "
                      f"{b / a:>7.2f}x", flush=True)


def decode(args) -> None:
    import llamalab
    from llamalab.generation.generate import complete
    from llamalab.kernels.dense import use_dense_kernels, use_torch_linears

    print(f"threads {torch.get_num_threads()}; prompt 16 tokens, {args.new_tokens} new; decode tok/s, median of "
          f"{args.rounds} rounds (each: dense kernel, then F.linear, same model)")
    print(f"{'model':<13} {'dtype':<9} {'dense':>7} {'F.linear':>8} {'speed-up':>8}")
    for name in args.models:
        for dname in args.dtypes:
            model, _ = llamalab.load("smollm2" if name == "smollm2-135m" else name, dtype=dname)
            model.eval()
            ours, theirs = [], []
            use_dense_kernels(model)
            _rate(complete, model, args.new_tokens)  # warm-up
            for _ in range(args.rounds):
                use_dense_kernels(model)
                ours.append(_rate(complete, model, args.new_tokens))
                use_torch_linears(model)
                theirs.append(_rate(complete, model, args.new_tokens))
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"{name:<13} {dname:<9} {a:>7.1f} {b:>8.1f} {a / b:>7.2f}x", flush=True)


def _rate(complete, model, n: int) -> float:
    """Greedy decode tok/s of n new tokens after a 16-token prompt (stop tokens banned: always n)."""
    ban = {int(i): -100.0 for i in model.config.stop_token_ids}
    c = complete(model, None, [list(range(1, 17))], max_new_tokens=n, compile=False, logit_bias=ban)[0]
    return c.stats["decode_steps"] / c.stats["decode_s"]


def _time(fn) -> float:
    """Thread CPU seconds of fn() (the machine may be shared: time spent descheduled does not count)."""
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def _each(op, x: torch.Tensor, ws: list[torch.Tensor]) -> float:
    """Seconds per call of op(x, w), w going through every copy once."""
    t = time.thread_time()
    for w in ws:
        op(x, w)
    return (time.thread_time() - t) / len(ws)


if __name__ == "__main__":
    main()
