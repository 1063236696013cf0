"""`llamalab serve --model PATH`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse
import os

from llamalab.cli._args import add_model_argument

HELP = "serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)"
API_KEY_ENV = "LLAMALAB_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, help="HF dir, .gguf file, run dir or smollm2 (with a tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} when set)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    p.add_argument("--dtype", default=None, help="weights and activations: float32 (default) or bfloat16")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV-cache rows; default 8)")
    p.add_argument("--max-len", type=int, default=2048,
                   help="context per sequence, capped by the model's (default 2048)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429 (default 64)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated Host names to accept besides localhost, IP addresses and --host "
                        "('*': any; default none)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections at once; the longest-idle one is closed to make room (default 512)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request headers (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its request body (default 30)")
    p.add_argument("--write-timeout", type=float, default=60.0,
                   help="seconds a client may leave the answer unread before it is disconnected (default 60)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    from llamalab.errors import LlamalabError
    from llamalab.server.connections import ConnectionLimits
    from llamalab.server.run import serve

    if not 0 <= args.port <= 65535:
        raise LlamalabError(f"--port must be in 0..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    if api_key is not None and not api_key.strip():
        raise LlamalabError("--api-key must not be empty")
    limits = ConnectionLimits(max_connections=args.max_connections, header_timeout=args.header_timeout,
                              body_timeout=args.body_timeout, write_timeout=args.write_timeout)
    limits.check()
    serve(args.model, host=args.host, port=args.port, api_key=api_key, model_name=args.model_name,
          dtype=args.dtype, log_level=args.log_level, max_batch=args.max_batch, max_len=args.max_len,
          max_queue=args.max_queue, max_body_bytes=args.max_body, limits=limits,
          allowed_hosts=[h for h in args.allowed_hosts.split(",") if h.strip()])
    return 0
