"""One line of progress on stderr, "what: done/total, N s left", for any long loop.

Redrawn in place at most twice a second, ended with a newline when the work is done.
Quantizing a model to 4-bit types (export) and embedding a corpus (rag) use it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """`phase(what)` starts a phase and returns its `update(done, total)` callback."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.what, self.start, self.drawn = "", 0.0, 0.0

    def phase(self, what: str) -> Callable[[int, int], None]:
        self.what, self.start, self.drawn = what, time.perf_counter(), 0.0
        return self.update

    def update(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.drawn < 0.5:
            return
        self.drawn = now
        left = (now - self.start) / max(done, 1) * (total - done)
        end = "\n" if done >= total else ""
        print(f"\r{self.what}: {done}/{total}, {left:.0f} s left ", end=end, file=self.stream, flush=True)
