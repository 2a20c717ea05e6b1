"""BERT's WordPiece tokenizer, for the sentence encoders of `lmforge.rag`: text -> [CLS] ids [SEP].

    text --added tokens--> stretches --normalize--> --pre-tokenize--> words --WordPiece--> ids

The steps are HF `tokenizers`' BertNormalizer, BertPreTokenizer and WordPiece model (which
follow Google's original BERT code):

1. clean: drop NUL, U+FFFD and every control or format character (Unicode Cc, Cf, Co, Cs)
   except tab, newline and carriage return, which are whitespace; write all whitespace as " ";
2. CJK: put spaces around each CJK ideograph, so that it becomes a word of its own (BERT's
   vocabulary holds Chinese by character, not by word);
3. strip accents: NFD, then drop the non-spacing marks (Mn), so "café" becomes "cafe"; on
   whenever lowercasing is, unless the file says otherwise;
4. lowercase, one character at a time (HF's Rust does it per character, so a final capital
   sigma becomes σ, where Python's `str.lower` would give ς);
5. pre-tokenize: split at whitespace (dropped) and around punctuation (each mark a word of its
   own): Unicode's P* categories plus all of ASCII's punctuation, whose $ + < = > ^ ` | ~
   Unicode calls symbols;
6. WordPiece, greedy longest-match-first: the longest vocabulary entry that starts the word,
   then the longest "##" entry that starts the rest, and so on. A word that cannot be covered
   this way, or that is longer than 100 characters, becomes a single [UNK].

Unicode's tables move: lmforge uses Python's (`unicodedata`, the `regex` module), while HF's
Rust crates carry older character categories and decompositions and newer case mappings. Over
all 1,112,064 code points the normalized text differs on a few hundred, every one a character
added to Unicode after version 3.2 or re-categorised since; tests/tokenizer/test_wordpiece.py
checks exactly that. HF's CJK ranges are kept as HF has them (its supplementary range starts at
U+2B920 where BERT's starts at U+2B820), since matching its ids is the point.

Words repeat (a corpus of 2,000 paragraphs has ~20,000 distinct words among ~250,000), so
each word's ids are computed once and cached: the per-text cost is a few regex passes.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import regex

from lmforge.formats.strictjson import JSONInputError, read_json
from lmforge.tokenizer.added import AddedToken, AddedTokenSplitter
from lmforge.tokenizer.errors import TokenizerError

# HF's `is_chinese_char` ranges (tokenizers/src/normalizers/bert.rs), in that order.
_CJK = ("\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f\U0002b740-\U0002b81f"
        "\U0002b920-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f")
_CJK_CHAR = regex.compile(f"([{_CJK}])")
_NOT_CLEAN = regex.compile(r"[[\x00\ufffd\p{Cc}\p{Cf}\p{Co}\p{Cs}]--[\t\n\r]]+", regex.V1)
_OTHER_SPACE = regex.compile(r"[\p{White_Space}--[ ]]", regex.V1)
_NONSPACING_MARKS = regex.compile(r"\p{Mn}+")
_ASCII_PUNCTUATION = "".join(regex.escape(c) for c in string.punctuation)
_WORD = regex.compile(rf"[^\p{{White_Space}}\p{{P}}{_ASCII_PUNCTUATION}]+|[\p{{P}}{_ASCII_PUNCTUATION}]")
_CACHE_LIMIT = 1 << 18  # distinct words remembered before the cache starts over


class WordPiece:
    """A BERT tokenizer: `encode(text, max_length=256)` gives the ids HF's gives, [CLS] and [SEP] included."""

    def __init__(self, vocab: Mapping[str, int], *, unk_token: str = "[UNK]", cls_token: str = "[CLS]",
                 sep_token: str = "[SEP]", pad_token: str = "[PAD]", lowercase: bool = True,
                 strip_accents: bool | None = None, clean_text: bool = True,
                 handle_chinese_chars: bool = True, prefix: str = "##", max_input_chars_per_word: int = 100,
                 added_tokens: Sequence[AddedToken] = ()) -> None:
        self.vocab = dict(vocab)
        self.tokens = {i: t for t, i in self.vocab.items()}
        for added in added_tokens:
            self.tokens.setdefault(added.id, added.content)
        for name, token in (("unk", unk_token), ("cls", cls_token), ("sep", sep_token), ("pad", pad_token)):
            if token not in self.vocab:
                raise TokenizerError(f"WordPiece vocabulary has no {name} token {token!r}")
        self.unk_id, self.cls_id = self.vocab[unk_token], self.vocab[cls_token]
        self.sep_id, self.pad_id = self.vocab[sep_token], self.vocab[pad_token]
        self.lowercase, self.clean_text = lowercase, clean_text
        self.handle_chinese_chars = handle_chinese_chars
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.prefix, self.max_input_chars_per_word = prefix, max_input_chars_per_word
        self.added = AddedTokenSplitter(added_tokens)
        self.special_ids = {t.id for t in added_tokens if t.special}
        self._has_added = bool(added_tokens)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return max(self.tokens) + 1

    # ------------------------------------------------------------------ the pipeline
    def normalize(self, text: str) -> str:
        """Steps 1-4 of the module docstring."""
        if self.clean_text:
            text = _OTHER_SPACE.sub(" ", _NOT_CLEAN.sub("", text))
        if text.isascii():
            return text.lower() if self.lowercase else text
        if self.handle_chinese_chars:
            text = _CJK_CHAR.sub(r" \1 ", text)
        if self.strip_accents:
            text = _NONSPACING_MARKS.sub("", unicodedata.normalize("NFD", text))
        if self.lowercase:
            text = text.replace("\u03a3", "\u03c3").lower()  # Σ -> σ first: no final-sigma rule per char
        return text

    def pre_tokenize(self, normalized: str) -> list[str]:
        """Step 5: the words of normalized text."""
        return _WORD.findall(normalized)

    def word_ids(self, word: str) -> list[int]:
        """Step 6: greedy longest-match-first over one word (cached)."""
        ids = self._cache.get(word)
        if ids is None:
            ids = self._wordpiece(word)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_id]
        ids, start, vocab = [], 0, self.vocab
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                token_id = vocab.get(piece)
                if token_id is not None:
                    ids.append(token_id)
                    start = end
                    break
            else:  # no entry starts the rest of the word: the whole word is unknown
                return [self.unk_id]
        return ids

    def _content_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        if not self._has_added:
            for word in self.pre_tokenize(self.normalize(text)):
                ids += self.word_ids(word)
            return ids
        for segment in self.added.split(text, normalize=self.normalize):
            if segment.token_id is not None:
                ids.append(segment.token_id)
            else:
                for word in self.pre_tokenize(segment.text):
                    ids += self.word_ids(word)
        return ids

    # ------------------------------------------------------------------ public
    def encode(self, text: str, *, max_length: int | None = None,
               add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; `max_length` (special tokens included) truncates from the right, as HF does."""
        if not isinstance(text, str):
            raise TokenizerError(f"WordPiece encodes text (str), got {type(text).__name__}")
        ids = self._content_ids(text)
        room = None if max_length is None else max_length - (2 if add_special_tokens else 0)
        if room is not None:
            if room < 0:
                raise TokenizerError(f"max_length {max_length} leaves no room for [CLS] and [SEP]")
            ids = ids[:room]
        return [self.cls_id, *ids, self.sep_id] if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str], *, max_length: int | None = None) -> list[list[int]]:
        return [self.encode(text, max_length=max_length) for text in texts]

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of `text` (no [CLS]/[SEP]): what the ids stand for."""
        return [self.tokens[i] for i in self._content_ids(text)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Tokens joined with spaces, "##" pieces glued on, each piece cleaned up as HF's decoder does
        (" ." -> "." and the like; per piece, so "wood ' s" stays apart as in HF)."""
        pieces: list[str] = []
        for token_id in ids:
            if skip_special_tokens and token_id in self.special_ids:
                continue
            token = self.tokens.get(int(token_id))
            if token is None:
                raise TokenizerError(f"token id {token_id} is not in this WordPiece vocabulary")
            if pieces and token.startswith(self.prefix):
                token = token[len(self.prefix):]
            elif pieces:
                token = " " + token
            pieces.append(_clean_up(token))
        return "".join(pieces)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> WordPiece:
        """Read an HF tokenizer.json whose model is WordPiece with BERT's normalizer and pre-tokenizer."""
        path = Path(path)
        obj = _json(path)
        model = _section(obj, "model", path)
        if model.get("type") != "WordPiece":
            raise TokenizerError(f"{path}: model type {model.get('type')!r} is not WordPiece")
        vocab = model.get("vocab")
        if not (isinstance(vocab, dict) and vocab and all(isinstance(v, int) for v in vocab.values())):
            raise TokenizerError(f"{path}: the WordPiece vocabulary must map tokens to integer ids")
        normalizer = obj.get("normalizer") or {}
        if normalizer and normalizer.get("type") != "BertNormalizer":
            raise TokenizerError(f"{path}: normalizer {normalizer.get('type')!r} is not supported with "
                                 "WordPiece (lmforge implements BertNormalizer)")
        pre = obj.get("pre_tokenizer") or {}
        if pre.get("type") != "BertPreTokenizer":
            raise TokenizerError(f"{path}: pre-tokenizer {pre.get('type')!r} is not supported with "
                                 "WordPiece (lmforge implements BertPreTokenizer)")
        cls_token, sep_token = _post_processor_ends(obj.get("post_processor"), path)
        added = obj.get("added_tokens") or []
        if not (isinstance(added, list) and all(isinstance(a, dict) and isinstance(a.get("content"), str)
                                                and isinstance(a.get("id"), int) for a in added)):
            raise TokenizerError(f"{path}: added_tokens must be a list of {{content, id}}")
        padding = obj.get("padding") or {}
        return cls(vocab, unk_token=model.get("unk_token", "[UNK]"), cls_token=cls_token, sep_token=sep_token,
                   pad_token=padding.get("pad_token", "[PAD]"),
                   lowercase=bool(normalizer.get("lowercase", False)),
                   strip_accents=normalizer.get("strip_accents"),
                   clean_text=bool(normalizer.get("clean_text", False)),
                   handle_chinese_chars=bool(normalizer.get("handle_chinese_chars", False)),
                   prefix=model.get("continuing_subword_prefix", "##"),
                   max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
                   added_tokens=[AddedToken.from_hf(a) for a in added])

    @classmethod
    def from_vocab_txt(cls, path: str | Path) -> WordPiece:
        """Read BERT's original vocab.txt (one token a line, the line number its id), with the
        tokenizer_config.json beside it for lowercasing and the special tokens."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{path}: cannot read the vocabulary ({err})") from err
        if lines and lines[-1] == "":
            lines.pop()
        vocab = {token.rstrip("\r"): i for i, token in enumerate(lines)}
        config_path = path.parent / "tokenizer_config.json"
        config = _json(config_path) if config_path.is_file() else {}
        specials = {k: config.get(k, d) for k, d in (("unk_token", "[UNK]"), ("cls_token", "[CLS]"),
                                                     ("sep_token", "[SEP]"), ("pad_token", "[PAD]"),
                                                     ("mask_token", "[MASK]"))}
        added = [AddedToken(vocab[t], t) for t in dict.fromkeys(specials.values()) if t in vocab]
        return cls(vocab, unk_token=specials["unk_token"], cls_token=specials["cls_token"],
                   sep_token=specials["sep_token"], pad_token=specials["pad_token"],
                   lowercase=bool(config.get("do_lower_case", True)),
                   strip_accents=config.get("strip_accents"),
                   handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
                   added_tokens=sorted(added, key=lambda t: t.id))


def load_wordpiece(path: str | Path) -> WordPiece:
    """A WordPiece tokenizer from a folder (tokenizer.json, else vocab.txt), tokenizer.json or vocab.txt."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name, read in (("tokenizer.json", WordPiece.from_tokenizer_json),
                           ("vocab.txt", WordPiece.from_vocab_txt)):
            if (path / name).is_file():
                return read(path / name)
        raise TokenizerError(f"{path}: no tokenizer.json or vocab.txt in this folder")
    if path.name.endswith(".txt"):
        return WordPiece.from_vocab_txt(path)
    return WordPiece.from_tokenizer_json(path)


def _json(path: Path) -> Any:
    try:
        return read_json(path)
    except JSONInputError as err:
        raise TokenizerError(f"{path}: not a readable JSON file ({err.reason})") from err


def _section(obj: Any, key: str, path: Path) -> dict[str, Any]:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: no {key!r} section")
    return value


def _post_processor_ends(post: Any, path: Path) -> tuple[str, str]:
    """The tokens a single sequence is wrapped in: BERT's [CLS] ... [SEP], however the file spells it."""
    if post is None:
        return "[CLS]", "[SEP]"
    kind = post.get("type") if isinstance(post, dict) else None
    if kind == "BertProcessing":
        return str(post["cls"][0]), str(post["sep"][0])
    if kind == "TemplateProcessing":
        single = post.get("single") or []
        if (len(single) == 3 and "SpecialToken" in single[0] and "Sequence" in single[1]
                and "SpecialToken" in single[2]):
            return str(single[0]["SpecialToken"]["id"]), str(single[2]["SpecialToken"]["id"])
    raise TokenizerError(f"{path}: post-processor {post!r:.80} is not BERT's [CLS] $A [SEP]")


# HF's WordPiece decoder `cleanup`: spaces before punctuation and English contractions removed.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _clean_up(text: str) -> str:
    for before, after in _CLEAN_UP:
        text = text.replace(before, after)
    return text
