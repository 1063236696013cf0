#!/usr/bin/env bash
# One GPU check, under 8 minutes on a CUDA machine: the parity tests, then for a Llama-3.2-1B-shaped
# bf16 model (random weights) and its int8 / int4 forms: batch-1 decode tok/s (eager and with the decode
# step compiled whole, CUDA graphs) and % of HBM bandwidth, prefill tok/s, and one training step.
#
#   benchmarks/device_check.sh                          # on a CUDA machine
#   DEVICE=cpu PRESET=tiny benchmarks/device_check.sh   # the same script as a CPU smoke run (seconds)
#
# Every figure is printed as one line "name: value"; a part that cannot run on this machine prints
# "name: skipped (reason)" and the rest goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export DEVICE=${DEVICE:-cuda} PRESET=${PRESET:-llama3.2-1b} NEW_TOKENS=${NEW_TOKENS:-128}

echo "== parity tests (CPU reference, $(date -u +%H:%M:%S))"
timeout 240 "$PY" -m pytest -q -x tests/test_parity.py -p no:cacheprovider 2>&1 | tail -3

echo "== model checks on $DEVICE, preset $PRESET ($(date -u +%H:%M:%S))"
timeout 420 "$PY" - <<'EOF'
import os
import time

import torch

from llamalab import Llama, LlamaConfig
from llamalab.generation.generate import complete

dev = torch.device(os.environ["DEVICE"])
preset, n_new = os.environ["PRESET"], int(os.environ["NEW_TOKENS"])
if dev.type == "cuda" and not torch.cuda.is_available():
    raise SystemExit("device_check: error: DEVICE=cuda but torch sees no CUDA device")
if preset == "tiny":  # the CPU smoke run
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_position_embeddings=1024)
    n_new = min(n_new, 16)
else:
    cfg = LlamaConfig.from_preset(preset)
dtype = torch.bfloat16


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bandwidth() -> float:
    """Device read+write bandwidth in GB/s: a large copy, median of 5."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=dev)
    y = torch.empty_like(x)
    times = []
    for _ in range(5):
        sync()
        t = time.perf_counter()
        y.copy_(x)
        sync()
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * 4 / sorted(times)[2] / 1e9


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen and not ("embed_tokens" in name and not cfg.tie_word_embeddings):
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def decode(model, label: str, bw: float) -> None:
    ban = {i: -100.0 for i in model.config.stop_token_ids}
    prompt = list(range(3, 35))
    for compiled in (False, True):
        name = f"{label} decode{' compiled' if compiled else ''}"
        try:
            t = time.perf_counter()
            first = complete(model, None, [prompt], max_new_tokens=4, compile=compiled)[0]
            warm = time.perf_counter() - t
            c = complete(model, None, [prompt], max_new_tokens=n_new, compile=compiled, logit_bias=ban)[0]
            tps = c.stats["decode_steps"] / c.stats["decode_s"]
            gbs = tps * weight_bytes(model) / 1e9
            extra = f", first call {warm:.1f}s" + (" (compile)" if first.stats.get("compiled") else "")
            print(f"{name}: {tps:.1f} tok/s, {gbs:.0f} GB/s = {gbs / bw:.0%} of measured bandwidth{extra}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)


bw = bandwidth()
print(f"bandwidth: {bw:.0f} GB/s (device copy)")
torch.manual_seed(0)
with torch.device(dev):
    model = Llama(cfg.replace()).to(dtype).eval()
print(f"model: {model.num_parameters() / 1e6:.0f}M parameters, {weight_bytes(model) / 2**30:.2f} GiB bf16")

# prefill
ids = torch.randint(0, cfg.vocab_size, (1, 512), device=dev)
with torch.inference_mode():
    model(ids, last_only=True)
    sync()
    t = time.perf_counter()
    for _ in range(3):
        model(ids, last_only=True)
    sync()
print(f"prefill 512: {3 * 512 / (time.perf_counter() - t):.0f} tok/s")

decode(model, "bf16", bw)

# one training step (bf16 weights kept in float32 master copy: autocast on a float32 model)
try:
    with torch.device(dev):
        train_model = Llama(cfg.replace()).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (4, 512), device=dev)
    times = []
    for _ in range(3):
        sync()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = train_model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    print(f"training step 4x512 bf16 autocast: {4 * 511 / min(times[1:]):.0f} tok/s (loss {loss.item():.2f})")
    del train_model, opt
except Exception as e:  # noqa: BLE001
    print(f"training step: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")

for method in ("int8", "int4"):
    try:
        from llamalab.quantization.quantize import quantize_model

        with torch.device(dev):
            q = Llama(cfg.replace()).to(dtype).eval()  # a config of its own: quantizing records itself there
        q = quantize_model(q, method)
        print(f"{method} model: {weight_bytes(q) / 2**30:.2f} GiB")
        decode(q, method, bw)
        del q
    except Exception as e:  # noqa: BLE001
        print(f"{method}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
EOF
echo "== done ($(date -u +%H:%M:%S))"
