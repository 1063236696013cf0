"""The OpenAI-compatible server, driven over loopback: the official `openai` client (streaming and
not), raw HTTP for malformed requests, concurrency (16 clients == the same requests one at a time),
queue limits, disconnects, failure isolation, auth, and the `llamalab serve` command.

The model is a random-init tiny Llama with a byte-level BPE trained here on a few lines, so every
test runs in well under a second of model time. Expected outputs come from a plain, cache-free
greedy loop over the model (not from the server's own code path).
"""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import torch

from helpers import WORDS, llamalab_serve, server_tiny, wait_until
from llamalab.server.run import BackgroundServer

CONTEXT = 192
MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def tiny():
    return server_tiny(CONTEXT)


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    with BackgroundServer(model, tok, MODEL, max_batch=8, max_len=CONTEXT, max_queue=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(model, tok, ids: list[int], max_tokens: int, penalty: tuple[float, float] = (0.0, 0.0),
              stop_ids: set[int] | None = None) -> tuple[list[int], str]:
    """Greedy continuation by recomputing the whole sequence each step (no cache, no batching)."""
    stop_ids = set(tok.stop_token_ids) if stop_ids is None else stop_ids
    seq, out = list(ids), []
    counts = torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([seq]))[0, -1]
            logits = logits - penalty[0] * counts - penalty[1] * (counts > 0).float()
            t = int(logits.argmax())
            out.append(t)
            counts[t] += 1
            if t in stop_ids:
                break
            seq.append(t)
    text_ids = [t for t in out if t not in stop_ids]
    # an incomplete UTF-8 character at the end (cut by max_tokens) is dropped, not sent as U+FFFD
    return out, tok.decode(text_ids, skip_special_tokens=True).rstrip("\ufffd")


# --------------------------------------------------------------------------- the API, with the openai client
def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["max_len"] == CONTEXT


def test_completion_matches_reference_greedy(tiny, client):
    model, tok = tiny
    prompt = "to be or not to be"
    expected_ids, expected = reference(model, tok, tok.encode(prompt), 24)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    c = r.choices[0]
    assert c.text == expected
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == len(expected_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert c.finish_reason == ("stop" if expected_ids[-1] in tok.stop_token_ids else "length")
    # token ids as the prompt give the same answer
    r2 = client.completions.create(model=MODEL, prompt=tok.encode(prompt), max_tokens=24, temperature=0)
    assert r2.choices[0].text == expected


def test_chat_streaming_equals_non_streaming(tiny, client):
    model, tok = tiny
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    expected_ids, expected = reference(model, tok, ids, 30)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected_ids)
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == expected
    assert finish == r.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_stop_token_is_honoured(tiny, client):
    _, tok = tiny
    im_end = tok.token_to_id("<|im_end|>")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20,
                                       temperature=0, logit_bias={str(im_end): 100})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 1


def test_stop_strings(tiny, client):
    model, tok = tiny
    prompt = "all the world"
    _, full = reference(model, tok, tok.encode(prompt), 40, stop_ids=set())
    # a stop string taken from the middle of the greedy text
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in
                full[i:i + 2])
    want = full[:full.index(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
                                  logit_bias={str(i): -100 for i in tok.stop_token_ids})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True,
        logit_bias={str(i): -100 for i in tok.stop_token_ids}))
    assert streamed == want


def test_max_tokens_cutting_a_character_drops_the_incomplete_tail(tiny, client):
    """'Ã' is byte 0xC3 in the byte-level alphabet: the first half of a two-byte UTF-8 character. Cut there
    by max_tokens, the answer ends before it instead of with U+FFFD, streamed or not."""
    _, tok = tiny
    lead = tok.token_to_id("Ã")
    assert tok.decode([lead]) == "\ufffd"
    kw = dict(model=MODEL, prompt="hello", max_tokens=1, temperature=0, logit_bias={str(lead): 100})
    r = client.completions.create(**kw)
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)) == ""
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       temperature=0, logit_bias={str(lead): 100})
    assert c.choices[0].message.content == ""


def test_max_tokens_and_length(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                       max_completion_tokens=7, temperature=0.0, logit_bias={"0": -100, "2": -100})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7


