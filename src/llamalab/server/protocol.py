"""The OpenAI wire format: parse and check request bodies, shape errors and responses.

Every bad request becomes an :class:`APIError`, rendered as OpenAI does::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Requests are checked by hand rather than by a schema library so each message names the exact field
and the rule it broke. Fields we do not know are ignored (clients send many optional ones).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.generation.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP = 16  # stop strings per request
MAX_N = 16  # choices per request (also bounded by the engine's batch size)
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict[str, Any]:
    """Bytes -> JSON object, or a 400 for invalid UTF-8, malformed JSON or a non-object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    if not text.strip():
        raise APIError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    check_unicode(body)
    return body


def check_unicode(body: Any) -> None:
    """A 400 for any string (or key) that is not valid Unicode: JSON's ``"\\ud800"`` escapes decode to
    lone UTF-16 surrogates, which cannot be encoded as UTF-8, tokenized or echoed."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
        return
    except UnicodeEncodeError:
        pass
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:  # find where, to name the field
        path, v = stack.pop()
        if isinstance(v, str) and not _encodes(v):
            break
        if isinstance(v, dict):
            for k, x in v.items():
                if not _encodes(k):
                    break
                stack.append((f"{path}.{k}" if path else k, x))
            else:
                continue
            break
        if isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    where = f"'{path}' " if path else ""
    raise APIError(400, f"the request field {where}holds a string that is not valid Unicode (a lone UTF-16 "
                        "surrogate such as \\ud800)", param=path or None, code="invalid_encoding")


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _show(s: str, limit: int = 64) -> str:
    """A client's string quoted in an error message, cut short."""
    return repr(s if len(s) <= limit else s[:limit] + "...")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# --------------------------------------------------------------------------- field checks
