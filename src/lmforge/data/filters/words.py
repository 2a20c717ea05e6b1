"""How the quality heuristics see text: words, lines, sentences, terminal punctuation.

The Gopher, C4 and FineWeb rules are statements about words and lines ("at least 50
words", "fewer than 30% of lines end in an ellipsis"), so the way text is cut into
words decides what the thresholds mean. lmforge cuts on whitespace and strips the
punctuation around each piece: ``"(see page 12)."`` is the words ``see``, ``page``,
``12``. That is close to what NLTK's tokenizer yields once punctuation tokens are
removed, and it is fast. It is made for languages that put spaces between words;
Chinese or Japanese text would need a segmenter, which is why the language stage runs
first in the default recipe.
"""

from __future__ import annotations

import re
import string

# ASCII punctuation plus the typographic quotes, dashes and ellipsis web text is full of.
PUNCTUATION = string.punctuation + "“”‘’«»‹›„‚–—…·•¡¿、。，；：！？（）【】《》"

# Marks that end a sentence (or a quoted one) in the scripts the default recipe keeps.
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’", "»", "…", "。", "！", "？", "؟", "۔", "।", "॥",
                        "‼", "⁇", "⁈", "⁉", "։", "።", "᙮", "︒", "﹒", "．", "｡")

_SENTENCE_END = re.compile(r"[.!?…。！？؟]+[\"'”’»)\]]*(?=\s|$)")


_last_words: tuple[str, list[str]] = ("", [])


def words_of(text: str) -> list[str]:
    """Whitespace-separated pieces with surrounding punctuation stripped; empty pieces removed.

    Consecutive filters usually ask about the same text object, so the last answer is
    remembered (by identity: a rewritten text is a new object). Callers must not modify
    the returned list.
    """
    global _last_words
    if _last_words[0] is text:
        return _last_words[1]
    strip = PUNCTUATION
    words = [w for w in (piece.strip(strip) for piece in text.split()) if w]
    _last_words = (text, words)
    return words


def lines_of(text: str) -> list[str]:
    """Non-blank lines, stripped."""
    return [line for line in (raw.strip() for raw in text.split("\n")) if line]


def count_sentences(line: str) -> int:
    """Sentences in one line: each terminal mark followed by space or the end closes one,
    and trailing words after the last mark make one more.

    Abbreviations ("e.g. this") are counted as ends; C4 asks only for "at least five
    sentences", which this is accurate enough to answer.
    """
    ends = 0
    last = 0
    for match in _SENTENCE_END.finditer(line):
        ends += 1
        last = match.end()
    return ends + (1 if line[last:].strip() else 0)
