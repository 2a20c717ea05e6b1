"""Unicode normalizers that run before pre-tokenization (Qwen2 uses NFC).

Only the four Unicode normalization forms (alone or in a `Sequence`) are supported: they
have one exact definition, so `unicodedata` gives the same result as HF `tokenizers`
(up to differences in the Unicode version of the two libraries). Anything else a
tokenizer.json may name (Lowercase, Replace, Prepend, BertNormalizer, Precompiled, ...) is
rejected with a `TokenizerError` rather than approximated.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

from lmforge.tokenizer.errors import TokenizerError

FORMS = ("NFC", "NFD", "NFKC", "NFKD")


@dataclass(frozen=True)
class Normalizer:
    """A sequence of Unicode normalization forms, applied in order."""

    forms: tuple[str, ...]

    def __post_init__(self) -> None:
        for form in self.forms:
            if form not in FORMS:
                raise TokenizerError(
                    f"unsupported normalization form {form!r} (supported: {', '.join(FORMS)})"
                )

    def __call__(self, text: str) -> str:
        for form in self.forms:
            text = unicodedata.normalize(form, text)
        return text

    @classmethod
    def from_hf(cls, obj: dict[str, Any] | None) -> Normalizer | None:
        """Parse tokenizer.json's "normalizer" entry; None when there is nothing to do."""
        if obj is None:
            return None
        forms = tuple(_forms(obj))
        return cls(forms) if forms else None

    def to_hf(self) -> dict[str, Any]:
        steps = [{"type": form} for form in self.forms]
        return steps[0] if len(steps) == 1 else {"type": "Sequence", "normalizers": steps}


def _forms(obj: dict[str, Any]) -> list[str]:
    kind = obj.get("type")
    if kind in FORMS:
        return [kind]
    if kind == "Sequence":
        return [form for step in obj.get("normalizers", []) for form in _forms(step)]
    raise TokenizerError(
        f"tokenizer.json normalizer {kind!r} is not supported (lmforge implements {', '.join(FORMS)} "
        "and Sequence of them); refusing to tokenize differently from the original"
    )
