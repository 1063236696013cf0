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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llamalab.errors import LlamalabError
from llamalab.generation.generate import stop_token_ids
from llamalab.server.engine import Delta, Engine, Failed, GenOptions, Job, QueueFull
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


def create_app(engine: Engine, model_id: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               allowed_hosts: set[str] | None = None, body_timeout: float = 30.0) -> FastAPI:
    """Build the app. ``engine`` must be started (:meth:`Engine.start`) before requests arrive.

    ``allowed_hosts``: Host names accepted besides IP literals (default: localhost; ``{"*"}`` accepts
    any; :func:`~llamalab.server.guard.allowed_host_names` builds it from ``--host`` and
    ``--allowed-hosts``); ``body_timeout``: seconds a client has to send its body.
    """
    if allowed_hosts is None:
        allowed_hosts = allowed_host_names("127.0.0.1")
    elif "*" in allowed_hosts:
        allowed_hosts = None
    app = FastAPI(title="llamalab", description="OpenAI-compatible server for a llamalab model",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts)
    app.state.engine = engine
    app.state.model_id = model_id
    created = int(time.time())
    tok = engine.tok
    config = engine.model.config
    stop_ids = stop_token_ids(engine.model, tok)  # the tokenizer's stop tokens and the config's eos ids
    max_prompt_bytes = prompt_byte_budget(tok, engine.max_len)
    small_pool = ThreadPoolExecutor(PREP_WORKERS, thread_name_prefix="llamalab-prep")
    large_pool = ThreadPoolExecutor(1, thread_name_prefix="llamalab-prep-large")
    for pool in (small_pool, large_pool):
        app.router.on_shutdown.append(lambda pool=pool: pool.shutdown(wait=False, cancel_futures=True))

    # ----------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
        if e.status in (408, 413):  # the body was not read to its end: this connection cannot carry another request
            headers["Connection"] = "close"
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
        msg = f"{request.method} {path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), status_code=e.status_code)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        sent = given.strip().encode("latin-1")  # the header's own bytes (ASGI decodes them as latin-1)
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, api_key.encode("utf-8")):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"the request body is {int(length)} bytes; the limit is {max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_body_bytes:
                        raise APIError(413, f"the request body exceeds the limit of {max_body_bytes} bytes",
                                       code="request_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {body_timeout:g} s",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise ClientGone() from None
        return b"".join(chunks)

    # ----------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": model_id, **engine.stats()},
                            status_code=200 if ok else 503)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "llamalab",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        if name != model_id:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        return await handle(request, await prepare_off_loop(await read_body(request), "completion"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        return await handle(request, await prepare_off_loop(await read_body(request), "chat"))

    # ----------------------------------------------------------------- generation
    async def prepare_off_loop(raw: bytes, kind: str) -> Prepared:
        pool = large_pool if len(raw) >= LARGE_BODY else small_pool
        return await asyncio.get_running_loop().run_in_executor(pool, prepare, raw, kind)

    def prepare(raw: bytes, kind: str) -> Prepared:
        """Parse, check and tokenize a request body (in the prep pool: this can take a while)."""
        req = parse_request(parse_json(raw), kind, [model_id])
        if req.n > engine.max_batch:
            raise APIError(400, f"'n' is {req.n} but this server runs at most {engine.max_batch} sequences at once",
                           param="n", code="invalid_value")
        if len(req.prompts) > engine.max_queue:
            raise APIError(400, f"{len(req.prompts)} prompts in one request; this server queues at most "
                                f"{engine.max_queue}", param="prompt", code="invalid_value")
        try:
            req.params.validate(config.vocab_size)
        except LlamalabError as e:
            raise APIError(400, str(e), param="logit_bias", code="invalid_value") from None
        prompt_ids = tokenize(req)
        return Prepared(req, prompt_ids, [max_tokens_for(req, len(ids)) for ids in prompt_ids])

    def too_long(req: GenerationRequest, what: str) -> APIError:
        return APIError(400, f"the prompt has {what}; this model's context is {engine.max_len} tokens and at least "
                             "one must be left for the answer", param="messages" if req.kind == "chat" else "prompt",
                        code="context_length_exceeded")

    def check_bytes(req: GenerationRequest, p: Any) -> None:
        """Refuse, before tokenizing, text with more bytes than ``max_len`` tokens could cover."""
        if isinstance(p, str):
            n = len(p.encode("utf-8"))
        elif req.kind == "chat":
            n = sum(len(v.encode("utf-8")) for m in p for v in m.values())
        else:
            return
        if n > max_prompt_bytes:
            raise too_long(req, f"{n} bytes, more than {engine.max_len} tokens can hold")

    def tokenize(req: GenerationRequest) -> list[list[int]]:
        out = []
        for p in req.prompts:
            check_bytes(req, p)
            if req.kind == "chat":
                if not getattr(tok, "chat_template", None):
                    raise APIError(400, "this model has no chat template; use /v1/completions",
                                   param="messages", code="no_chat_template")
                try:
                    text = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                except LlamalabError as e:  # the template's own one-line message (raise_exception, limits)
                    raise APIError(400, f"could not apply the chat template: {e}", param="messages") from None
                except Exception:
                    log.exception("the chat template failed")
                    raise APIError(400, "could not apply the chat template to these messages",
                                   param="messages") from None
                if len(text.encode("utf-8")) > max_prompt_bytes:
                    raise too_long(req, f"{len(text.encode('utf-8'))} bytes once templated")
                ids = encode(tok, text)
            elif isinstance(p, str):
                ids = encode(tok, p)
            else:
                if len(p) >= engine.max_len:
                    raise too_long(req, f"{len(p)} tokens")
                bad = [t for t in p if not 0 <= t < config.vocab_size]
                if bad:
                    raise APIError(400, f"token id {bad[0]} is outside the vocabulary (size {config.vocab_size})",
                                   param="prompt", code="invalid_value")
                ids = list(p)
            if not ids:
                raise APIError(400, "the prompt is empty (no tokens)", param="prompt", code="invalid_value")
            if len(ids) >= engine.max_len:
                raise too_long(req, f"{len(ids)} tokens")
            out.append(ids)
        return out

    def max_tokens_for(req: GenerationRequest, n_prompt: int) -> int:
        room = engine.max_len - n_prompt
        if req.max_tokens is None:
            return room if req.kind == "chat" else min(16, room)
        if req.max_tokens > room:
            param = "max_completion_tokens" if req.kind == "chat" else "max_tokens"
            raise APIError(400, f"max_tokens is {req.max_tokens} but the prompt has {n_prompt} tokens and the "
                                f"context is {engine.max_len}: at most {room} tokens can be generated",
                           param=param, code="context_length_exceeded")
        return req.max_tokens

    async def handle(request: Request, prep: Prepared):
        req, prompt_ids, limits = prep.req, prep.prompt_ids, prep.max_tokens
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | Failed | None] = asyncio.Queue()

        def sink(ev: Delta | Failed) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        jobs = [Job(ids, req.params, GenOptions(max_tokens=mt, stop=req.stop, stop_token_ids=stop_ids, n=req.n,
                                                first_index=i * req.n), sink)
                for i, (ids, mt) in enumerate(zip(prompt_ids, limits))]
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        total = len(jobs) * req.n
        if req.stream:
            return StreamingResponse(stream_events(request, req, rid, jobs, queue, total, prompt_ids),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = watch_disconnect(request, queue, jobs)
        try:
            return await collect(request, req, rid, jobs, queue, total, prompt_ids)
        finally:
            watcher.cancel()
            for j in jobs:
                j.cancel()

    def watch_disconnect(request: Request, queue: asyncio.Queue, jobs: list[Job]) -> asyncio.Task:
        """Poll for the client going away (events may keep coming meanwhile); then cancel its jobs."""
        async def watch() -> None:
            while not all(j.done or j.cancelled for j in jobs):
                await asyncio.sleep(DISCONNECT_POLL_S)
                if await request.is_disconnected():
                    for j in jobs:
                        j.cancel()
                    queue.put_nowait(None)
                    return

        return asyncio.create_task(watch())

    def failure(ev: Failed) -> APIError:
        """A failed job as the client sees it: the engine logged the details; the answer names none."""
        if ev.message == SHUTTING_DOWN:
            return APIError(503, SHUTTING_DOWN, type="server_error", code="shutting_down")
        return APIError(500, "the generation failed inside the server (the details are in the server log)",
                        type="server_error", code="internal_error")

    def final_text(ev: Delta) -> str:
        """A finished choice's last piece loses an incomplete UTF-8 tail (max_tokens cut a multi-byte
        character in the middle), which would decode to U+FFFD."""
        return ev.text.rstrip("\ufffd") if ev.finish_reason else ev.text

    async def next_event(queue: asyncio.Queue) -> Delta | Failed | None:
        """The next engine event, or None once the client has gone away."""
        return await queue.get()

    async def collect(request, req, rid, jobs, queue, total, prompt_ids) -> Response:
        texts = [""] * total
        lps: list[list] = [[] for _ in range(total)]
        ids: list[list[int]] = [[] for _ in range(total)]
        finish: list[str | None] = [None] * total
        completion_tokens = 0
        remaining = total
        while remaining:
            ev = await next_event(queue)
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
        prompt_tokens = sum(len(p) for p in prompt_ids)
        choices = []
        for i in range(total):
            if req.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": chat_logprobs(lps[i]) if req.params.logprobs else None,
                                "finish_reason": finish[i]})
            else:
                prefix = echo_text(req, prompt_ids, i)
                choices.append({"index": i, "text": prefix + texts[i],
                                "logprobs": completion_logprobs(lps[i], len(prefix))
                                if req.logprobs is not None else None,
                                "finish_reason": finish[i]})
        return JSONResponse({"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                             "created": int(time.time()), "model": model_id, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})

    async def stream_events(request, req, rid, jobs, queue, total, prompt_ids) -> AsyncIterator[str]:
        chat = req.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        offsets = [0] * total

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model_id,
                                    "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        watcher = watch_disconnect(request, queue, jobs)
        try:
            for i in range(total):
                if chat:
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                elif req.echo:
                    prefix = echo_text(req, prompt_ids, i)
                    offsets[i] = len(prefix)
                    yield chunk([{"index": i, "text": prefix, "logprobs": None, "finish_reason": None}])
            remaining, completion_tokens = total, 0
            while remaining:
                ev = await next_event(queue)
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
                    lp = chat_logprobs(ev.logprobs or []) if req.params.logprobs else None
                    yield chunk([{"index": ev.index, "delta": delta, "logprobs": lp,
                                  "finish_reason": ev.finish_reason}])
                else:
                    lp = completion_logprobs(ev.logprobs or [], offsets[ev.index]) \
                        if req.logprobs is not None else None
                    offsets[ev.index] += len(ev.text)
                    yield chunk([{"index": ev.index, "text": ev.text, "logprobs": lp,
                                  "finish_reason": ev.finish_reason}])
            else:
                if req.include_usage:
                    pt = sum(len(p) for p in prompt_ids)
                    yield chunk([], {"prompt_tokens": pt, "completion_tokens": completion_tokens,
                                     "total_tokens": pt + completion_tokens})
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            for j in jobs:
                j.cancel()

    # ----------------------------------------------------------------- logprobs and echo
    def token_text(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    def chat_logprobs(items) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            s = token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]}
                            for x in items]}

    def completion_logprobs(items, offset: int) -> dict[str, Any]:
        tokens, offsets = [], []
        for x in items:
            s = token_text(x.token_id)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in items],
                "top_logprobs": [top_by_text(x.top) for x in items], "text_offset": offsets}

    def top_by_text(top: list[tuple[int, float]]) -> dict[str, float]:
        """{text: logprob} of the most likely tokens; tokens with the same text (byte pieces that each decode
        to U+FFFD) keep the most likely one's logprob, not the last one's."""
        out: dict[str, float] = {}
        for t, lp in top:  # most likely first
            out.setdefault(token_text(t), lp)
        return out

    def echo_text(req: GenerationRequest, prompt_ids: list[list[int]], choice: int) -> str:
        if not req.echo:
            return ""
        p = req.prompts[choice // req.n]
        return p if isinstance(p, str) else tok.decode(prompt_ids[choice // req.n])

    return app
