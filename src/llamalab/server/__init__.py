"""OpenAI-compatible serving: a continuous-batching engine (engine.py), the wire format and request
checks (protocol.py) and the HTTP app (app.py). Run it with ``llamalab serve`` or
:func:`llamalab.server.run.serve`."""

from llamalab.server.app import create_app
from llamalab.server.engine import Engine, QueueFull
from llamalab.server.protocol import APIError

__all__ = ["APIError", "Engine", "QueueFull", "create_app"]
