"""lmforge's byte-level BPE trainer: text in, tiktoken-compatible merge ranks out.

Byte-level BPE starts from the 256 single bytes and repeatedly glues together the
adjacent pair of tokens that occurs most often in the training text, until the vocabulary
has the requested size. The result is the same kind of table tiktoken ships for GPT-4:
``mergeable_ranks`` maps every token's bytes to its rank (the 256 bytes first, in byte
order, then each merge in the order it was learned), so
``tiktoken.Encoding(name, pat_str=model.pattern, mergeable_ranks=model.mergeable_ranks,
special_tokens=model.special_tokens)`` encodes with it at full speed.

The trainer works in two phases, each written for speed without giving up readability:

1. **Counting.** A regex (the GPT-2 or GPT-4 pattern) cuts the text into pre-tokens
   (words, numbers, punctuation runs, whitespace), and merges never cross a pre-token
   boundary. A corpus of 50 MB has millions of pre-tokens but only tens of thousands of
   distinct ones, so each distinct pre-token is counted once (a ``Counter``). The input
   streams in batches (files in 1 MB blocks, cut only where no pre-token can span the
   cut); large inputs are counted by several processes and their counts summed.
2. **Merging.** Over the distinct words (strings of token ids, see ``_learn_merges``) the
   trainer keeps the count of every adjacent pair and, per pair, the set of words that
   contain it (an inverted index). Merging the best pair touches only the words that
   contain it, and in them only the pairs next to each occurrence. The best pair comes
   from a heap with lazy deletion, so no merge ever rescans all pairs.

Ties are broken deterministically: the pair with the highest count wins, and among equal
counts the pair whose ``(left bytes, right bytes)`` is lexicographically smallest. The rule
depends only on the counts and the bytes, never on the order in which words were seen, so
the result is the same with one worker or many.

Should the merged bytes of the best pair already be a token (``(ab, c)`` after
``(a, bc)`` made ``abc``: the tests have never produced one, but nothing in the algorithm
forbids it), the pair is merged into that existing token. tiktoken identifies tokens by
their bytes and would build ``abc`` from either pair, so such a merge costs no vocabulary
entry, gets no rank and is not listed in ``merges``; ``BPEModel.reused_merges`` counts them.
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import queue
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import TYPE_CHECKING

import regex

from lmforge.tokenizer.pretokenize import CL100K_POSSESSIVE_PATTERN, GPT2_PATTERN, LLAMA3_PATTERN

if TYPE_CHECKING:  # only needed by BPEModel.to_tiktoken / to_tokenizer
    import tiktoken

    from lmforge.tokenizer.tokenizer import Tokenizer

__all__ = ["DEFAULT_PATTERN", "GPT2_PATTERN", "GPT4_PATTERN", "BPEModel", "TrainingError", "train_bpe",
           "train_bpe_from_files"]

#: GPT-4's cl100k in tiktoken's possessive spelling (its quantifiers only save the regex
#: engine from backtracking), which llama.cpp's regex engine cannot run. See pretokenize.py.
GPT4_PATTERN = CL100K_POSSESSIVE_PATTERN

#: The default: the same rules as GPT-4's in the spelling Llama 3 ships, which llama.cpp
#: knows as `llama-bpe`, so a tokenizer trained with it exports to GGUF.
DEFAULT_PATTERN = LLAMA3_PATTERN

#: Texts are counted in batches of about this many characters: large enough that the
#: per-batch costs (a regex call per text, a pickled batch to a worker) stay small, small
#: enough that a stream never holds more than a few batches in memory and that the
#: workers finish at about the same time.
BATCH_CHARS = 2 * 1024 * 1024

#: Files are read in blocks of this many bytes.
READ_BYTES = 1024 * 1024

#: A file stretch this long without a safe cut point (see ``_last_safe_cut``) is passed on
#: as it is rather than held in memory: its pre-tokens may then differ at the border.
_MAX_CARRY_CHARS = 4 * 1024 * 1024

#: Worker processes are used only for inputs of at least this many bytes (a known total,
#: or once a stream has passed it): starting them costs ~0.3 s of spawning and importing
#: while one core counts ~8 MB/s. Measured on 2 cores (GPT-2 pattern, English, best of 3):
#: two workers are 0.65x as fast at 4 MB, even at 8 MB, 1.4x at 12-16 MB, 1.6x at 50 MB.
PARALLEL_MIN_BYTES = 10_000_000


class TrainingError(ValueError):
    """The corpus or the arguments cannot produce a tokenizer (raised before or during training)."""


@dataclass
class BPEModel:
    """A trained byte-level BPE tokenizer, in tiktoken's terms.

    ``mergeable_ranks`` holds every token's bytes and its rank (= token id): the 256 single
    bytes as ranks 0..255 in byte order, then one rank per merge in training order.
    ``merges`` lists the merged pairs in the same order (``merges[i]`` made rank 256 + i).
    ``special_tokens`` get the ids right after the last merge, in the order given.
    The vocabulary can be smaller than requested when ``min_frequency`` stopped training or
    the corpus ran out of pairs; ``stop_reason`` says which.
    """

    mergeable_ranks: dict[bytes, int]
    merges: list[tuple[bytes, bytes]]
    special_tokens: dict[str, int]
    pattern: str
    requested_vocab_size: int = 0
    stop_reason: str = ""
    reused_merges: int = 0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        """Number of token ids: byte tokens, merges and special tokens."""
        return len(self.mergeable_ranks) + len(self.special_tokens)

    @property
    def stopped_early(self) -> bool:
        """True when training ended before reaching the requested vocabulary size."""
        return self.vocab_size < self.requested_vocab_size

    def to_tokenizer(self) -> Tokenizer:
        """The trained ranks as a lmforge `Tokenizer`; with ChatML's two special tokens it
        also gets the ChatML chat template, so the model it tokenizes for can be chatted with."""
        from lmforge.tokenizer.chat import CHATML_TEMPLATE
        from lmforge.tokenizer.tokenizer import Tokenizer

        chatml = "<|im_start|>" in self.special_tokens and "<|im_end|>" in self.special_tokens
        return Tokenizer.from_tiktoken(self.mergeable_ranks, self.pattern, self.special_tokens,
                                       chat_template=CHATML_TEMPLATE if chatml else None)

    def to_tiktoken(self, name: str = "lmforge-bpe") -> tiktoken.Encoding:
        """A tiktoken ``Encoding`` over these ranks (tiktoken does the fast encoding)."""
        import tiktoken

        return tiktoken.Encoding(
            name,
            pat_str=self.pattern,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )


# --------------------------------------------------------------------------- progress


class _Progress:
    """A single self-redrawing line on stderr, updated at most twice a second.

    ``total`` enables a percentage and an ETA; the rate is measured since the start.
    Disabled progress costs one attribute check per update.
    """

    def __init__(self, enabled: bool, label: str, unit: str, total: float | None, scale: float = 1.0):
        self.enabled = enabled
        self.label, self.unit, self.total, self.scale = label, unit, total, scale
        self.start = self.last = time.perf_counter()
        self.done = 0.0

    def update(self, done: float, force: bool = False) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        digits = 1 if self.scale != 1 else 0
        line = f"\r{self.label}: {done / self.scale:,.{digits}f}"
        if self.total:
            line += f"/{self.total / self.scale:,.{digits}f}"
        line += f" {self.unit} {rate / self.scale:,.{digits}f} {self.unit}/s"
        if self.total and rate > 0:
            line += f" {100 * done / self.total:5.1f}% ETA {max(self.total - done, 0) / rate:,.0f}s"
        line += f" [{elapsed:,.1f}s]"
        sys.stderr.write(line.ljust(78))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(self.done, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


# --------------------------------------------------------------------------- counting


def _cut_candidates(text: str, lowest: int, end: int) -> Iterator[int]:
    """Indices in ``[lowest, end)`` where ``text`` may be cut between pre-tokens, best first.

    Two kinds of points are safe for the GPT-2 and GPT-4 patterns: ``x\\n|y`` (just after a
    newline) and ``x| y`` (just before a space), where x and y are not whitespace. No
    alternative of either pattern matches across them, and the piece before the cut ends
    in x, so the alternatives that look at what follows a whitespace run (``\\s+(?!\\S)``,
    ``\\s++$``) see the same thing in the piece as in the whole text. (Whitespace before
    the cut is not safe: GPT-2 splits " \\n" before "x" but keeps it whole at the end of a
    piece.) Later points come first, newlines before spaces, so pieces are long. A custom
    pattern whose pre-tokens can cross these points may differ at the cuts, which are at
    least half a batch apart.
    """
    lowest = max(lowest, 1)
    if end - 1 <= lowest:
        return
    i = text.rfind("\n", lowest, end - 1)
    while i != -1:
        if not text[i + 1].isspace() and not text[i - 1].isspace():
            yield i + 1
        i = text.rfind("\n", lowest, i)
    i = text.rfind(" ", lowest, end - 1)
    while i != -1:
        if not text[i + 1].isspace() and not text[i - 1].isspace():
            yield i
        i = text.rfind(" ", lowest, i)


def _last_safe_cut(text: str, lowest: int, end: int, keep: regex.Pattern[str] | None = None) -> int:
    """The best safe cut point in ``[lowest, end)`` (see ``_cut_candidates``), or -1.

    ``keep`` matches the special tokens that contain whitespace (``"<| user |>"``), which
    must not be cut in two: a point inside one of its matches is skipped.
    """
    reach = len(keep.pattern) if keep is not None else 0  # the pattern is longer than any token
    for cut in _cut_candidates(text, lowest, end):
        if keep is None or not any(
            m.start() < cut < m.end() for m in keep.finditer(text, max(cut - reach, 0), cut + reach)
        ):
            return cut
    return -1


def _safe_cuts(text: str, max_chars: int, keep: regex.Pattern[str] | None = None) -> Iterator[str]:
    """Split a long text into pieces of at most ``max_chars`` at pre-token boundaries.

    Without a safe point in the second half of a window (a huge run of CJK, say) the text
    is cut at the window's end, which can split one pre-token in two.
    """
    start, n = 0, len(text)
    while n - start > max_chars:
        limit = start + max_chars
        cut = _last_safe_cut(text, start + max_chars // 2, limit, keep)
        if cut == -1:
            cut = limit
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:] if start else text


def _utf8_len(text: str) -> int:
    """UTF-8 size of ``text`` (``isascii`` is O(1) in CPython, so ASCII text is free)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _batches(
    texts: Iterable[str], batch_chars: int, keep: regex.Pattern[str] | None = None
) -> Iterator[tuple[list[str], int]]:
    """Group a stream of texts into batches of about ``batch_chars``; yields (texts, utf-8 bytes).

    Each text stays one document (pre-tokens never span two texts); a text longer than a
    batch is cut at pre-token boundaries by ``_safe_cuts``.
    """
    batch: list[str] = []
    chars = nbytes = 0
    for text in texts:
        if not isinstance(text, str):
            raise TrainingError(f"texts must yield str, got {type(text).__name__}")
        for piece in _safe_cuts(text, batch_chars, keep) if len(text) > batch_chars else (text,):
            batch.append(piece)
            chars += len(piece)
            nbytes += _utf8_len(piece)
            if chars >= batch_chars:
                yield batch, nbytes
                batch, chars, nbytes = [], 0, 0
    if batch:
        yield batch, nbytes


