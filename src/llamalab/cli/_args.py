"""Options and input checks shared by the commands: the model given positionally or as ``--model``,
``--device`` and ``--seed`` checked before any work, and standard input read as UTF-8.

Every check raises :class:`llamalab.errors.LlamalabError`, which the CLI prints as one line.
Nothing here imports torch at import time, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llamalab.errors import LlamalabError

MODEL_HELP = "HF dir, .gguf file, run dir or 'smollm2' (the bundled pretrained model)"
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed accepts up to 2**64-1, numpy and random less: keep one range


def add_model_argument(p: argparse.ArgumentParser, help: str = MODEL_HELP, required: bool = True) -> None:
    """The model as a positional ``MODEL`` or as ``--model/-m MODEL`` (either; :func:`merge_model` joins them)."""
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help=f"{help} (or --model MODEL)")
    p.add_argument("--model", "-m", dest="model", default=None, metavar="MODEL", help="the model, as an option")
    p.set_defaults(_model_required=required)


def merge_model(args: argparse.Namespace, command: str) -> None:
    """Set ``args.model`` from the positional or the option; refuse two different models or none."""
    if not hasattr(args, "model_arg"):
        return
    pos, opt = args.model_arg, args.model
    if pos is not None and opt is not None and pos != opt:
        hint = " (a prompt goes in --prompt TEXT)" if command in ("generate", "chat") else ""
        raise LlamalabError(f"two models given: {pos!r} and --model {opt!r}; give one{hint}")
    args.model = opt if opt is not None else pos
    if args.model is None and getattr(args, "_model_required", True):
        raise LlamalabError(f"which model? llamalab {command} MODEL ... (or --model MODEL), e.g. smollm2")


def refuse_preset(name: str, what: str = "text") -> None:
    """A random-init shape preset has no weights and no tokenizer: say so, and where the real model is."""
    from pathlib import Path

    from llamalab.config import PRESETS

    if name in PRESETS and not Path(name).exists():
        hint = "; the pretrained SmolLM2-135M-Instruct is `smollm2`" if name.startswith("smollm2") else ""
        raise LlamalabError(f"{name} is a random-init shape preset (no trained weights, no tokenizer), "
                            f"not a model to {what} with{hint}")


def check_seed(seed: int | None, option: str = "--seed") -> int | None:
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise LlamalabError(f"{option} must be in 0..{SEED_MAX} (2**63-1), got {seed}")
    return seed


def resolve_device(name: str | None) -> str:
    """A device torch can use here: the name given (checked), or cuda when available, else cpu."""
    import torch

    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LlamalabError(f"unknown --device {name!r} (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LlamalabError(f"--device {name}: CUDA is not available here (torch {torch.__version__}"
                                f"{'' if torch.version.cuda else ', built without CUDA'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LlamalabError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise LlamalabError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise LlamalabError(f"--device {name}: llamalab runs on cpu, cuda or mps")
    return str(device)


def decode_utf8(data: bytes, what: str = "standard input") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamalabError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def check_text(text: str, what: str = "standard input") -> str:
    """Text typed at a terminal (input() may carry undecodable bytes as surrogates): refuse it unless UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LlamalabError(f"{what} is not UTF-8 text") from None
    return text


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse a command-line argument that is not UTF-8 (the OS hands such bytes over as surrogates)."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not name.startswith("_"):
                check_text(v, f"the value of --{name.replace('_', '-')}" if name != "model_arg" else "MODEL")


def read_stdin() -> str:
    """All of standard input as UTF-8 text, whatever the locale."""
    stream: Any = getattr(sys.stdin, "buffer", None)
    if stream is None:  # replaced by a text stream (tests)
        return check_text(sys.stdin.read())
    return decode_utf8(stream.read())


def read_stdin_line() -> str:
    """One line of standard input as UTF-8 text ('' at the end)."""
    stream: Any = getattr(sys.stdin, "buffer", None)
    if stream is None:
        return check_text(sys.stdin.readline())
    return decode_utf8(stream.readline())
