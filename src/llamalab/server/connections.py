"""Connections: what keeps one client from making the server unreachable for the others.

uvicorn accepts connections and hands each to an HTTP protocol object. :func:`guarded_protocol`
builds the one used here, uvicorn's h11 protocol plus three rules:

* **a header deadline** — a connection has ``header_timeout`` seconds from its first byte (or from
  connecting) to deliver complete request headers; then it gets a 408 and is closed. Half-open
  sockets and slowloris-style trickles cannot hold a file descriptor for long; nor can a client that,
  once answered, keeps trickling the unread rest of its body.
* **a connection cap** — at most ``max_connections`` open at once (never more than the open-file
  limit allows, so ``accept()`` does not run out of descriptors). When a new connection would pass
  the cap, the connection idle the longest (no request in progress: half-open, headers still
  arriving, keep-alive) is closed to make room; if none is idle, the new one gets a 503.
* **a write deadline** — a client that leaves the answer unread (the send buffer stays above its
  high-water mark) for ``write_timeout`` seconds is disconnected: a stream nobody reads cannot pin a
  connection, and the events queued for it, after its generation has ended.
* **JSON errors** — a malformed request line or headers gets an OpenAI-style error object, not
  uvicorn's plain-text 400.

:class:`AcceptErrorLog` replaces the event loop's exception handler so that a burst of ``accept()``
failures (``EMFILE``: too many open files) logs one line per interval, not a traceback per try, and
:class:`QuietRepeats` does the same for uvicorn's warning per malformed request;
:func:`raise_open_file_limit` lifts the soft ``nofile`` limit toward the hard one at startup.
The request-body deadline lives in the app (:func:`llamalab.server.app.create_app`), which reads
the body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("llamalab.server.run")

FD_RESERVE = 64  # descriptors kept free for model files, logs and the listening socket


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections, and how long each may take to send its request."""

    max_connections: int = 512
    header_timeout: float = 10.0  # seconds to deliver the request line and headers
    body_timeout: float = 30.0  # seconds to deliver the whole body, once the headers are in
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection stays open
    write_timeout: float = 60.0  # seconds a client may leave a full send buffer unread
    backlog: int = 2048  # connections the kernel queues before accept(), and asyncio accepts in one go

    def check(self) -> None:
        from llamalab.errors import LlamalabError

        if self.max_connections < 1:
            raise LlamalabError(f"--max-connections must be >= 1, got {self.max_connections}")
        for name, v in (("--header-timeout", self.header_timeout), ("--body-timeout", self.body_timeout),
                        ("--write-timeout", self.write_timeout)):
            if not v > 0:
                raise LlamalabError(f"{name} must be > 0 seconds, got {v}")


