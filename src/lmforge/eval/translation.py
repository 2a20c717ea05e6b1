"""Translation from English: paragraph pairs of the Debian handbook's human translations, scored
with BLEU and chrF through sacrebleu.

**The pairs.** The handbook (Debian's `debian-handbook`, GPL-2+/CC-BY-SA-3.0; the
`debian-handbook` data sample) is one DocBook source rendered into 26 languages: every
page has the same ``<div class="para">`` paragraphs in the same order, so the i-th
paragraph of ``en-US/apt.html`` and of ``de-DE/apt.html`` are a translation pair. A page
whose paragraph counts differ would be skipped (none does), and so is a pair whose target
equals its source: a paragraph left untranslated (commands, file listings, or text the
translators had not reached). That leaves 2,401 English->German and 2,380 English->Spanish
pairs (DATA.md's survey counted 2,349 and 2,330: within 2%).

**The metrics.** BLEU (Papineni et al. 2002: the geometric mean of 1-4-gram precisions
times a brevity penalty) depends on its tokenisation, so scores are only comparable with
the same settings: sacrebleu fixes them and prints them as a *signature*
(``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``), which the result
carries. chrF (Popović 2015: an F-score over character 1-6-grams, beta 2) needs no
tokenisation and credits a right word stem with a wrong ending, which matters for German.
Both are corpus-level: computed over all pairs at once, not averaged over sentences.

The prompt asks the chat model for the translation only; the reply's text (whitespace
collapsed) is the hypothesis.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.samples import debian_handbook_dir
from lmforge.eval.generation import Generator, chat_context, generate
from lmforge.eval.lm import Progress
from lmforge.eval.tasks import TaskResult, sample_items

__all__ = ["LANGUAGES", "Pair", "Translation", "aligned_pairs", "corpus_scores", "page_paragraphs"]

LANGUAGES = {"de": ("de-DE", "German"), "es": ("es-ES", "Spanish"), "fr": ("fr-FR", "French")}
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Pair:
    id: str  # "apt.html#12": the page and the paragraph's index on it
    source: str
    target: str


def page_paragraphs(path: Path) -> list[str]:
    """The text of each ``<div class="para">`` of an HTML page (UTF-8, as the handbook's pages are:
    without a charset declared, lxml would read it as Latin-1), whitespace collapsed."""
    import lxml.html

    root = lxml.html.parse(str(path), lxml.html.HTMLParser(encoding="utf-8")).getroot()
    if root is None:
        return []
    return [_SPACES.sub(" ", div.text_content()).strip() for div in root.xpath('//div[@class="para"]')]


def aligned_pairs(handbook: Path, lang: str) -> list[Pair]:
    """English -> `lang` paragraph pairs over every page both have (see the module docstring)."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown target language {lang!r}; known: {', '.join(LANGUAGES)}")
    folder = handbook / LANGUAGES[lang][0]
    pairs = []
    for english in sorted((handbook / "en-US").glob("*.html")):
        translated = folder / english.name
        if not translated.exists():
            continue
        sources, targets = page_paragraphs(english), page_paragraphs(translated)
        if len(sources) != len(targets):
            continue
        pairs += [Pair(f"{english.name}#{i}", s, t) for i, (s, t) in enumerate(zip(sources, targets))
                  if s and t and s != t]
    if not pairs:
        raise ValueError(f"{handbook} holds no English/{LANGUAGES[lang][1]} paragraph pairs")
    return pairs


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF with sacrebleu's defaults, and their signatures."""
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise ValueError("the translation tasks score with sacrebleu: pip install 'lmforge[eval]'") from None
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": bleu_score.score, "chrf": chrf_score.score, "bleu_brevity_penalty": bleu_score.bp,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


class Translation:
    """English -> `lang` on the handbook's pairs; `--data DIR` is another handbook-like folder
    (``en-US/*.html`` beside ``<locale>/*.html``)."""

    name = "translation"
    lang = "de"
    default_shots = 0

    def __init__(self, data: Sequence[Path] = (), *, max_gen_toks: int = 384, max_chars: int = 600) -> None:
        if len(data) > 1:
            raise ValueError(f"{self.name} takes one --data folder, got {len(data)}")
        self.folder = Path(data[0]) if data else None
        self.max_gen_toks = max_gen_toks
        self.max_chars = max_chars

    def pairs(self) -> list[Pair]:
        """The pairs whose English paragraph has at most `max_chars` characters (long ones would be cut
        off by `max_gen_toks` and score as bad translations of the part not reached)."""
        pairs = aligned_pairs(self.folder or debian_handbook_dir(quiet=True), self.lang)
        return [p for p in pairs if len(p.source) <= self.max_chars]

    def messages(self, pair: Pair) -> list[dict[str, str]]:
        language = LANGUAGES[self.lang][1]
        return [{"role": "user", "content": f"Translate this English text into {language}. Reply with the "
                                            f"{language} translation only.\n\n{pair.source}"}]

    def run(self, model: Generator, *, shots: int | None = None, limit: int | None = None, seed: int = 0,
            progress: Progress | None = None) -> TaskResult:
        if shots:
            raise ValueError(f"{self.name} is zero-shot, not {shots}-shot")
        chosen = sample_items(self.pairs(), limit, seed)
        contexts = [(pair.id, chat_context(model, self.messages(pair))) for pair in chosen]
        started = time.perf_counter()
        replies = generate(model, contexts, {"max_gen_toks": self.max_gen_toks}, progress=progress)
        seconds = time.perf_counter() - started
        hypotheses = [_SPACES.sub(" ", reply).strip() for (reply,) in replies]
        scores = corpus_scores(hypotheses, [p.target for p in chosen])
        records = [{"id": p.id, "source": p.source, "reference": p.target, "hypothesis": h}
                   for p, h in zip(chosen, hypotheses)]
        metrics = {"bleu": scores["bleu"], "chrf": scores["chrf"], "pairs": len(chosen)}
        info = {"shots": 0, "limit": limit, "seed": seed, "max_gen_toks": self.max_gen_toks,
                "max_chars": self.max_chars, "seconds": seconds, "direction": f"en->{self.lang}",
                "bleu_signature": scores["bleu_signature"], "chrf_signature": scores["chrf_signature"],
                "bleu_brevity_penalty": scores["bleu_brevity_penalty"],
                "data": str(self.folder) if self.folder else "debian-handbook"}
        return TaskResult(self.name, metrics, records, {}, info)


class TranslationDe(Translation):
    name = "translation_de"
    lang = "de"


class TranslationEs(Translation):
    name = "translation_es"
    lang = "es"
