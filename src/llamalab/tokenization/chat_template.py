"""Chat templates: jinja2 rendering the way transformers does it, with bounded work and output.

A chat template comes with the model file, so it is data from whoever made the file. jinja2's
sandbox already keeps it from touching Python internals (``ImmutableSandboxedEnvironment``); what
the sandbox does not bound is work: ``{% for i in range(100000) %}{% for j in range(100000) %}``
runs 10^10 times, ``{% set ns.s = ns.s ~ ns.s %}`` doubles a string per line. Each render here has

* a step budget (:data:`MAX_STEPS`): every loop item, call, attribute or item look-up, operator
  and output chunk costs one step;
* a size budget: no string, list or output grows beyond :data:`MIN_OUTPUT` characters plus four
  times the characters of the messages; integer arguments to filters and string methods (widths,
  counts) stay under :data:`MAX_INT_ARG`; ``**`` refuses results of more than :data:`MAX_POW_BITS` bits.

Exceeding either is a one-line :class:`~llamalab.errors.TokenizerError`, as is any template error.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import nodes
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamalab.errors import TokenizerError

MAX_STEPS = 2_000_000
MIN_OUTPUT = 1 << 20
MAX_INT_ARG = 1 << 16
MAX_POW_BITS = 1 << 16


class _Budget:
    """What one render may still spend."""

    def __init__(self, chars: int) -> None:
        self.steps, self.chars = MAX_STEPS, chars

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise TokenizerError(f"chat template takes more than {MAX_STEPS:,} steps (a loop that does not end?)")

    def size(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.chars:
            raise TokenizerError(f"chat template builds a value of more than {self.chars:,} characters or items")
        return value


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    return _Budget(MIN_OUTPUT) if budget is None else budget  # None: a Template.render of the caller's own


def _check_int_args(args: tuple, kwargs: dict) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT_ARG:
            raise TokenizerError(f"chat template passes {v:,} to a filter or string method (limit {MAX_INT_ARG:,})")


# filters and str methods whose output can be a product of their inputs' sizes
_MULTIPLYING = frozenset({"replace", "indent", "wordwrap", "join", "center", "ljust", "rjust", "zfill",
                          "expandtabs"})


def _check_product(name: str, value: Any, args: tuple, kwargs: dict) -> None:
    """Refuse a call whose result could exceed the size budget: (size of the value + 1) times (1 + the
    largest string length or integer among the arguments) is an upper bound for every _MULTIPLYING one."""
    if name not in _MULTIPLYING:
        return
    def size(v: Any) -> int:
        if isinstance(v, (str, list, tuple)):
            return len(v)
        return abs(v) if isinstance(v, int) and not isinstance(v, bool) else 0
    widest = max((size(a) for a in (*args, *kwargs.values())), default=0)
    budget = _budget()
    if (size(value) + 1) * (1 + widest) > budget.chars:
        raise TokenizerError(f"chat template's {name} could build more than {budget.chars:,} characters")


def _bounded_filter(name: str, f):
    pass_arg = getattr(f, "jinja_pass_arg", None)  # pass_context / pass_eval_context / pass_environment

    @functools.wraps(f)  # keeps that mark, so jinja still passes the context first
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        value_at = 1 if pass_arg is not None else 0
        _check_int_args(args[value_at + 1:], kwargs)
        if len(args) > value_at:
            _check_product(name, args[value_at], args[value_at + 1:], kwargs)
            if name == "format" and isinstance(args[value_at], str):
                _check_widths(args[value_at])
        return budget.size(f(*args, **kwargs))

    return wrapper


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):  # each loop item costs a step
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        for concat in list(tree.find_all(nodes.Concat)):  # a ~ b: checked for size
            concat.nodes = [nodes.Call(nodes.EnvironmentAttribute("bounded_concat"), [nodes.List(concat.nodes)],
                                       [], None, None, lineno=concat.lineno)]
        return tree

    @staticmethod
    def bounded_iter(iterable: Any):
        budget = _budget()
        for item in iterable:
            budget.step()
            yield item

    @staticmethod
    def bounded_concat(parts: list) -> str:
        budget = _budget()
        budget.step()
        strs = [str(p) for p in parts]
        if sum(map(len, strs)) > budget.chars:
            raise TokenizerError(f"chat template builds a value of more than {budget.chars:,} characters or items")
        return "".join(strs)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        if operator == "**" and all(isinstance(v, int) for v in (left, right)) and abs(left) > 1 and right > 0:
            if right * math.log2(abs(left)) > MAX_POW_BITS:
                raise TokenizerError(f"chat template computes {left} ** {right} (more than {MAX_POW_BITS:,} bits)")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > budget.chars:
                    raise TokenizerError(f"chat template builds a value of more than {budget.chars:,} characters "
                                         "or items")
        if operator == "%" and isinstance(left, str):
            _check_int_args(right if isinstance(right, tuple) else (right,), {})
            _check_widths(left)
        return budget.size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's signature
        budget = _budget()
        budget.step()
        if isinstance(getattr(__obj, "__self__", None), str):  # a string method: widths and counts bounded
            _check_int_args(args, kwargs)
            if __obj.__name__ == "join":
                _check_product("join", args[0] if args else "", (__obj.__self__,), {})
            else:
                _check_product(__obj.__name__, __obj.__self__, args, kwargs)
        for a in args:
            budget.size(a)
        return budget.size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any):  # str.format / format_map, which jinja runs sandboxed
        if isinstance(getattr(value, "__self__", None), str):
            _check_widths(value.__self__, brace=True)
        return super().wrap_str_format(value)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().step()
        return super().getitem(obj, argument)


_PERCENT_WIDTH = re.compile(r"%(\([^)]*\))?[#0\- +]*(\*|\d{6,}|\d*\.(\*|\d{6,}))")
_BRACE_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\d{6,}[^{}]*\}")


def _check_widths(fmt: str, brace: bool = False) -> None:
    """Refuse a format string whose width or precision is a million or more, or (``%*d``) an argument."""
    if (_BRACE_WIDTH if brace else _PERCENT_WIDTH).search(fmt):
        raise TokenizerError("chat template formats with a width of a million or more")


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 16):
        raise TokenizerError(f"chat template: tojson indent must be 0..16, got {indent!r}")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached), or a one-line TokenizerError if it does not parse."""
    # optimized=False: no constant folding at compile time, where the budgets do not apply
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], optimized=False)
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # unbounded text generation, and no template needs it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except Exception as e:  # noqa: BLE001 - any parse failure is the template's, reported in one line
        raise TokenizerError(f"chat template does not parse: {str(e).splitlines()[0] if str(e) else e!r}") from None


def _chars(value: Any) -> int:
    """Characters of text in a message structure (strings, lists, dicts; iterative, so any depth)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            stack += list(v.keys()) + list(v.values())
        elif isinstance(v, (list, tuple)):
            stack += v
        else:
            total += 8
    return total


def render_chat_template(source: str, **variables: Any) -> str:
    """Render ``source`` with ``variables`` inside this render's step and size budgets."""
    template = compile_template(source)
    budget = _Budget(MIN_OUTPUT + 4 * _chars(variables))
    token = _BUDGET.set(budget)
    try:
        out, size = [], 0
        for chunk in template.generate(**variables):
            budget.step()
            size += len(chunk)
            if size > budget.chars:
                raise TokenizerError(f"chat template output exceeds {budget.chars:,} characters")
            out.append(chunk)
        return "".join(out)
    except TokenizerError:
        raise
    except Exception as e:  # noqa: BLE001 - jinja errors (undefined names, type errors, recursion) in one line
        raise TokenizerError(f"chat template failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                             ) from None
    finally:
        _BUDGET.reset(token)