def test_seed_n_and_sampling(client):
    kw = dict(model=MODEL, prompt="a rose", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # the n choices differ
    assert a.usage.prompt_tokens == b.usage.prompt_tokens  # the prompt is counted once
    assert a.usage.completion_tokens >= 3
    # several prompts in one request: choices for each
    r = client.completions.create(model=MODEL, prompt=["hello", "world"], max_tokens=3, temperature=0, n=2)
    assert len(r.choices) == 4 and r.choices[0].text == r.choices[1].text


def test_penalties_match_reference(tiny, client):
    model, tok = tiny
    prompt = "the quick brown fox"
    _, expected = reference(model, tok, tok.encode(prompt), 20, penalty=(0.7, 1.3))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, frequency_penalty=0.7,
                                  presence_penalty=1.3)
    assert r.choices[0].text == expected


def test_logprobs(tiny, client):
    model, tok = tiny
    prompt = "hello world"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                  logit_bias={str(i): -100 for i in tok.stop_token_ids})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    ids = tok.encode(prompt)
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
    assert lp.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy = the top one
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(x.top_logprobs) == 2 and x.logprob <= 0 for x in content)


# --------------------------------------------------------------------------- concurrency
def test_16_concurrent_clients_equal_one_at_a_time(server, client):
    prompts = [f"{WORDS[i % len(WORDS)][: 8 + 3 * i]}" for i in range(16)]
    lengths = [6 + (i * 5) % 23 for i in range(16)]

    def ask(i: int) -> tuple[str, str | None]:
        if i % 2:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}],
                                               max_tokens=lengths[i], temperature=0)
            return r.choices[0].message.content, r.choices[0].finish_reason
        r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason

    sequential = [ask(i) for i in range(16)]
    before = server.engine.max_running
    server.engine.max_running = 0
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, range(16)))
    assert concurrent == sequential
    assert server.engine.max_running > 1, "requests were never decoded together"
    server.engine.max_running = max(before, server.engine.max_running)


def test_queue_full_answers_429(tiny):
    model, tok = tiny
    with BackgroundServer(model, tok, MODEL, max_batch=1, max_len=CONTEXT, max_queue=2) as srv:
        srv.engine.pause()
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=30) for _ in range(2)]
            assert wait_until(lambda: srv.engine.stats()["queued"] == 2)
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
            srv.engine.resume()
            assert all(f.result().status_code == 200 for f in waiting)


def test_client_disconnect_stops_generation(tiny, monkeypatch):
    """A client that hangs up (streaming or not) cancels its job: the engine's decode step is held until
    the job is cancelled, so generation cannot run to max_tokens first, however fast the machine."""
    from llamalab.server import engine as engine_module

    model, tok = tiny
    cancelled, decoding = threading.Event(), threading.Event()
    cancel = engine_module.Job.cancel

    def tracked_cancel(job):
        cancelled.set()
        cancel(job)

    monkeypatch.setattr(engine_module.Job, "cancel", tracked_cancel)
    with BackgroundServer(model, tok, MODEL, max_batch=2, max_len=CONTEXT) as srv:
        step = srv.engine.runner.decode

        def held_decode(rows, tokens):  # after a few tokens, wait for the cancellation (generous limit)
            decoding.set()
            if srv.engine.steps >= 3:
                cancelled.wait(30)
            return step(rows, tokens)

        srv.engine.runner.decode = held_decode
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 150, "temperature": 0,
                "logit_bias": {str(i): -100 for i in tok.stop_token_ids}}
        # streaming: read one event, then hang up
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            next(r.iter_lines())
        assert cancelled.wait(30), "the server never cancelled the job of a client that hung up"
        assert wait_until(lambda: srv.engine.stats()["running"] == 0, timeout=30)
        assert srv.engine.steps < 10
        # non-streaming: the client hangs up once decoding has started
        cancelled.clear()
        decoding.clear()
        steps = srv.engine.steps
        url = urlsplit(srv.url)
        with socket.create_connection((url.hostname, url.port)) as sock:
            raw = json.dumps(body).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
            assert decoding.wait(30)
        assert cancelled.wait(30), "the server never cancelled the job of a client that hung up"
        assert wait_until(lambda: srv.engine.stats()["running"] == 0, timeout=30)
        assert srv.engine.steps - steps < 10
        srv.engine.runner.decode = step
        assert httpx.post(srv.url + "/v1/completions", json={**body, "max_tokens": 2}).status_code == 200


