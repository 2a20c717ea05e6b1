"""The nouns every data stage shares: `Document`, `StageStats`, and the `Stage` contract.

A document flows through a list of stages. A stage looks at one document and either
keeps it (possibly rewriting its text or adding metadata) or drops it, naming why. The
pipeline, not the stage, does the bookkeeping: it times each call and counts the keeps
and the drop reasons in a `StageStats`, so every stage stays a small, testable function
and every run can say exactly where its documents went.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class Document:
    """One unit of text: a web page, a file, a JSONL row.

    `text` holds raw HTML until the extraction stage replaces it with the page's main
    text (`metadata["content_type"]` says which). `id` is stable across runs, so a
    resumed run writes the same ids and duplicates can name the document they repeat.
    """

    id: str
    text: str
    url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    """A filter or transform over one document.

    Returns None to keep the document (after changing it in place if it wants), or a
    short reason such as ``"gopher_short_doc"`` to drop it. A stage may also keep a
    ``counters`` Counter of events that are not drops (lines removed, emails redacted);
    `run_stages` moves them into the stage's `StageStats`.
    """

    name: str

    def __call__(self, doc: Document) -> str | None: ...


@dataclass
class StageStats:
    """What one stage saw, kept, dropped (by reason) and how long it took.

    Stats of the same stage from different shards and workers add up with `merge`, which
    is how the run report is built.
    """

    name: str
    docs_in: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    chars_in: int = 0
    chars_out: int = 0
    seconds: float = 0.0
    counters: Counter[str] = field(default_factory=Counter)  # events that are not drops (e.g. redactions)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: StageStats) -> StageStats:
        self.docs_in += other.docs_in
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.chars_in += other.chars_in
        self.chars_out += other.chars_out
        self.seconds += other.seconds
        self.counters.update(other.counters)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "docs_in": self.docs_in, "kept": self.kept, "dropped": self.dropped_total,
            "dropped_by_reason": dict(self.dropped.most_common()), "chars_in": self.chars_in,
            "chars_out": self.chars_out, "seconds": round(self.seconds, 4),
            "counters": dict(sorted(self.counters.items())),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageStats:
        return cls(name=data["name"], docs_in=data["docs_in"], kept=data["kept"],
                   dropped=Counter(data.get("dropped_by_reason", {})), chars_in=data.get("chars_in", 0),
                   chars_out=data.get("chars_out", 0), seconds=data.get("seconds", 0.0),
                   counters=Counter(data.get("counters", {})))


def run_stages(docs: Iterable[Document], stages: Sequence[Stage],
               stats: dict[str, StageStats]) -> Iterator[Document]:
    """Pass each document through `stages` in order, yielding the survivors.

    A stage that raises on a document drops that document with reason
    ``error_<ExceptionType>`` instead of ending the run: one odd page in a million must
    not cost the other 999,999, and the report still shows that it happened.
    """
    for stage in stages:
        stats.setdefault(stage.name, StageStats(stage.name))
    clock = time.perf_counter
    for doc in docs:
        for stage in stages:
            record = stats[stage.name]
            record.docs_in += 1
            record.chars_in += len(doc.text)
            started = clock()
            try:
                reason = stage(doc)
            except Exception as err:  # noqa: BLE001 - counted and reported, see docstring
                reason = f"error_{type(err).__name__}"
            record.seconds += clock() - started
            if reason is not None:
                record.dropped[reason] += 1
                break
            record.kept += 1
            record.chars_out += len(doc.text)
        else:
            yield doc
    for stage in stages:
        events = getattr(stage, "counters", None)
        if events:
            stats[stage.name].counters.update(events)
            events.clear()
