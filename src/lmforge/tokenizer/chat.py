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
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import regex
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"chat template does not parse: {err}") from err


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None] | None = None) -> None:
        self.source = source
        self.context = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.template = _compile(source)
        self.marks_generation = regex.search(r"\{%-?\s*generation\s*-?%\}", source) is not None

    def render(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The conversation as the model expects to read it."""
        return self._render(messages, add_generation_prompt, kwargs).replace(_OPEN, "").replace(_CLOSE, "")

    def _render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, kwargs: Mapping[str, Any]
    ) -> str:
        context = {**self.context, **kwargs}
        try:
            return self.template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as err:
            raise TokenizerError(f"chat template failed: {err}") from err

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
