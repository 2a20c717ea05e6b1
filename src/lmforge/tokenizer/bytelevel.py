"""GPT-2's byte <-> character map, which lets a BPE over strings act on raw bytes.

Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2, SmolLM2, ...) store each token as a
string in which every character stands for one byte. Printable Latin-1 bytes stand for
themselves; the 68 others (controls, space, NBSP, soft hyphen, ...) are shifted to
U+0100 onwards in byte order, so that no token contains whitespace or an invisible
character. The space byte, for example, is written "Ġ" (U+0120) and newline "Ċ".

Both directions are done with `str.translate` on a Latin-1 view of the bytes, which runs
at C speed.
"""

from __future__ import annotations


def _build_table() -> tuple[str, ...]:
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    chars: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return tuple(chars)


#: BYTE_TO_CHAR[b] is the character that stands for byte b.
BYTE_TO_CHAR: tuple[str, ...] = _build_table()
#: The inverse map, character -> byte.
CHAR_TO_BYTE: dict[str, int] = {char: byte for byte, char in enumerate(BYTE_TO_CHAR)}
#: The 256 characters of the byte alphabet.
ALPHABET: frozenset[str] = frozenset(BYTE_TO_CHAR)

_ENCODE = str.maketrans({chr(byte): char for byte, char in enumerate(BYTE_TO_CHAR)})
_DECODE = str.maketrans({char: chr(byte) for byte, char in enumerate(BYTE_TO_CHAR)})


def bytes_to_chars(data: bytes) -> str:
    """Spell bytes in the byte alphabet: b" hi" -> "Ġhi"."""
    return data.decode("latin-1").translate(_ENCODE)


def is_byte_level(text: str) -> bool:
    """True when every character of `text` is one of the 256 byte characters."""
    return ALPHABET.issuperset(text)


def chars_to_bytes(text: str) -> bytes:
    """The bytes a byte-alphabet string stands for: "Ġhi" -> b" hi".

    Raises ValueError for characters outside the alphabet (check `is_byte_level` first).
    """
    if not is_byte_level(text):
        raise ValueError(f"{text!r} is not spelled in the byte-level alphabet")
    return text.translate(_DECODE).encode("latin-1")


def token_string_bytes(text: str) -> bytes:
    """The bytes a vocabulary string decodes to, by HF's ByteLevel decoder rule.

    A string made only of byte characters stands for those bytes; any other string (an
    added token such as "<|im start|>" with a real space) stands for its own UTF-8.
    """
    if ALPHABET.issuperset(text):
        return text.translate(_DECODE).encode("latin-1")
    return text.encode("utf-8")
