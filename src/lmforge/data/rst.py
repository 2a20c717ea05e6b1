"""reStructuredText sources as the text a reader sees: markup removed, words kept.

Documentation often ships twice, as HTML and as its reST source (Python's docs keep
every page's source in ``_sources/``). Read raw, the source is full of markup that no
reader sees (``:func:`open```, ``.. note::``, heading underlines), which both pollutes
training text and hides that the two files say the same thing. This module unwraps the
inline roles, literals, references and emphasis, keeps the arguments of directives
(``.. function:: open(file)`` becomes ``open(file)``) and drops link targets, options
and underlines. It is a line-by-line approximation, not a docutils parse: fast, with no
dependency, and close enough for filtering and near-duplicate detection.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":[\w:.+-]+:`[~!]?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")
_REFERENCE = re.compile(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{1,2}")
_EMPHASIS = re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")
_DIRECTIVE = re.compile(r"^(\s*)\.\. [\w:-]+::\s?(.*)$")
_TARGET_OR_COMMENT = re.compile(r"^\s*\.\. _[^:]*:.*$|^\s*\.\.\s*$|^\s*\.\. \|[^|]+\| .*$")
_FIELD_OPTION = re.compile(r"^\s+:[\w-]+:(\s.*)?$")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>.:_])\1{2,}\s*$")


def rst_to_text(source: str) -> str:
    """The readable text of a reST document (see the module docstring for what is removed)."""
    out: list[str] = []
    for line in source.splitlines():
        if _UNDERLINE.match(line) or _TARGET_OR_COMMENT.match(line) or _FIELD_OPTION.match(line):
            continue
        if match := _DIRECTIVE.match(line):
            line = match.group(1) + match.group(2)
        line = _ROLE.sub(r"\1", line)
        line = _LITERAL.sub(r"\1", line)
        line = _REFERENCE.sub(r"\1", line)
        line = _EMPHASIS.sub(lambda m: m.group(1) or m.group(2), line)
        stripped = line.rstrip()
        if stripped.endswith("::"):  # "Example::" introduces a literal block; readers see "Example:"
            line = stripped[:-1]
        out.append(line)
    return "\n".join(out)