def test_one_failing_request_does_not_hurt_others(tiny):
    model, tok = tiny
    poison = tok.token_to_id("<|im_start|>")
    with BackgroundServer(model, tok, MODEL, max_batch=4, max_len=CONTEXT) as srv:
        eng = srv.engine
        forward, prefill = eng._forward, eng._prefill_batch

        def bad_forward(seqs):
            if any(s.job.prompt_ids[0] == poison for s in seqs):
                raise RuntimeError("boom in decode")
            return forward(seqs)

        def bad_prefill(group):  # a batched prefill holding the poisoned prompt raises, as it does alone
            if any(job.prompt_ids[:2] == [poison, poison] for job, _ in group):
                raise RuntimeError("boom in prefill")
            return prefill(group)

        eng._forward, eng._prefill_batch = bad_forward, bad_prefill
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        good = dict(model=MODEL, prompt="hello world", max_tokens=20, temperature=0,
                    logit_bias={str(i): -100 for i in tok.stop_token_ids})
        expected = c.completions.create(**good).choices[0].text
        with ThreadPoolExecutor(4) as pool:
            ok = [pool.submit(c.completions.create, **good) for _ in range(2)]
            bad_decode = pool.submit(httpx.post, srv.url + "/v1/completions", timeout=30,
                                     json={**good, "prompt": [poison, 5, 6]})
            bad_pre = pool.submit(httpx.post, srv.url + "/v1/completions", timeout=30,
                                  json={**good, "prompt": [poison, poison, 5]})
            assert [f.result().choices[0].text for f in ok] == [expected, expected]
            for f in (bad_decode, bad_pre):
                r = f.result()
                err = r.json()["error"]
                # a 500 that names no internal detail (the traceback is in the server log)
                assert r.status_code == 500 and err["type"] == "server_error" and "boom" not in err["message"]
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        assert c.completions.create(**good).choices[0].text == expected


# --------------------------------------------------------------------------- bad input
BAD_REQUESTS = [
    # (path, raw body, expected status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "\xff\xfe hi"}', 400, None),
    ("/v1/completions", b'{"prompt": "hi"}', 400, "model"),
    ("/v1/completions", b'{"model": "tiny-chat"}', 400, "prompt"),
    ("/v1/completions", b'{"model": "gpt-17", "prompt": "hi"}', 404, "model"),
    ("/v1/completions", b'{"model": 5, "prompt": "hi"}', 400, "model"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": {"a": 1}}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": "10"}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": 100000}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "temperature": -0.5}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "top_p": 0}', 400, "top_p"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "top_p": 1.5}', 400, "top_p"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "n": 0}', 400, "n"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "stop": 7}', 400, "stop"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "presence_penalty": 9}', 400,
     "presence_penalty"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": [1, 99999]}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "temperature": NaN}', 400, None),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "stream": "yes"}', 400, "stream"),
    ("/v1/chat/completions", b'{"model": "tiny-chat"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "wizard", "content": "x"}]}', 400,
     "messages[0].role"),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": 5}]}', 400,
     "messages[0].content"),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], '
                             b'"top_logprobs": 3}', 400, "top_logprobs"),
    ("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], '
                             b'"max_completion_tokens": 0}', 400, "max_completion_tokens"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "logit_bias": {"99999": 5}}', 400, "logit_bias"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "seed": 99999999999999999999999}', 400, "seed"),
    ("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi", "n": 9}', 400, "n"),
    ("/v1/nothing", b"{}", 404, None),
]


