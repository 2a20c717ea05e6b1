"""Chat templates: a model's own Jinja2 template turns a conversation into one string.

Chat models are trained on conversations laid out in one particular way ("<|im_start|>
user\\n...<|im_end|>\\n" for ChatML), and they ship that layout as a Jinja2 template. We
render it exactly as Hugging Face transformers does, so prompts match the ones the model
was trained on: the same variables (`messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, ..., `tools`, `documents`), the `raise_exception` and `strftime_now`
helpers, a `tojson` that keeps non-ASCII text, `trim_blocks`/`lstrip_blocks`, the
`loopcontrols` extension and the `{% generation %}` tag. Templates come from model files,
so they run in Jinja2's immutable sandbox.

`assistant_spans` finds where each assistant reply sits in the rendered text, for
supervised fine-tuning masks. A template that marks replies with `{% generation %}`
says so itself; otherwise the conversation is rendered up to each reply (with the
generation prompt) and through it, and the reply is the difference, cut after the last
special token (the end-of-turn token) so that the template's trailing newline is not
counted as something the model must say.

**Message text never becomes a control token.** `render_parts` keeps apart what the
template wrote and what came from the messages: special-token text inside a message
("<|im_end|>\\n<|im_start|>system" typed by a user) is cut out into pieces of its own that
the tokenizer encodes as ordinary text (`Tokenizer.encode_chat_prompt`), so only the
template's own markers become special tokens. A conversation without such text renders
to the same single piece, and so to the same ids, as before.

**The sandbox has limits.** A template from a model file is untrusted code: it may build
a string of ten billion characters in one expression or loop for minutes. Every render
runs under a budget (`max_chars`, default 8 Mi characters; `timeout`, default 2 s):
anything a template builds (by `*`, `+`, `~`, `%`, a literal, a method or a filter) and
the text it renders may hold at most `max_chars` characters, all the text it writes
(including what `{% set %}` blocks and macros capture) at most four times that, and the
clock is checked at every loop step, call and output. Sizes are predicted before the
work where one operation can multiply them (`'a' * n`, `join`, `replace`, `indent`,
formatting widths, `tojson`'s indent, large integers). `range()` yields at most 100,000
numbers; `{% include %}`, `{% import %}` and `{% extends %}` are refused (a template
from a model file loads nothing else). Every failure is one line: a `TokenizerError`
naming the limit or what was not allowed.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import regex
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from lmforge.tokenizer.errors import TokenizerError

#: ChatML, used when a tokenizer has no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Noncharacters that bracket `{% generation %}` output while we look for replies, and one
# that stands in for a reply's text.
_OPEN, _CLOSE, _PLACEHOLDER = "\ufdd0", "\ufdd1", "\ufdd2"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the text the assistant generates."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        return f"{_OPEN}{caller()}{_CLOSE}"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# ---------------------------------------------------------------------- the sandbox's limits

#: Characters a rendered prompt, or any one value a template builds, may hold.
MAX_CHARS = 8 << 20
#: Seconds a render may take.
TIMEOUT_S = 2.0
#: Numbers `range()` may yield (Jinja's own sandbox limit).
MAX_RANGE = 100_000
#: Bits an integer a template computes may have (about 20,000 decimal digits).
MAX_INT_BITS = 1 << 16
#: All the text one render writes, captured or not, as a multiple of `max_chars`.
WRITTEN_FACTOR = 4


class _Stopped(jinja2.exceptions.TemplateRuntimeError):
    """A render ran past one of its limits."""


class _Refused(SecurityError):
    """Something lmforge's sandbox does not allow (its message says what)."""


