"""`llamalab generate MODEL --prompt TEXT` (or `--model MODEL`): stream a continuation to the terminal.

Every sampler has an option (see ``--help``); ``--chat`` wraps the prompt in the model's chat
template; ``--draft-model PATH`` (or ``--draft-layers N``, an early-exit draft made of the model's
first N layers) turns on speculative decoding; ``--stats`` prints timing and acceptance to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from llamalab.cli._args import add_model_argument, check_seed, read_stdin, refuse_preset, resolve_device
from llamalab.errors import LlamalabError

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.tokenization.protocol import TokenizerProtocol


HELP = "generate text from a prompt, streamed to the terminal (every sampler, stop strings, speculative decoding)"


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 256, temperature: float = 0.0) -> None:
    """Options shared by `generate` and `chat` (each with its own defaults, shown by --help)."""
    add_model_argument(p)
    p.add_argument("--max-new-tokens", "-n", type=int, default=max_new_tokens,
                   help="stop after this many tokens (default %(default)s)")
    p.add_argument("--temperature", "-t", type=float, default=temperature,
                   help="0 = greedy; higher = more random (default %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p × the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS to token ID's logit (repeatable; -100 bans, +100 forces)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible (0..2**63-1)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--draft-model", default=None, help="a smaller model with the same tokenizer: speculative decoding")
    p.add_argument("--draft-layers", type=int, default=None,
                   help="speculative decoding with an early-exit draft: the model's first N layers")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="tokens the draft proposes per round (4)")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step compiled whole (torch.compile; cached on disk under ~/.cache/llamalab)")
    p.add_argument("--no-compile", action="store_true",
                   help="run the decode step eagerly (the default unless LLAMALAB_COMPILE=1)")
    p.add_argument("--decode-dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="accepted for compatibility; ignored (the step runs in the model's dtype: see --dtype)")
    p.add_argument("--no-fast", action="store_true", help="decode with the model's plain forward")
    p.add_argument("--truncate", action="store_true",
                   help="keep the end of a prompt longer than the context instead of failing")
    p.add_argument("--stats", action="store_true",
                   help="print prompt/decode speed (and acceptance) to stderr, measured after a warm-up run")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    add_sampling_arguments(p)


def sampling_params(args: argparse.Namespace):
    """SamplingParams from the options; raises a one-line LlamalabError on a bad value."""
    from llamalab.generation.sampling import SamplingParams

    bias: dict[int, float] = {}
    for item in args.logit_bias:
        tid, sep, val = item.partition("=")
        try:
            bias[int(tid)] = float(val)
        except ValueError:
            raise LlamalabError(f"--logit-bias takes ID=BIAS (e.g. 42=-100), got {item!r}") from None
        if not sep:
            raise LlamalabError(f"--logit-bias takes ID=BIAS (e.g. 42=-100), got {item!r}")
    if args.max_new_tokens < 1:
        raise LlamalabError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_draft_tokens < 1:
        raise LlamalabError(f"--num-draft-tokens must be >= 1, got {args.num_draft_tokens}")
    if args.draft_layers is not None and args.draft_layers < 1:
        raise LlamalabError(f"--draft-layers must be >= 1 (the draft is the model's first N layers), "
                            f"got {args.draft_layers}")
    if args.draft_model and args.draft_layers is not None:
        raise LlamalabError("pass either --draft-model or --draft-layers, not both")
    check_seed(args.seed)
    args.device = resolve_device(args.device)  # before the (slow) load
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                          presence_penalty=args.presence_penalty, logit_bias=bias, seed=args.seed)


def load_models(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, draft model or None) as the options ask."""
    import llamalab

    device = resolve_device(args.device)
    refuse_preset(args.model, "generate")
    model, tok = llamalab.load(args.model, dtype=args.dtype, device=device)
    model.eval()
    draft = None
    if args.draft_model:
        draft, _ = llamalab.load(args.draft_model, dtype=args.dtype or model.dtype, device=device)
        draft.eval()
    elif args.draft_layers is not None:
        from llamalab.generation.speculative import early_exit_draft

        if args.draft_layers >= model.config.n_layers:
            raise LlamalabError(f"--draft-layers must be below the model's {model.config.n_layers} layers "
                                f"(a draft of all of them is the model itself), got {args.draft_layers}")
        draft = early_exit_draft(model, args.draft_layers)
    return model, tok, draft


def warm_up(model: Any, tok: TokenizerProtocol, prompt: Any, kwargs: dict[str, Any]) -> None:
    """A short generation first, so that --stats leaves out one-time costs (building the decode step,
    torch.compile, first-call allocations); prints how long the compiled step took to start."""
    from llamalab.generation.generate import Completion, stream_batch

    results: list[Completion] = []
    t = time.perf_counter()
    for _ in stream_batch(model, tok, [prompt], results=results, **{**kwargs, "max_new_tokens": 2, "stop": None}):
        pass
    if results and results[0].stats.get("compiled"):
        first = results[0].stats.get("first_step_s", 0.0)
        print(f"[decode step compiled: first step {first:.1f}s (compiling cold, or loading the cached graph "
              f"warm); warm-up {time.perf_counter() - t:.1f}s]", file=sys.stderr)


def generation_kwargs(args: argparse.Namespace, params: Any, draft: Any) -> dict[str, Any]:
    return dict(params=params, max_new_tokens=args.max_new_tokens, stop=args.stop or None, truncate=args.truncate,
                draft_model=draft, num_draft_tokens=args.num_draft_tokens, fast=not args.no_fast,
                compile=True if args.compile else (False if getattr(args, "no_compile", False) else None),
                decode_dtype=args.decode_dtype)


def print_stats(result: Any, elapsed: float) -> None:
    s = result.stats
    n = len(result.token_ids)
    msg = f"[{result.prompt_tokens} prompt tokens, {n} generated in {elapsed:.2f}s"
    if "decode_s" in s and s["decode_s"] > 0:
        msg += f"; prefill {result.prompt_tokens / max(s['prefill_s'], 1e-9):.1f} tok/s, " \
               f"decode {s['decode_steps'] / s['decode_s']:.1f} tok/s"
    if "acceptance_rate" in s:
        msg += f"; draft acceptance {s['acceptance_rate']:.0%}, {s['tokens_per_step']:.2f} tokens per target step"
    print(msg + f"; finish: {result.finish_reason}]", file=sys.stderr)


def stream_to_stdout(model: Any, tok: Any, prompt: Any, kwargs: dict[str, Any]) -> tuple[Any, float]:
    """Stream one completion of `prompt` to stdout as it is generated (then a newline); returns the
    completion (or None) and the seconds it took."""
    from llamalab.generation.generate import Completion, stream_batch

    results: list[Completion] = []
    t0 = time.perf_counter()
    for _, piece in stream_batch(model, tok, [prompt], results=results, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return (results[0] if results else None), time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:

    params = sampling_params(args)
    prompt: Any = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise LlamalabError("give a prompt with --prompt TEXT (or pipe it on stdin)")
        prompt = read_stdin()
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = messages + [{"role": "user", "content": prompt}]
    model, tok, draft = load_models(args)
    kwargs = generation_kwargs(args, params, draft)
    if args.stats:
        warm_up(model, tok, prompt, kwargs)
    result, seconds = stream_to_stdout(model, tok, prompt, kwargs)
    if args.stats and result is not None:
        print_stats(result, seconds)
    return 0
