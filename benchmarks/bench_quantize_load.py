"""CPU seconds to quantize + save SmolLM2-135M-Instruct to int8/int4 and to load the result.

One thread and ``time.process_time`` (CPU time of this process), so the figure is what the work
costs whatever else the machine runs. The SmolLM2 GGUF load before quantizing is not counted.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quantize_load.py --out /tmp/qbench int8 int4
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quantize_load.py int8 int4 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import _report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="+", choices=("int8", "int4"))
    ap.add_argument("--out", default="/tmp/qbench", help="where the quantized dirs are written")
    _report.add_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import llamalab
    from llamalab.quantization.quantize import quantize_model, save_quantized

    lines = ["SmolLM2-135M-Instruct, one thread, CPU seconds (`time.process_time`); the GGUF load before "
             "quantizing is not counted.", "", "| method | quantize + save (CPU s) | load (CPU s) |", "|---|---:|---:|"]
    for method in args.methods:
        model, _ = llamalab.load("smollm2", dtype=torch.float32)
        out = Path(args.out) / method
        t = time.process_time()
        quantize_model(model, method)
        save_quantized(model, out)
        quantize_s = time.process_time() - t
        del model
        t = time.process_time()
        llamalab.load(out)
        load_s = time.process_time() - t
        print(f"{method}: quantize+save {quantize_s:.1f} CPU s, load {load_s:.1f} CPU s", flush=True)
        lines.append(f"| {method} | {quantize_s:.1f} | {load_s:.1f} |")
    _report.emit(args, "bench_quantize_load", "Quantize + save and load cost (CPU seconds)", lines)


if __name__ == "__main__":
    main()