@dataclass
class _Budget:
    """One render's limits, and what it has used of them."""

    max_chars: int = MAX_CHARS
    seconds: float = math.inf
    deadline: float = math.inf
    written: int = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Stopped(f"still running after {self.seconds:g} s, the time limit")

    def fits(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise _Stopped(f"{what} would be {size:,} characters, over the limit of {self.max_chars:,}")

    def write(self, size: int) -> None:
        self.written += size
        if self.written > WRITTEN_FACTOR * self.max_chars:
            raise _Stopped(
                f"it wrote more than {WRITTEN_FACTOR * self.max_chars:,} characters in all "
                f"(text captured by set blocks and macros included), the limit"
            )


_BUDGET: ContextVar[_Budget | None] = ContextVar("lmforge_chat_template_budget", default=None)


def _budget() -> _Budget:
    """The running render's budget (outside a render, e.g. constant folding: no time limit)."""
    return _BUDGET.get() or _Budget()


def _size(value: Any, limit: int) -> int:
    """Characters and items in `value`, counting a part shared by several containers once
    per reference (that is what printing or comparing it costs); stops past `limit`."""
    memo: dict[int, int] = {}

    def size(v: Any) -> int:
        if isinstance(v, (str, bytes)):
            return len(v)
        if not isinstance(v, (list, tuple, dict, set, frozenset)):
            return 1
        if id(v) not in memo:
            total = len(v)
            for item in itertools.chain.from_iterable(v.items()) if isinstance(v, dict) else v:
                total += size(item)
                if total > limit:
                    break
            memo[id(v)] = total
        return memo[id(v)]

    return size(value)


def _check_built(value: Any, what: str = "a value it built") -> Any:
    """`value`, if it is within the budget (an integer's bits, a value's characters)."""
    budget = _budget()
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Stopped(
            f"{what} is an integer of {value.bit_length():,} bits, over the limit of {MAX_INT_BITS:,}"
        )
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        budget.fits(_size(value, budget.max_chars), what)
    return value


def _int_args(args: Iterable[Any], what: str) -> None:
    """Refuse an integer argument larger than the budget: a width or a count of copies."""
    limit = _budget().max_chars
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > limit:
            raise _Stopped(f"{what} {arg:,} is over the limit of {limit:,}")


_PERCENT_SPEC = regex.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = regex.compile(r"\{[^{}]*:([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def _format_size(fmt: str, args: Any, spec: regex.Pattern[str]) -> int:
    """An upper bound on the size of `fmt` filled in with `args` (`%` or `str.format`): the
    widths and precisions written in it, or taken from the arguments, count in full."""
    budget = _budget()
    size = len(fmt) + _size(args, budget.max_chars)
    values = (
        list(args.values())
        if isinstance(args, Mapping)
        else list(args)
        if isinstance(args, (list, tuple))
        else [args]
    )
    for match in spec.finditer(fmt):
        numbers = regex.findall(r"\d+", "".join(g or "" for g in match.groups()))
        size += sum(int(n) for n in numbers if len(n) < 30) + sum(10**30 for n in numbers if len(n) >= 30)
        if "*" in match.group(0) or "{" in (match.group(1) or ""):
            size += sum(abs(v) for v in values if isinstance(v, int))
    return size


def _replace_size(s: str, old: str, new: str, count: int | None = -1) -> int:
    occurrences = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        occurrences = min(occurrences, count)
    return len(s) + occurrences * max(len(new) - len(old), 0)


def _bounded_list(values: Iterable[Any], what: str) -> list[Any]:
    """`list(values)`, stopping as soon as it would pass the budget."""
    if isinstance(values, (list, tuple, dict, set, frozenset, str)):
        return list(values)
    budget = _budget()
    out: list[Any] = []
    for item in values:
        out.append(item)
        if len(out) % 4096 == 0:
            budget.tick()
            budget.fits(len(out), what)
    return out


def _check_str_method(method: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Predict what a string method that multiplies sizes would build (the arguments, with
    an iterator to `join` made a list)."""
    budget = _budget()
    s, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(s, str):
        return args
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        budget.fits(_replace_size(s, *args[:3]), "str.replace()")
    elif name == "join" and args:
        items = _bounded_list(args[0], "str.join()")
        total = sum(len(x) if isinstance(x, str) else 1 for x in items)
        budget.fits(total + max(len(items) - 1, 0) * len(s), "str.join()")
        args = (items, *args[1:])
    elif name in ("center", "ljust", "rjust", "zfill"):
        _int_args(args[:1], f"str.{name}()")
    elif name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else 8
        budget.fits(len(s) + s.count("\t") * max(tab, 0), "str.expandtabs()")
    elif name in ("format", "format_map"):
        budget.fits(
            _format_size(s, args[0] if name == "format_map" and args else args, _FORMAT_SPEC), f"str.{name}()"
        )
    return args


# Filters whose result can be far larger than their input: predict the size first. Each
# takes the filter's own parameters (after any context Jinja passes) and may return a
# replacement for the value (an iterator made a list).
def _join_filter(value: Any, d: str = "", attribute: Any = None) -> Any:
    items = _bounded_list(value, "join")
    total = sum(len(x) if isinstance(x, str) else 20 for x in items)
    _budget().fits(total + max(len(items) - 1, 0) * len(str(d)), "join")
    return items


def _replace_filter(s: Any, old: Any, new: Any, count: int | None = None) -> Any:
    _budget().fits(_replace_size(str(s), str(old), str(new), count), "replace")
    return s


def _indent_filter(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> Any:
    text = str(s)
    w = len(width) if isinstance(width, str) else max(int(width), 0)
    _budget().fits(len(text) + (text.count("\n") + 1) * w, "indent")
    return s


def _wordwrap_filter(
    s: Any,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> Any:
    text = str(s)
    lines = len(text) // max(int(width), 1) + text.count(" ") + text.count("\n") + 1
    _budget().fits(len(text) + lines * len(wrapstring or "\n"), "wordwrap")
    return s


def _urlize_filter(
    value: Any,
    trim_url_limit: int | None = None,
    nofollow: bool = False,
    target: str | None = None,
    rel: str | None = None,
    extra_schemes: Any = None,
) -> Any:
    text = str(value)
    links = text.count(":") + text.count("www.") + text.count("@") + 1
    _budget().fits(2 * len(text) + links * (len(target or "") + len(rel or "") + 64), "urlize")
    return value


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> Any:
    _budget().fits(_format_size(str(value), kwargs or args, _PERCENT_SPEC), "format")
    return value


def _sum_filter(iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    items = _bounded_list(iterable, "sum")
    if not isinstance(start, (int, float)) or (
        attribute is None and any(not isinstance(x, (int, float)) for x in items)
    ):
        raise _Refused("sum() of anything but numbers is not allowed")
    return items


#: Filters whose integer arguments are sizes (a width, a number of items or of spaces).
_SIZE_ARGUMENTS = frozenset({"center", "indent", "wordwrap", "truncate", "batch", "slice", "tojson"})

_FILTER_CHECKS: dict[str, Callable[..., Any]] = {
    "join": _join_filter,
    "replace": _replace_filter,
    "indent": _indent_filter,
    "wordwrap": _wordwrap_filter,
    "urlize": _urlize_filter,
    "format": _format_filter,
    "sum": _sum_filter,
    "list": lambda value: _bounded_list(value, "list"),
}


def _guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` behind the budget: the clock, integer arguments (widths, counts), a size
    prediction where the filter can multiply sizes, and the size of what it returns."""
    passes_context = getattr(func, "jinja_pass_arg", None) is not None
    check = _FILTER_CHECKS.get(name)
    sizes = name in _SIZE_ARGUMENTS

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _budget().tick()
        head, args = (args[:1], args[1:]) if passes_context else ((), args)
        if sizes:
            _int_args([*args[1:], *kwargs.values()], f"the {name} filter's argument")
        if check is not None and args:
            args = (check(*args, **kwargs), *args[1:])
        return _check_built(func(*head, *args, **kwargs), f"the {name} filter's result")

    return guarded


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON that keeps non-ASCII text (as transformers' `tojson`), written piece by piece so
    that a deep value with a wide indent stops at the budget instead of filling memory."""
    encoder = json.JSONEncoder(
        ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    budget = _budget()
    parts, size = [], 0
    for part in encoder.iterencode(value):
        parts.append(part)
        size += len(part)
        if len(parts) % 4096 == 0:
            budget.tick()
        budget.fits(size, "tojson")
    return "".join(parts)


def _range(*args: int) -> range:
    numbers = range(*args)
    try:
        count = len(numbers)
    except OverflowError:
        count = math.inf
    if count > MAX_RANGE:
        raise _Refused(f"range() of more than {MAX_RANGE:,} numbers is not allowed")
    return numbers


class _Limits(jinja2.ext.Extension):
    """What the compiled template calls at each loop step, `~`, literal and piece of text
    (`_instrument` puts the calls in)."""

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = _budget()
        for item in iterable:
            budget.tick()
            yield item

    def concat(self, *parts: Any) -> str:
        budget = _budget()
        budget.tick()
        texts = [p if isinstance(p, str) else str(p) for p in parts]
        budget.fits(sum(map(len, texts)), "a ~ b")
        return "".join(texts)

    def built(self, value: Any) -> Any:
        _budget().tick()
        return _check_built(value, "a literal")

    def text(self, data: str) -> str:
        return data


class _SandboxedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus the budget: operators and calls check sizes and the
    clock before they run, and every piece of output is counted (`finalize`)."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator == "*":
            _check_repeat(left, right)
        elif operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
            budget.fits(_size(left, budget.max_chars) + _size(right, budget.max_chars), "a + b")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            bits = max(left.bit_length() - 1, 0) * right + 1
            if bits > MAX_INT_BITS:
                raise _Stopped(
                    f"{left} ** {right} would have about {bits:,} bits, over the limit of {MAX_INT_BITS:,}"
                )
        elif operator == "%" and isinstance(left, str):
            budget.fits(_format_size(left, right, _PERCENT_SPEC), "a % formatting")
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _budget().tick()
        args = _check_str_method(getattr(obj, "__wrapped__", obj), args)
        return _check_built(super().call(context, obj, *args, **kwargs), "a call's result")


_SIZED = (str, bytes, list, tuple, dict, set, frozenset)


def _check_repeat(left: Any, right: Any) -> None:
    """`sequence * n` (or `n * sequence`): refuse a result over the budget before building it;
    `n * m`: refuse an integer over MAX_INT_BITS."""
    budget = _budget()
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _Stopped(
                f"a product of {left.bit_length() + right.bit_length():,} bits is over the limit "
                f"of {MAX_INT_BITS:,}"
            )
        return
    sequence, count = (left, right) if isinstance(right, int) else (right, left)
    if isinstance(sequence, (str, bytes, list, tuple)) and isinstance(count, int):
        shown = repr(sequence[:10]) + ("..." if len(sequence) > 10 else "")
        budget.fits(_size(sequence, budget.max_chars) * max(count, 0), f"{shown} * {count}")


@jinja2.pass_context  # needing the context keeps Jinja from writing constants out at compile time
def _written(context: Any, value: Any) -> str:
    """`finalize`: every `{{ ... }}` and piece of template text, as text, counted."""
    budget = _budget()
    budget.tick()
    text = value if isinstance(value, str) else str(value)
    budget.write(len(text))
    return text


class _Instrument(NodeTransformer):
    """Puts `_Limits`' calls into a parsed template; refuses loading other templates."""

    def _call(self, name: str, args: list[nodes.Expr], lineno: int) -> nodes.Call:
        method = nodes.ExtensionAttribute(_Limits.identifier, name, lineno=lineno)
        return nodes.Call(method, args, [], None, None, lineno=lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = self._call("iterate", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        return self._call("concat", self.generic_visit(node).nodes, node.lineno)

    def visit_List(self, node: nodes.Node) -> nodes.Node:
        return self._call("built", [self.generic_visit(node)], node.lineno)

    visit_Dict = visit_List

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        node = self.generic_visit(node)
        return self._call("built", [node], node.lineno) if node.ctx == "load" else node

    def visit_TemplateData(self, node: nodes.TemplateData) -> nodes.Node:
        return self._call("text", [nodes.Const(node.data, lineno=node.lineno)], node.lineno)

    def _refuse(self, node: nodes.Node) -> nodes.Node:
        tag = {
            "Include": "include",
            "Import": "import",
            "FromImport": "from ... import",
            "Extends": "extends",
        }[type(node).__name__]
        raise TokenizerError(
            f"chat template: {{% {tag} %}} is not allowed (a template from a model file "
            "loads no other templates)"
        )

    visit_Include = visit_Import = visit_FromImport = visit_Extends = _refuse


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = _SandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_written,
        extensions=[_GenerationTag, _Limits, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guarded_filter(name, func) for name, func in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _range
    env.globals.pop("lipsum", None)  # n paragraphs of filler text: nothing a chat template needs
    try:
        return env.from_string(_Instrument().visit(env.parse(source)))
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"chat template does not parse: {err}") from err


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to.

    `max_chars` and `timeout` bound every render (see the module docstring)."""

    def __init__(
        self,
        source: str,
        special_tokens: Mapping[str, str | None] | None = None,
        *,
        max_chars: int = MAX_CHARS,
        timeout: float = TIMEOUT_S,
    ) -> None:
        self.source = source
        self.context = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.max_chars = max_chars
        self.timeout = timeout
        self.template = _compile(source)
        self.marks_generation = regex.search(r"\{%-?\s*generation\s*-?%\}", source) is not None

    def render(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The conversation as the model expects to read it."""
        return self._render(messages, add_generation_prompt, kwargs).replace(_OPEN, "").replace(_CLOSE, "")

    def render_parts(
        self,
        messages: Sequence[Mapping[str, Any]],
        special_tokens: Iterable[str],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[tuple[str, bool]]:
        """The rendered conversation as `(text, template)` pieces: special-token text that came
        from the messages is in pieces of its own with `template` False, to be encoded as
        ordinary text. Without such text, the one piece is `render(...)`.

        How: every occurrence of a special token's text in a message's strings is replaced
        by a private-use character the rendered text does not hold, the conversation is
        rendered again, and the text is cut at those characters. Templates that transform
        the content (`| trim`, `.strip()`, `.split(...)`) keep working: a stand-in is one
        ordinary character that no such transformation removes. Other template inputs
        (`tools`, `documents`, ...) are the caller's and are not examined.
        """
        text = self.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        specials = _alternation([t for t in special_tokens if t])
        if specials is None or not any(specials.search(s) for s in _strings(messages)):
            return [(text, True)]
        used = set(text).union(*(set(s) for s in _strings(messages)))
        free = (c for c in map(chr, range(_STAND_INS, 0x10FFFE)) if c not in used)
        stand_in: dict[str, str] = {}

        def neutral(s: str) -> str:
            return specials.sub(lambda m: stand_in.setdefault(m.group(), next(free)), s)

        marked = self.render(
            _map_strings(messages, neutral), add_generation_prompt=add_generation_prompt, **kwargs
        )
        original = {c: token for token, c in stand_in.items()}
        parts = []
        for piece in regex.split(f"({'|'.join(map(regex.escape, original))})", marked):
            if piece in original:
                parts.append((original[piece], False))
            elif piece:
                parts.append((piece, True))
        return parts

    def _render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, kwargs: Mapping[str, Any]
    ) -> str:
        """Render under the budget, streaming, so that output past `max_chars` or a render past
        the deadline stops there; every failure becomes a one-line `TokenizerError`."""
        context = {**self.context, **kwargs}
        budget = _Budget(self.max_chars, self.timeout, time.monotonic() + self.timeout)
        token = _BUDGET.set(budget)
        try:
            parts, size = [], 0
            for part in self.template.generate(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **context
            ):
                size += len(part)
                budget.fits(size, "the rendered text")
                parts.append(part)
            return "".join(parts)
        except _Stopped as err:
            raise TokenizerError(f"chat template stopped: {err}") from None
        except _Refused as err:
            raise TokenizerError(f"chat template: {err}") from None
        except SecurityError as err:  # Jinja's: "access to attribute 'append' of 'list' object is unsafe."
            message = str(err).rstrip(".")
            raise TokenizerError(f"chat template: {message}: not allowed in the sandbox") from None
        except jinja2.TemplateError as err:
            raise TokenizerError(f"chat template failed: {err}") from err
        except TokenizerError:
            raise
        except Exception as err:  # a template's own bug (or a limit Python enforces): one line, no traceback
            raise TokenizerError(f"chat template failed: {type(err).__name__}: {err}") from err
        finally:
            _BUDGET.reset(token)

    def assistant_spans(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        end_tokens: Sequence[str] = (),
        **kwargs: Any,
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the (start, end) character span of every assistant reply.

        A span covers the reply and the end-of-turn token after it (the last of
        `end_tokens` found before the next message begins).
        """
        if self.marks_generation:
            return _spans_from_marks(self._render(messages, add_generation_prompt, kwargs))
        text = self.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        ends = _alternation(end_tokens)
        fast = self._spans_by_brackets(messages, text, add_generation_prompt, kwargs, ends)
        if fast is not None:
            return text, fast
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            span = self._span_by_prefix(messages, i, text, kwargs, ends)
            if span is None:
                span = self._span_by_difference(messages, i, text, add_generation_prompt, kwargs, ends)
            if span is None:
                raise TokenizerError(f"cannot find assistant message #{i} in the rendered chat template")
            spans.append(span)
        return text, spans

    def _spans_by_brackets(
        self,
        messages: Sequence[Mapping[str, Any]],
        text: str,
        add_generation_prompt: bool,
        kwargs: Mapping[str, Any],
        ends: regex.Pattern[str] | None,
    ) -> list[tuple[int, int]] | None:
        """Every reply in one render (linear in the conversation's length, where rendering each
        prefix is quadratic): each assistant content is bracketed by noncharacters, and the
        brackets' positions, extended over the end-of-turn token right after each, are the
        spans. None when the template does not pass the content through unchanged or no
        end-of-turn token follows a reply: then the per-reply renders take over."""
        def bracket(message: Mapping[str, Any]) -> Mapping[str, Any]:
            if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
                return message
            return {**message, "content": f"{_OPEN}{message['content']}{_CLOSE}"}

        try:
            marked = self._render([bracket(m) for m in messages], add_generation_prompt, kwargs)
        except TokenizerError:
            return None
        plain, spans = _spans_from_marks(marked)
        replies = sum(1 for m in messages if m.get("role") == "assistant")
        if plain != text or len(spans) != replies:
            return None
        extended = []
        for start, end in spans:
            match = ends.match(text, end) if ends is not None else None
            if match is None:  # no end-of-turn token right after the reply: the per-reply renders decide
                return None
            extended.append((start, match.end()))
        return extended

    def _span_by_prefix(
        self,
        messages: Sequence[Mapping[str, Any]],
        i: int,
        text: str,
        kwargs: Mapping[str, Any],
        ends: regex.Pattern[str] | None,
    ) -> tuple[int, int] | None:
        """Render up to the reply (with the generation prompt) and through it: the reply is
        the difference, up to the last end-of-turn token in it."""
        try:
            before = self.render(messages[:i], add_generation_prompt=True, **kwargs)
            through = self.render(messages[: i + 1], add_generation_prompt=False, **kwargs)
        except TokenizerError:
            return None
        if not (through.startswith(before) and text.startswith(through) and len(through) > len(before)):
            return None
        last_end = None
        if ends is not None:
            for match in ends.finditer(text, len(before), len(through)):
                last_end = match.end()
        return len(before), last_end or len(through)

    def _span_by_difference(
        self,
        messages: Sequence[Mapping[str, Any]],
        i: int,
        text: str,
        add_generation_prompt: bool,
        kwargs: Mapping[str, Any],
        ends: regex.Pattern[str] | None,
    ) -> tuple[int, int] | None:
        """For templates that render earlier turns differently (e.g. dropping a reasoning
        model's thoughts): render again with this reply replaced by a placeholder; the
        text that differs is what the template made of the reply."""
        changed = [dict(m) for m in messages]
        changed[i]["content"] = _PLACEHOLDER
        try:
            other = self.render(changed, add_generation_prompt=add_generation_prompt, **kwargs)
        except TokenizerError:
            return None
        start = 0
        while start < min(len(text), len(other)) and text[start] == other[start]:
            start += 1
        tail = 0
        while tail < min(len(text), len(other)) - start and text[-1 - tail] == other[-1 - tail]:
            tail += 1
        end = len(text) - tail
        if ends is not None and (match := regex.compile(rf"\s*(?:{ends.pattern})").match(text, end)):
            end = match.end()
        return (start, end) if end > start else None


#: The first stand-in for special-token text found in a message (Supplementary Private Use Area-B).
_STAND_INS = 0x100000


def _strings(value: Any) -> Iterator[str]:
    """Every string inside messages (dict values, list items), however nested."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _map_strings(value: Any, f: Callable[[str], str]) -> Any:
    """`value` with `f` applied to every string inside it (dict keys stay)."""
    if isinstance(value, str):
        return f(value)
    if isinstance(value, Mapping):
        return {k: _map_strings(v, f) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, f) for v in value]
    return value


def _alternation(words: Sequence[str]) -> regex.Pattern[str] | None:
    """A regex matching any of `words`, longest first."""
    if not words:
        return None
    return regex.compile("|".join(map(regex.escape, sorted(words, key=len, reverse=True))))


def _spans_from_marks(marked: str) -> tuple[str, list[tuple[int, int]]]:
    text_parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length, start = 0, None
    for part in regex.split(f"([{_OPEN}{_CLOSE}])", marked):
        if part == _OPEN:
            start = length
        elif part == _CLOSE:
            if start is not None and length > start:
                spans.append((start, length))
            start = None
        else:
            text_parts.append(part)
            length += len(part)
    return "".join(text_parts), spans
