"""The HTTP side: an OpenAI-compatible FastAPI app in front of an :class:`~llamalab.server.engine.Engine`.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (non-streaming, or server-sent events ending with ``data: [DONE]``).

Every request first passes :class:`~llamalab.server.guard.RequestGuard` (Host allow-list, JSON
content type, no leaked exceptions). Its body is read within a size limit and a deadline; then, in a
small thread pool so the event loop keeps serving others, it is parsed and checked
(:mod:`llamalab.server.protocol`), held against a byte budget (a prompt with more bytes than the
context could hold in tokens is refused before tokenizing), rendered with the chat template and
tokenized. The jobs (one per prompt) are queued on the engine, and the handler waits on an asyncio
queue that the engine thread feeds. A client that goes away cancels its jobs, so their rows are
freed for others. With an API key set, ``/v1/*`` needs ``Authorization: Bearer KEY`` (``/health``
stays open for liveness probes).

:func:`create_app` builds the FastAPI app around an :class:`Api`, which holds what every route
shares (the engine, the model id, the limits, the preparation threads) and has one method per route
and per step of a request: ``check_auth`` → ``read_body`` → ``prepare`` (``tokenize``) → ``submit``
→ ``collect`` or ``stream_events``. What needs no such context — error bodies, token budgets,
log-probability and echo rendering — is plain functions below.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llamalab.errors import LlamalabError
from llamalab.generation.generate import stop_token_ids
from llamalab.server.engine import Delta, Engine, Failed, GenOptions, Job, QueueFull, TokenLogprob
from llamalab.server.guard import ClientGone, RequestGuard, allowed_host_names
from llamalab.server.protocol import APIError, GenerationRequest, parse_json, parse_request

if TYPE_CHECKING:  # annotations only (no import at run time)
    from llamalab.tokenization.protocol import TokenizerProtocol


log = logging.getLogger("llamalab.server.run")

DISCONNECT_POLL_S = 0.25
PREP_WORKERS = 2  # threads that parse, template and tokenize small requests
LARGE_BODY = 64 << 10  # bodies from this size are prepared one at a time in their own thread: small requests
#                        never wait behind them, and they take at most one core from the engine
LONG_TEXT = 16 << 10  # characters from which tokenizing releases the GIL
SHRINK_ALLOWANCE = 4
SHUTTING_DOWN = "the server is shutting down"


@dataclass
class Prepared:
    """A request checked and tokenized: its prompts' ids and each one's token budget."""

    req: GenerationRequest
    prompt_ids: list[list[int]]
    max_tokens: list[int]


def longest_token_bytes(tok: TokenizerProtocol) -> int:
    """An upper bound on the bytes of text one token covers: the longest vocabulary entry's."""
    try:
        added = {t.content for t in tok.backend.get_added_tokens_decoder().values()}
        vocab = tok.get_vocab()
        if tok.kind == "bpe":  # byte-level: one character of a regular token is one byte
            return max(len(s.encode("utf-8")) if s in added else len(s) for s in vocab)
        pieces = tok.backend.decode_batch([[i] for i in vocab.values()], skip_special_tokens=False)
        return 1 + max(len(s.encode("utf-8")) for s in pieces)  # + a leading space a decoder may strip
    except Exception:  # some other tokenizer: measure its vocabulary strings
        try:
            return max(len(s.encode("utf-8", "replace")) for s in tok.get_vocab()) + 1
        except Exception:
            return 256


def prompt_byte_budget(tok: TokenizerProtocol, max_len: int) -> int:
    """Bytes of prompt text that could still fit in ``max_len`` tokens: a text longer than this is refused
    before tokenizing. A normalizer may shrink text (NFKC folds some 3-byte characters to one byte)."""
    allowance = 1 if getattr(getattr(tok, "backend", None), "normalizer", True) is None else SHRINK_ALLOWANCE
    return max_len * longest_token_bytes(tok) * allowance


def encode(tok: TokenizerProtocol, text: str) -> list[int]:
    """``tok.encode(text)``, for a long text through HF tokenizers' batch call, which releases the GIL
    (its single ``encode`` holds it throughout: a 500 KB prompt would freeze the event loop for a second)."""
    backend = getattr(tok, "backend", None)
    if len(text) < LONG_TEXT or not hasattr(backend, "encode_batch") or not hasattr(tok, "add_bos"):
        return tok.encode(text)
    ids = backend.encode_batch([text], add_special_tokens=False)[0].ids
    if tok.add_bos and tok.bos_token_id is not None and not (ids and ids[0] == tok.bos_token_id):
        ids.insert(0, tok.bos_token_id)
    if tok.add_eos and tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return ids


