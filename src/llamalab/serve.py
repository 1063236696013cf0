"""Run the OpenAI-compatible server: :func:`serve` (blocking, what ``llamalab serve`` calls) and
:class:`BackgroundServer` (in a thread of this process, for tests, benchmarks and notebooks).

The pieces live in :mod:`llamalab.server`: the continuous-batching engine, the request checks, the
FastAPI app and the streaming detokenizer.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.server import Engine, create_app


def model_id_for(path: str | Path) -> str:
    """The name a model is served under: its directory name, or a .gguf file's stem."""
    p = Path(path)
    return p.stem if p.suffix == ".gguf" else (p.resolve().name or str(path))


def build(model, tok, model_id: str, api_key: str | None = None, max_batch: int = 8, max_len: int | None = 2048,
          max_queue: int = 64, max_body_bytes: int = 1 << 20, prefill_chunk: int = 256):
    """(app, engine) for a loaded model; the engine thread is started."""
    if tok is None:
        raise LlamalabError("serving needs a tokenizer, and none was found next to the model")
    if max_batch < 1:
        raise LlamalabError(f"--max-batch must be >= 1, got {max_batch}")
    if max_queue < 0:
        raise LlamalabError(f"--max-queue must be >= 0, got {max_queue}")
    if max_len is not None and max_len < 2:
        raise LlamalabError(f"--max-len must be >= 2, got {max_len}")
    engine = Engine(model, tok, max_batch=max_batch, max_len=max_len, max_queue=max_queue,
                    prefill_chunk=prefill_chunk).start()
    return create_app(engine, model_id, api_key=api_key, max_body_bytes=max_body_bytes), engine


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, dtype: str | None = None, log_level: str = "info", **engine_kw: Any) -> None:
    """Load a model and serve it until interrupted."""
    import uvicorn

    from llamalab.loading import load

    model, tok = load(model_path, dtype=dtype)
    app, engine = build(model, tok, model_name or model_id_for(model_path), api_key=api_key, **engine_kw)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()


class BackgroundServer:
    """``with BackgroundServer(model, tok) as srv: ... srv.url ...`` — the server on a free loopback port."""

    def __init__(self, model, tok, model_id: str = "llamalab", host: str = "127.0.0.1", port: int = 0,
                 **kw: Any) -> None:
        import uvicorn

        self.app, self.engine = build(model, tok, model_id, **kw)
        self.model_id = model_id
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                                     timeout_graceful_shutdown=2))
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
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.engine.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