def _special_splitter(special_tokens: Sequence[str]) -> regex.Pattern[str] | None:
    """A regex matching any special token, longest first, or None without special tokens."""
    if not special_tokens:
        return None
    ordered = sorted(special_tokens, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(s) for s in ordered))


def _spaced_specials(special_tokens: Sequence[str]) -> regex.Pattern[str] | None:
    """A regex for the special tokens that a safe cut point could fall into (they hold whitespace)."""
    return _special_splitter([s for s in special_tokens if any(c.isspace() for c in s)])


def _count_into(
    counter: Counter[str],
    texts: Iterable[str],
    pattern: regex.Pattern[str],
    specials: regex.Pattern[str] | None,
) -> None:
    """Add the pre-tokens of ``texts`` to ``counter``.

    Special-token strings in the text are cut out first, so that a corpus full of
    ``<|endoftext|>`` separators does not spend merges on their pieces. The whole batch
    goes through one ``Counter.update`` on a chained iterator, which counts in C.
    """
    if specials is not None:
        texts = chain.from_iterable(map(specials.split, texts))
    counter.update(chain.from_iterable(map(pattern.findall, texts)))


def _count_worker(
    tasks: Queue, results: Queue, done: Synchronized, pattern: str, special_tokens: tuple[str, ...]
) -> None:
    """A counting process: count every batch it takes into one Counter, send it at the end.

    Keeping one Counter per worker (rather than one per batch) means the main process
    sums ``workers`` Counters instead of one per batch, and pickles far less. ``done``
    adds up the bytes counted, for the progress line.
    """
    compiled, specials = regex.compile(pattern), _special_splitter(special_tokens)
    counter: Counter[str] = Counter()
    while (task := tasks.get()) is not None:
        batch, batch_bytes = task
        _count_into(counter, batch, compiled, specials)
        with done.get_lock():
            done.value += batch_bytes
    results.put(counter)


