"""Prefill / decode / verify over one KV cache — always through the model's own forward.

:class:`Runner` is what ``generate``, ``chat``, the server's engine, speculative decoding and eval's
generation all decode with. There is one implementation of the math, :meth:`Llama.forward_step`;
the decode step either runs it eagerly or runs it **compiled whole** (``torch.compile`` of every
layer, attention and the head as one graph) over a static cache:

* the cache has a fixed number of rows (the batch rounded up to a power of two) and slots (the
  context needed, rounded up to a power of two of at least :data:`SEQ_BUCKET`) plus one scratch slot, so one
  graph serves every step of every call of that bucket; rows that take no part in a step write
  into the scratch slot (:meth:`KVCache.plan_decode`);
* CPU: Inductor's defaults (``cpp_wrapper``, ``freezing`` and few-row products rewritten as streaming
  reductions were tried and measured no faster: docs/generation.md); CUDA: CUDA graphs
  (``mode="reduce-overhead"``);
* the compiled artifacts are cached on disk (Inductor's FX-graph cache, in
  ``~/.cache/llamalab/inductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise), so a second
  process skips code generation.

``compile="blocks"`` (``LLAMALAB_COMPILE=blocks``) compiles per block instead: one graph of
``Block.forward`` with dynamic shapes that every layer runs (each layer's weights and cache tensors
are its arguments), over the eager step's cache and plan — a fraction of the whole step's cold
compile on CPU, 8-13% faster than eager once loaded (:func:`compile_pays`).

Compiling is chosen by ``compile=`` (True / False / ``"whole"`` / ``"blocks"``), else the environment
variable ``LLAMALAB_COMPILE`` (``0`` / ``1`` / ``blocks``), else :func:`compile_pays` — on where it was
measured to pay.
Forward hooks on any module run the eager step (hooks then fire as usual); so does a padded batch in
the whole-step mode (the per-block mode plans it as the eager step does).
Prefill (many tokens per row) always runs eagerly: its matrix products dominate and need no graph.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.model.llama import Llama


PREFILL_CHUNK = 512
SEQ_BUCKET = 512  # the compiled step's slots: a power of two, at least this (a short warm-up shares the graph)
COMPILE_ENV = "LLAMALAB_COMPILE"
CACHE_DIR = Path("~/.cache/llamalab").expanduser()


def compile_pays(model: Llama) -> bool:
    """Where compiling the decode step was measured to pay by default (docs/generation.md has the
    figures): nowhere yet. On a 2-core CPU, SmolLM2's step compiled whole takes minutes cold and
    12-40 s to load warm. Compiled per block (``compile="blocks"``) it takes ~1 min cold and ~12 s warm
    (torch.compile's import ~5 s, loading the cached graph ~7 s), then decodes 8-13% faster than eager
    (median step 18.8-23.6 against 20.4-26.5 ms of CPU, interleaved in one process): a 64-token
    generation takes ~1.4-3 s eagerly, so the warm start is won back only after thousands of tokens."""
    return False


COMPILE_MODES = ("whole", "blocks")


def compile_mode(model: Llama, compile: bool | str | None) -> str:
    """``"eager"``, ``"whole"`` (the step compiled whole over a static cache) or ``"blocks"`` (each layer
    through one compiled ``Block.forward``): from ``compile`` (True = "whole", False = eager, or a mode's
    name), else ``LLAMALAB_COMPILE`` (0 / 1 / blocks), else :func:`compile_pays`."""
    if isinstance(compile, str):
        if compile not in COMPILE_MODES + ("eager",):
            raise ValueError(f"unknown compile mode {compile!r}; use one of eager, {', '.join(COMPILE_MODES)}")
        return compile
    if compile is not None:
        return "whole" if compile else "eager"
    env = os.environ.get(COMPILE_ENV, "").strip().lower()
    if env:
        if env in ("0", "false", "no", "off", "eager"):
            return "eager"
        return "blocks" if env == "blocks" else "whole"
    return "whole" if compile_pays(model) else "eager"


def want_compile(model: Llama, compile: bool | str | None) -> bool:
    return compile_mode(model, compile) != "eager"


def has_hooks(model: Llama) -> bool:
    """Any forward (pre-)hook on the model's modules, or a global one: the eager step runs them."""
    from torch.nn.modules import module as m

    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())


def compiled_step(model: Llama):
    """``torch.compile(model.forward_step)``, built once per model and kept on it."""
    fn = model.__dict__.get("_llamalab_compiled_step")
    if fn is None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR / "inductor"))
        if model.device.type == "cuda":
            fn = torch.compile(model.forward_step, mode="reduce-overhead", dynamic=False)
        else:
            fn = torch.compile(model.forward_step, dynamic=False)
        model.__dict__["_llamalab_compiled_step"] = fn
    return fn


_BLOCK_STEP = None


