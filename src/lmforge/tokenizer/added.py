"""Added tokens (special tokens like <|im_start|>): found in the text before BPE runs.

An added token is matched as a whole wherever its text occurs, so "<|im_end|>" becomes
one id instead of eight BPE pieces; the text between matches goes through the normal
pipeline, each stretch on its own. This follows HF `tokenizers`' `AddedVocabulary`:

- the longest token wins among those starting at the same place, and the leftmost
  match wins overall;
- tokens with `normalized=False` (all special tokens in practice) are matched in the
  raw text first; `normalized=True` ones are matched afterwards in the normalized text;
- `single_word`: the match counts only if no word character touches it on either side;
- `lstrip` / `rstrip`: whitespace on that side is swallowed into the token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import regex

#: HF's word characters for `single_word` (the Unicode `\w` class).
_WORD_CHAR = regex.compile(r"[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]")
_SPACE = regex.compile(r"\p{White_Space}")


@dataclass(frozen=True)
class AddedToken:
    """One added token, with HF's matching flags."""

    id: int
    content: str
    special: bool = True
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False

    @classmethod
    def from_hf(cls, obj: dict[str, Any]) -> AddedToken:
        return cls(
            id=int(obj["id"]),
            content=obj["content"],
            special=bool(obj.get("special", False)),
            single_word=bool(obj.get("single_word", False)),
            lstrip=bool(obj.get("lstrip", False)),
            rstrip=bool(obj.get("rstrip", False)),
            normalized=bool(obj.get("normalized", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "content": self.content,
            "single_word": self.single_word,
            "lstrip": self.lstrip,
            "rstrip": self.rstrip,
            "normalized": self.normalized,
            "special": self.special,
        }


@dataclass(frozen=True)
class Segment:
    """A stretch of text: ordinary (`token_id` None) or one added token, starting at `start`."""

    text: str
    token_id: int | None
    start: int


class AddedTokenSplitter:
    """Cuts text into ordinary stretches and added tokens."""

    def __init__(self, tokens: Sequence[AddedToken]) -> None:
        self.tokens = list(tokens)
        self._matchers: dict[tuple[bool, bool], tuple[regex.Pattern[str] | None, dict[str, AddedToken]]] = {}
        for allow_special in (False, True):
            for normalized in (False, True):
                chosen = {
                    t.content: t
                    for t in self.tokens
                    if t.normalized == normalized and (allow_special or not t.special) and t.content
                }
                # Longest first, so that at one position the longest token is the one matched.
                alternatives = sorted(chosen, key=lambda c: (-len(c), c))
                pattern = regex.compile("|".join(map(regex.escape, alternatives))) if alternatives else None
                self._matchers[allow_special, normalized] = (pattern, chosen)

    def split(
        self, text: str, *, allow_special: bool = True, normalize: Callable[[str], str] | None = None
    ) -> list[Segment]:
        """Ordinary stretches (normalized when `normalize` is given) and added tokens, in order."""
        out: list[Segment] = []
        for segment in self._split_once(text, 0, self._matchers[allow_special, False]):
            if segment.token_id is not None:
                out.append(segment)
                continue
            normalized = normalize(segment.text) if normalize is not None else segment.text
            # Offsets inside a stretch the normalizer changed are those of the normalized text.
            out.extend(self._split_once(normalized, segment.start, self._matchers[allow_special, True]))
        return [s for s in out if s.token_id is not None or s.text]

    def _split_once(
        self, text: str, offset: int, matcher: tuple[regex.Pattern[str] | None, dict[str, AddedToken]]
    ) -> list[Segment]:
        pattern, by_content = matcher
        if pattern is None or not text:
            return [Segment(text, None, offset)]
        out: list[Segment] = []
        done = 0  # end of the last accepted token
        for match in pattern.finditer(text):
            start, stop = match.span()
            if start < done:
                continue  # swallowed by the previous token's rstrip
            token = by_content[match.group()]
            if token.single_word and not _stands_alone(text, start, stop):
                continue
            if token.lstrip:
                while start > done and _SPACE.match(text[start - 1]):
                    start -= 1
            if token.rstrip:
                while stop < len(text) and _SPACE.match(text[stop]):
                    stop += 1
            if start > done:
                out.append(Segment(text[done:start], None, offset + done))
            out.append(Segment(token.content, token.id, offset + start))
            done = stop
        if done < len(text):
            out.append(Segment(text[done:], None, offset + done))
        return out


def _stands_alone(text: str, start: int, stop: int) -> bool:
    before_ok = start == 0 or not _WORD_CHAR.match(text[start - 1])
    after_ok = stop == len(text) or not _WORD_CHAR.match(text[stop])
    return before_ok and after_ok
