"""Final answers out of free-form completions, and whether two answers agree.

A verifiable task rewards the *answer*, not the prose around it, so the first job is to
find the answer a model committed to. Models write it in many ways; `extract_answer`
looks for them in order of how explicit they are, and within each kind the **last**
occurrence wins (a model that corrects itself means its final word):

1. ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced, so ``\\boxed{\\frac{1}{2}}`` is whole;
2. ``<answer>...</answer>``;
3. ``#### 42`` (GSM8K's marker);
4. "The answer is 42.", "Final answer: 42", "**Answer:** 42";
5. failing all of these, the last number in the text.

The answer is then cleaned (`clean_answer`): math delimiters ``$``, LaTeX spacing
(``\\!``, ``\\,``), ``\\left``/``\\right``, ``\\text{...}`` wrappers, degree marks, markdown
bold and trailing punctuation go; what is left is the answer as written.

`answers_match(predicted, gold)` compares two answers as numbers where both parse
(`parse_number`: exact rationals, so 3.50 = 3.5 = 7/2 = ``\\dfrac{7}{2}``, with thousands
separators, currency signs, a percent sign and trailing unit words dropped: GSM8K's gold
for "25%" is 25), else as normalised strings (no whitespace, one spelling of ``\\frac``,
case-folded), which covers MATH-style answers such as ``\\frac{\\sqrt{3}}{2}`` or ``(C)``.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["answers_match", "canonical_answer", "clean_answer", "extract_answer", "has_boxed_answer",
           "normalize_text", "parse_number"]


# ============================================================================ finding the answer
def extract_answer(text: str | None) -> str | None:
    """The final answer stated in `text`, cleaned; None when it states none (not even a number)."""
    if not text:
        return None
    for find in (_last_boxed, _last_tagged, _last_hashes, _last_stated):
        found = find(text)
        if found is not None and (cleaned := clean_answer(found)):
            return cleaned
    return _last_number(text)


def has_boxed_answer(text: str) -> bool:
    """Whether `text` puts an answer in a closed ``\\boxed{...}`` (the format the tasks ask for)."""
    return bool(_last_boxed(text))


_BOX = re.compile(r"\\(?:boxed|fbox)\b\s*")


def _last_boxed(text: str) -> str | None:
    """The contents of the last complete ``\\boxed{...}`` (braces balanced), or ``\\boxed 5``'s 5."""
    for match in reversed(list(_BOX.finditer(text))):
        start = match.end()
        if start < len(text) and text[start] != "{":  # \boxed 5: the next token
            token = re.match(r"[^\s$]+", text[start:])
            if token:
                return token.group(0)
            continue
        end = _closing_brace(text[start:])
        if end is not None:
            return text[start + 1:start + end]
        # unclosed (a completion cut off mid-box): an earlier complete box may still be there
    return None


_TAGGED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_TAG = re.compile(r"<answer>(.*)\Z", re.DOTALL | re.IGNORECASE)


def _last_tagged(text: str) -> str | None:
    """The last ``<answer>...</answer>``; an unclosed final one (cut off, or stopped at the tag) too."""
    closed = _TAGGED.findall(text)
    if closed:
        return closed[-1]
    tail = _OPEN_TAG.search(text)
    return tail.group(1) if tail else None


_HASHES = re.compile(r"####\s*([^\n]+)")


def _last_hashes(text: str) -> str | None:
    found = _HASHES.findall(text)
    return found[-1] if found else None