class _CountingPool:
    """Spawned worker processes fed through a bounded queue; each returns one Counter.

    The queue holds at most two batches per worker, so a stream of any length stays in
    bounded memory, and idle workers take the next batch, so the load balances itself.
    Every wait has a timeout, and then checks that the workers are alive (a worker that
    dies of an exception, the OOM killer or a script without a ``__main__`` guard becomes
    a ``TrainingError`` rather than a hang) and calls ``tick`` (to redraw progress).
    """

    def __init__(
        self, workers: int, pattern: str, special_tokens: Sequence[str], tick: Callable[[], None]
    ) -> None:
        context = multiprocessing.get_context("spawn")  # safe next to threads (torch, HF)
        self.tasks: Queue = context.Queue(maxsize=2 * workers)
        self.results: Queue = context.Queue()
        self.done: Synchronized = context.Value("q", 0)
        self.tick = tick
        args = (self.tasks, self.results, self.done, pattern, tuple(special_tokens))
        self.processes = [
            context.Process(target=_count_worker, args=args, daemon=True) for _ in range(workers)
        ]
        for process in self.processes:
            process.start()

    @property
    def done_bytes(self) -> int:
        """UTF-8 bytes the workers have counted so far."""
        return self.done.value

    def submit(self, batch: list[str] | None, batch_bytes: int = 0) -> None:
        """Queue a batch (None: the stop signal), waiting while the queue is full."""
        task = None if batch is None else (batch, batch_bytes)
        while True:
            try:
                self.tasks.put(task, timeout=0.25)
                return
            except queue.Full:
                self._check_alive()

    def finish(self) -> list[Counter[str]]:
        """Tell every worker to stop and collect their Counters."""
        for _ in self.processes:
            self.submit(None)
        counters: list[Counter[str]] = []
        while len(counters) < len(self.processes):
            try:
                counters.append(self.results.get(timeout=0.25))
            except queue.Empty:
                self._check_alive()
        for process in self.processes:
            process.join()
        return counters

    def close(self) -> None:
        """Stop any worker still running (after an error; a no-op after ``finish``)."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join()

    def _check_alive(self) -> None:
        for process in self.processes:
            if process.exitcode is not None and process.exitcode != 0:
                raise TrainingError(
                    f"a counting worker process died (exit code {process.exitcode}); if this runs from a "
                    'script, put the training call under `if __name__ == "__main__":` (workers are '
                    "spawned) or pass workers=1"
                )
        self.tick()


def _resolve_workers(workers: int | None) -> int:
    if workers is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    if workers < 1:
        raise TrainingError(f"workers must be >= 1, got {workers}")
    return workers


def _count_pretokens(
    texts: Iterable[str],
    pattern: str,
    special_tokens: Sequence[str],
    workers: int,
    progress: bool,
    total_bytes: int | None = None,
) -> tuple[Counter[str], int]:
    """Count every distinct pre-token of the stream; returns (counts, UTF-8 bytes read).

    Small inputs are counted here. From ``PARALLEL_MIN_BYTES`` on (known up front for
    files, or once a stream has passed it) and with ``workers > 1``, worker processes
    count the batches while this process reads ahead (see ``_CountingPool``). The workers
    are spawned, not forked, which is safe next to threaded libraries (torch, HF
    tokenizers) but means a calling script needs an ``if __name__ == "__main__":`` guard.
    """
    compiled = regex.compile(pattern)
    specials = _special_splitter(special_tokens)
    total: Counter[str] = Counter()
    meter = _Progress(progress, "counting", "MB", total_bytes, scale=1e6)
    nbytes = 0  # read so far
    counted_here = 0  # counted by this process, before any workers started
    pool: _CountingPool | None = None

    def tick() -> None:
        meter.update(counted_here + (pool.done_bytes if pool is not None else 0))

    try:
        for batch, batch_bytes in _batches(texts, BATCH_CHARS, _spaced_specials(special_tokens)):
            big = (total_bytes if total_bytes is not None else nbytes + batch_bytes) >= PARALLEL_MIN_BYTES
            if pool is None and workers > 1 and big:
                pool = _CountingPool(workers, pattern, special_tokens, tick)
            if pool is None:
                _count_into(total, batch, compiled, specials)
                counted_here += batch_bytes
            else:
                pool.submit(batch, batch_bytes)  # waits while the workers are two batches each behind
            nbytes += batch_bytes
            tick()
        if pool is not None:
            for counter in pool.finish():
                total.update(counter)
    finally:
        if pool is not None:
            pool.close()
    meter.update(nbytes)
    meter.close()
    return total, nbytes


# --------------------------------------------------------------------------- merging


def _learn_merges(
    words: list[str],
    counts: list[int],
    num_tokens: int,
    min_frequency: int,
    progress: bool,
) -> tuple[list[bytes], list[tuple[bytes, bytes]], str, int]:
    """Merge pairs until there are ``num_tokens`` tokens; returns (vocab, merges, stop reason, reused).

    **Representation.** A word is a ``str`` whose characters are token ids (``chr(id)``;
    Python strings hold any code point up to 0x10FFFF, so any vocabulary fits), and a pair
    is the two-character string of its ids. This makes the BPE rewrite of a word a single
    ``word.replace(pair, chr(new))`` (left to right, non-overlapping: exactly BPE's rule),
    done in C, and gives small hashable keys. ``words`` start as the byte values of the
    distinct pre-tokens (= the ids of the 256 byte tokens) and are rewritten in place;
    ``counts`` says how often each occurred in the corpus.

    **Invariants** of the loop:

    * ``pair_counts[p]`` is the exact number of occurrences of pair ``p`` in the corpus;
    * ``where[p]`` contains every word holding ``p`` (and possibly words that used to hold
      it: those are skipped when visited, which is cheaper than removing them);
    * every pair with a positive count has a heap entry whose count is at least the true
      one. A count only rises when a merge creates the pair, and then a fresh entry is
      pushed; when it falls, the old entry overestimates. So a popped entry whose count
      equals the true count is the true maximum; one that overestimates is pushed back
      with the true count, and one that underestimates is a leftover and dropped.
    """
    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    token_of: dict[bytes, int] = {b: i for i, b in enumerate(vocab)}
    merges: list[tuple[bytes, bytes]] = []
    reused = 0

    pair_counts: defaultdict[str, int] = defaultdict(int)
    where: defaultdict[str, set[int]] = defaultdict(set)
    for index, word in enumerate(words):
        count = counts[index]
        for i in range(len(word) - 1):
            pair = word[i : i + 2]
            pair_counts[pair] += count
            where[pair].add(index)
    # Heap entries sort by (-count, left bytes, right bytes): the tie rule of the module doc.
    heap = [(-count, vocab[ord(p[0])], vocab[ord(p[1])], p) for p, count in pair_counts.items()]
    heapq.heapify(heap)

    goal = num_tokens - 256
    meter = _Progress(progress, "merging", "merges", goal if goal > 0 else None)
    stop_reason = f"reached vocab_size ({num_tokens} tokens before special tokens)"
    while len(vocab) < num_tokens:
        # Find the true best pair (see the heap invariant above).
        while heap:
            neg_count, left, right, pair = heap[0]
            true_count = pair_counts.get(pair, 0)
            if true_count == -neg_count:
                break
            if 0 < true_count < -neg_count:
                heapq.heapreplace(heap, (-true_count, left, right, pair))
            else:
                heapq.heappop(heap)
        if not heap:
            stop_reason = "no pairs left to merge (every pre-token is a single token)"
            break
        neg_count, left, right, best = heap[0]
        if -neg_count < min_frequency:
            stop_reason = f"best pair count {-neg_count} < min_frequency {min_frequency}"
            break
        heapq.heappop(heap)

        merged = left + right
        new = token_of.get(merged)
        if new is None:
            new = len(vocab)
            vocab.append(merged)
            token_of[merged] = new
            merges.append((left, right))
        else:
            reused += 1
        new_char = chr(new)

        # Rewrite every word holding the pair and collect the pair-count changes. Only the
        # pairs touching an occurrence change: at an occurrence at i (new position j in the
        # rewritten word) the left pair word[i-1:i+1] becomes new_word[j-1:j+1] and the
        # right pair word[i+1:i+3] becomes new_word[j:j+2]. When the next occurrence starts
        # right at i+2, the pair between the two is handled once, as that one's left pair.
        delta: defaultdict[str, int] = defaultdict(int)
        for index in where.pop(best):
            word = words[index]
            i = word.find(best)
            if i == -1:
                continue  # a stale index: this word lost the pair to an earlier merge
            new_word = word.replace(best, new_char)
            count = counts[index]
            n = len(word)
            seen = 0  # occurrences before i, so the rewritten position is j = i - seen
            while i != -1:
                j = i - seen
                if i > 0:
                    delta[word[i - 1 : i + 1]] -= count
                    pair = new_word[j - 1 : j + 1]
                    delta[pair] += count
                    where[pair].add(index)
                following = word.find(best, i + 2)
                if i + 2 < n and following != i + 2:
                    delta[word[i + 1 : i + 3]] -= count
                    pair = new_word[j : j + 2]
                    delta[pair] += count
                    where[pair].add(index)
                seen += 1
                i = following
            delta[best] -= count * seen
            words[index] = new_word

        for pair, change in delta.items():
            if change == 0:
                continue
            count = pair_counts[pair] + change
            if count > 0:
                pair_counts[pair] = count
                if change > 0:
                    heapq.heappush(heap, (-count, vocab[ord(pair[0])], vocab[ord(pair[1])], pair))
            else:
                del pair_counts[pair]
                where.pop(pair, None)
        meter.update(len(vocab) - 256)
    meter.close()
    return vocab, merges, stop_reason, reused


# --------------------------------------------------------------------------- public API


def _validate(vocab_size: int, pattern: str, special_tokens: Sequence[str], min_frequency: int) -> None:
    if isinstance(special_tokens, str):
        raise TrainingError("special_tokens must be a sequence of strings, not one string")
    seen: set[str] = set()
    for token in special_tokens:
        if not isinstance(token, str) or not token:
            raise TrainingError(f"special tokens must be non-empty strings, got {token!r}")
        if token in seen:
            raise TrainingError(f"duplicate special token {token!r}")
        seen.add(token)
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
        raise TrainingError(
            f"vocab_size must be at least 256 byte tokens + {len(special_tokens)} special tokens "
            f"= {256 + len(special_tokens)}, got {vocab_size}"
        )
    if not isinstance(min_frequency, int) or min_frequency < 0:
        raise TrainingError(f"min_frequency must be an int >= 0, got {min_frequency!r}")
    try:
        regex.compile(pattern)
    except regex.error as err:
        raise TrainingError(f"invalid pre-tokenizer pattern: {err}") from err


def _train(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str,
    special_tokens: Sequence[str],
    min_frequency: int,
    progress: bool,
    workers: int | None,
    total_bytes: int | None,
) -> BPEModel:
    _validate(vocab_size, pattern, special_tokens, min_frequency)
    n_workers = _resolve_workers(workers)
    started = time.perf_counter()
    word_counts, nbytes = _count_pretokens(texts, pattern, special_tokens, n_workers, progress, total_bytes)
    counted = time.perf_counter()
    if not word_counts:
        raise TrainingError("empty corpus: the texts contain no pre-tokens to train on")

    words: list[str] = []  # each word as a str of token ids, see _learn_merges
    counts: list[int] = []
    for text, count in word_counts.items():
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise TrainingError(f"text contains a lone surrogate ({text!r}); it has no UTF-8 bytes") from err
        if len(data) > 1:  # single-byte words hold no pair
            words.append(data.decode("latin-1"))  # byte b becomes chr(b): the id of its token
            counts.append(count)
    num_pretokens = sum(word_counts.values())
    num_words = len(word_counts)
    del word_counts

    num_tokens = vocab_size - len(special_tokens)
    vocab, merges, stop_reason, reused = _learn_merges(words, counts, num_tokens, min_frequency, progress)
    finished = time.perf_counter()
    ranks = {token: rank for rank, token in enumerate(vocab)}
    specials = {token: len(vocab) + i for i, token in enumerate(special_tokens)}
    return BPEModel(
        mergeable_ranks=ranks,
        merges=merges,
        special_tokens=specials,
        pattern=pattern,
        requested_vocab_size=vocab_size,
        stop_reason=stop_reason,
        reused_merges=reused,
        stats={
            "bytes": nbytes,
            "pretokens": num_pretokens,
            "distinct_pretokens": num_words,
            "count_seconds": counted - started,
            "merge_seconds": finished - counted,
        },
    )


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    pattern: str = DEFAULT_PATTERN,
    special_tokens: Sequence[str] = (),
    min_frequency: int = 2,
    progress: bool = False,
    workers: int | None = None,
) -> BPEModel:
    """Train a byte-level BPE tokenizer on a stream of texts.

    Args:
        texts: any iterable of strings (a list, a generator over files or lines); it is
            read once. Each string is a separate document: pre-tokens never span two.
        vocab_size: the total number of ids wanted: 256 byte tokens + merges + special
            tokens. Training stops earlier when ``min_frequency`` or the corpus runs out.
        pattern: the pre-tokenizer regex (``regex`` module syntax); Llama 3's (GPT-4's rules) by default.
        special_tokens: strings that get the ids after the last merge, in this order.
            Their occurrences in the texts are not trained on.
        min_frequency: stop when the best pair occurs fewer times than this.
        progress: draw a progress line with rate and ETA on stderr.
        workers: processes for the counting phase (default: the usable CPU cores);
            inputs under ``PARALLEL_MIN_BYTES`` (10 MB) are counted in this process. The
            workers are spawned: a script calling this needs a ``__main__`` guard.

    Raises:
        TrainingError: bad arguments, duplicate special tokens, or a corpus without any
            pre-token.
    """
    if isinstance(texts, str):
        raise TrainingError("texts must be an iterable of strings (a list of one text, say), not a str")
    return _train(texts, vocab_size, pattern, special_tokens, min_frequency, progress, workers, None)


def _read_utf8(path: Path) -> Iterator[str]:
    """Yield the text of a UTF-8 file in blocks, decoding across block borders.

    A block may end inside a multi-byte character; its last bytes wait for the next block.
    Any invalid byte or I/O error becomes a TrainingError naming the file and the offset.
    """
    offset = 0  # file offset of the first byte of ``pending``
    pending = b""
    try:
        with open(path, "rb") as handle:
            while True:
                block = handle.read(READ_BYTES)
                data = pending + block
                if not data:
                    return
                try:
                    text = data.decode("utf-8")
                    pending = b""
                except UnicodeDecodeError as err:
                    truncated = err.reason == "unexpected end of data" and err.end == len(data)
                    if not truncated or not block:
                        raise TrainingError(
                            f"{path}: not valid UTF-8 at byte offset {offset + err.start} ({err.reason})"
                        ) from err
                    text = data[: err.start].decode("utf-8")
                    pending = data[err.start :]
                if offset == 0 and text.startswith("\ufeff"):
                    text = text[1:]  # a byte-order mark is not text
                offset += len(data) - len(pending)
                if text:
                    yield text
    except OSError as err:
        raise TrainingError(f"{path}: cannot read at byte offset {offset + len(pending)}: {err}") from err


def _join_file_blocks(path: Path, keep: regex.Pattern[str] | None = None) -> Iterator[str]:
    """Re-cut a file's blocks at pre-token boundaries, so the file reads as one document.

    The tail after the last safe cut point of a block is carried into the next block. With
    special tokens to keep whole, the last stretch of a block (as long as the longest of
    them) is never cut, since a special token may start there and end in the next block.
    """
    margin = len(keep.pattern) if keep is not None else 0  # the pattern outlasts any token
    carry = ""
    for block in _read_utf8(path):
        text = carry + block if carry else block
        cut = _last_safe_cut(text, 1, len(text) - margin, keep)
        if cut == -1:
            carry = text
            if len(carry) > _MAX_CARRY_CHARS:  # no cut point in sight: give up on exactness
                yield carry
                carry = ""
            continue
        yield text[:cut]
        carry = text[cut:]
    if carry:
        yield carry


def train_bpe_from_files(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    vocab_size: int,
    *,
    pattern: str = DEFAULT_PATTERN,
    special_tokens: Sequence[str] = (),
    min_frequency: int = 2,
    progress: bool = False,
    workers: int | None = None,
) -> BPEModel:
    """Train on UTF-8 text files, streamed in 1 MB blocks (each file is one document).

    ``paths`` is one path or several; the other arguments are those of ``train_bpe``. A
    file that cannot be read or is not valid UTF-8 raises ``TrainingError`` naming the
    file and the byte offset. A leading byte-order mark is skipped; line endings are kept
    as they are (``\\r\\n`` stays two bytes).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    path_list = [Path(p) for p in paths]
    total = 0
    for path in path_list:
        try:
            total += path.stat().st_size
        except OSError as err:
            raise TrainingError(f"{path}: cannot read at byte offset 0: {err}") from err
    keep = _spaced_specials(special_tokens) if not isinstance(special_tokens, str) else None
    texts = chain.from_iterable(_join_file_blocks(path, keep) for path in path_list)
    return _train(texts, vocab_size, pattern, special_tokens, min_frequency, progress, workers, total)
