"""The checks every HTTP request passes before it reaches a route, as one ASGI middleware.

* **Host** — the ``Host`` header must name this server: ``localhost``, an IP address (``127.0.0.1``,
  ``[::1]``, any literal: DNS rebinding needs a name, never an address), the ``--host`` name, or one
  of ``--allowed-hosts`` (``*`` turns the check off). A web page whose domain an attacker re-points at
  127.0.0.1 sends its own name and gets 421, so it cannot read answers.
* **Content-Type** — a POST body must be declared ``application/json`` (415 otherwise). Browsers send
  ``text/plain`` and form types cross-origin without asking first; JSON needs a CORS preflight,
  which this server never grants, so a page cannot queue generations either.
* **Nothing leaks** — an exception a route did not turn into an error answer is logged once and
  answered with a 500 that names no internal detail; a client that hung up gets nothing and no log.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Iterable
from typing import Any

from starlette.requests import ClientDisconnect

log = logging.getLogger("llamalab.server.run")

LOCAL_NAMES = ("localhost", "localhost.localdomain")
WILDCARD_BINDS = ("", "0.0.0.0", "::", "[::]")


class ClientGone(Exception):
    """The client hung up before its request was read; nothing is sent and nothing is logged."""


def allowed_host_names(bound_host: str, extra: Iterable[str] = ()) -> set[str] | None:
    """The Host names to accept (IP literals are always accepted); None accepts any ("*" in ``extra``)."""
    extra = [h.strip() for h in extra if h.strip()]
    if "*" in extra:
        return None
    extra = [host_of(h) for h in extra]
    names = set(LOCAL_NAMES) | set(extra)
    bound = bound_host.strip().lower().rstrip(".")
    if bound in WILDCARD_BINDS:
        names.add(socket.gethostname().lower())
    else:
        names.add(bound)
    return names


def host_of(header: str) -> str:
    """``Host`` header -> the host alone, lowercased, without the port or brackets."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    name, sep, port = h.rpartition(":")
    h = name if sep and port.isdigit() else h
    return h.rstrip(".")


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def error_body(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


class RequestGuard:
    """ASGI middleware: Host allow-list, JSON-only POST bodies, no leaked exceptions (see the module doc)."""

    def __init__(self, app: Any, allowed_hosts: set[str] | None) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed_hosts is not None and not (host_of(host) in self.allowed_hosts or is_ip_literal(host_of(host))):
            shown = repr(host[:64]) if host else "missing"
            await self._reply(send, 421 if host else 400, f"the Host header ({shown}) does not name this server; "
                              "start it with --allowed-hosts NAME to accept that name", "invalid_host")
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                shown = repr(ctype[:64]) if ctype else "missing"
                await self._reply(send, 415, f"the request body must be sent as 'Content-Type: application/json' "
                                  f"(got {shown})", "unsupported_media_type")
                return

        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except (ClientGone, ClientDisconnect):
            return
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope.get("path"))
            if not started:
                await self._reply(send, 500, "internal server error (the details are in the server log)",
                                  "internal_error", type="server_error")

    @staticmethod
    async def _reply(send: Any, status: int, message: str, code: str, type: str = "invalid_request_error") -> None:
        body = error_body(message, code, type)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
