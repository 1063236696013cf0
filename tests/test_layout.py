"""The package's import graph has no cycles — counting imports inside functions too, which is where
cycles hide — and every module named in the docs' layout exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "llamalab"


def module_name(path: Path, root: Path = PKG) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body), resolved to the longest module
    name that exists (``from llamalab.model import Llama`` -> ``llamalab.model``; ``from llamalab import
    kernels`` -> ``llamalab.kernels``)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                if t.split(".")[0] == root.name:
                    r = resolve(t)
                    if r and r != mod:
                        graph[mod].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "llamalab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from llamalab.sub.b import g\n")  # hidden in a function
    (pkg / "sub" / "b.py").write_text("from llamalab import a\n")
    (pkg / "c.py").write_text("from llamalab.a import f\n")
    assert cycles(import_graph(pkg)) == [["llamalab.a", "llamalab.sub.b"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("package", ["model", "formats", "tokenization", "generation", "quantization", "kernels",
                                     "data", "training", "eval", "server", "explain", "cli", "assets"])
def test_one_home_per_concern(package):
    assert (PKG / package / "__init__.py").is_file()
    doc = ast.get_docstring(ast.parse((PKG / package / "__init__.py").read_text(encoding="utf-8")))
    assert doc, f"llamalab/{package}/__init__.py should say what the package holds"


def test_the_tokenizer_satisfies_the_protocol_the_library_takes():
    from helpers import make_tokenizer
    from llamalab.tokenization.protocol import TokenizerProtocol

    class NoDecode:  # missing a member the protocol names
        vocab_size, bos_token_id, eos_token_id, stop_token_ids = 10, None, 1, [1]

        def encode(self, text, add_bos=None, add_eos=None):
            return [1]

    assert isinstance(make_tokenizer(), TokenizerProtocol)
    assert not isinstance(NoDecode(), TokenizerProtocol)


def test_generate_is_a_plain_function():
    import inspect

    import llamalab

    assert inspect.isfunction(llamalab.generate) and inspect.isfunction(llamalab.stream)
    assert llamalab.generate.__module__ == "llamalab.generation.generate"
