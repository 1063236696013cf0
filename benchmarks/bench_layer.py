"""Where a decode step's time goes: one decoder layer's eager forward against its C++ ops called alone.

For one layer of ``llamalab.load(model)`` (default: the shipped SmolLM2 Q4_1 file, its linears kept as
blocks), one token decoded after a short prompt, several ways, alternating within every round:

* ``module``: ``layer(h, cos, sin, None, step, kv)`` — the model's own forward (module calls, the checks
  that choose the fused ops, op dispatch);
* ``module, nn.Module.__call__``: the same, with every module call through ``nn.Module.__call__`` (its
  hook dispatch) instead of :class:`llamalab.module_call.DirectCall`'s direct call of ``forward``;
* ``ops alone``: the same ops it calls (rms_norm, block_linears for q|k|v, decode_attention, o_proj's
  linear, add_rms_norm, block_swiglu for gate|up, down_proj's linear, the residual add) called
  back to back from Python with their arguments bound beforehand, as the forward calls them
  (``llamalab.kernels.OPS``: unboxed where direct.cpp is built); its output is checked to equal the module's
  bit for bit;
* ``ops, torch.ops``: the same calls through ``torch.ops.llamalab`` (torch's boxed Python path);
* ``linears alone``: just the seven block linears, in the four calls the forward makes.

Then the same over every layer in turn, as a decode step meets them (each weight read once per pass, not
from cache): ``all layers, module`` (each layer's forward), ``all layers, ops`` (its ops called alone) and
``all layers, linears`` (its seven linears in the forward's four calls), ``all layers, 7 calls`` (the same
products, one call per module: what the joint calls of model/shared_input.py save), µs per layer, with the
linears' read speed in GB/s; and the output head once per pass.

The difference module - ops alone is the eager forward's fixed cost per layer (times n_layers per step).
Printed: µs per call (median over rounds of the mean of ``--calls`` calls), one thread by default.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_layer.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_layer.py --layer 10 --rounds 61
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn

DISPATCHED = "module, nn.Module.__call__"
SEPARATE = "all layers, 7 calls"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=31)
    args = ap.parse_args()

    import llamalab
    from llamalab import kernels
    from llamalab.module_call import DirectCall
    from llamalab.quantization.blocks import BlockQuantLinear

    direct_call = DirectCall.__call__

    model, tok = llamalab.load(args.model)
    if not kernels.fused():
        raise SystemExit("the fused C++ ops are not in use here (LLAMALAB_FUSED=0 or no compiler): nothing to compare")
    layer = model.layers[args.layer]
    a, mlp = layer.self_attn, layer.mlp
    linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not all(type(m) is BlockQuantLinear for m in linears):
        raise SystemExit(f"{args.model}: layer {args.layer}'s linears are not GGUF blocks; this script times those")
    cache = model.new_cache(1, 512)
    with torch.inference_mode():
        model(torch.tensor([tok.encode("Write a haiku about the sea.")]), cache=cache)
        step = cache.plan(slice(0, 1), 1, 1)
        cos, sin = model.rotary.tables(step.position_ids)
        kv = cache.layer(args.layer)
        h = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        boxed = torch.ops.llamalab
        boxed_ops = {"rms_norm": boxed.rms_norm.default, "add_rms_norm": boxed.add_rms_norm.default,
                     "decode_attention": boxed.decode_attention.default,
                     "block_linears": boxed.block_linears.default, "block_swiglu": boxed.block_swiglu.default}

        def joint(*mods: BlockQuantLinear) -> tuple:  # what llamalab::block_linears takes (model/shared_input.py)
            return ([m.qs for m in mods], [m.d for m in mods], [m.m for m in mods if m.m is not None],
                    mods[0].joint_kind)

        qkv, gu = joint(a.q_proj, a.k_proj, a.v_proj), joint(mlp.gate_proj, mlp.up_proj)
        o, d = ((m._eager, m._args) for m in (a.o_proj, mlp.down_proj))
        ob, db = ((m._op, m._args) for m in (a.o_proj, mlp.down_proj))
        w1, w2, eps = layer.input_layernorm.weight, layer.post_attention_layernorm.weight, layer.input_layernorm.eps
        row0, slot = step.rows.start, step.start
        down_in = torch.randn(1, 1, mlp.down_proj.in_features)

        def module() -> torch.Tensor:
            return layer(h, cos, sin, None, step, kv)

        def calls(ops, qkv, o, gu, d, w1=w1, w2=w2, kv=kv) -> torch.Tensor:
            x = ops.rms_norm(h, w1, eps)
            att = ops.decode_attention(*ops.block_linears(x, *qkv), cos, sin, kv[0], kv[1], row0, slot)
            x2, nx = ops.add_rms_norm(h, o[0](att, *o[1]), w2, eps)
            return x2 + d[0](ops.block_swiglu(nx, *gu), *d[1])

        boxed_ns = SimpleNamespace(**boxed_ops)

        def ops_alone() -> torch.Tensor:
            return calls(kernels.OPS, qkv, o, gu, d)

        def ops_boxed() -> torch.Tensor:
            return calls(boxed_ns, qkv, ob, gu, db)

        def linears_alone() -> None:
            kernels.OPS.block_linears(h, *qkv)
            o[0](h, *o[1])
            kernels.OPS.block_linears(h, *gu)
            d[0](down_in, *d[1])

        if not torch.equal(module(), ops_alone()) or not torch.equal(module(), ops_boxed()):
            raise SystemExit("the ops called alone do not reproduce the layer's output: this script is out of date")
        cases = {"module": module, DISPATCHED: module, "ops alone": ops_alone, "ops, torch.ops": ops_boxed,
                 "linears alone": linears_alone}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, f in cases.items():
                DirectCall.__call__ = nn.Module.__call__ if name == DISPATCHED else direct_call
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    f()
                times[name].append((time.perf_counter() - t0) / args.calls * 1e6)
            DirectCall.__call__ = direct_call
        # every layer in turn: the weights streamed as in a decode step
        layers = list(model.layers)
        kvs = [cache.layer(i) for i in range(len(layers))]
        lin_all = [(joint(ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj),
                    (ly.self_attn.o_proj._eager, ly.self_attn.o_proj._args), joint(ly.mlp.gate_proj, ly.mlp.up_proj),
                    (ly.mlp.down_proj._eager, ly.mlp.down_proj._args)) for ly in layers]
        norms = [(ly.input_layernorm.weight, ly.post_attention_layernorm.weight) for ly in layers]
        head = model.lm_head

        def all_modules() -> None:
            for ly, kvi in zip(layers, kvs):
                ly(h, cos, sin, None, step, kvi)

        def all_ops() -> None:
            for lins, (n1, n2), kvi in zip(lin_all, norms, kvs):
                calls(kernels.OPS, *lins, w1=n1, w2=n2, kv=kvi)

        def all_linears() -> None:
            for qkv_i, (oop, oargs), gu_i, (dop, dargs) in lin_all:
                kernels.OPS.block_linears(h, *qkv_i)
                oop(h, *oargs)
                kernels.OPS.block_linears(h, *gu_i)
                dop(down_in, *dargs)

        # the same seven products, one op call per module (no joint calls): (op, its args, its input)
        sep_all = [[(m._eager, m._args, down_in if m is ly.mlp.down_proj else h)
                    for m in (ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj, ly.self_attn.o_proj,
                              ly.mlp.gate_proj, ly.mlp.up_proj, ly.mlp.down_proj)] for ly in layers]

        def all_linears_each() -> None:
            for calls_i in sep_all:
                for op, op_args, x in calls_i:
                    op(x, *op_args)

        streamed = {"all layers, module": all_modules, "all layers, ops": all_ops, "all layers, linears": all_linears,
                    SEPARATE: all_linears_each, "head": lambda: head(h)}
        stimes: dict[str, list[float]] = {name: [] for name in streamed}
        passes = max(1, args.calls // 20)
        for _ in range(args.rounds):
            for name, f in streamed.items():
                t0 = time.perf_counter()
                for _ in range(passes):
                    f()
                per = len(layers) if name != "head" else 1
                stimes[name].append((time.perf_counter() - t0) / passes / per * 1e6)
    med = {name: statistics.median(t) for name, t in times.items()}
    smed = {name: statistics.median(t) for name, t in stimes.items()}
    n = model.config.n_layers
    print(f"{args.model} layer {args.layer}, one decode token, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} rounds x {args.calls} calls:")
    for name, us in med.items():
        print(f"  {name:26s} {us:7.1f} us")
    extra = med["module"] - med["ops alone"]
    print(f"  eager cost over its ops: {extra:.1f} us per layer = {extra * n / 1e3:.2f} ms per step "
          f"({n} layers); module / ops alone = {med['module'] / med['ops alone']:.2f}x")
    saved = med[DISPATCHED] - med["module"]
    print(f"  DirectCall saves {saved:.1f} us per layer against nn.Module.__call__ "
          f"({med[DISPATCHED] / med['module']:.3f}x)")
    layer_bytes = sum(m.weight_nbytes for m in linears)
    head_bytes = (head.weight_nbytes if hasattr(head, "weight_nbytes")
                  else head.weight.numel() * head.weight.element_size())
    print(f"every layer in turn (weights streamed), median of {args.rounds} rounds x {passes} passes:")
    for name, us in smed.items():
        gbs = (head_bytes if name == "head" else layer_bytes) / us / 1e3
        extra_gbs = f"  ({gbs:.1f} GB/s of weights)" if name in ("all layers, linears", SEPARATE, "head") else ""
        print(f"  {name:20s} {us:8.1f} us{' per layer' if name != 'head' else ''}{extra_gbs}")
    joint_saves = smed[SEPARATE] - smed["all layers, linears"]
    print(f"  q|k|v and gate|up as two joint calls save {joint_saves:.1f} us per layer against seven calls "
          f"({smed[SEPARATE] / smed['all layers, linears']:.3f}x)")


if __name__ == "__main__":
    main()
