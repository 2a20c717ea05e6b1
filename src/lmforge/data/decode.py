"""Turn the bytes of a page or file into text, or say precisely why not.

Web bytes lie about themselves: a server says ``charset=utf-8`` for a Latin-1 page, a
``.html`` file is really a PNG, a download stops half-way. Guessing silently would put
mojibake or binary noise into training data, so this module decodes strictly and
refuses with a reason the run report can count:

- ``binary``: NUL bytes or many control characters near the start (images, archives);
- ``bad_encoding``: the declared (or default UTF-8) charset does not fit the bytes,
  beyond a tiny tolerance for the odd stray byte that real pages do contain;
- ``empty``: nothing but whitespace.
"""

from __future__ import annotations

import codecs
import re

from lmforge.data.errors import UnreadablePayload

# Bytes 0-8, 14-31 and 127 never occur in real text (tab, newline, form feed and CR do).
_CONTROL = bytes(range(0, 9)) + bytes(range(14, 32)) + b"\x7f"
_CONTROL_TABLE = bytes.maketrans(_CONTROL, b"\x00" * len(_CONTROL))
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Python codecs that a page may name but that are no charset: they rewrite the text
# (backslash escapes, IDNA, punycode) or cannot decode at all. Browsers ignore them too.
_NOT_CHARSETS = frozenset({"unicode_escape", "raw_unicode_escape", "unicode_internal", "punycode", "idna",
                           "undefined", "utf_7"})
_WIDE = ("utf_16", "utf_32", "utf16", "utf32")


def looks_binary(data: bytes, *, window: int = 4096, max_control_fraction: float = 0.05) -> bool:
    """True for data that is not text in any 8-bit or UTF-8 encoding.

    UTF-16 text is full of NUL bytes, so a UTF-16 byte-order mark exempts the data.
    """
    head = data[:window]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    if b"\x00" in head:
        return True
    if not head:
        return False
    controls = len(head) - len(head.translate(_CONTROL_TABLE).replace(b"\x00", b""))
    return controls / len(head) > max_control_fraction


def charset_of(data: bytes, content_type: str | None = None, *, sniff_html: bool = True) -> str | None:
    """The charset a document declares: byte-order mark, then HTTP header, then ``<meta>``."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    if content_type and (match := _HEADER_CHARSET.search(content_type)):
        return match.group(1)
    if sniff_html and (match := _META_CHARSET.search(data[:4096])):
        name = match.group(1).decode("ascii", "replace")
        # a <meta> readable as ASCII cannot be UTF-16/32: browsers read such pages as UTF-8
        return None if name.lower().replace("-", "_").startswith(_WIDE) else name
    return None


def _codec(name: str | None) -> str:
    """A Python codec for a declared charset; unknown or missing names mean UTF-8."""
    if not name:
        return "utf-8"
    try:
        info = codecs.lookup(name)
    except LookupError:
        return "utf-8"
    codec = info.name
    if not getattr(info, "_is_text_encoding", True) or codec.replace("-", "_") in _NOT_CHARSETS:  # rot13, ...
        return "utf-8"
    # Browsers read "latin-1" and "ascii" as windows-1252, and so do we (a superset).
    return "cp1252" if codec in ("latin-1", "iso8859-1", "ascii") else codec


def decode_bytes(data: bytes, content_type: str | None = None, *, html: bool = True,
                 max_bad_fraction: float = 0.001) -> str:
    """Decode `data`, raising `UnreadablePayload` with a countable reason when it is not text.

    Up to `max_bad_fraction` of the bytes may be invalid in the chosen charset (they
    become U+FFFD); past that the declaration is wrong and the page is refused.
    """
    if looks_binary(data):
        raise UnreadablePayload("binary", "control bytes where text should be")
    codec = _codec(charset_of(data, content_type, sniff_html=html))
    try:
        text = data.decode(codec)
    except UnicodeError:  # UnicodeDecodeError, or a codec's own failure
        try:
            text = data.decode(codec, errors="replace")
        except UnicodeError as err:
            raise UnreadablePayload("bad_encoding", f"not decodable as {codec}: {err}") from None
        bad = text.count("\ufffd")
        if bad > max(1, max_bad_fraction * len(data)):
            raise UnreadablePayload("bad_encoding", f"{bad} bytes invalid as {codec}") from None
    if not text.strip():
        raise UnreadablePayload("empty")
    return text