def raise_open_file_limit() -> int | None:
    """Lift the soft RLIMIT_NOFILE to the hard limit where allowed; the soft limit now (None if unknown)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int:
    """File descriptors this process holds now (0 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def fit_to_open_files(limits: ConnectionLimits, nofile: int | None) -> ConnectionLimits:
    """``limits`` lowered so that connections never exhaust the open-file limit. asyncio accepts up to
    ``backlog`` connections in one go before the cap can close idle ones, so both share the room left."""
    if nofile is None:
        return limits
    room = max(2, nofile - open_descriptors() - FD_RESERVE)
    backlog = max(1, min(limits.backlog, room // 2))
    cap = max(1, min(limits.max_connections, room - backlog))
    return dataclasses.replace(limits, max_connections=cap, backlog=backlog)


def _error_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline, a connection cap and JSON errors (see the module doc)."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.header_timer: asyncio.TimerHandle | None = None
            self.write_timer: asyncio.TimerHandle | None = None
            self.partial = False  # bytes of a request whose headers are not complete yet
            self.last_active = 0.0

        # -------------------------------------------------------------- state
        def idle(self) -> bool:
            """No request in progress (its headers may be arriving)."""
            return self.cycle is None or self.cycle.response_complete

        def arm_header_timer(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(limits.header_timeout, self.on_header_timeout)

        def cancel_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def close_with(self, response: bytes | None) -> None:
            self.cancel_header_timer()
            if self.transport.is_closing():
                return
            if response is not None:
                self.transport.write(response)
            self.transport.close()

        # -------------------------------------------------------------- protocol
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.last_active = time.monotonic()
            self.arm_header_timer()
            if len(self.connections) > limits.max_connections:
                self.make_room()

        def make_room(self) -> None:
            live = [c for c in self.connections if not c.transport.is_closing()]
            if len(live) <= limits.max_connections:
                return
            idle = [c for c in live if c is not self and isinstance(c, GuardedH11Protocol) and c.idle()]
            if idle:
                min(idle, key=lambda c: c.last_active).close_with(None)
            else:
                self.close_with(_error_response(503, "Service Unavailable", "the server has too many open "
                                                "connections; try again later", "too_many_connections"))

        def connection_lost(self, exc: Exception | None) -> None:
            self.cancel_header_timer()
            self.cancel_write_timer()
            super().connection_lost(exc)

        def pause_writing(self) -> None:  # the transport's buffer passed its high-water mark
            super().pause_writing()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(limits.write_timeout, self.on_write_timeout)

        def resume_writing(self) -> None:
            super().resume_writing()
            self.cancel_write_timer()

        def cancel_write_timer(self) -> None:
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None

        def on_write_timeout(self) -> None:
            self.write_timer = None
            if not self.transport.is_closing():
                self.transport.abort()  # connection_lost follows: the response ends, the jobs are cancelled

        def data_received(self, data: bytes) -> None:
            self.last_active = time.monotonic()
            if self.idle():  # the next request's headers (or the unread rest of an answered one's body)
                self.partial = True
                self.arm_header_timer()
            super().data_received(data)
            if not self.idle():  # a request is in
                self.partial = False
                self.cancel_header_timer()

        def on_response_complete(self) -> None:
            self.last_active = time.monotonic()
            super().on_response_complete()

        def on_header_timeout(self) -> None:
            self.header_timer = None
            if not self.idle():
                return
            headers_due = self.partial and self.conn.their_state is h11.IDLE
            self.close_with(_error_response(408, "Request Timeout", f"the request headers did not arrive within "
                                            f"{limits.header_timeout:g} s", "request_timeout") if headers_due else None)

        def send_400_response(self, msg: str) -> None:
            self.close_with(_error_response(400, "Bad Request", f"malformed HTTP request: {msg}", "invalid_http"))

    return GuardedH11Protocol


class AcceptErrorLog:
    """An event-loop exception handler: ``accept()`` running out of descriptors logs one line per
    ``interval`` seconds (with how many were suppressed); anything else goes to the default handler."""

    RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

    def __init__(self, interval: float = 10.0, logger: logging.Logger = log) -> None:
        self.interval = interval
        self.logger = logger
        self.last = -float("inf")
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in self.RESOURCE_ERRNOS):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        self.logger.warning("cannot accept connections: %s%s; retrying", exc.strerror or exc, more)
        self.last, self.suppressed = now, 0


class QuietRepeats(logging.Filter):
    """A log filter: uvicorn's per-request warnings about malformed requests pass once per ``interval``
    seconds (the next one says how many were held back), so a flood of garbage cannot flood the log."""

    MESSAGES = ("Invalid HTTP request received.", "Unsupported upgrade request.")
    DROPPED = ("No supported WebSocket library",)  # advice to install one: this server serves no WebSocket

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith(self.DROPPED):
            return False
        if not msg.startswith(self.MESSAGES):
            return True
        now = time.monotonic()
        if now - self.last.get(msg, -float("inf")) < self.interval:
            self.held[msg] = self.held.get(msg, 0) + 1
            return False
        if self.held.get(msg):
            record.msg, record.args = f"{msg} ({self.held[msg]} more like it not logged)", ()
        self.last[msg], self.held[msg] = now, 0
        return True

    @classmethod
    def install(cls, logger_name: str = "uvicorn.error") -> None:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())

