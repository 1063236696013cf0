"""Cutting token sequences into model-sized windows and scoring them, batched.

A *window* is a run of at most ``max_length`` tokens fed to the model in one forward pass; its
*targets* are the tokens ``ids[first_target:]``, each predicted from the logits one position
earlier. Two ways of covering a long document:

* :func:`strided_windows` — the standard strided sliding window of Hugging Face's perplexity guide
  ("Perplexity of fixed-length models"): windows start every ``stride`` tokens and each scores
  only the tokens the previous window did not reach, so with ``stride < max_length`` every token
  after the first is scored exactly once, with at least ``max_length - stride`` tokens of context.
  (With ``stride == max_length`` the windows are disjoint and each window's first token goes
  unscored, exactly as in that guide.)
* :func:`rolling_windows` — lm-evaluation-harness's rolling log-likelihood: disjoint chunks of
  targets, each window as full as possible, the last one end-aligned.

:func:`score_windows` runs one or more models over the windows in length-sorted batches and hands
the float32 logits of the target positions, a chunk at a time, to a callback; the output head is
applied only where there are targets, so a 49k-token vocabulary does not blow up memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llamalab.errors import LlamalabError


@dataclass(frozen=True)
class Window:
    doc: int  # which document the window belongs to
    ids: tuple[int, ...]  # tokens fed to the model
    first_target: int  # ids[first_target:] are scored (first_target >= 1)

    @property
    def n_targets(self) -> int:
        return len(self.ids) - self.first_target


def check_window(max_length: int, stride: int | None = None) -> None:
    if max_length < 2:
        raise LlamalabError(f"max_length must be at least 2 tokens, got {max_length}")
    if stride is not None and not 1 <= stride <= max_length:
        raise LlamalabError(f"stride must be between 1 and max_length ({max_length}), got {stride}")


def strided_windows(ids: Sequence[int], max_length: int, stride: int, doc: int = 0) -> list[Window]:
    """HF's strided sliding window over one document (see the module docstring)."""
    check_window(max_length, stride)
    n = len(ids)
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        first = max(prev_end, begin + 1) - begin
        if end - begin > first:
            out.append(Window(doc, tuple(ids[begin:end]), first))
        prev_end = end
        if end == n:
            break
    return out


def rolling_windows(ids: Sequence[int], max_length: int, doc: int = 0) -> list[Window]:
    """Every token after ``ids[0]`` scored exactly once; windows as long as possible, the last end-aligned."""
    check_window(max_length)
    n = len(ids)
    out: list[Window] = []
    a = 1
    while a < n:
        b = min(a + max_length - 1, n)  # targets ids[a:b]
        start = max(0, b - max_length)
        out.append(Window(doc, tuple(ids[start:b]), a - start))
        a = b
    return out


def continuation_window(context: Sequence[int], continuation: Sequence[int], max_length: int,
                        doc: int = 0) -> Window:
    """A window scoring ``continuation`` after ``context``, the context cut from the left to fit."""
    if not context:
        raise LlamalabError("a continuation needs at least one context token")
    if not continuation:
        raise LlamalabError("empty continuation: nothing to score")
    whole = list(context) + list(continuation)
    if len(whole) > max_length:
        whole = whole[-max_length:]
    return Window(doc, tuple(whole), max(1, len(whole) - len(continuation)))


def _hidden(model, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head") and hasattr(model, "norm"):
        return model.hidden_states(ids, attention_mask=mask)
    return model(ids, attention_mask=mask)  # a plain callable: logits already


def _head(model, h: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head") and hasattr(model, "norm"):
        return model.lm_head(model.norm(h)).float()
    return h.float()


def _device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


Callback = Callable[[int, int, list[torch.Tensor], torch.Tensor], None]


def score_windows(models: Sequence, windows: Sequence[Window], fn: Callback, batch_size: int = 4,
                  chunk: int = 256, progress: bool = False, desc: str = "scoring") -> None:
    """Run every model over every window; call ``fn(window_index, offset, logits, targets)``.

    ``logits`` holds one float32 tensor (n, vocab) per model for the targets
    ``window.ids[first_target + offset :][:n]`` (``targets``, a LongTensor on the first model's device).
    """
    if batch_size < 1:
        raise LlamalabError(f"batch size must be at least 1, got {batch_size}")
    from llamalab.progress import progress_bar

    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
    devices = [_device(m) for m in models]
    main = devices[0]
    bar = progress_bar(total=sum(w.n_targets for w in windows), disable=not progress, unit="tok", desc=desc,
               leave=False, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                lens = [len(windows[i].ids) for i in idx]
                T = max(lens)
                ids = torch.zeros(len(idx), T, dtype=torch.long)
                mask = torch.zeros(len(idx), T, dtype=torch.long)
                for b, i in enumerate(idx):
                    ids[b, :lens[b]] = torch.tensor(windows[i].ids)
                    mask[b, :lens[b]] = 1
                uniform = min(lens) == T
                hs = [_hidden(m, ids.to(d), None if uniform else mask.to(d)) for m, d in zip(models, devices)]
                for b, i in enumerate(idx):
                    w = windows[i]
                    targets = ids[b, w.first_target:lens[b]].to(main)
                    for off in range(0, w.n_targets, chunk):
                        p0 = w.first_target - 1 + off
                        n = min(chunk, w.n_targets - off)
                        logits = [_head(m, h[b, p0:p0 + n]).to(main) for m, h in zip(models, hs)]
                        fn(i, off, logits, targets[off:off + n])
                    bar.update(w.n_targets)
    finally:
        bar.close()