def compiled_block():
    """``torch.compile(Block.forward)`` with dynamic shapes, built once per process: every layer of every
    model runs through the same graph — a layer is an argument (its weights are graph inputs under
    Dynamo's module inlining) and so are its cache tensors (:meth:`KVCache.layer`), so no per-layer index
    is guarded on — and the fill length of the cache is a symbolic size, not a recompile per step."""
    global _BLOCK_STEP
    if _BLOCK_STEP is None:
        from llamalab.model.llama import Block

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR / "inductor"))
        _BLOCK_STEP = torch.compile(Block.forward, dynamic=True)
    return _BLOCK_STEP


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Runner:
    """Prefill / decode over one KV cache of ``batch_size`` rows × ``max_seq_len`` slots."""

    def __init__(self, model: Llama, batch_size: int, max_seq_len: int, compile: bool | str | None = None
                 ) -> None:
        self.model = model
        self.mode = compile_mode(model, compile)
        self.compiled = self.mode != "eager"
        self._block = None  # compile="blocks": the compiled Block.forward, made at the first decode step
        if self.mode == "whole":
            context = model.config.max_position_embeddings
            max_seq_len = max(max_seq_len, min(context, _next_pow2(max(max_seq_len, SEQ_BUCKET))))
            self.cache = model.new_cache(_next_pow2(batch_size), max_seq_len, scratch_slot=True)
            if model.device.type == "cuda":  # CUDA graphs replay over fixed addresses
                for t in self.cache.k_layers + self.cache.v_layers:
                    torch._dynamo.mark_static_address(t)
            self._step = compiled_step(model)
        else:
            self.cache = model.new_cache(batch_size, max_seq_len)
            self._step = None
        self.first_step_s: float | None = None  # the first decode step's time (compiling or loading the graph)

    @torch.inference_mode()
    def prefill(self, row: int, ids: Sequence[int], chunk: int = PREFILL_CHUNK, all_logits: bool = False
                ) -> torch.Tensor:
        """Write a prompt into cache row ``row``; logits of its last token (V,) (all (T, V) with all_logits)."""
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
        rows = slice(row, row + 1)
        outs = []
        for s in range(0, x.shape[1], chunk):
            part = x[:, s:s + chunk]
            if s + chunk >= x.shape[1] or all_logits:
                outs.append(self.model(part, cache=self.cache, cache_rows=rows, last_only=not all_logits)[0])
            else:
                self.model.hidden_states(part, cache=self.cache, cache_rows=rows)
        return torch.cat(outs) if all_logits else outs[-1][-1]

    @torch.inference_mode()
    def prefill_rows(self, rows: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Write several prompts (any lengths, ≥ 1 token each) into cache rows ``rows``, each after what
        its row holds, in one forward call; logits of each prompt's last token (len(rows), V).

        The batch is right-padded to the longest prompt (with each row's own last token) and every row's
        length is then cut back to its own tokens: a padded token only ever sits after a row's real
        tokens, where causal attention never looks, and is forgotten at once, so the cache holds no
        padded slots and later decode steps stay on the unpadded (compiled) path. If the forward raises,
        the rows are left as they were."""
        if not rows or len(rows) != len(prompts) or min(len(p) for p in prompts) < 1:
            raise ValueError("prefill_rows needs one non-empty prompt per row")
        dev = self.model.device
        lens = [len(p) for p in prompts]
        T = max(lens)
        x = torch.tensor([list(p) + [p[-1]] * (T - len(p)) for p in prompts], dtype=torch.long, device=dev)
        r0 = rows[0]
        sel = slice(r0, r0 + len(rows)) if list(rows) == list(range(r0, r0 + len(rows))) else \
            torch.tensor(list(rows), dtype=torch.long, device=dev)
        start = self.cache.lengths[torch.tensor(list(rows), dtype=torch.long, device=dev)].tolist()
        try:
            h = self.model.hidden_states(x, cache=self.cache, cache_rows=sel)
        except BaseException:
            for row, s in zip(rows, start):
                self.cache.truncate(row, s)
            raise
        for row, s, n in zip(rows, start, lens):
            if n < T:
                self.cache.truncate(row, s + n)
        last = h[torch.arange(len(rows), device=dev), torch.tensor(lens, device=dev) - 1]  # (B, D)
        return self.model.lm_head(self.model.norm(last[:, None]))[:, 0].float()

    @torch.inference_mode()
    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """One token per listed cache row -> logits (len(rows), V)."""
        dev = self.model.device
        t = torch.tensor(tokens, dtype=torch.long, device=dev)
        r = torch.tensor(rows, dtype=torch.long, device=dev)
        if self._step is not None and not self.cache.has_padding and not has_hooks(self.model):
            step = self.cache.plan_decode(r)
            ids = torch.zeros(self.cache.batch_size, 1, dtype=torch.long, device=dev)
            ids[r, 0] = t
            t0 = time.perf_counter() if self.first_step_s is None else 0.0
            logits = self._step(ids, self.cache, step)[:, 0]
            if self.first_step_s is None:
                self.first_step_s = time.perf_counter() - t0
            self.cache.commit(step, r)
            return logits[r]
        sel = slice(rows[0], rows[0] + 1) if len(rows) == 1 else \
            (slice(0, len(rows)) if rows == list(range(len(rows))) else r)
        if self.mode == "blocks" and not has_hooks(self.model):
            t0 = time.perf_counter() if self.first_step_s is None else 0.0
            if self._block is None:  # (importing torch.compile's machinery: seconds, counted in first_step_s)
                self._block = compiled_block()
            step = self.cache.plan(sel, len(rows), 1)
            logits = self.model.forward_step(t[:, None], self.cache, step, last_only=True, block=self._block)
            if self.first_step_s is None:
                self.first_step_s = time.perf_counter() - t0
            self.cache.commit(step)
            return logits[:, 0]
        return self.model(t[:, None], cache=self.cache, cache_rows=sel, last_only=True)[:, 0]

    def truncate(self, row: int, length: int) -> None:
        """Forget everything row ``row`` holds after its first ``length`` tokens (speculative rollback)."""
        self.cache.truncate(row, length)

    def length(self, row: int) -> int:
        return self.cache.length(row)
