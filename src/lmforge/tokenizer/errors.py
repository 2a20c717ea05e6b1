"""The one exception the tokenizer package raises for input it cannot handle exactly."""

from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer lmforge cannot load, save or run exactly as its source defines it.

    Raised instead of guessing: an unsupported normalizer, model type or pre-tokenizer
    would otherwise give a silently different tokenization.
    """