@pytest.mark.parametrize("path,raw,status,param", BAD_REQUESTS)
def test_bad_input_gets_openai_error(server, path, raw, status, param):
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_long_prompt_and_huge_body_then_still_serving(server, tiny, client):
    _, tok = tiny
    long_prompt = " ".join(WORDS * 20)
    assert len(tok.encode(long_prompt)) > CONTEXT
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": long_prompt}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    short_words = "x " * CONTEXT  # few bytes (inside the byte budget), yet more tokens than the context
    assert len(tok.encode(short_words)) >= CONTEXT
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": short_words}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "tokens" in r.json()["error"]["message"]
    huge = b'{"model": "tiny-chat", "prompt": "' + b"a" * (2 << 20) + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=huge, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(server.url + "/v1/completions", timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert client.completions.create(model=MODEL, prompt="hello", max_tokens=3).usage.completion_tokens >= 1


def test_long_texts_tokenize_as_tok_encode(tiny):
    """The server tokenizes long prompts through the GIL-releasing batch call: the same ids as tok.encode."""
    from llamalab.server.app import LONG_TEXT, encode, prompt_byte_budget

    _, tok = tiny
    text = " ".join(WORDS) * (LONG_TEXT // 100)
    assert len(text) >= LONG_TEXT and encode(tok, text) == tok.encode(text)
    assert encode(tok, "hello") == tok.encode("hello")
    # the byte budget is an upper bound: no text that fits the context is refused by it
    assert prompt_byte_budget(tok, CONTEXT) >= max(len(tok.decode([i]).encode()) for i in range(tok.vocab_size))


def test_api_key(tiny):
    model, tok = tiny
    with BackgroundServer(model, tok, MODEL, max_batch=1, max_len=CONTEXT, api_key="s3cret") as srv:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(**body).choices[0].finish_reason in ("stop", "length")
        assert httpx.get(srv.url + "/health").status_code == 200


# --------------------------------------------------------------------------- the command
def test_cli_serve(tiny, tmp_path):
    import copy

    from llamalab.quantization.quantize import quantize_model, save_quantized

    model, tok = tiny
    n_params = model.num_parameters()
    quantized = quantize_model(copy.deepcopy(model), "int8")  # served int8: its banner counts every weight
    save_quantized(quantized, tmp_path / "m")
    tok.save(tmp_path / "m")
    with llamalab_serve(tmp_path / "m", tmp_path / "serve.log", "--max-batch", "2", "--max-len", "128",
                        "--log-level", "warning", env={"LLAMALAB_API_KEY": "k"}) as srv:  # the key from the env
        url = srv.url
        startup = srv.log_text()
        assert "loaded " + str(tmp_path / "m") in startup and " s\n" in startup  # the model and its load time
        assert f"({n_params / 1e6:.1f}M parameters" in startup
        assert f"serving model 'm' at {url}/v1" in startup
        assert httpx.get(url + "/v1/models").status_code == 401
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["m"]
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_cli_serve_errors_are_one_line(tmp_path, capsys):
    from llamalab.cli.main import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamalab serve: error:") and err.strip().count("\n") == 0
    assert main(["serve", "--model", str(tmp_path), "--port", "70000"]) == 2
    capsys.readouterr()
    for bad in (["--host", "256.1.1.1"], ["--max-connections", "0"], ["--header-timeout", "-1"]):
        assert main(["serve", "--model", str(tmp_path / "missing"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("llamalab serve: error:") and err.strip().count("\n") == 0, err
    with socket.socket() as busy:  # a port already taken: one line, before the model is loaded
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--model", str(tmp_path / "missing"), "--port", str(busy.getsockname()[1])]) == 2
        err = capsys.readouterr().err
        assert "cannot listen on 127.0.0.1" in err and err.strip().count("\n") == 0, err


# --------------------------------------------------------------------------- a real chat model
def test_smollm2_chat(smollm2):
    """SmolLM2-135M-Instruct through the server: its ChatML template and <|im_end|> stop, same as generate()."""
    import llamalab

    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with BackgroundServer(model, tok, "smollm2", max_batch=2, max_len=256) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
        r = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    answer = r.choices[0].message.content
    assert "Paris" in answer
    assert answer == llamalab.generate(model, tok, messages, max_new_tokens=24, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert "<|im_end|>" not in answer and r.usage.completion_tokens < 24