def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def get_number(body: dict, name: str, default: float | None, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {_type_name(v)}", param=name, code="invalid_type")
    if not math.isfinite(v):  # 1e999 is valid JSON and parses to infinity
        raise _bad(name, f"'{name}' must be a finite number, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise _bad(name, f"'{name}' must be {'>' if lo_open else '>='} {lo:g}, got {v}")
    if hi is not None and v > hi:
        raise _bad(name, f"'{name}' must be <= {hi:g}, got {v}")
    return float(v)


def get_int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"'{name}' must be an integer, got {_type_name(v)}", param=name, code="invalid_type")
    if lo is not None and v < lo:
        raise _bad(name, f"'{name}' must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise _bad(name, f"'{name}' must be <= {hi}, got {v}")
    return v


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be a boolean, got {_type_name(v)}", param=name, code="invalid_type")
    return v


def get_stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise APIError(400, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(items) > MAX_STOP:
        raise _bad("stop", f"'stop' may hold at most {MAX_STOP} strings, got {len(items)}")
    return [s for s in items if s]


# --------------------------------------------------------------------------- requests
@dataclass
class GenerationRequest:
    """What a completions or chat request asks for, checked and normalised."""

    kind: str  # "completion" | "chat"
    model: str
    prompts: list[Any]  # completion: str or list[int] each; chat: one list of messages
    params: SamplingParams
    max_tokens: int | None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # completions: top alternatives per token (None = off)


def parse_request(body: dict, kind: str, model_ids: list[str]) -> GenerationRequest:
    """Check a /v1/completions (``kind="completion"``) or /v1/chat/completions body."""
    model = body.get("model")
    if model is None:
        raise APIError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {_type_name(model)}", param="model", code="invalid_type")
    if model not in model_ids:
        raise APIError(404, f"the model {_show(model)} does not exist; this server serves {', '.join(model_ids)}",
                       param="model", code="model_not_found")

    check_unsupported(body)
    if kind == "chat":
        prompts: list[Any] = [parse_messages(body.get("messages"))]
    else:
        prompts = parse_prompt(body.get("prompt"))

    max_tokens = get_int(body, "max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None, lo=1)
    n = get_int(body, "n", 1, lo=1, hi=MAX_N)
    assert n is not None
    stream = get_bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
        include_usage = get_bool(opts, "include_usage", False)

    temperature = get_number(body, "temperature", 1.0, lo=0, hi=2)
    top_p = get_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)
    presence = get_number(body, "presence_penalty", 0.0, lo=-2, hi=2)
    frequency = get_number(body, "frequency_penalty", 0.0, lo=-2, hi=2)
    seed = get_int(body, "seed", None, lo=-(2**63), hi=2**63 - 1 - MAX_N)
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise APIError(400, "'logit_bias' must be an object of token id -> bias", param="logit_bias",
                       code="invalid_type")
    if isinstance(logit_bias, dict):
        for k, v in logit_bias.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise _bad("logit_bias", "'logit_bias' values must be numbers in [-100, 100], "
                                         f"got {_show(repr(v))} for {_show(k)}")

    logprobs_flag = False
    top = 0
    completion_logprobs = None
    if kind == "chat":
        logprobs_flag = get_bool(body, "logprobs", False)
        top = get_int(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS) or 0
        if top and not logprobs_flag:
            raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    else:
        completion_logprobs = get_int(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
        if completion_logprobs is not None:
            logprobs_flag, top = True, completion_logprobs
    echo = get_bool(body, "echo", False) if kind == "completion" else False

    try:
        params = SamplingParams(temperature=temperature or 0.0, top_p=top_p or 1.0, presence_penalty=presence or 0.0,
                                frequency_penalty=frequency or 0.0, seed=seed, logit_bias=logit_bias or {},
                                logprobs=logprobs_flag, top_logprobs=top)
    except LlamalabError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    return GenerationRequest(kind=kind, model=model, prompts=prompts, params=params, max_tokens=max_tokens, n=n,
                             stop=get_stop(body), stream=stream, include_usage=include_usage, echo=echo,
                             logprobs=completion_logprobs)


def check_unsupported(body: dict) -> None:
    """A 400 for what this server cannot honour (rather than a 200 that silently ignores it): tool and
    function calling, and ``response_format`` other than plain text (JSON mode needs constrained decoding)."""
    for name in ("tools", "functions"):
        if body.get(name) not in (None, []):
            raise APIError(400, f"'{name}' is not supported by this server (no tool or function calling); "
                                "remove it", param=name, code="unsupported_parameter")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise APIError(400, f"'{name}' is not supported by this server (no tool or function calling)",
                           param=name, code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise APIError(400, "'response_format' must be an object with a string 'type'", param="response_format",
                       code="invalid_type")
    if fmt["type"] != "text":
        raise APIError(400, f"'response_format' type {_show(fmt['type'])} is not supported: this server cannot "
                            "constrain its output to JSON; only {\"type\": \"text\"} is accepted",
                       param="response_format", code="unsupported_value")


def parse_prompt(v: Any) -> list[str | list[int]]:
    """``prompt``: a string, an array of strings, an array of token ids, or an array of those arrays."""
    err = APIError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array of "
                        "token-id arrays", param="prompt", code="invalid_type")
    if v is None:
        raise APIError(400, "you must provide a prompt", param="prompt", code="missing_required_parameter")
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v:
        raise err if not isinstance(v, list) else _bad("prompt", "'prompt' must not be an empty array")
    if all(isinstance(x, str) for x in v):
        return list(v)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return [list(v)]
    if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in v):
        return [list(x) for x in v]
    raise err


def parse_messages(v: Any) -> list[dict[str, str]]:
    """``messages``: a non-empty array of {role, content}; content parts of type text are joined."""
    if v is None:
        raise APIError(400, "you must provide 'messages'", param="messages", code="missing_required_parameter")
    if not isinstance(v, list):
        raise APIError(400, f"'messages' must be an array, got {_type_name(v)}", param="messages",
                       code="invalid_type")
    if not v:
        raise _bad("messages", "'messages' must not be empty")
    out = []
    for i, m in enumerate(v):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"'{p}' must be an object", param=p, code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise APIError(400, f"'{p}.role' must be a string", param=f"{p}.role", code="invalid_type")
        if role not in ROLES:
            raise _bad(f"{p}.role", f"'{p}.role' must be one of {', '.join(ROLES)}, got {_show(role)}")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"'{p}.content[{j}]' must be a text part "
                                        "({\"type\": \"text\", \"text\": ...}); only text is supported",
                                   param=f"{p}.content", code="invalid_type")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise APIError(400, f"'{p}.content' must be a string or an array of text parts",
                           param=f"{p}.content", code="invalid_type")
        msg = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out
