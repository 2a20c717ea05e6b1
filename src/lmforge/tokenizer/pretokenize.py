"""Pre-tokenizers: cut text into the pieces that BPE merges never cross.

A byte-level BPE tokenizer first splits text with a regex (words with their leading
space, numbers, punctuation runs, whitespace), then merges bytes only inside each piece.
The regex is part of the tokenizer's definition: the same vocabulary with another regex
gives other ids. This module names the regexes real models use and models HF
`tokenizers`' pre-tokenizer steps exactly, so that one `PreTokenizer` can be read from
a tokenizer.json, named for a GGUF file, and handed to tiktoken as a single regex.

A `PreTokenizer` is a sequence of steps, each turning every current piece into smaller
pieces, as in HF's `Sequence`:

- `Split(pattern, behavior)`: regex (or literal) matches and the text between them
  become pieces; `behavior` says what happens to the matches (HF's five behaviours).
- `Digits(individual)`: every digit (or every run of digits) becomes its own piece.
- `ByteLevel(add_prefix_space, use_regex)`: optionally prepend a space to each piece,
  optionally split with the GPT-2 regex, then spell every piece in the byte alphabet
  (`bytelevel`). Exactly one ByteLevel step is required; steps after it see byte
  characters, as in HF.

Regexes run on the `regex` module, whose `\\s`, `\\p{L}`, `\\p{N}` and `(?i:...)` agree with
Oniguruma (HF) and Rust's fancy-regex (tiktoken) on the patterns used here; the tests
check that on random text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import regex

from lmforge.tokenizer.bytelevel import bytes_to_chars
from lmforge.tokenizer.errors import TokenizerError

# --------------------------------------------------------------------------- named patterns

#: GPT-2 (also r50k/p50k, and HF's ByteLevel `use_regex`): contractions, optionally
#: space-led letter / number / punctuation runs, whitespace that leaves its last space to
#: lead the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: GPT-4's cl100k_base, also Llama 3's: case-insensitive contractions, a letter run led by
#: at most one non-letter, numbers in groups of up to three digits, punctuation with its
#: trailing newlines, newline-aware whitespace.
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_PATTERN = CL100K_PATTERN

#: tiktoken's newer Python spelling of cl100k (possessive quantifiers; it differs from the
#: original on whitespace at the very end of a text).
CL100K_POSSESSIVE_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

#: Qwen2 (and Qwen3): like Llama 3 but every digit is its own piece.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Qwen3.5: Qwen2 with combining marks kept inside words.
QWEN35_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: GPT-4o's o200k_base (also Llama 4): words split at lower->upper case changes, with
#: contractions attached.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

#: Mistral's Tekken: o200k's case-aware words without contractions, single digits.
TEKKEN_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*""",
        r"""\p{N}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

#: SmolLM2 / StarCoder2 split every digit off first, then apply GPT-2's regex to the rest.
#: As one regex: a digit alone; no alternative may run into a digit (so " ?\p{N}+" goes);
#: and a digit ends the text GPT-2's regex sees, so "\s+(?!\S)" may stop before one.
DIGITS_THEN_GPT2_PATTERN = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)

#: The same SmolLM2 digits rule as the first regex of llama.cpp's list.
SINGLE_DIGIT_PATTERN = r"""\p{N}"""

#: Patterns by name, for callers that pick one (the trainer, the CLI).
PATTERNS: dict[str, str] = {
    "gpt2": GPT2_PATTERN,
    "cl100k": CL100K_PATTERN,
    "gpt4": CL100K_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "qwen2": QWEN2_PATTERN,
    "qwen35": QWEN35_PATTERN,
    "o200k": O200K_PATTERN,
    "tekken": TEKKEN_PATTERN,
    "smollm": DIGITS_THEN_GPT2_PATTERN,
}

#: Patterns known to match at every position of every text, so that cutting with them
#: leaves no unmatched gaps. tiktoken drops gaps while HF keeps them, so only such a
#: pattern can be handed to tiktoken as is.
TOTAL_PATTERNS: frozenset[str] = frozenset(
    {
        GPT2_PATTERN,
        CL100K_PATTERN,
        CL100K_POSSESSIVE_PATTERN,
        QWEN2_PATTERN,
        QWEN35_PATTERN,
        O200K_PATTERN,
        TEKKEN_PATTERN,
        DIGITS_THEN_GPT2_PATTERN,
    }
)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> regex.Pattern[str]:
    try:
        return regex.compile(pattern)
    except regex.error as err:
        raise TokenizerError(f"pre-tokenizer regex {pattern!r} does not compile: {err}") from err


# --------------------------------------------------------------------------- steps

Behavior = Literal["removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous"]
_HF_BEHAVIORS: dict[str, Behavior] = {
    "Removed": "removed",
    "Isolated": "isolated",
    "MergedWithPrevious": "merged_with_previous",
    "MergedWithNext": "merged_with_next",
    "Contiguous": "contiguous",
}


def split_text(
    text: str, matches: Iterable[tuple[int, int]], behavior: Behavior, invert: bool = False
) -> list[str]:
    """Cut `text` at `matches` (start, end) the way HF's `SplitDelimiterBehavior` does.

    The text becomes alternating gap/match segments; `invert` swaps which is which; then
    matches are dropped (removed), kept alone (isolated), glued to the segment before or
    after unless that one is a match too (merged_with_*), or runs of adjacent matches are
    glued together (contiguous). Empty pieces are dropped.
    """
    segments: list[tuple[int, int, bool]] = []
    pos = 0
    for start, end in matches:
        if start > pos:
            segments.append((pos, start, False))
        segments.append((start, end, True))
        pos = end
    if pos < len(text):
        segments.append((pos, len(text), False))
    if invert:
        segments = [(s, e, not m) for s, e, m in segments]

    spans: list[list[int]] = []
    if behavior == "removed":
        spans = [[s, e] for s, e, m in segments if not m]
    elif behavior == "isolated":
        spans = [[s, e] for s, e, _ in segments]
    elif behavior == "merged_with_previous":
        after_match = False
        for s, e, m in segments:
            if m and not after_match and spans:
                spans[-1][1] = e
            else:
                spans.append([s, e])
            after_match = m
    elif behavior == "merged_with_next":
        before_match = False
        for s, e, m in reversed(segments):
            if m and not before_match and spans:
                spans[-1][0] = s
            else:
                spans.append([s, e])
            before_match = m
        spans.reverse()
    elif behavior == "contiguous":
        previous = False
        for s, e, m in segments:
            if m == previous and spans:
                spans[-1][1] = e
            else:
                spans.append([s, e])
            previous = m
    else:
        raise TokenizerError(f"unknown split behavior {behavior!r}")
    return [text[s:e] for s, e in spans if e > s]


def _spans(matches: Iterator[regex.Match[str]]) -> Iterator[tuple[int, int]]:
    return (m.span() for m in matches)


@dataclass(frozen=True)
class Split:
    """HF `Split`: cut at the matches of a regex (or of a literal string)."""

    pattern: str
    behavior: Behavior = "isolated"
    invert: bool = False
    literal: bool = False

    def apply(self, piece: str) -> list[str]:
        compiled = compile_pattern(regex.escape(self.pattern) if self.literal else self.pattern)
        return split_text(piece, _spans(compiled.finditer(piece)), self.behavior, self.invert)

    def to_hf(self) -> dict[str, Any]:
        behavior = next(k for k, v in _HF_BEHAVIORS.items() if v == self.behavior)
        return {
            "type": "Split",
            "pattern": {"String" if self.literal else "Regex": self.pattern},
            "behavior": behavior,
            "invert": self.invert,
        }


@dataclass(frozen=True)
class Digits:
    """HF `Digits`: numeric characters (\\p{N}, Rust's `is_numeric`) become their own pieces."""

    individual: bool = True

    def apply(self, piece: str) -> list[str]:
        matches = _spans(compile_pattern(r"\p{N}").finditer(piece))
        return split_text(piece, matches, "isolated" if self.individual else "contiguous")

    def to_hf(self) -> dict[str, Any]:
        return {"type": "Digits", "individual_digits": self.individual}


@dataclass(frozen=True)
class ByteLevel:
    """HF `ByteLevel`: optional prefix space, optional GPT-2 split, then the byte alphabet."""

    add_prefix_space: bool = False
    use_regex: bool = True
    trim_offsets: bool = field(default=True, compare=False)  # offsets only; kept for round trips

    def apply(self, piece: str) -> list[str]:
        if not piece:
            return []
        if self.add_prefix_space and not piece.startswith(" "):
            piece = " " + piece
        pieces = [piece]
        if self.use_regex:
            pieces = split_text(piece, _spans(compile_pattern(GPT2_PATTERN).finditer(piece)), "isolated")
        return [bytes_to_chars(p.encode("utf-8")) for p in pieces]

    def to_hf(self) -> dict[str, Any]:
        return {
            "type": "ByteLevel",
            "add_prefix_space": self.add_prefix_space,
            "trim_offsets": self.trim_offsets,
            "use_regex": self.use_regex,
        }


Step = Split | Digits | ByteLevel


# --------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class PreTokenizer:
    """A sequence of steps ending in byte-alphabet pieces, ready for BPE."""

    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        n_byte_level = sum(isinstance(step, ByteLevel) for step in self.steps)
        if n_byte_level != 1:
            raise TokenizerError(
                f"a byte-level BPE pre-tokenizer needs exactly one ByteLevel step, got {n_byte_level} "
                f"in {self.describe()}"
            )

    def split(self, text: str) -> list[str]:
        """The pieces of `text`, each spelled in the byte alphabet."""
        pieces = [text]
        for step in self.steps:
            pieces = [out for piece in pieces for out in step.apply(piece)]
        return pieces

    def describe(self) -> str:
        return " -> ".join(type(step).__name__ for step in self.steps) or "(no steps)"

    @property
    def name(self) -> str | None:
        """The name of the known pipeline this cuts like (a GGUF `tokenizer.ggml.pre` value)."""
        canonical = self.canonical()
        return next((name for name, known in PIPELINES.items() if known == canonical), None)

    def canonical(self) -> PreTokenizer:
        """The same pipeline as `PIPELINES` spells it: a GPT-2 Split before a plain ByteLevel
        is written as ByteLevel's own regex (which is that Split)."""
        match self.steps:
            case (
                Split(pattern=p, behavior="isolated", invert=False, literal=False),
                ByteLevel(add_prefix_space=False, use_regex=False),
            ) if p == GPT2_PATTERN:
                return PreTokenizer((ByteLevel(),))
        return self

    @property
    def fused_pattern(self) -> str | None:
        """One regex whose matches are exactly this pipeline's pieces, if we know one.

        tiktoken takes a single regex; a pipeline of several steps has one only when
        someone worked it out (and a test checks it on random text).
        """
        match self.steps:
            case (ByteLevel(add_prefix_space=False, use_regex=True),):
                return GPT2_PATTERN
            case (
                Split(pattern=p, behavior="isolated", invert=False, literal=False),
                ByteLevel(add_prefix_space=False, use_regex=False),
            ) if p in TOTAL_PATTERNS:
                return p
            case (Digits(individual=True), ByteLevel(add_prefix_space=False, use_regex=True)):
                return DIGITS_THEN_GPT2_PATTERN
        return None

    # ---------------------------------------------------------------- tokenizer.json

    @classmethod
    def from_hf(cls, obj: dict[str, Any] | None) -> PreTokenizer:
        """Parse tokenizer.json's "pre_tokenizer"; unsupported steps raise TokenizerError."""
        if obj is None:
            raise TokenizerError(
                "tokenizer.json has no pre_tokenizer; a byte-level BPE needs a ByteLevel step"
            )
        return cls(tuple(_steps_from_hf(obj)))

    def to_hf(self) -> dict[str, Any]:
        if len(self.steps) == 1:
            return self.steps[0].to_hf()
        return {"type": "Sequence", "pretokenizers": [step.to_hf() for step in self.steps]}


def _steps_from_hf(obj: dict[str, Any]) -> Iterator[Step]:
    kind = obj.get("type")
    if kind == "Sequence":
        for sub in obj.get("pretokenizers", []):
            yield from _steps_from_hf(sub)
    elif kind == "ByteLevel":
        yield ByteLevel(
            add_prefix_space=bool(obj.get("add_prefix_space", True)),
            use_regex=bool(obj.get("use_regex", True)),
            trim_offsets=bool(obj.get("trim_offsets", True)),
        )
    elif kind == "Digits":
        yield Digits(individual=bool(obj.get("individual_digits", False)))
    elif kind == "Split":
        pattern = obj.get("pattern") or {}
        behavior = obj.get("behavior", "Isolated")
        if behavior not in _HF_BEHAVIORS:
            raise TokenizerError(
                f"tokenizer.json Split behavior {behavior!r} is not one of {sorted(_HF_BEHAVIORS)}"
            )
        if "Regex" in pattern:
            yield Split(pattern["Regex"], _HF_BEHAVIORS[behavior], bool(obj.get("invert", False)))
        elif "String" in pattern:
            yield Split(
                pattern["String"], _HF_BEHAVIORS[behavior], bool(obj.get("invert", False)), literal=True
            )
        else:
            raise TokenizerError(f"tokenizer.json Split has no Regex or String pattern: {obj!r}")
    else:
        raise TokenizerError(
            f"tokenizer.json pre-tokenizer {kind!r} is not supported by lmforge's byte-level BPE "
            "(supported: ByteLevel, Split, Digits and Sequence of them)"
        )


# --------------------------------------------------------------------------- known pipelines


def _gpt2() -> PreTokenizer:
    return PreTokenizer((ByteLevel(),))


def _regexes(*patterns: str) -> PreTokenizer:
    """llama.cpp's form: each regex isolates its matches inside the previous pieces."""
    return PreTokenizer((*(Split(p) for p in patterns), ByteLevel(use_regex=False)))


def _chars(pattern: str) -> str:
    """Turn \\uXXXX / \\UXXXXXXXX escapes into the characters themselves.

    Non-ASCII pattern characters are written as escapes in this file, so that no editor
    can silently normalize them (U+1FD3 and U+0390 are canonically equal), and turned into
    real characters so that a saved tokenizer.json holds the same regex the model has.
    """
    return regex.sub(
        r"\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})", lambda m: chr(int(m.group(1) or m.group(2), 16)), pattern
    )


_CJK = _chars(r"""[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+""")
_DEEPSEEK_LLM_LETTERS = _chars(
    r"""\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"""
    r"""\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"""
    r"""\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"""
    r"""\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"""
    r"""\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"""
    r"""\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"""
    r"""\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134"""
    r"""\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"""
    r"""\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"""
    r"""\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"""
    r"""\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"""
    r"""\U0001e900-\U0001e943]+"""
)
_DEEPSEEK_LLM_PUNCT = _chars(r"""\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+""")
_KANA_HAN = _chars(r"""[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+""")
_DEEPSEEK_V3_MAIN = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_GPT2_NO_TAIL = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_BLOOM = _chars(r""" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+""")

#: Pre-tokenizers of real models, by their llama.cpp name (`tokenizer.ggml.pre`).
#: Single-regex ones use the regex of the model's own tokenizer.json; multi-regex ones
#: follow llama.cpp's list (each regex isolates its matches inside the previous pieces).
PIPELINES: dict[str, PreTokenizer] = {
    "gpt-2": _gpt2(),
    "smollm": PreTokenizer((Digits(individual=True), ByteLevel())),  # also StarCoder2, Refact, Command-R
    "llama-bpe": _regexes(LLAMA3_PATTERN),
    "qwen2": _regexes(QWEN2_PATTERN),
    "qwen35": _regexes(QWEN35_PATTERN),
    "gpt-4o": _regexes(O200K_PATTERN),
    "tekken": _regexes(TEKKEN_PATTERN),
    "seed-coder": _regexes(
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
    "ufakzeka": _regexes(
        r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
    "minicpm5": _regexes(
        r"""\p{N}{1,3}""",
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
    ),
    "deepseek-llm": _regexes(
        r"""[\r\n]""", _DEEPSEEK_LLM_LETTERS, _DEEPSEEK_LLM_PUNCT, r"""\s+$""", _CJK, r"""\p{N}+"""
    ),
    "deepseek-coder": _regexes(r"""[\r\n]""", r"""\s?\p{L}+""", r"""\s?\p{P}+""", _CJK, r"""\p{N}"""),
    "deepseek-v3": _regexes(r"""\p{N}{1,3}""", _KANA_HAN, _DEEPSEEK_V3_MAIN),
    "falcon": _regexes(r"""[\p{P}\$\+<=>\^~\|`]+""", _GPT2_NO_TAIL, r"""[0-9][0-9][0-9]"""),
    "bloom": _regexes(_BLOOM),
    "viking": _regexes(_BLOOM, r"""\p{N}"""),
    "default": _regexes(r"""[\p{P}\$\+<=>\^~\|]+""", _GPT2_NO_TAIL, r"""\p{N}+""", r"""[0-9][0-9][0-9]"""),
}