# ----------------------------------------------------------------- errors
async def api_error_response(request: Request, e: APIError) -> JSONResponse:
    """An :class:`APIError` as OpenAI renders it (with ``WWW-Authenticate`` for 401)."""
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.status in (408, 413):  # the body was not read to its end: this connection cannot carry another request
        headers["Connection"] = "close"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def http_error_response(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in the same OpenAI shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
    msg = f"{request.method} {path}: {e.detail}"
    return JSONResponse(APIError(e.status_code, msg, code=code).body(), status_code=e.status_code)


def failure(ev: Failed) -> APIError:
    """A failed job as the client sees it: the engine logged the details; the answer names none."""
    if ev.message == SHUTTING_DOWN:
        return APIError(503, SHUTTING_DOWN, type="server_error", code="shutting_down")
    return APIError(500, "the generation failed inside the server (the details are in the server log)",
                    type="server_error", code="internal_error")


def too_long(req: GenerationRequest, max_len: int, what: str) -> APIError:
    return APIError(400, f"the prompt has {what}; this model's context is {max_len} tokens and at least "
                         "one must be left for the answer", param="messages" if req.kind == "chat" else "prompt",
                    code="context_length_exceeded")


# ----------------------------------------------------------------- token budgets
def max_tokens_for(req: GenerationRequest, n_prompt: int, max_len: int) -> int:
    """The tokens a prompt of ``n_prompt`` tokens may generate: the request's ``max_tokens`` if it fits,
    else a 400; by default what is left of the context (chat) or 16 (completions, as OpenAI)."""
    room = max_len - n_prompt
    if req.max_tokens is None:
        return room if req.kind == "chat" else min(16, room)
    if req.max_tokens > room:
        param = "max_completion_tokens" if req.kind == "chat" else "max_tokens"
        raise APIError(400, f"max_tokens is {req.max_tokens} but the prompt has {n_prompt} tokens and the "
                            f"context is {max_len}: at most {room} tokens can be generated",
                       param=param, code="context_length_exceeded")
    return req.max_tokens


# ----------------------------------------------------------------- output text, logprobs and echo
def final_text(ev: Delta) -> str:
    """A finished choice's last piece loses an incomplete UTF-8 tail (max_tokens cut a multi-byte
    character in the middle), which would decode to U+FFFD."""
    return ev.text.rstrip("\ufffd") if ev.finish_reason else ev.text


def token_text(tok: TokenizerProtocol, t: int) -> str:
    return tok.decode([t], skip_special_tokens=False)


def chat_logprobs(tok: TokenizerProtocol, items: list[TokenLogprob]) -> dict[str, Any]:
    """Chat-completions ``logprobs``: each token's text, logprob and UTF-8 bytes, with its top alternatives."""
    def entry(t: int, lp: float) -> dict[str, Any]:
        s = token_text(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]}
                        for x in items]}


def completion_logprobs(tok: TokenizerProtocol, items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """Completions ``logprobs``: token texts, their logprobs, top alternatives by text and character offsets
    (counted from ``offset``, the length of the text already sent for this choice)."""
    tokens, offsets = [], []
    for x in items:
        s = token_text(tok, x.token_id)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [x.logprob for x in items],
            "top_logprobs": [top_by_text(tok, x.top) for x in items], "text_offset": offsets}


def top_by_text(tok: TokenizerProtocol, top: list[tuple[int, float]]) -> dict[str, float]:
    """{text: logprob} of the most likely tokens; tokens with the same text (byte pieces that each decode
    to U+FFFD) keep the most likely one's logprob, not the last one's."""
    out: dict[str, float] = {}
    for t, lp in top:  # most likely first
        out.setdefault(token_text(tok, t), lp)
    return out