# "The answer is 42", "Final answer: 42", "**Answer:** 42", "the answer is: 42", "Answer = 42"
_STATED = re.compile(r"\banswer\b\s*(?:\*\*|__)?\s*(?:is\b|:|=)\s*:?\s*(?:\*\*|__)?[ \t]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def _last_stated(text: str) -> str | None:
    """The value after the last "answer is / answer:", up to the end of its sentence."""
    found = list(_STATED.finditer(text))  # the markers only: two on one line are both found
    if not found:
        return None
    value = text[found[-1].end():].split("\n", 1)[0]
    if not value.strip():
        return None
    end = _SENTENCE_END.search(value)  # "3.5." ends at the last dot; "$1,200.00" keeps its cents
    value = value[:end.start()] if end else value
    if parse_number(value) is not None or "$" in value or "\\" in value:
        return value
    leading = _NUMBER.match(value.strip())  # "42 because 6 x 7 = 42": the number it opens with
    if leading:
        return leading.group(0)
    # a short word answer ("(C)", "yes") stands; "Answer: let me think ..." is prose, not an answer
    return value if len(value.split()) <= 3 else None


# a number as written in prose: -1,234.5 or 3/4 or 0.25 (not the "3" of "x3" or of "5-3" 's minus sign)
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?(?![\d])")
_LATEX_FRACTION = re.compile(r"-?\\[dt]?frac\s*(?:\{[^{}]*\}|\d)\s*(?:\{[^{}]*\}|\d)")


def _last_number(text: str) -> str | None:
    """The last number (or ``\\frac{a}{b}``) in the text, cleaned; None if there is none."""
    cleaned = _unspace(text)
    candidates = [(m.end(), m.group(0)) for m in _NUMBER.finditer(cleaned)]
    candidates += [(m.end(), m.group(0)) for m in _LATEX_FRACTION.finditer(cleaned)]
    if not candidates:
        return None
    return clean_answer(max(candidates)[1])


# ============================================================================ cleaning
_SPACING = re.compile(r"\\[!,;: ]|~")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")


def _unspace(text: str) -> str:
    return _SPACING.sub("", text.replace("\\left", "").replace("\\right", ""))


def clean_answer(answer: str) -> str:
    """An answer as written, without what is only presentation (see the module docstring)."""
    s = _unspace(answer)
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("\u2212", "-")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    previous = None
    while s != previous:  # "**42.**", "{{5}}": peel until nothing changes
        previous = s
        s = s.strip().strip("*_").rstrip(".,;:!?").strip()
        if s.startswith("{") and _closing_brace(s) == len(s) - 1:
            s = s[1:-1]
    return s


def _closing_brace(s: str) -> int | None:
    """Index of the brace that closes the one `s` starts with."""
    depth = 0
    for i, char in enumerate(s):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return i
    return None


# ============================================================================ numbers
_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_GROUPED = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC = re.compile(r"(-?)\\frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)")
_ASSIGNMENT = re.compile(r"[A-Za-z]\w*\s*=\s*(.+)")
_UNIT_WORDS = re.compile(r"\s+[A-Za-z][A-Za-z .]*")
_CURRENCY = "$£€¥"


def parse_number(answer: str | None) -> Fraction | None:
    """The exact value of a numeric answer ("-1,234.50", "3/4", "\\dfrac{3}{4}", "25%", "$12 dollars",
    "x = 5"), or None if it is not one number."""
    if answer is None:
        return None
    s = clean_answer(answer)
    assignment = _ASSIGNMENT.fullmatch(s)
    if assignment:
        s = assignment.group(1).strip()
    s = s.lstrip(_CURRENCY).removesuffix("%").strip()
    if s.startswith("-") and s[1:2] in set(_CURRENCY):  # -$5
        s = "-" + s[2:]
    value = _plain_or_fraction(s)
    if value is None and (unit := _UNIT_WORDS.search(s)) and unit.end() == len(s):
        value = _plain_or_fraction(s[:unit.start()].removesuffix("%").strip())  # "12 apples", "5 cm"
    return value


def _plain_or_fraction(s: str) -> Fraction | None:
    if _GROUPED.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN.fullmatch(s):
        return Fraction(s)
    latex = _FRAC.fullmatch(s)
    if latex:
        sign, top, bottom = latex.groups()
        s = f"{sign}{top.strip('{}')}/{bottom.strip('{}')}"
    if s.count("/") == 1:
        top, bottom = (part.strip() for part in s.split("/"))
        if top.startswith("-") and bottom.startswith("-"):
            top, bottom = top[1:], bottom[1:]
        elif bottom.startswith("-"):
            top, bottom = "-" + top.lstrip("-+"), bottom[1:]
        if _PLAIN.fullmatch(top) and _PLAIN.fullmatch(bottom) and Fraction(bottom) != 0:
            return Fraction(top) / Fraction(bottom)
    return None


def canonical_answer(answer: str | None) -> str | None:
    """One spelling per value: "1200" for "$1,200.00", "0.75" for "3/4", "1/3" for "\\frac13"
    (decimals where they terminate); a non-numeric answer cleaned."""
    if answer is None:
        return None
    value = parse_number(answer)
    if value is None:
        return clean_answer(answer)
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    scaled = str(abs(value.numerator) * 10**digits // value.denominator).rjust(digits + 1, "0")
    return f"{'-' * (value < 0)}{scaled[:-digits]}.{scaled[-digits:]}"


# ============================================================================ comparing
def normalize_text(answer: str) -> str:
    """A non-numeric answer for string comparison: cleaned, no whitespace, ``\\sqrt3`` = ``\\sqrt{3}``,
    ``\\frac12`` = ``\\frac{1}{2}``, case-folded."""
    s = clean_answer(answer)
    s = re.sub(r"\\sqrt\s*(\d|[A-Za-z])", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\s+", "", s).casefold()


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether a predicted answer equals the gold one: exactly as numbers where both parse, else as
    normalised strings. No prediction (None) never matches."""
    if predicted is None:
        return False
    ours, theirs = parse_number(predicted), parse_number(gold)
    if ours is not None and theirs is not None:
        return ours == theirs
    return normalize_text(predicted) == normalize_text(gold)
