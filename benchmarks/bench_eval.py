"""Perplexity throughput: llamalab's batched strided evaluation vs the transformers recipe, same weights.

The peer is Hugging Face's perplexity guide run on ``LlamaForCausalLM`` (one window per forward,
``labels=`` loss) over the same token ids, window and stride. Both are timed interleaved, several
rounds, medians reported; scored tokens/s and the ratio are printed, and the two perplexities
(they must agree: the test suite asserts it to 1e-5).

    .venv/bin/python benchmarks/bench_eval.py                                 # llamalab-20m, random weights
    .venv/bin/python benchmarks/bench_eval.py --model runs/shakespeare --tokens 8192
    .venv/bin/python benchmarks/bench_eval.py --write docs/benchmarks.md     # its section of that page
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch

import _report


def hf_strided(hf, ids: list[int], max_length: int, stride: int) -> float:
    enc = torch.tensor([ids])
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, enc.size(1), stride):
        end = min(begin + max_length, enc.size(1))
        inp = enc[:, begin:end]
        tgt = inp.clone()
        tgt[:, :-(end - prev_end)] = -100
        with torch.inference_mode():
            loss = hf(inp, labels=tgt).loss
        k = int((tgt[:, 1:] != -100).sum())
        nll, n, prev_end = nll + float(loss) * k, n + k, end
        if end == enc.size(1):
            break
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llamalab-20m", help="preset name (random weights) or model dir")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    _report.add_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(2)

    from transformers import LlamaForCausalLM

    import llamalab
    from llamalab.eval import perplexity_of_ids

    model, _ = llamalab.load(args.model, dtype="float32")
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.tokens + 1,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    times: dict[str, list[float]] = {"llamalab": [], "transformers": []}
    ppl = {}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ppl["llamalab"] = perplexity_of_ids(model, [ids], max_length=args.max_length, stride=args.stride,
                                            batch_size=args.batch_size, n_boot=0).perplexity
        times["llamalab"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ppl["transformers"] = hf_strided(hf, ids, args.max_length, args.stride)
        times["transformers"].append(time.perf_counter() - t0)
    head = (f"{args.model}: {model.num_parameters() / 1e6:.1f}M params, {args.tokens} scored tokens, window "
            f"{args.max_length}, stride {args.stride}, {args.rounds} interleaved rounds, median")
    print(head)
    lines = [head + "; 2 threads. The transformers row is Hugging Face's strided-perplexity recipe on "
             "`LlamaForCausalLM` over the same ids.", "",
             "| engine | scored tokens/s | seconds | perplexity |", "|---|---:|---:|---:|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:12s} {args.tokens / med:8.0f} scored tok/s  ({med:.2f} s)  perplexity {ppl[name]:.6g}")
        lines.append(f"| {name} | {args.tokens / med:.0f} | {med:.2f} | {ppl[name]:.6g} |")
    ratio = statistics.median(times["transformers"]) / statistics.median(times["llamalab"])
    rel = abs(ppl["llamalab"] / ppl["transformers"] - 1)
    print(f"  llamalab / transformers speed: {ratio:.2f}x; perplexity rel. diff {rel:.1e}")
    lines += ["", f"llamalab / transformers speed: {ratio:.2f}x; perplexity relative difference {rel:.1e}."]
    _report.emit(args, "bench_eval", "Evaluation: strided perplexity, llamalab vs transformers", lines)


if __name__ == "__main__":
    main()