def echo_text(tok: TokenizerProtocol, req: GenerationRequest, prompt_ids: list[list[int]], choice: int) -> str:
    """The prompt a completions choice repeats with ``echo``: its own text, or its ids decoded."""
    if not req.echo:
        return ""
    p = req.prompts[choice // req.n]
    return p if isinstance(p, str) else tok.decode(prompt_ids[choice // req.n])


def sse(body: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON body."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------- one request in flight
@dataclass
class Submitted:
    """A request's jobs on the engine and the queue their events arrive on."""

    req: GenerationRequest
    rid: str  # the response id ("cmpl-…" / "chatcmpl-…")
    jobs: list[Job]
    queue: asyncio.Queue[Delta | Failed | None]
    prompt_ids: list[list[int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Choices across all prompts (``n`` per prompt)."""
        return len(self.jobs) * self.req.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompt_ids)

    def cancel(self) -> None:
        for j in self.jobs:
            j.cancel()


# ----------------------------------------------------------------- the routes
class Api:
    """What the routes share — the engine, the model id, the limits, the preparation threads — and one
    method per route and per step of a request. :meth:`install` puts it on a FastAPI app."""

    def __init__(self, engine: Engine, model_id: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
                 body_timeout: float = 30.0) -> None:
        self.engine = engine
        self.model_id = model_id
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.created = int(time.time())
        self.tok = engine.tok
        self.vocab_size = engine.model.config.vocab_size
        self.max_len = engine.max_len
        self.stop_ids = stop_token_ids(engine.model, self.tok)  # the tokenizer's stop tokens and the config's eos ids
        self.max_prompt_bytes = prompt_byte_budget(self.tok, engine.max_len)
        self.small_pool = ThreadPoolExecutor(PREP_WORKERS, thread_name_prefix="llamalab-prep")
        self.large_pool = ThreadPoolExecutor(1, thread_name_prefix="llamalab-prep-large")

    def install(self, app: FastAPI) -> None:
        app.add_exception_handler(APIError, api_error_response)
        app.add_exception_handler(StarletteHTTPException, http_error_response)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{name:path}", self.model_info, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        for pool in (self.small_pool, self.large_pool):
            app.router.on_shutdown.append(lambda pool=pool: pool.shutdown(wait=False, cancel_futures=True))

    # ----------------------------------------------------------------- routes
    async def health(self) -> JSONResponse:
        ok = self.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": self.model_id,
                             **self.engine.stats()}, status_code=200 if ok else 503)

    async def models(self, request: Request) -> dict[str, Any]:
        self.check_auth(request)
        return {"object": "list", "data": [self.model_card()]}

    async def model_info(self, name: str, request: Request) -> dict[str, Any]:
        self.check_auth(request)
        if name != self.model_id:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return self.model_card()

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, "chat")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "llamalab",
                "max_model_len": self.max_len}

    # ----------------------------------------------------------------- the request
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        sent = given.strip().encode("latin-1")  # the header's own bytes (ASGI decodes them as latin-1)
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, self.api_key.encode("utf-8")):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        """The body, within ``max_body_bytes`` (413) and ``body_timeout`` seconds (408)."""
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"the request body is {int(length)} bytes; the limit is {limit}",
                           code="request_too_large")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise APIError(413, f"the request body exceeds the limit of {limit} bytes",
                                       code="request_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise ClientGone() from None
        return b"".join(chunks)

    async def generate(self, request: Request, kind: str) -> Response:
        """``POST /v1/completions`` (``kind="completion"``) and ``/v1/chat/completions`` (``"chat"``)."""
        self.check_auth(request)
        prep = await self.prepare_off_loop(await self.read_body(request), kind)
        sub = self.submit(prep)
        if prep.req.stream:
            return StreamingResponse(self.stream_events(request, sub), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = self.watch_disconnect(request, sub)
        try:
            return await self.collect(sub)
        finally:
            watcher.cancel()
            sub.cancel()

    # ----------------------------------------------------------------- preparation (in the prep threads)
    async def prepare_off_loop(self, raw: bytes, kind: str) -> Prepared:
        pool = self.large_pool if len(raw) >= LARGE_BODY else self.small_pool
        return await asyncio.get_running_loop().run_in_executor(pool, self.prepare, raw, kind)

    def prepare(self, raw: bytes, kind: str) -> Prepared:
        """Parse, check and tokenize a request body (in the prep pool: this can take a while)."""
        engine = self.engine
        req = parse_request(parse_json(raw), kind, [self.model_id])
        if req.n > engine.max_batch:
            raise APIError(400, f"'n' is {req.n} but this server runs at most {engine.max_batch} sequences at once",
                           param="n", code="invalid_value")
        if len(req.prompts) > engine.max_queue:
            raise APIError(400, f"{len(req.prompts)} prompts in one request; this server queues at most "
                                f"{engine.max_queue}", param="prompt", code="invalid_value")
        try:
            req.params.validate(self.vocab_size)
        except LlamalabError as e:
            raise APIError(400, str(e), param="logit_bias", code="invalid_value") from None
        prompt_ids = self.tokenize(req)
        return Prepared(req, prompt_ids, [max_tokens_for(req, len(ids), self.max_len) for ids in prompt_ids])

    def tokenize(self, req: GenerationRequest) -> list[list[int]]:
        """Every prompt of the request as token ids, each checked against the context."""
        out = []
        for p in req.prompts:
            self.check_bytes(req, p)
            if req.kind == "chat":
                ids = encode(self.tok, self.render_chat(req, p))
            elif isinstance(p, str):
                ids = encode(self.tok, p)
            else:
                ids = self.check_ids(req, p)
            if not ids:
                raise APIError(400, "the prompt is empty (no tokens)", param="prompt", code="invalid_value")
            if len(ids) >= self.max_len:
                raise too_long(req, self.max_len, f"{len(ids)} tokens")
            out.append(ids)
        return out

    def check_bytes(self, req: GenerationRequest, p: Any) -> None:
        """Refuse, before tokenizing, text with more bytes than ``max_len`` tokens could cover."""
        if isinstance(p, str):
            n = len(p.encode("utf-8"))
        elif req.kind == "chat":
            n = sum(len(v.encode("utf-8")) for m in p for v in m.values())
        else:
            return
        if n > self.max_prompt_bytes:
            raise too_long(req, self.max_len, f"{n} bytes, more than {self.max_len} tokens can hold")

    def render_chat(self, req: GenerationRequest, messages: list[dict[str, Any]]) -> str:
        """The messages through the tokenizer's chat template (a 400 for a template that refuses them)."""
        tok = self.tok
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except LlamalabError as e:  # the template's own one-line message (raise_exception, limits)
            raise APIError(400, f"could not apply the chat template: {e}", param="messages") from None
        except Exception:
            log.exception("the chat template failed")
            raise APIError(400, "could not apply the chat template to these messages",
                           param="messages") from None
        n = len(text.encode("utf-8"))
        if n > self.max_prompt_bytes:
            raise too_long(req, self.max_len, f"{n} bytes once templated")
        return text

    def check_ids(self, req: GenerationRequest, ids: list[int]) -> list[int]:
        """A prompt given as token ids: shorter than the context, every id in the vocabulary."""
        if len(ids) >= self.max_len:
            raise too_long(req, self.max_len, f"{len(ids)} tokens")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})",
                           param="prompt", code="invalid_value")
        return list(ids)

    # ----------------------------------------------------------------- generation (on the event loop)
    def submit(self, prep: Prepared) -> Submitted:
        """One engine job per prompt (``n`` choices each), fed back through an asyncio queue; 429 when full."""
        req = prep.req
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | Failed | None] = asyncio.Queue()

        def sink(ev: Delta | Failed) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        jobs = [Job(ids, req.params, GenOptions(max_tokens=mt, stop=req.stop, stop_token_ids=self.stop_ids, n=req.n,
                                                first_index=i * req.n), sink)
                for i, (ids, mt) in enumerate(zip(prep.prompt_ids, prep.max_tokens))]
        try:
            self.engine.submit(jobs)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        return Submitted(req, rid, jobs, queue, prep.prompt_ids)

    def watch_disconnect(self, request: Request, sub: Submitted) -> asyncio.Task:
        """Poll for the client going away (events may keep coming meanwhile); then cancel its jobs."""
        async def watch() -> None:
            while not all(j.done or j.cancelled for j in sub.jobs):
                await asyncio.sleep(DISCONNECT_POLL_S)
                if await request.is_disconnected():
                    sub.cancel()
                    sub.queue.put_nowait(None)
                    return

        return asyncio.create_task(watch())

    async def collect(self, sub: Submitted) -> Response:
        """Wait for every choice to finish; one JSON response (499 if the client went away first)."""
        req, total = sub.req, sub.total
        texts = [""] * total
        lps: list[list[TokenLogprob]] = [[] for _ in range(total)]
        ids: list[list[int]] = [[] for _ in range(total)]
        finish: list[str | None] = [None] * total
        completion_tokens = 0
        remaining = total
        while remaining:
            ev = await sub.queue.get()
            if ev is None:
                return Response(status_code=499)  # client gone (nginx's code); the caller cancels its jobs
            if isinstance(ev, Failed):
                raise failure(ev)
            texts[ev.index] += final_text(ev)
            ids[ev.index] += ev.token_ids
            if ev.logprobs:
                lps[ev.index] += ev.logprobs
            if ev.finish_reason:
                finish[ev.index] = ev.finish_reason
                completion_tokens += ev.completion_tokens
                remaining -= 1
        choices = []
        for i in range(total):
            if req.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": chat_logprobs(self.tok, lps[i]) if req.params.logprobs else None,
                                "finish_reason": finish[i]})
            else:
                prefix = echo_text(self.tok, req, sub.prompt_ids, i)
                choices.append({"index": i, "text": prefix + texts[i],
                                "logprobs": completion_logprobs(self.tok, lps[i], len(prefix))
                                if req.logprobs is not None else None,
                                "finish_reason": finish[i]})
        prompt_tokens = sub.prompt_tokens
        return JSONResponse({"id": sub.rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                             "created": int(time.time()), "model": self.model_id, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})

    async def stream_events(self, request: Request, sub: Submitted) -> AsyncIterator[str]:
        """Server-sent events: a first chunk per choice (role, or the echoed prompt), one per engine delta,
        the usage chunk when asked for, then ``data: [DONE]``. A failure becomes an error event."""
        req, total = sub.req, sub.total
        chat = req.kind == "chat"
        head = {"id": sub.rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_id}
        offsets = [0] * total  # characters already sent per choice (completions logprobs' text_offset)
        watcher = self.watch_disconnect(request, sub)
        try:
            for i in range(total):
                if chat:
                    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                elif req.echo:
                    prefix = echo_text(self.tok, req, sub.prompt_ids, i)
                    offsets[i] = len(prefix)
                    yield sse({**head, "choices": [{"index": i, "text": prefix, "logprobs": None,
                                                    "finish_reason": None}]})
            remaining, completion_tokens = total, 0
            while remaining:
                ev = await sub.queue.get()
                if ev is None:
                    return
                if isinstance(ev, Failed):
                    yield f"data: {json.dumps(failure(ev).body())}\n\n"
                    break
                ev.text = final_text(ev)
                if ev.finish_reason:
                    remaining -= 1
                    completion_tokens += ev.completion_tokens
                if chat:
                    delta = {"content": ev.text} if ev.text or not ev.finish_reason else {}
                    lp = chat_logprobs(self.tok, ev.logprobs or []) if req.params.logprobs else None
                    choice = {"index": ev.index, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
                else:
                    lp = completion_logprobs(self.tok, ev.logprobs or [], offsets[ev.index]) \
                        if req.logprobs is not None else None
                    offsets[ev.index] += len(ev.text)
                    choice = {"index": ev.index, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
                yield sse({**head, "choices": [choice]})
            else:
                if req.include_usage:
                    pt = sub.prompt_tokens
                    yield sse({**head, "choices": [], "usage": {"prompt_tokens": pt,
                                                                "completion_tokens": completion_tokens,
                                                                "total_tokens": pt + completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            sub.cancel()


def create_app(engine: Engine, model_id: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               allowed_hosts: set[str] | None = None, body_timeout: float = 30.0) -> FastAPI:
    """Build the app. ``engine`` must be started (:meth:`Engine.start`) before requests arrive.

    ``allowed_hosts``: Host names accepted besides IP literals (default: localhost; ``{"*"}`` accepts
    any; :func:`~llamalab.server.guard.allowed_host_names` builds it from ``--host`` and
    ``--allowed-hosts``); ``body_timeout``: seconds a client has to send its body. The routes are an
    :class:`Api`'s methods (``app.state.api``).
    """
    if allowed_hosts is None:
        allowed_hosts = allowed_host_names("127.0.0.1")
    elif "*" in allowed_hosts:
        allowed_hosts = None
    app = FastAPI(title="llamalab", description="OpenAI-compatible server for a llamalab model",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts)
    api = Api(engine, model_id, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    api.install(app)
    app.state.engine = engine
    app.state.model_id = model_id
    app.state.api = api
    return app
