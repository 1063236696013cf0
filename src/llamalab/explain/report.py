"""The explain report: sections of math, pointers to the code, figures and tables, written as HTML.

Each section module exposes ``section(lab) -> Section``. :class:`Lab` carries what sections share —
the model under study, its tokenizer, the output folder, ``quick`` — and caches the small models
trained for the controlled experiments, so ``all`` trains the MHA/RMSNorm base model once and the
RoPE, RMSNorm and GQA sections all reuse it. :func:`write_report` renders ``index.html``: a single
self-contained file (inline CSS, no network), with the PNG figures beside it.
"""

from __future__ import annotations

import html
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamalab.errors import LlamalabError

SECTIONS = ("rope", "rmsnorm", "gqa", "attention")

DEFAULT_PROMPT = ("The quick brown fox jumps over the lazy dog. The dog, being lazy, did not chase the fox, "
                  "and the fox ran on into the forest.")


@dataclass
class Section:
    key: str
    title: str
    blocks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def para(self, text: str) -> None:
        self.blocks.append(f"<p>{text}</p>")

    def math(self, text: str) -> None:
        self.blocks.append(f'<pre class="math">{html.escape(text.strip())}</pre>')

    def code_ref(self, path: str, names: str) -> None:
        self.blocks.append(f'<p class="ref">Implemented in <code>{html.escape(path)}</code>: '
                           f"{html.escape(names)}</p>")

    def heading(self, text: str) -> None:
        self.blocks.append(f"<h3>{html.escape(text)}</h3>")

    def figure(self, filename: str, caption: str, takeaway: str) -> None:
        self.blocks.append(
            f'<figure><img src="{html.escape(filename)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}<br><b>Takeaway:</b> {html.escape(takeaway)}</figcaption></figure>")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.blocks.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c != c:
            return "—"
        if abs(c) >= 1000:
            return f"{c:,.0f}"
        return f"{c:.3g}" if abs(c) < 0.01 and c != 0 else f"{c:.3f}".rstrip("0").rstrip(".")
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


class Lab:
    """Shared state of one explain run (the model studied, output folder, cached experiment models)."""

    def __init__(self, model, tok, model_name: str, out_dir: Path, quick: bool = False,
                 prompt: str = DEFAULT_PROMPT, log: Callable[[str], None] | None = None) -> None:
        self.model, self.tok, self.model_name = model.eval(), tok, model_name
        self.out = Path(out_dir)
        self.quick = quick
        self.prompt = prompt
        self.log = log or (lambda msg: None)
        self._cache: dict[str, Any] = {}

    @property
    def config(self):
        return self.model.config

    # -- tokens of the prompt, for the given model (bytes when it has no tokenizer) -------------
    def prompt_ids(self, max_tokens: int = 48) -> tuple[torch.Tensor, list[str]]:
        vocab = self.config.vocab_size
        if self.tok is not None:
            ids = list(self.tok.encode(self.prompt))[:max_tokens]
            labels = [self.tok.decode([i]) for i in ids]
        else:
            raw = self.prompt.encode()[:max_tokens]
            ids = [b % vocab for b in raw]
            labels = [chr(b) for b in raw]
        labels = [lab.replace("\n", "\\n") if lab.strip() else repr(lab)[1:-1] or "␣" for lab in labels]
        return torch.tensor([ids], dtype=torch.long, device=self.model.device), labels

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def run_sections(lab: Lab, names: Sequence[str]) -> list[Section]:
    import importlib

    out = []
    for name in names:
        if name not in SECTIONS:
            raise LlamalabError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)} or all")
        lab.log(f"explain: {name} …")
        t0 = time.perf_counter()
        sec = importlib.import_module(f"llamalab.explain.{name}").section(lab)
        sec.seconds = time.perf_counter() - t0
        lab.log(f"explain: {name} done in {sec.seconds:.1f} s")
        out.append(sec)
    return out


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;line-height:1.5;color:#1d1d1f;background:#fff}
h1{font-size:1.7em;margin-bottom:.2em} h2{border-bottom:2px solid #e4e4e7;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em} .meta{color:#555;font-size:.9em}
pre.math{background:#f6f8fa;border-left:4px solid #6366f1;padding:.7em 1em;white-space:pre-wrap;font-size:.88em;
font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace}
p.ref{background:#fefce8;border-left:4px solid #eab308;padding:.4em .8em;font-size:.92em}
figure{margin:1.2em 0;text-align:center} figure img{max-width:100%;border:1px solid #e4e4e7}
figcaption{font-size:.9em;color:#333;text-align:left;margin-top:.4em}
figure.broken{outline:3px solid #dc2626}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} caption{caption-side:top;text-align:left;color:#333;
padding-bottom:.3em} th,td{border:1px solid #d4d4d8;padding:.25em .6em;text-align:right}
th{background:#f4f4f5} td:first-child,th:first-child{text-align:left} nav a{margin-right:1em}
code{background:#f4f4f5;padding:0 .25em;border-radius:3px}
"""

# Marks each image with data-loaded="1"/"0" once the page has loaded (and outlines broken ones), so that
# a headless browser's DOM dump tells whether every figure rendered.
_JS = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute('data-loaded', good ? '1' : '0');
    if (good) { ok++; } else { imgs[i].parentNode.className += ' broken'; }
  }
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
"""


def write_report(lab: Lab, sections: Sequence[Section], command: str, seconds: float) -> Path:
    cfg = lab.config
    kind = "MHA" if cfg.n_kv_heads == cfg.n_heads else ("MQA" if cfg.n_kv_heads == 1 else "GQA")
    nav = "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>{"".join(s.blocks)}'
                   f'<p class="meta">Section computed in {s.seconds:.1f} s.</p></section>' for s in sections)
    meta = (f"Model <code>{html.escape(lab.model_name)}</code>: {lab.model.num_parameters() / 1e6:.1f}M parameters, "
            f"{cfg.n_layers} layers, hidden {cfg.hidden_size}, {cfg.n_heads} query / {cfg.n_kv_heads} KV heads "
            f"({kind}), head_dim {cfg.head_dim}, rope_theta {cfg.rope_theta:g}, context "
            f"{cfg.max_position_embeddings:,}. Generated by <code>{html.escape(command)}</code> in {seconds:.0f} s "
            f"on {html.escape(platform.machine())}, torch {html.escape(torch.__version__)}, "
            f"{torch.get_num_threads()} thread(s){' (--quick: shrunken experiments)' if lab.quick else ''}.")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            f"content=\"width=device-width,initial-scale=1\"><title>llamalab explain — {html.escape(lab.model_name)}"
            f"</title><style>{_CSS}</style></head><body><h1>Anatomy of a Llama, measured</h1>"
            f"<p class=\"meta\">{meta}</p><nav>{nav}</nav>{body}<script>{_JS}</script></body></html>\n")
    path = lab.out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
