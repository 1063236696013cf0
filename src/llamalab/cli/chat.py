"""`llamalab chat MODEL` (or `--model MODEL`): an interactive chat through the model's chat template.

Each line you type is a user message; the reply streams back and joins the history. ``/reset``
forgets the conversation (the ``--system`` message stays), ``/exit`` (or end of input) quits.
Works from a terminal (a ``> `` prompt, readline editing) and from a pipe (one message per line,
replies only). When the history no longer fits the context, the oldest turns are dropped.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from llamalab.cli._args import check_text, read_stdin_line
from llamalab.cli.generate import (
    add_sampling_arguments,
    generation_kwargs,
    load_models,
    print_stats,
    sampling_params,
    stream_to_stdout,
    warm_up,
)

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.tokenization.protocol import TokenizerProtocol

MAX_NEW_TOKENS = 512  # per reply
TEMPERATURE = 0.7

HELP = "chat with a model interactively (its chat template, history, --system, /reset, /exit; pipe-friendly)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system message")
    add_sampling_arguments(p, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE)


def _fit_history(tok: TokenizerProtocol, history: list[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """Drop the oldest turns (keeping a system message) until the prompt fits ``budget`` tokens."""
    while True:
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        body = 1 if history and history[0]["role"] == "system" else 0
        if len(ids) <= budget or len(history) - body <= 1:
            return history
        history = history[:body] + history[body + 2:] if len(history) - body > 2 else history[:body] + history[-1:]


def run(args: argparse.Namespace) -> int:
    from llamalab.errors import LlamalabError

    params = sampling_params(args)
    model, tok, draft = load_models(args)
    if tok is None or not getattr(tok, "chat_template", None):
        raise LlamalabError(f"{args.model} has no tokenizer with a chat template: use `llamalab generate`")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print("chat with the model; /reset forgets the conversation, /exit quits", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    kwargs = generation_kwargs(args, params, draft)
    budget = model.config.max_position_embeddings - args.max_new_tokens
    if budget < 1:
        raise LlamalabError(f"--max-new-tokens {args.max_new_tokens} leaves no room in the "
                            f"{model.config.max_position_embeddings}-token context")
    if args.stats:
        warm_up(model, tok, [{"role": "user", "content": "Hi"}], kwargs)
    while True:
        try:
            line = check_text(input("> ")) if interactive else read_stdin_line()
        except EOFError:
            break
        if not interactive and line == "":
            break  # end of the pipe
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(system)
            if interactive:
                print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        history = _fit_history(tok, history, budget)
        result, seconds = stream_to_stdout(model, tok, history, kwargs)
        history.append({"role": "assistant", "content": result.text if result is not None else ""})
        if args.stats and result is not None:
            print_stats(result, seconds)
    return 0
