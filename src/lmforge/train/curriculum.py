"""Curriculum learning: train on the easiest windows first and widen to all of them.

Each training window gets a difficulty score:

- `length`: how long the documents it is made of are (token-weighted mean document
  length); short documents are the simple ones (Platanios et al. 2019 used sentence length);
- `rarity`: the mean negative log unigram frequency of its tokens, counted over the
  training shards; windows of common tokens are easy;
- `perplexity`: the mean next-token loss that a given (small) checkpoint assigns to it.

The windows are sorted easiest first (equal scores in a seeded order). A pacing function
g(t) maps training progress t in [0, 1] to the share of that order in play, from
g(0) = `start` to g(1) = 1; at draw k the sampler takes a window uniformly from the
easiest ceil(g(k / ramp_draws) * n). The draw itself comes from a random stream keyed by
(seed, k), so the window drawn at k is a pure function of the seed, the scores and k:
a checkpoint that stores k resumes with exactly the windows an unbroken run would draw.
Once the ramp is over the ordinary shuffled epochs of `TokenWindows` take over.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from lmforge.atomic import atomic_write
from lmforge.train.data import TokenWindows

if TYPE_CHECKING:
    import torch

Score = Literal["none", "length", "rarity", "perplexity"]
Pacing = Literal["linear", "root", "step", "geometric"]
_STREAM = 0x63757272  # "curr": keeps the curriculum's random streams apart from the epoch permutations


class CurriculumError(ValueError):
    """A curriculum that cannot be built: bad pacing values, a scorer that does not fit the data."""


@dataclass
class CurriculumConfig:
    score: Score = "none"  # none: no curriculum (the ordinary shuffled epochs)
    pacing: Pacing = "root"
    start: float = 0.2  # g(0): the share of the windows, easiest first, in play at the first step
    ramp: float = 1.0  # share of the run's steps after which every window is in play
    stages: int = 4  # `step` pacing: the number of plateaus from `start` to 1
    scorer: str | None = None  # `perplexity`: the checkpoint folder that scores each window
    scorer_batch: int = 16  # windows per forward pass when scoring

    def validate(self) -> None:
        if not 0.0 < self.start <= 1.0:
            raise CurriculumError(f"data.curriculum.start must be in (0, 1], got {self.start}")
        if not 0.0 < self.ramp <= 1.0:
            raise CurriculumError(f"data.curriculum.ramp must be in (0, 1], got {self.ramp}")
        if self.stages < 2:
            raise CurriculumError(f"data.curriculum.stages must be at least 2, got {self.stages}")
        if self.scorer_batch < 1:
            raise CurriculumError(f"data.curriculum.scorer_batch must be positive, got {self.scorer_batch}")
        if self.score == "perplexity" and not self.scorer:
            raise CurriculumError("data.curriculum.score: perplexity needs data.curriculum.scorer, "
                                  "a checkpoint folder that scores each window")


# ---------------------------------------------------------------------------------- pacing
def pacing_fraction(kind: Pacing, t: float, start: float, stages: int = 4) -> float:
    """g(t): the share of windows (easiest first) in play at progress t; g(0) = start, g(1) = 1.

    linear grows at a constant rate; root (Platanios et al.) grows fast early, when the
    pool is small and each new window matters most, and slowly later; step holds
    `stages` plateaus (Hacohen & Weinshall); geometric multiplies the pool by a constant
    factor per unit of progress, staying small for longest.
    """
    t = min(max(float(t), 0.0), 1.0)
    if kind == "linear":
        return start + (1.0 - start) * t
    if kind == "root":
        return math.sqrt(start * start + (1.0 - start * start) * t)
    if kind == "step":
        return start + (1.0 - start) * min(1.0, math.floor(t * stages) / (stages - 1))
    if kind == "geometric":
        return start ** (1.0 - t)
    raise CurriculumError(f"unknown pacing {kind!r}; known: linear, root, step, geometric")


class Curriculum:
    """The easiest-first order of the windows and the pacing that widens it: draw number -> window."""

    BLOCK = 4096  # draws per block of the random stream (one generator per block, not per draw)

    def __init__(self, scores: np.ndarray, config: CurriculumConfig, ramp_draws: int, seed: int) -> None:
        config.validate()
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1 or len(scores) == 0 or not np.isfinite(scores).all():
            raise CurriculumError("curriculum scores must be one finite number per window")
        self.config, self.seed, self.ramp_draws = config, seed, max(1, int(ramp_draws))
        tiebreak = np.random.default_rng([seed, _STREAM]).permutation(len(scores))
        self.order = np.lexsort((tiebreak, scores))  # easiest first; equal scores in a seeded order
        self.scores = scores
        # names the exact order, so a resume with other scores (other data, scorer, seed) is refused
        self.fingerprint = hashlib.sha256(self.order.astype(np.int64).tobytes()).hexdigest()[:16]
        self._block, self._uniforms = -1, np.zeros(0)

    def __len__(self) -> int:
        return len(self.order)

    def describe(self) -> str:
        c = self.config
        pacing = f"step pacing ({c.stages} plateaus)" if c.pacing == "step" else f"{c.pacing} pacing"
        return (f"{c.score} scores, {pacing} from the easiest {c.start:.0%} of {len(self):,} windows to all "
                f"of them after {self.ramp_draws:,} windows drawn")

    def fraction(self, drawn: int) -> float:
        """g(t) at draw `drawn`, t = drawn / ramp_draws."""
        c = self.config
        return pacing_fraction(c.pacing, drawn / self.ramp_draws, c.start, c.stages)

    def allowed(self, drawn: int) -> int:
        """How many of the easiest windows draw `drawn` may come from (at least one)."""
        n = len(self.order)
        return max(1, min(n, math.ceil(self.fraction(drawn) * n - 1e-9)))

    def window(self, drawn: int) -> int:
        """The window index of draw `drawn` (< ramp_draws): uniform over the allowed easiest ones."""
        block, offset = divmod(drawn, self.BLOCK)
        if block != self._block:
            self._uniforms = np.random.default_rng([self.seed, _STREAM, block]).random(self.BLOCK)
            self._block = block
        allowed = self.allowed(drawn)
        return int(self.order[min(int(self._uniforms[offset] * allowed), allowed - 1)])


# ---------------------------------------------------------------------------------- scores
def length_scores(windows: TokenWindows) -> np.ndarray:
    """Per window: the token-weighted mean length of the documents its tokens belong to.

    With F(x) = sum over tokens before x of their document's length, a window [s, s+W)
    sums to F(s+W) - F(s); F is piecewise linear between document starts, so each window
    costs a binary search, not a pass over its tokens.
    """
    width = windows.seq_len + 1
    out = np.zeros(len(windows), dtype=np.float64)
    for i, shard in enumerate(windows.shards):
        picked = np.flatnonzero(windows.shard_ids == i)
        if not len(picked):
            continue
        bounds = np.unique(np.concatenate([[0], np.asarray(shard.doc_starts, dtype=np.int64), [len(shard)]]))
        lengths = np.diff(bounds).astype(np.float64)
        before = np.concatenate([[0.0], np.cumsum(lengths * lengths)])  # F at each document start

        def F(x: np.ndarray, bounds: np.ndarray = bounds, lengths: np.ndarray = lengths,
              before: np.ndarray = before) -> np.ndarray:
            doc = np.clip(np.searchsorted(bounds, x, side="right") - 1, 0, len(lengths) - 1)
            return before[doc] + (x - bounds[doc]) * lengths[doc]

        starts = windows.starts[picked]
        out[picked] = (F(starts + width) - F(starts)) / width
    return out


def unigram_costs(windows: TokenWindows, chunk: int = 1 << 24) -> np.ndarray:
    """-log p(token) for every id up to the largest seen, counted over all the shards (add-one smoothed)."""
    counts = np.zeros(0, dtype=np.int64)
    for shard in windows.shards:
        for begin in range(0, len(shard), chunk):
            part = np.bincount(np.asarray(shard.tokens[begin:begin + chunk], dtype=np.int64))
            if len(part) > len(counts):
                counts = np.pad(counts, (0, len(part) - len(counts)))
            counts[:len(part)] += part
    return -np.log((counts + 1.0) / (counts.sum() + len(counts)))


def _window_tokens(windows: TokenWindows, picked: np.ndarray) -> np.ndarray:
    """[len(picked), seq_len + 1] int64 tokens of the windows `picked` (indices into the window list)."""
    return np.stack([windows._window(int(k)) for k in picked])


def rarity_scores(windows: TokenWindows, chunk: int = 4096) -> np.ndarray:
    """Per window: the mean unigram surprisal of its tokens (rare tokens -> high score)."""
    costs = unigram_costs(windows)
    out = np.zeros(len(windows), dtype=np.float64)
    for begin in range(0, len(windows), chunk):
        picked = np.arange(begin, min(begin + chunk, len(windows)))
        out[picked] = costs[_window_tokens(windows, picked)].mean(axis=1)
    return out


def perplexity_scores(windows: TokenWindows, scorer: str, *, batch: int = 16,
                      device: torch.device | str = "cpu") -> np.ndarray:
    """Per window: the mean next-token loss (log perplexity, nats) under the checkpoint `scorer`."""
    import torch

    from lmforge.model.checkpoint import load_checkpoint

    if not Path(scorer).is_dir():
        raise CurriculumError(f"data.curriculum.scorer: {scorer} is not a checkpoint folder")
    model, config = load_checkpoint(scorer, dtype=torch.float32, device=device)
    if windows.seq_len > config.max_seq_len:
        raise CurriculumError(f"the scorer {scorer} reads at most {config.max_seq_len} tokens, but the "
                              f"windows have seq_len {windows.seq_len}")
    out = np.zeros(len(windows), dtype=np.float64)
    with torch.no_grad():
        for begin in range(0, len(windows), batch):
            picked = np.arange(begin, min(begin + batch, len(windows)))
            tokens = torch.from_numpy(_window_tokens(windows, picked))
            if int(tokens.max()) >= config.vocab_size:
                raise CurriculumError(f"the shards hold token id {int(tokens.max())}, beyond the scorer's "
                                      f"vocabulary of {config.vocab_size}: score with a model of the same "
                                      "tokenizer")
            tokens = tokens.to(device)
            logits = model(tokens[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
            out[picked] = loss.mean(dim=1).double().cpu().numpy()
    return out


def window_scores(windows: TokenWindows, config: CurriculumConfig, *, cache: str | Path | None = None,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """The difficulty of every window; cached in `cache` (safetensors) so a resumed run reuses them.

    The cache is keyed by the score, the scorer and the exact window list, so a cache
    left by other data or another scorer is recomputed, never reused by mistake.
    """
    key = json.dumps({"score": config.score, "scorer": str(Path(config.scorer).resolve()) if config.scorer
                      else None, "windows": _windows_digest(windows)}, sort_keys=True)
    if cache is not None and Path(cache).is_file():
        from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors

        try:  # through the checked reader; a damaged cache is recomputed, never trusted
            tensors, header = load_tensors(cache, ["scores"], framework="numpy")
            if header.metadata.get("key") == key:
                return tensors["scores"]
        except SafetensorsError:
            pass
    if config.score == "length":
        scores = length_scores(windows)
    elif config.score == "rarity":
        scores = rarity_scores(windows)
    elif config.score == "perplexity":
        scores = perplexity_scores(windows, str(config.scorer), batch=config.scorer_batch, device=device)
    else:
        raise CurriculumError(f"unknown curriculum score {config.score!r}; known: length, rarity, perplexity")
    if cache is not None:
        from safetensors.numpy import save

        with atomic_write(cache) as f:
            f.write(save({"scores": scores}, metadata={"key": key, "config": json.dumps(asdict(config))}))
    return scores


def _windows_digest(windows: TokenWindows) -> str:
    digest = hashlib.sha256()
    for array in (windows.shard_ids, windows.starts, np.asarray([len(s) for s in windows.shards])):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    digest.update(str(windows.seq_len).encode())
    for shard in windows.shards:  # the files and a sample of their tokens: re-tokenized data is new data
        digest.update(str(Path(shard.path).resolve()).encode())
        digest.update(np.asarray(shard.tokens[:4096], dtype=np.int64).tobytes())
        digest.update(np.asarray(shard.tokens[-4096:], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def attach_curriculum(windows: TokenWindows, config: CurriculumConfig, *, total_draws: int,
                      cache: str | Path | None = None,
                      device: torch.device | str = "cpu") -> Curriculum | None:
    """Score `windows` and make them draw easiest-first over the first `ramp` of `total_draws`."""
    if config.score == "none":
        return None
    config.validate()
    scores = window_scores(windows, config, cache=cache, device=device)
    curriculum = Curriculum(scores, config, math.ceil(config.ramp * total_draws), windows.seed)
    windows.use_curriculum(curriculum)
    return curriculum
