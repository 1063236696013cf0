"""Hostile clients against a real `llamalab serve` process on 127.0.0.1: malformed HTTP and JSON,
wrong types and content types, foreign Host headers, lone surrogates, huge bodies, hang-ups mid-body,
slow headers and bodies, more half-open sockets than the server has file descriptors.

Every case answers 4xx with an OpenAI error object (or, for the socket cases, a closed connection);
after each, a normal request gets the same answer as before the attack, and the server's log never
holds a traceback. The server runs with an open-file limit of 256 and short header/body deadlines;
the deadlines are generous limits for "still answers", never speed assertions.
"""

from __future__ import annotations

import json
import logging
import resource
import select
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from helpers import Served, llamalab_serve, server_tiny, wait_until
from llamalab.server.connections import AcceptErrorLog, QuietRepeats

MODEL = "m"
NOFILE = 256  # the server's open-file limit (soft and hard): the flood below opens more sockets than this
MAX_CONNECTIONS = 32
READ_LIMIT_S = 30.0  # how long a client waits for an answer before calling the server unreachable


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


NORMAL = {"model": MODEL, "prompt": "hello world", "max_tokens": 8, "temperature": 0}
NORMAL_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "to be or not"}], "max_tokens": 8,
               "temperature": 0}


def normal_answers(url: str) -> dict[str, str]:
    r = httpx.post(url + "/v1/completions", json=NORMAL, timeout=READ_LIMIT_S)
    c = httpx.post(url + "/v1/chat/completions", json=NORMAL_CHAT, timeout=READ_LIMIT_S)
    assert r.status_code == 200 and c.status_code == 200, (r.text, c.text)
    return {"completion": r.json()["choices"][0]["text"], "chat": c.json()["choices"][0]["message"]["content"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, tok = server_tiny()
    d = tmp_path_factory.mktemp("hostile")
    model.save_pretrained(d / MODEL)
    tok.save(d / MODEL)
    with llamalab_serve(d / MODEL, d / "server.log", "--max-batch", "2", "--max-len", "128", "--max-connections",
                        str(MAX_CONNECTIONS), "--header-timeout", "1", "--body-timeout", "1",
                        "--allowed-hosts", "api.example:8000, other.example", "--log-level", "info",
                        preexec_fn=_low_nofile) as srv:
        srv.baseline = normal_answers(srv.url)
        yield srv


def still_serving(srv: Served) -> None:
    """The same answers as before the attack, and no traceback in the log."""
    assert srv.proc.poll() is None, srv.log_text()
    assert normal_answers(srv.url) == srv.baseline
    assert "Traceback" not in srv.log_text(), srv.log_text()[-4000:]


# --------------------------------------------------------------------------- raw HTTP
def connect(srv: Served) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=READ_LIMIT_S)
    return s


def read_response(s: socket.socket) -> tuple[int | None, dict | None]:
    """(status, JSON body) of the one response on ``s``, read until the server closes; (None, None) when
    the server closed without answering."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    if not data:
        return None, None
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def exchange(srv: Served, raw: bytes) -> tuple[int | None, dict | None]:
    with connect(srv) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):  # the server answered and closed before reading it all
            pass
        return read_response(s)


def request(path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST") -> bytes:
    h = {"Host": "127.0.0.1", "Content-Type": "application/json", "Connection": "close",
         "Content-Length": str(len(body)), **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_openai_error(status: int | None, body: dict | None, expected: int | tuple[int, ...]) -> dict:
    expected = (expected,) if isinstance(expected, int) else expected
    assert status in expected, (status, body)
    assert body is not None and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# --------------------------------------------------------------------------- malformed requests
MALFORMED = [
    # (raw body, expected status)
    (b"{not json", 400),
    (b'"a string"', 400),
    (b"[" * 100_000, 400),  # nested too deeply
    (b"\xff\xfe\x00garbage", 400),  # not UTF-8
    (b'{"model": "m", "prompt": "hi", "temperature": Infinity}', 400),
    (b'{"model": ["m"], "prompt": "hi"}', 400),
    (b'{"model": "m", "prompt": [[]]}', 400),
    (b'{"model": "m", "prompt": [true, false]}', 400),
    (b'{"model": "m", "prompt": "hi", "n": 1.5}', 400),
    (b'{"model": "m", "prompt": "hi", "stop": ["a", 1]}', 400),
    (b'{"model": "m", "prompt": "hi", "logit_bias": {"1": "x"}}', 400),
    (b'{"model": "m", "prompt": "hi", "stream_options": 3}', 400),
    (b'{"model": "m", "prompt": "hi", "max_tokens": 1e400}', 400),
    (b'{"model": "' + b"x" * 100_000 + b'", "prompt": "hi"}', 404),
    (b'{"model": "m", "prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}', 400),
    (b'{"model": "m", "prompt": "hi", "tool_choice": "auto"}', 400),
    (b'{"model": "m", "prompt": "hi", "response_format": {"type": "json_object"}}', 400),
    (b'{"model": "m", "prompt": "hi", "response_format": "json"}', 400),
]


@pytest.mark.parametrize("raw,status", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bodies(served, raw, status):
    err = assert_openai_error(*exchange(served, request("/v1/completions", raw)), status)
    assert len(err["message"]) < 500  # a client's huge string is not echoed back
    still_serving(served)


def test_chat_tools_and_json_mode_are_refused_plain_text_format_is_fine(served):
    for extra in ({"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tool_choice": "required"},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}):
        r = httpx.post(served.url + "/v1/chat/completions", json={**NORMAL_CHAT, **extra}, timeout=READ_LIMIT_S)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(extra)), r.text
    r = httpx.post(served.url + "/v1/chat/completions", json={**NORMAL_CHAT, "response_format": {"type": "text"}},
                   timeout=READ_LIMIT_S)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == served.baseline["chat"]
    still_serving(served)


LONE = "\\ud800"  # valid JSON, but a lone UTF-16 surrogate: not encodable as UTF-8
SURROGATES = [(path, raw.replace("@", LONE)) for path, raw in [
    ("/v1/completions", '{"model": "m", "prompt": "a@b"}'),
    ("/v1/completions", '{"model": "m", "prompt": ["ok", "@"]}'),
    ("/v1/completions", '{"model": "m@", "prompt": "hi"}'),
    ("/v1/completions", '{"model": "m", "prompt": "@", "echo": true, "max_tokens": 2}'),
    ("/v1/completions", '{"model": "m", "prompt": "hi", "stop": ["@"]}'),
    ("/v1/completions", '{"model": "m", "prompt": "hi", "stream": true, "stop": "@"}'),
    ("/v1/completions", '{"model": "m", "prompt": "hi", "logit_bias": {"@": 1}}'),
    ("/v1/completions", '{"model": "m", "prompt": "hi", "user": "@"}'),
    ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "@"}]}'),
    ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "us@er", "content": "x"}]}'),
    ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "@"}]}]}'),
]]


@pytest.mark.parametrize("path,raw", SURROGATES, ids=range(len(SURROGATES)))
def test_lone_surrogates_are_a_400(served, path, raw):
    err = assert_openai_error(*exchange(served, request(path, raw.encode())), 400)
    assert err["code"] == "invalid_encoding"
    assert "surrogates not allowed" not in err["message"]  # no internal exception text
    still_serving(served)


# --------------------------------------------------------------------------- what a web page can send
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   None])
def test_post_needs_json_content_type(served, ctype):
    raw = json.dumps(NORMAL).encode()
    err = assert_openai_error(*exchange(served, request("/v1/completions", raw, {"Content-Type": ctype})), 415)
    assert err["code"] == "unsupported_media_type"
    ok = request("/v1/completions", raw, {"Content-Type": "application/json; charset=utf-8"})
    status, body = exchange(served, ok)
    assert status == 200 and body["choices"][0]["text"] == served.baseline["completion"]
    still_serving(served)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"])
def test_foreign_host_is_refused(served, host):
    raw = json.dumps(NORMAL).encode()
    err = assert_openai_error(*exchange(served, request("/v1/completions", raw, {"Host": host})), 421)
    assert err["code"] == "invalid_host"
    status, _ = exchange(served, request("/health", b"", {"Host": host}, method="GET"))
    assert status == 421
    still_serving(served)


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:1234", "[::1]:8000", "[::1]",
                                  "api.example", "API.example:80", "other.example"])  # the last three: --allowed-hosts
def test_local_hosts_are_accepted(served, host):
    status, body = exchange(served, request("/v1/completions", json.dumps(NORMAL).encode(), {"Host": host}))
    assert status == 200 and body["choices"][0]["text"] == served.baseline["completion"]


def test_missing_host_and_malformed_http(served):
    for raw in (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",  # no Host
                b"GARBAGE\r\n\r\n",
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (128 * 1024) + b"\r\n\r\n"):
        assert_openai_error(*exchange(served, raw), 400)
    upgrade = request("/v1/completions", b"", {"Upgrade": "websocket", "Connection": "Upgrade, close",
                                               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                               "Sec-WebSocket-Version": "13"}, method="GET")
    assert_openai_error(*exchange(served, upgrade), 405)  # no WebSocket: a plain GET of a POST-only route
    still_serving(served)


# --------------------------------------------------------------------------- size and time
def test_huge_bodies(served):
    huge = b'{"model": "m", "prompt": "' + b"a" * (2 << 20) + b'"}'
    # announced too large: answered before the body is read
    err = assert_openai_error(*exchange(served, request("/v1/completions", b"", {"Content-Length": str(len(huge))})),
                              413)
    assert err["code"] == "request_too_large"
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(huge[i:i + 65536]), huge[i:i + 65536])
                       for i in range(0, len(huge), 65536)) + b"0\r\n\r\n"
    raw = request("/v1/completions", b"", {"Content-Length": None, "Transfer-Encoding": "chunked"}) + chunked
    assert_openai_error(*exchange(served, raw), 413)  # not announced: cut off at the limit
    still_serving(served)


def test_many_big_prompts_at_once_do_not_stall_others(served):
    """Eight ~1 MB prompts (under the body limit, over what the context can hold) are refused by the byte
    budget before tokenizing, while a normal request sent alongside gets its usual answer."""
    big = {"model": MODEL, "prompt": "to be or not to be " * 50_000}
    big_chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello world " * 80_000}]}
    with ThreadPoolExecutor(9) as pool:
        bigs = [pool.submit(httpx.post, served.url + ("/v1/chat/completions" if i % 2 else "/v1/completions"),
                            json=big_chat if i % 2 else big, timeout=READ_LIMIT_S) for i in range(8)]
        normal = pool.submit(normal_answers, served.url)
        assert normal.result() == served.baseline
        for f in bigs:
            r = f.result()
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    still_serving(served)


def test_hang_up_mid_body_is_quiet(served):
    raw = request("/v1/completions", json.dumps(NORMAL).encode())
    for _ in range(20):
        with connect(served) as s:
            s.sendall(raw[: len(raw) - 10])
    with connect(served) as s:  # and with a reset instead of a clean close
        s.sendall(raw[: len(raw) - 10])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # hanging up while the answer streams, and while a non-streamed answer is being generated
    long = {**NORMAL, "max_tokens": 100, "logit_bias": {"0": -100, "2": -100}}
    for stream in (True, False):
        with connect(served) as s:
            s.sendall(request("/v1/completions", json.dumps({**long, "stream": stream}).encode()))
            if stream:
                assert s.recv(1).startswith(b"H")  # the answer has begun
    still_serving(served)


def test_slow_body_gets_408(served):
    raw = request("/v1/completions", json.dumps(NORMAL).encode())
    with connect(served) as s:
        s.sendall(raw[: len(raw) - 10])  # the rest never comes
        err = assert_openai_error(*read_response(s), 408)
    assert err["code"] == "request_timeout"
    still_serving(served)


def test_slow_headers_are_cut_off(served):
    with connect(served) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")  # and nothing more
        err = assert_openai_error(*read_response(s), 408)
    assert err["code"] == "request_timeout"
    with connect(served) as s:  # connects, says nothing: closed without an answer
        assert read_response(s) == (None, None)
    still_serving(served)


def test_trickling_after_the_answer_is_cut_off(served):
    """Answered before its body was read (404), a keep-alive client that keeps trickling body bytes is
    closed by the header deadline instead of holding the connection for ever."""
    with connect(served) as s:
        s.sendall(request("/v1/nothing", b"", {"Content-Length": "100000", "Connection": None}))
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(65536)
        assert head.split(b" ", 2)[1] == b"404"
        deadline = time.monotonic() + READ_LIMIT_S
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                s.sendall(b"x")
                ready, _, _ = select.select([s], [], [], 0.2)
                closed = bool(ready) and not s.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed
    still_serving(served)


def test_more_half_open_sockets_than_file_descriptors(served):
    """1.2 x the server's open-file limit of idle sockets: the oldest idle ones are closed to make room, so
    a normal client is still answered."""
    before, start = served.log_text().count("Too many open files"), time.monotonic()
    socks = []
    try:
        for i in range(int(NOFILE * 1.2)):
            s = socket.create_connection(("127.0.0.1", served.port), timeout=READ_LIMIT_S)
            if i % 2:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a request
            socks.append(s)
        assert normal_answers(served.url) == served.baseline
        status, body = exchange(served, request("/v1/completions", json.dumps(NORMAL).encode()))
        assert status == 200 and body["choices"][0]["text"] == served.baseline["completion"]
        # every flood socket was accepted before those requests; all but MAX_CONNECTIONS were closed by the server
        closed, _, _ = select.select(socks, [], [], 0)
        assert len(socks) - len(closed) <= MAX_CONNECTIONS
    finally:
        for s in socks:
            s.close()
    # should accept() still run out (asyncio accepts a burst before the cap can act), it pauses and retries:
    # one log line per 10 s (however long this took: the bound counts the intervals), never a traceback
    logged = served.log_text().count("Too many open files") - before
    assert logged <= 2 + (time.monotonic() - start) // AcceptErrorLog().interval
    still_serving(served)


def test_a_burst_of_bad_requests(served):
    bodies = [raw for raw, _ in MALFORMED] + [s.encode() for _, s in SURROGATES]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda raw: exchange(served, request("/v1/completions", raw)), bodies * 3))
    for status, body in answers:
        assert status is not None and 400 <= status < 500 and "error" in body
    invalid = "Invalid HTTP request received."
    before, start = served.log_text().count(invalid), time.monotonic()
    for _ in range(40):  # malformed HTTP: uvicorn's warning for each is logged once per 10 s
        assert_openai_error(*exchange(served, b"GARBAGE\r\n\r\n"), 400)
    # at most one line per interval that passed (not a speed limit: a slow run may log more lines)
    assert served.log_text().count(invalid) - before <= 1 + (time.monotonic() - start) // QuietRepeats().interval
    still_serving(served)


class FakeClock:
    """Stands in for the ``time`` module of llamalab.server.connections: ``monotonic()`` moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_accept_errors_are_logged_one_line_per_interval(monkeypatch):
    """What the event loop reports when accept() runs out of descriptors: one line, not a traceback per try."""
    import asyncio
    import errno

    from llamalab.server import connections

    clock = FakeClock()
    monkeypatch.setattr(connections, "time", clock)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test_accept_errors")
    logger.addHandler(Keep())
    handler = connections.AcceptErrorLog(interval=3600, logger=logger)
    loop = asyncio.new_event_loop()
    emfile = {"message": "socket.accept() out of system resource",
              "exception": OSError(errno.EMFILE, "Too many open files")}
    try:
        for _ in range(1000):
            handler(loop, emfile)
        assert len(records) == 1 and records[0].exc_info is None
        assert "Too many open files" in records[0].getMessage()
        assert handler.suppressed == 999
        clock.now += 3599.9  # still inside the interval: held back
        handler(loop, emfile)
        assert len(records) == 1 and handler.suppressed == 1000
        clock.now += 0.1  # the interval has passed: the next one is logged, with the count held back
        handler(loop, emfile)
    finally:
        loop.close()
    assert len(records) == 2 and "(1000 more since the last report)" in records[1].getMessage()
    assert handler.suppressed == 0


def test_malformed_request_warnings_pass_once_per_interval(monkeypatch):
    """uvicorn's warning for each malformed request passes once per interval, the next one saying how many
    were held back; other records pass, the advice to install a WebSocket library never does."""
    from llamalab.server import connections

    clock = FakeClock()
    monkeypatch.setattr(connections, "time", clock)
    quiet = connections.QuietRepeats(interval=10.0)

    def passes(msg: str) -> logging.LogRecord | None:
        record = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 0, msg, (), None)
        return record if quiet.filter(record) else None

    invalid = "Invalid HTTP request received."
    assert passes(invalid)
    assert not any(passes(invalid) for _ in range(39))
    assert passes("Unsupported upgrade request.")  # each message has its own interval
    assert passes("something else") and passes("something else")
    clock.now += 9.9
    assert not passes(invalid)
    clock.now += 0.1
    again = passes(invalid)
    assert again and again.getMessage() == f"{invalid} (40 more like it not logged)"
    assert not passes(invalid)
    assert not passes("No supported WebSocket library detected.")


def test_when_every_connection_is_busy_a_new_one_gets_503():
    """With every connection carrying a request in progress there is no idle one to close: the newcomer
    gets a 503 error object, and the requests in progress finish normally."""
    from llamalab.server.connections import ConnectionLimits
    from llamalab.server.run import BackgroundServer

    model, tok = server_tiny()
    with BackgroundServer(model, tok, MODEL, max_batch=1, max_len=128,
                          limits=ConnectionLimits(max_connections=2)) as srv:
        srv.engine.pause()
        with ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(httpx.post, srv.url + "/v1/completions", json=NORMAL, timeout=READ_LIMIT_S)
                    for _ in range(2)]
            assert wait_until(lambda: srv.engine.stats()["queued"] == 2, timeout=READ_LIMIT_S)
            port = int(srv.url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=READ_LIMIT_S) as s:
                err = assert_openai_error(*read_response(s), 503)
            assert err["code"] == "too_many_connections"
            srv.engine.resume()
            texts = [f.result().json()["choices"][0]["text"] for f in busy]
        assert texts[0] == texts[1]
        assert httpx.post(srv.url + "/v1/completions", json=NORMAL, timeout=READ_LIMIT_S).json()["choices"][0][
            "text"] == texts[0]
