"""An lm-evaluation-harness model: llamalab's Llama behind the harness's ``LM`` interface.

lm-evaluation-harness (EleutherAI) reduces every task to three kinds of request:

* ``loglikelihood``: ``(context, continuation)`` → ``(ln p(continuation | context), is_greedy)``;
* ``loglikelihood_rolling``: ``(text,)`` → ln p(text), every token scored once, conditioned on a
  BOS/EOS prefix, text longer than the window cut into disjoint chunks with as much context each
  as fits (:func:`llamalab.eval.windows.rolling_windows`);
* ``generate_until``: ``(context, gen_kwargs)`` → greedy (or sampled) text, cut at the first of
  ``gen_kwargs["until"]``, at most ``max_gen_toks`` tokens.

:class:`LlamalabLM` answers them with :mod:`llamalab.eval.multichoice` scoring and
:func:`llamalab.generate.complete`. It subclasses ``lm_eval.api.model.LM`` and registers itself as
``llamalab`` when lm-eval is installed (``pip install 'llamalab[harness]'``); without it the class
still works on any objects with an ``args`` tuple, as the harness's ``Instance`` has.
:func:`run_tasks` runs harness tasks by name, offline, with :func:`write_local_tasks` giving the
bundled next-line tasks as harness YAML over local files (no dataset downloads).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamalab.errors import LlamalabError
from llamalab.eval.multichoice import TASKS_DIR, encode_pair, loglikelihoods_of_ids
from llamalab.eval.windows import rolling_windows, score_windows

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.tokenization.protocol import TokenizerProtocol


try:  # optional extra
    from lm_eval.api.model import LM as _Base

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised where lm-eval is absent
    HAVE_LM_EVAL = False

    class _Base:  # type: ignore[no-redef]
        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1


def _args(request: Any) -> tuple:
    a = getattr(request, "args", request)
    return a if isinstance(a, tuple) else (a,)


class LlamalabLM(_Base):
    """``LM`` for lm-evaluation-harness. Give ``model``+``tok`` objects or ``pretrained`` (any path
    :func:`llamalab.load` takes); ``model_args`` strings work too: ``pretrained=DIR,batch_size=8``."""

    def __init__(self, model: Any = None, tok: TokenizerProtocol | None = None, pretrained: str | None = None,
                 batch_size: int | str = 8,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256, add_bos: bool | None = None,
                 dtype: str | None = None, device: str = "cpu", **_: Any) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise LlamalabError("LlamalabLM needs a model (model=...) or a path (pretrained=...)")
            import llamalab

            model, tok = llamalab.load(pretrained, dtype=dtype, device=device)
        if tok is None:
            raise LlamalabError("LlamalabLM needs a tokenizer; the model has none")
        self.model, self.tok = model.eval(), tok
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        ctx = int(model.config.max_position_embeddings)
        self.max_length = min(ctx, int(max_length)) if max_length else ctx
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = add_bos

    # ------------------------------------------------------------------ harness hooks
    @property
    def tokenizer_name(self) -> str:
        return f"llamalab-{type(self.tok).__name__}-{self.tok.vocab_size}"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt, tokenize=False)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tok, "bos_token_id", None)
        return bos if bos is not None else self.tok.eos_token_id

    # ------------------------------------------------------------------ the three request types
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, *_args(r)[:2], add_bos=self.add_bos) for r in requests]
        scores = loglikelihoods_of_ids(self.model, pairs, max_length=self.max_length, batch_size=self.batch_size,
                                       progress=not disable_tqdm)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = True) -> list[float]:
        import torch.nn.functional as F

        windows = []
        for d, r in enumerate(requests):
            ids = [self.prefix_token_id, *self.tok.encode(_args(r)[0], add_bos=False)]
            windows.extend(rolling_windows(ids, self.max_length, doc=d))
        totals = [0.0] * len(requests)

        def add(i: int, off: int, logits: list, targets: Any) -> None:
            totals[windows[i].doc] -= float(F.cross_entropy(logits[0], targets, reduction="sum").double())

        score_windows([self.model], windows, add, batch_size=self.batch_size, progress=not disable_tqdm,
                      desc="loglikelihood_rolling")
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = True) -> list[str]:
        from llamalab.generation.generate import complete

        out: list[str] = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            a = _args(r)
            kw = dict(a[1]) if len(a) > 1 and a[1] else {}
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            groups.setdefault((tuple(until), max_new, temperature), []).append(i)
        for (until, max_new, temperature), idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s:s + self.batch_size]
                comps = complete(self.model, self.tok, [_args(requests[i])[0] for i in part],
                                 max_new_tokens=max_new, stop=list(until), temperature=temperature,
                                 add_bos=self.add_bos, truncate=True)
                for i, c in zip(part, comps):
                    text = c.text
                    for u in until:  # the generator stops at these; cut again in case one spans a piece
                        text = text.split(u)[0] if u else text
                    out[i] = text
        return out


if HAVE_LM_EVAL:
    from lm_eval.api.registry import register_model

    try:
        register_model("llamalab")(LlamalabLM)
    except (AssertionError, ValueError):  # pragma: no cover - already registered
        pass


def write_local_tasks(out_dir: str | Path, tasks: Sequence[str] | None = None) -> list[str]:
    """Write harness YAML for bundled next-line tasks (reading the shipped JSONL); returns the task names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(TASKS_DIR.glob("*.jsonl")):
        if tasks is not None and path.stem not in tasks:
            continue
        name = f"llamalab_{path.stem}"
        (out / f"{name}.yaml").write_text(multiple_choice_yaml(name, path), encoding="utf-8")
        names.append(name)
    return names


def multiple_choice_yaml(name: str, jsonl: str | Path) -> str:
    """Harness task config for a local ``{context, choices, answer}`` JSONL file."""
    return (f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {str(Path(jsonl).resolve())!r}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            "doc_to_text: '{{context}}'\n"
            "doc_to_choice: choices\n"
            "doc_to_target: answer\n"
            "target_delimiter: ''\n"
            "metric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")


def run_tasks(lm: LlamalabLM, tasks: Sequence[str], include_path: str | Path | None = None,
              limit: int | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """Run harness tasks (bundled ``llamalab_*_nextline`` ones included) offline; returns the results dict."""
    if not HAVE_LM_EVAL:
        raise LlamalabError("lm-evaluation-harness is not installed: pip install 'llamalab[harness]' (lm-eval)")
    import tempfile

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="llamalab-tasks-") as tmp:
        write_local_tasks(tmp)
        paths = [tmp] + ([str(include_path)] if include_path else [])
        local_only = all(t.startswith("llamalab_") for t in tasks)  # skip indexing the harness's ~10k tasks
        manager = TaskManager(include_path=paths, include_defaults=not local_only)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise LlamalabError(f"unknown harness task(s): {', '.join(unknown)} (bundled: "
                                f"{', '.join(sorted(t for t in manager.all_tasks if t.startswith('llamalab_')))})")
        try:
            res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, bootstrap_iters=1000, log_samples=False)
        except (ConnectionError, OSError) as e:  # a task whose dataset is not on this machine
            raise LlamalabError(f"harness task data unavailable offline: {str(e).splitlines()[0]} "
                                "(llamalab never downloads datasets; use local task files)") from None
    return {"results": res.get("results", {}) if res else {}, "n-samples": res.get("n-samples", {}) if res else {}}
