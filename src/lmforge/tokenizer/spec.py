"""`TokenizerSpec`: everything that defines a byte-level BPE tokenizer, in one place.

The file formats (HF tokenizer.json, GGUF metadata, GPT-2's vocab.json + merges.txt,
tiktoken ranks) are read into a spec and written from one; `Tokenizer` runs a spec.
Keeping the spec separate keeps each format's module free of the encoder, and lets a
loaded tokenizer be saved in another format without losing anything it knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.tokenizer.added import AddedToken
from lmforge.tokenizer.normalize import Normalizer
from lmforge.tokenizer.pretokenize import PreTokenizer


@dataclass
class TokenizerSpec:
    """A byte-level BPE tokenizer as data.

    `vocab` maps token strings (spelled in the byte alphabet; added tokens as themselves)
    to ids; `merges` are ordered pairs of vocab strings. `add_bos`/`add_eos` say whether
    plain `encode` adds those tokens by default. `gguf_pre` is the llama.cpp name of the
    pre-tokenizer when known.
    """

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    pretokenizer: PreTokenizer
    added_tokens: list[AddedToken] = field(default_factory=list)
    normalizer: Normalizer | None = None
    ignore_merges: bool = False
    unk_token: str | None = None
    fuse_unk: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    gguf_pre: str | None = None
    #: Set when the tokenizer was made from tiktoken ranks: they are its exact fast path.
    tiktoken_ranks: dict[bytes, int] | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (vocabularies may have unused ids)."""
        largest = max(
            max(self.vocab.values(), default=-1), max((t.id for t in self.added_tokens), default=-1)
        )
        return largest + 1

    def token_string(self, token_id: int | None) -> str | None:
        """The string of an id (added tokens first, as HF looks them up)."""
        if token_id is None:
            return None
        for token in self.added_tokens:
            if token.id == token_id:
                return token.content
        return next((text for text, i in self.vocab.items() if i == token_id), None)
