"""Run the OpenAI-compatible server: :func:`serve` (blocking, what ``llamalab serve`` calls) and
:class:`BackgroundServer` (in a thread of this process, for tests, benchmarks and notebooks).

The pieces live in :mod:`llamalab.server`: the continuous-batching engine, the request checks, the
FastAPI app, the per-request guard and the connection limits. Both entry points run uvicorn the same
way (:func:`uvicorn_server`): the guarded h11 protocol, the open-file limit raised, accept errors
logged one line at a time. :func:`serve` binds the socket itself first, so a bad ``--host`` or a
busy port is a one-line error before the model is loaded.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from llamalab.errors import LlamalabError
from llamalab.server import Engine, create_app
from llamalab.server.connections import (
    AcceptErrorLog,
    ConnectionLimits,
    QuietRepeats,
    fit_to_open_files,
    guarded_protocol,
    raise_open_file_limit,
)
from llamalab.server.guard import allowed_host_names


def model_id_for(path: str | Path) -> str:
    """The name a model is served under: its directory name, or a .gguf file's stem."""
    p = Path(path)
    return p.stem if p.suffix == ".gguf" else (p.resolve().name or str(path))


def build(model, tok, model_id: str, api_key: str | None = None, max_batch: int = 8, max_len: int | None = 2048,
          max_queue: int = 64, max_body_bytes: int = 1 << 20, prefill_chunk: int = 256,
          allowed_hosts: set[str] | None = None, body_timeout: float = 30.0, threads: int | None = None):
    """(app, engine) for a loaded model; the engine thread is started (with ``threads`` intra-op threads;
    default: the calling thread's count)."""
    if tok is None:
        raise LlamalabError("serving needs a tokenizer, and none was found next to the model")
    if max_batch < 1:
        raise LlamalabError(f"--max-batch must be >= 1, got {max_batch}")
    if max_queue < 0:
        raise LlamalabError(f"--max-queue must be >= 0, got {max_queue}")
    if max_len is not None and max_len < 2:
        raise LlamalabError(f"--max-len must be >= 2, got {max_len}")
    if max_body_bytes < 1:
        raise LlamalabError(f"--max-body must be >= 1 byte, got {max_body_bytes}")
    for what, value in (("--model-name", model_id), ("--api-key", api_key or "")):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise LlamalabError(f"{what} is not valid UTF-8 text") from None
    engine = Engine(model, tok, max_batch=max_batch, max_len=max_len, max_queue=max_queue,
                    prefill_chunk=prefill_chunk, threads=threads).start()
    app = create_app(engine, model_id, api_key=api_key, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts,
                     body_timeout=body_timeout)
    return app, engine


class _Server(uvicorn.Server):
    """A uvicorn server whose event loop logs accept() failures one line at a time."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptErrorLog())
        await super().serve(sockets=sockets)


def uvicorn_server(app, host: str, port: int, limits: ConnectionLimits, log_level: str, graceful_s: int):
    """A uvicorn server for ``app`` with the guarded protocol and limits (the open-file limit raised first)."""
    limits.check()
    limits = fit_to_open_files(limits, raise_open_file_limit())
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded_protocol(limits), ws="none",
                            backlog=limits.backlog, timeout_keep_alive=limits.keep_alive_timeout,
                            timeout_graceful_shutdown=graceful_s, h11_max_incomplete_event_size=64 * 1024)
    QuietRepeats.install()
    return _Server(config), limits


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on host:port, or a one-line error (unknown host, port in use, no permission)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise LlamalabError(f"--host {host!r} is not an address this machine can listen on ({e})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise LlamalabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, dtype: str | None = None, log_level: str = "info",
          allowed_hosts: list[str] | tuple[str, ...] = (), limits: ConnectionLimits | None = None,
          **engine_kw: Any) -> None:
    """Load a model and serve it until interrupted."""
    import torch

    limits = limits or ConnectionLimits()
    limits.check()
    sock = bind(host, port, limits.backlog)
    # The engine thread does the tensor work with all the threads; this thread (loading, then HTTP) keeps
    # one, so that it starts no OpenMP team of its own (two teams slow every parallel region: Engine._loop)
    before = torch.get_num_threads()
    threads = engine_kw.pop("threads", None) or before
    torch.set_num_threads(1)
    try:
        _serve_loaded(model_path, sock, host, port, api_key, model_name, dtype, log_level, allowed_hosts, limits,
                      threads, engine_kw)
    finally:
        sock.close()
        torch.set_num_threads(before)  # (serve called from Python: the caller's thread gets its count back)


def _serve_loaded(model_path, sock, host, port, api_key, model_name, dtype, log_level, allowed_hosts, limits,
                  threads, engine_kw) -> None:
    """serve() after binding: load, build the app and its engine (``threads``), run until interrupted."""
    from llamalab.loading import load

    t0 = time.perf_counter()
    model, tok = load(model_path, dtype=dtype)
    load_s = time.perf_counter() - t0
    model_id = model_name or model_id_for(model_path)
    app, engine = build(model, tok, model_id, api_key=api_key, allowed_hosts=allowed_host_names(host, allowed_hosts),
                        body_timeout=limits.body_timeout, threads=threads, **engine_kw)
    try:
        server, limits = uvicorn_server(app, host, port, limits, log_level, graceful_s=5)

        n_params = model.logical_parameters()  # quantized linears count as the weights they stand for
        dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
        print(f"llamalab serve: loaded {model_path} ({n_params / 1e6:.1f}M parameters, {dtype_name}) in {load_s:.1f} s",
              file=sys.stderr)
        print(f"llamalab serve: serving model '{model_id}' at {url_of(sock)}/v1 "
              f"({'API key required' if api_key else 'no API key'}; up to {limits.max_connections} connections)",
              file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()


class BackgroundServer:
    """``with BackgroundServer(model, tok) as srv: ... srv.url ...`` — the server on a free loopback port.

    ``limits`` (a :class:`~llamalab.server.connections.ConnectionLimits`) and ``allowed_hosts`` are
    as for ``llamalab serve``; other keywords go to :func:`build`.
    """

    def __init__(self, model, tok, model_id: str = "llamalab", host: str = "127.0.0.1", port: int = 0,
                 limits: ConnectionLimits | None = None, allowed_hosts: list[str] | tuple[str, ...] = (),
                 **kw: Any) -> None:
        limits = limits or ConnectionLimits()
        self.app, self.engine = build(model, tok, model_id, allowed_hosts=allowed_host_names(host, allowed_hosts),
                                      body_timeout=limits.body_timeout, **kw)
        self.model_id = model_id
        self._server, self.limits = uvicorn_server(self.app, host, port, limits, "warning", graceful_s=2)
        self._thread = threading.Thread(target=self._server.run, name="llamalab-http", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.engine.stop()
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        self.url = url_of(self._server.servers[0].sockets[0])
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.engine.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
