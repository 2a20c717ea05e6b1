"""`Tokenizer`: encode, decode, special tokens and chat templates for byte-level BPE.

One class runs every byte-level BPE tokenizer lmforge meets (GPT-2, SmolLM2, Llama 3,
Qwen2, tiktoken's cl100k, its own trained ones), loaded from any of the formats they
ship in, with the same ids as the original:

    text --added tokens--> stretches --normalize--> --pre-tokenize--> pieces --BPE--> ids

Two encoders compute the BPE step: the readable reference (`bpe.BPE`, HF `tokenizers`
semantics) and tiktoken (`fast.FastEncoder`), which is used whenever `ranks.py` can prove
it gives the same ids. `backend` says which one runs, `fast_path_reason` why tiktoken
could not be used.
"""

from __future__ import annotations

import base64
import bisect
import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write
from lmforge.tokenizer import gguf_meta, hf_json
from lmforge.tokenizer.added import AddedToken, AddedTokenSplitter
from lmforge.tokenizer.bpe import BPE
from lmforge.tokenizer.bytelevel import token_string_bytes
from lmforge.tokenizer.chat import CHATML_TEMPLATE, ChatTemplate
from lmforge.tokenizer.errors import TokenizerError
from lmforge.tokenizer.fast import FastEncoder
from lmforge.tokenizer.pretokenize import ByteLevel, PreTokenizer, Split
from lmforge.tokenizer.ranks import RankTable, merges_from_ranks, rank_table, read_tiktoken_file
from lmforge.tokenizer.spec import TokenizerSpec

logger = logging.getLogger(__name__)


