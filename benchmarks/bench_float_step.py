"""Where a float (float32 / bfloat16) decode step goes, and what the dense kernel's two step-level choices buy.

For ``llamalab.load(model, dtype=...)`` (its linears on the dense kernel, ``llamalab::dense_linear``), one
token decoded after a prompt, timed several ways, alternating within every round, ms per step:

* ``step``: ``Runner.decode`` — a decode step as ``generate`` runs it (embedding, cache plan, every layer,
  the head);
* ``layers, module``: every layer's own forward, in turn;
* ``layers, ops``: the same ops those forwards call (rms_norm, dense_linears for q|k|v, decode_attention,
  o_proj's dense_linear, add_rms_norm, dense_swiglu for gate|up, down_proj's dense_linear, the residual add),
  called back to back from Python with their arguments bound beforehand; their output is checked to equal
  the module's bit for bit. ``module - ops`` is the eager forward's own cost;
* ``linears``: just every weight of the step, in the step's order, through ``dense_linear`` (the weights
  streamed with nothing between them), with the read speed in GB/s;
* ``step, one call per linear``: the step with the joint q|k|v and gate|up calls of
  ``llamalab.model.shared_input`` turned off (each module called);
* ``step, prefetch <mode>``: the step with the weight prefetch forced to the other modes
  (``kernels.set_block_prefetch``; far prefetches 16-bit dense weights non-temporally, docs/kernels.md).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_float_step.py --dtype bfloat16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_float_step.py --model gqa-125m --dtype float32 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()

    import llamalab
    from llamalab import kernels
    from llamalab.generation.runner import Runner
    from llamalab.kernels.dense import DenseLinear
    from llamalab.model import shared_input

    model, _ = llamalab.load(args.model, dtype=args.dtype)
    if not kernels.fused() or not all(type(m) is DenseLinear for m in model.layers[0].modules()
                                      if isinstance(m, torch.nn.Linear)):
        raise SystemExit("the dense kernel and the fused ops are not in use here: nothing to time")
    ops = kernels.OPS
    runner = Runner(model, 1, args.prompt_len + args.steps + 8)
    prompt = list(range(10, 10 + args.prompt_len))
    runner.prefill(0, prompt)
    layers = list(model.layers)
    eps = layers[0].input_layernorm.eps
    kvs = [runner.cache.layer(i) for i in range(len(layers))]
    bound = [(ly.input_layernorm.weight, ly.post_attention_layernorm.weight,
              [ly.self_attn.q_proj.weight, ly.self_attn.k_proj.weight, ly.self_attn.v_proj.weight],
              ly.self_attn.o_proj.weight, [ly.mlp.gate_proj.weight, ly.mlp.up_proj.weight], ly.mlp.down_proj.weight)
             for ly in layers]
    every_weight = [w for b in bound for w in (*b[2], b[3], *b[4], b[5])] + [model.lm_head.weight]
    weight_bytes = sum(w.numel() * w.element_size() for w in every_weight)
    acts = {w.shape[1]: torch.randn(1, 1, w.shape[1]).to(w.dtype) for w in every_weight}

    with torch.inference_mode():
        step = runner.cache.plan(slice(0, 1), 1, 1)  # (planned, never committed: the layers' calls below)
        cos, sin = model.rotary.tables(step.position_ids)
        h = torch.randn(1, 1, model.config.hidden_size).to(model.dtype)

    def decode_steps() -> None:
        for i in range(args.steps):
            runner.decode([0], [100 + i])
        runner.truncate(0, len(prompt))

    def layers_module() -> torch.Tensor:
        for ly, kv in zip(layers, kvs):
            out = ly(h, cos, sin, None, step, kv)
        return out

    def layers_ops() -> torch.Tensor:
        for (w1, w2, qkv, wo, gu, wd), kv in zip(bound, kvs):
            x = ops.rms_norm(h, w1, eps)
            att = ops.decode_attention(*ops.dense_linears(x, qkv), cos, sin, kv[0], kv[1], 0, step.start)
            x2, nx = ops.add_rms_norm(h, ops.dense_linear(att, wo, None), w2, eps)
            out = x2 + ops.dense_linear(ops.dense_swiglu(nx, gu), wd, None)
        return out

    def linears() -> None:
        for w in every_weight:
            ops.dense_linear(acts[w.shape[1]], w, None)

    real_check = shared_input._Plan.check

    def separate_steps() -> None:
        shared_input._Plan.check = lambda plan, modules: False  # each module called
        try:
            decode_steps()
        finally:
            shared_input._Plan.check = real_check

    chosen = kernels.set_block_prefetch(None)

    def with_prefetch(mode: str):
        def run() -> None:
            kernels.set_block_prefetch(mode)
            try:
                decode_steps()
            finally:
                kernels.set_block_prefetch(None)
        return run

    with torch.inference_mode():
        if not torch.equal(layers_module(), layers_ops()):
            raise SystemExit("the ops called alone do not reproduce the layers' output: this script is out of date")
        per_step = {"step": (decode_steps, args.steps), "layers, module": (layers_module, 1),
                    "layers, ops": (layers_ops, 1), "linears": (linears, 1),
                    "step, one call per linear": (separate_steps, args.steps)}
        for mode in kernels.PREFETCH_MODES:
            if mode != chosen:
                per_step[f"step, prefetch {mode}"] = (with_prefetch(mode), args.steps)
        decode_steps()
        times: dict[str, list[float]] = {name: [] for name in per_step}
        for _ in range(args.rounds):
            for name, (f, n) in per_step.items():
                t0 = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t0) / n * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.model} {args.dtype}, one decode token after {args.prompt_len}, {torch.get_num_threads()} "
          f"thread(s), prefetch {chosen}, median of {args.rounds} rounds, ms per step:")
    for name, ms in med.items():
        extra = ""
        if name == "linears":
            extra = f"  ({weight_bytes / ms / 1e6:.1f} GB/s of {weight_bytes / 1e6:.0f} MB)"
        elif name.startswith("step"):
            extra = f"  ({1e3 / ms:.1f} tok/s; {med['step'] / ms:.3f}x the step's speed)"
        print(f"  {name:28s} {ms:7.2f}{extra}")
    n = len(layers)
    print(f"  eager forward over its ops: {(med['layers, module'] - med['layers, ops']) / n * 1e3:.1f} us per layer")


if __name__ == "__main__":
    main()