class Tokenizer:
    """A byte-level BPE tokenizer (see the module docstring for the pipeline)."""

    def __init__(self, spec: TokenizerSpec, *, use_fast: bool = True) -> None:
        self.spec = spec
        self.bpe = BPE(
            spec.vocab,
            spec.merges,
            ignore_merges=spec.ignore_merges,
            unk_token=spec.unk_token,
            fuse_unk=spec.fuse_unk,
        )
        self.pretokenizer: PreTokenizer = spec.pretokenizer
        self.normalizer = spec.normalizer
        self.added_tokens: list[AddedToken] = sorted(spec.added_tokens, key=lambda t: t.id)
        self._splitter = AddedTokenSplitter(self.added_tokens)
        self.vocab_size: int = spec.vocab_size
        self.special_tokens: dict[str, int] = {t.content: t.id for t in self.added_tokens if t.special}
        self._special_ids = frozenset(self.special_tokens.values())
        self.bos_token_id: int | None = spec.bos_token_id
        self.eos_token_id: int | None = spec.eos_token_id
        self.pad_token_id: int | None = spec.pad_token_id
        self.add_bos: bool = spec.add_bos
        self.add_eos: bool = spec.add_eos
        self.chat_template: str | None = spec.chat_template
        # id -> bytes, by HF's decoding rule (added tokens' own text wins over the vocabulary's).
        self._bytes: list[bytes | None] = [None] * self.vocab_size
        for text, token_id in spec.vocab.items():
            self._bytes[token_id] = token_string_bytes(text)
        for token in self.added_tokens:
            self._bytes[token.id] = token_string_bytes(token.content)
        self._use_fast = use_fast
        self._fast: FastEncoder | None = None
        self.fast_path_reason: str | None = None if use_fast else "disabled (use_fast=False)"
        self._chat: ChatTemplate | None = None
        self._reference: Tokenizer | None = None

    def __repr__(self) -> str:
        pre = self.spec.gguf_pre or self.pretokenizer.describe()
        # `backend` would run the fast-path check (seconds on a large vocabulary) just to print.
        decided = self._fast is not None or self.fast_path_reason is not None
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pre={pre!r}, special={len(self.special_tokens)}, "
            f"backend={self.backend if decided else 'not chosen yet'!r})"
        )

    # ------------------------------------------------------------------ encoding

    def encode(
        self,
        text: str,
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        allow_special: bool = True,
    ) -> list[int]:
        """Token ids of `text`.

        `add_bos`/`add_eos`: None uses the tokenizer's default (HF's post-processor /
        GGUF's add_bos_token). `allow_special=False` encodes special-token text such as
        "<|im_end|>" as ordinary text (for untrusted input); non-special added tokens
        are always matched, as in HF.
        """
        ids = self._boundary(self.bos_token_id, add_bos, self.add_bos, "BOS")
        for segment in self._splitter.split(text, allow_special=allow_special, normalize=self.normalizer):
            if segment.token_id is not None:
                ids.append(segment.token_id)
            else:
                ids.extend(self._encode_ordinary(segment.text))
        return ids + self._boundary(self.eos_token_id, add_eos, self.add_eos, "EOS")

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        allow_special: bool = True,
        num_threads: int = 8,
    ) -> list[list[int]]:
        """`encode` for many texts; tiktoken encodes their ordinary stretches on several threads."""
        fast = self._fast_encoder()
        segments = [
            self._splitter.split(t, allow_special=allow_special, normalize=self.normalizer) for t in texts
        ]
        ordinary = [s.text for row in segments for s in row if s.token_id is None]
        if fast is None or fast.pattern is None or not all(fast.can_encode(t) for t in ordinary):
            encoded = iter([self._encode_ordinary(t) for t in ordinary])
        else:
            encoded = iter(fast.encode_batch(ordinary, num_threads=num_threads))
        out = []
        for row in segments:
            ids = self._boundary(self.bos_token_id, add_bos, self.add_bos, "BOS")
            for segment in row:
                ids.extend([segment.token_id] if segment.token_id is not None else next(encoded))
            out.append(ids + self._boundary(self.eos_token_id, add_eos, self.add_eos, "EOS"))
        return out

    @staticmethod
    def _boundary(token_id: int | None, asked: bool | None, default: bool, name: str) -> list[int]:
        """[BOS] or [EOS] when asked for (or by default), [] otherwise."""
        if asked is None:
            return [token_id] if default and token_id is not None else []
        if asked and token_id is None:
            raise TokenizerError(f"asked to add {name}, but the tokenizer has no {name} token")
        return [token_id] if asked and token_id is not None else []

    def _encode_ordinary(self, text: str) -> list[int]:
        fast = self._fast_encoder()
        if fast is not None and fast.can_encode(text):
            return fast.encode(text)
        return self.encode_reference(text)

    def encode_reference(self, text: str) -> list[int]:
        """Ordinary text (no added-token matching, no normalizer) by the reference encoder."""
        ids: list[int] = []
        for piece in self.pretokenizer.split(text):
            ids.extend(self.bpe.encode_piece(piece))
        return ids

    def _fast_encoder(self) -> FastEncoder | None:
        if self._use_fast and self._fast is None and self.fast_path_reason is None:
            try:
                self._fast = FastEncoder.build(self.bpe, self.pretokenizer, self.spec.tiktoken_ranks)
            except TokenizerError as err:
                self.fast_path_reason = str(err)
                logger.warning(
                    "tiktoken cannot reproduce this tokenizer exactly (%s); "
                    "encoding with the reference encoder instead",
                    err,
                )
        return self._fast

    @property
    def backend(self) -> str:
        """Which encoder runs: "tiktoken", "tiktoken+python-split" or "reference"."""
        fast = self._fast_encoder()
        return fast.kind if fast is not None else "reference"

    def without_fast_path(self) -> Tokenizer:
        """A copy that always uses the reference encoder (for checks and teaching).

        It shares this tokenizer's BPE model and is made once.
        """
        if not self._use_fast:
            return self
        if self._reference is None:
            self._reference = copy.copy(self)
            self._reference._use_fast, self._reference._fast = False, None
            self._reference.fast_path_reason = "disabled (use_fast=False)"
        return self._reference

    # ------------------------------------------------------------------ decoding

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for."""
        try:
            data = self._bytes[int(token_id)] if int(token_id) >= 0 else None
        except IndexError:
            data = None
        if data is None:
            raise TokenizerError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})")
        return data

    def decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> bytes:
        """The bytes `ids` stand for; a stream decoder buffers incomplete UTF-8 itself."""
        if skip_special:
            ids = [i for i in ids if int(i) not in self._special_ids]
        return b"".join([self.token_bytes(i) for i in ids])

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD, as in HF."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        """The id of a special/added token or vocabulary entry spelled `text`, if any."""
        for token in self.added_tokens:
            if token.content == text:
                return token.id
        return self.spec.vocab.get(text)

    # ------------------------------------------------------------------ chat

    def _template(self) -> ChatTemplate:
        if self._chat is None:
            names = {
                "bos_token": self.bos_token_id,
                "eos_token": self.eos_token_id,
                "pad_token": self.pad_token_id,
            }
            strings = {key: self.spec.token_string(value) for key, value in names.items()}
            strings["unk_token"] = self.spec.unk_token
            self._chat = ChatTemplate(self.chat_template or CHATML_TEMPLATE, strings)
        return self._chat

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation with the model's chat template (ChatML if it has none)."""
        return self._template().render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def encode_chat_prompt(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Prompt ids of a conversation whose messages may come from anyone.

        `encode(apply_chat_template(...), add_bos=False, add_eos=False)` (transformers'
        `apply_chat_template(tokenize=True)`), except that special-token text inside a
        message is encoded as ordinary text: only the template's own markers become special
        tokens, so "<|im_end|><|im_start|>system" typed by a user cannot open a new turn.
        """
        parts = self._template().render_parts(
            messages, self.special_tokens, add_generation_prompt=add_generation_prompt, **kwargs
        )
        ids: list[int] = []
        for text, from_template in parts:
            ids += self.encode(text, add_bos=False, add_eos=False, allow_special=from_template)
        return ids

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False, **kwargs: Any
    ) -> tuple[list[int], list[bool]]:
        """Ids of the rendered conversation, and a mask that is True on the assistant's replies.

        The mask covers each reply and its end-of-turn token (what the model must learn
        to generate), not the prompts, headers or the template's newlines. The ids are
        `encode_chat_prompt`'s: special-token text inside a message is ordinary text, so a
        training example reads exactly as the same conversation would when served.
        """
        text, spans = self._template().assistant_spans(
            messages,
            add_generation_prompt=add_generation_prompt,
            end_tokens=list(self.special_tokens),
            **kwargs,
        )
        parts = self._template().render_parts(
            messages, self.special_tokens, add_generation_prompt=add_generation_prompt, **kwargs
        )
        if "".join(piece for piece, _ in parts) != text:
            raise TokenizerError("the chat template renders this conversation differently on each call")
        ids: list[int] = []
        starts: list[int] = []
        offset = 0
        for piece, from_template in parts:
            piece_ids, piece_starts = self._encode_with_starts(piece, allow_special=from_template)
            ids += piece_ids
            starts += [offset + start for start in piece_starts]
            offset += len(piece)
        span_starts = [s for s, _ in spans]
        mask = []
        for start in starts:
            k = bisect.bisect_right(span_starts, start) - 1
            mask.append(k >= 0 and start < spans[k][1])
        return ids, mask

    def _encode_with_starts(self, text: str, *, allow_special: bool = True) -> tuple[list[int], list[int]]:
        """Ids of `text` (no BOS/EOS) and the character offset where each token starts."""
        ids: list[int] = []
        starts: list[int] = []
        for segment in self._splitter.split(text, allow_special=allow_special, normalize=self.normalizer):
            if segment.token_id is not None:
                ids.append(segment.token_id)
                starts.append(segment.start)
                continue
            piece_ids = self._encode_ordinary(segment.text)
            char_byte_starts = []
            position = 0
            for char in segment.text:
                char_byte_starts.append(position)
                position += len(char.encode("utf-8"))
            position = 0
            for token_id in piece_ids:
                ids.append(token_id)
                starts.append(segment.start + bisect.bisect_right(char_byte_starts, position) - 1)
                position += len(self.token_bytes(token_id))
        return ids, starts

    # ------------------------------------------------------------------ formats

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> Tokenizer:
        """HF tokenizer.json (a file, or a folder holding one), with tokenizer_config.json beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return cls(hf_json.read_tokenizer_json(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer in a GGUF file's metadata (a plain dict, as `GGUFFile(path).metadata`)."""
        return cls(gguf_meta.read_gguf_metadata(metadata))

    @classmethod
    def from_vocab_merges(cls, vocab_path: str | Path, merges_path: str | Path) -> Tokenizer:
        """GPT-2's original vocab.json/encoder.json and merges.txt/vocab.bpe."""
        return cls(hf_json.read_vocab_merges(vocab_path, merges_path))

    @classmethod
    def from_tiktoken(
        cls,
        mergeable_ranks: Mapping[bytes, int],
        pattern: str,
        special_tokens: Mapping[str, int] | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """A tokenizer that encodes like `tiktoken.Encoding(pat_str=pattern, mergeable_ranks=...)`.

        The merges tiktoken implies are recovered from the ranks (`ranks.merges_from_ranks`)
        and `ignore_merges` is set, so the reference encoder and a saved tokenizer.json
        give tiktoken's ids. `pattern` must match every character (GPT-2's, cl100k's and
        the like do): tiktoken drops text its regex skips, HF keeps it.
        """
        vocab, merges = merges_from_ranks(dict(mergeable_ranks))
        specials = dict(special_tokens or {})
        if eos_token is None and "<|endoftext|>" in specials:
            eos_token = "<|endoftext|>"
        pretokenizer = PreTokenizer((Split(pattern), ByteLevel(use_regex=False)))
        spec = TokenizerSpec(
            vocab=vocab | specials,
            merges=merges,
            pretokenizer=pretokenizer,
            added_tokens=[AddedToken(i, text, special=True) for text, i in specials.items()],
            ignore_merges=True,
            bos_token_id=specials.get(bos_token) if bos_token else None,
            eos_token_id=specials.get(eos_token) if eos_token else None,
            chat_template=chat_template,
            gguf_pre=pretokenizer.name,
            tiktoken_ranks=dict(mergeable_ranks),
        )
        return cls(spec)

    @classmethod
    def from_tiktoken_file(
        cls, path: str | Path, pattern: str, special_tokens: Mapping[str, int] | None = None, **kwargs: Any
    ) -> Tokenizer:
        """A `.tiktoken` rank file with its regex and special tokens (which the file does not hold)."""
        return cls.from_tiktoken(read_tiktoken_file(path), pattern, special_tokens, **kwargs)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (HF format) into `folder`, atomically."""
        hf_json.save(self.spec, folder)

    def save_tiktoken(self, path: str | Path) -> None:
        """Write the ranks as a `.tiktoken` file ("<base64 token> <rank>" per line), atomically.

        The file holds neither the regex nor the special tokens (tiktoken keeps those in
        code), and its ranks are the ids, so only a vocabulary whose ids are in merge
        order (GPT-2's, cl100k's, any lmforge-trained one) can be saved this way.
        """
        table = self._rank_table()
        if table.rank_to_id is not None:
            raise TokenizerError("this vocabulary's ids are not in merge order, so a .tiktoken file "
                                 "would renumber it; save tokenizer.json instead")
        lines = (f"{base64.b64encode(token).decode()} {rank}\n"
                 for token, rank in sorted(table.mergeable_ranks.items(), key=lambda item: item[1]))
        with atomic_write(path, "w") as f:
            f.writelines(lines)

    def _rank_table(self) -> RankTable:
        """The vocabulary as tiktoken ranks: the fast path's table when it was built, so the
        check behind it (seconds on a large vocabulary) runs once per tokenizer."""
        fast = self._fast_encoder()
        if fast is not None:
            return fast.table
        if self._use_fast:  # the check ran and failed: its reason is the answer
            raise TokenizerError(f"cannot write the vocabulary as tiktoken ranks: {self.fast_path_reason}")
        return rank_table(self.bpe, self.spec.tiktoken_ranks)

    def gguf_metadata(self) -> dict[str, Any]:
        """The `tokenizer.ggml.*` and `tokenizer.chat_template` keys for a GGUF export."""
        return gguf_meta.gguf_metadata(self.spec, self.bpe)

    def with_chat_template(self, template: str | None) -> Tokenizer:
        """A copy with another chat template (None: ChatML)."""
        other = copy.copy(self)
        other.spec = copy.copy(self.spec)
        other.spec.chat_template = other.chat_template = template
        other._chat = other._reference = None
        return other


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a tokenizer from a folder (tokenizer.json, or vocab.json + merges.txt), a
    tokenizer.json file, a .gguf file (its `tokenizer.ggml.*` metadata), a training run's
    folder (its newest checkpoint's), or a sample's name (`smollm2`), as `--tokenizer` does."""
    from lmforge.hub import MODEL_ALIASES, resolve_model_path

    given = path
    try:
        path = resolve_model_path(path)
    except FileNotFoundError:
        raise TokenizerError(f"{Path(given).expanduser()}: no such file or folder (nor a sample name: "
                             f"{', '.join(sorted(MODEL_ALIASES))})") from None
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_tokenizer_json(path / "tokenizer.json")
        for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (path / vocab).is_file() and (path / merges).is_file():
                return Tokenizer.from_vocab_merges(path / vocab, path / merges)
        raise TokenizerError(f"{path}: no tokenizer.json (nor vocab.json + merges.txt) in this folder")
    if path.suffix == ".gguf":
        return Tokenizer.from_gguf_metadata(_gguf_metadata(path))
    if path.suffix == ".json":
        return Tokenizer.from_tokenizer_json(path)
    raise TokenizerError(
        f"{path}: unknown tokenizer format (expected a folder, a tokenizer.json or a .gguf file)"
    )


def _gguf_metadata(path: Path) -> Mapping[str, Any]:
    """A GGUF file's metadata, read by lmforge's own GGUF reader."""
    from lmforge.formats.gguf import GGUFFile

    try:
        return GGUFFile(path).metadata
    except (ValueError, OSError) as err:
        raise TokenizerError(f"{path}: cannot read GGUF metadata: {err}") from err
