"""lmforge's BPE trainer against a naive reference trainer, tiktoken, and its own contract."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import train as train_module
from lmforge.tokenizer.train import (
    DEFAULT_PATTERN,
    GPT2_PATTERN,
    GPT4_PATTERN,
    BPEModel,
    TrainingError,
    train_bpe,
    train_bpe_from_files,
)

GPL3 = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def english() -> str:
    if not GPL3.exists():
        pytest.skip("needs /usr/share/common-licenses/GPL-3 (Debian base-files)")
    return GPL3.read_text(encoding="utf-8")


def random_unicode(seed: int, n_words: int) -> str:
    """Words from several scripts (1-, 2-, 3- and 4-byte UTF-8), digits, punctuation, odd spaces."""
    rng = random.Random(seed)
    alphabets = ["abcde", "αβγδ", "жзий", "日本語中文", "😀🚀🎉", "0123456789", ".,;!?'\"-", "ﬁé"]
    seps = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", "\u00a0"]
    words = []
    for _ in range(n_words):
        alphabet = rng.choice(alphabets)
        words.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
        words.append(rng.choice(seps))
    return "".join(words)


# ----------------------------------------------------------------- naive references


def reference_train(
    texts: list[str], vocab_size: int, pattern: str, min_frequency: int, special_tokens: tuple[str, ...] = ()
) -> list[tuple[bytes, bytes]]:
    """The textbook algorithm: recount every pair of every word before each merge.

    Tokens are plain ``bytes``; the best pair has the highest count, ties go to the
    smallest (left, right) bytes. A merge whose bytes already are a token adds no rank
    (the trainer's documented rule). Returns the merges that created a token.
    """
    words: Counter[tuple[bytes, ...]] = Counter()
    split = regex.compile("|".join(map(regex.escape, special_tokens))) if special_tokens else None
    for text in texts:
        for piece in split.split(text) if split else [text]:
            for pretoken in regex.findall(pattern, piece):
                words[tuple(bytes([b]) for b in pretoken.encode("utf-8"))] += 1
    vocab = {bytes([b]) for b in range(256)}
    merges: list[tuple[bytes, bytes]] = []
    while len(vocab) < vocab_size - len(special_tokens):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < min_frequency:
            break
        merged = best[0] + best[1]
        if merged not in vocab:
            vocab.add(merged)
            merges.append(best)
        rewritten: Counter[tuple[bytes, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            rewritten[tuple(out)] += count
        words = rewritten
    return merges


def greedy_by_rank(text: str, model: BPEModel) -> list[int]:
    """Reference encoder: in each pre-token, merge the adjacent pair whose bytes have the
    lowest rank (leftmost among equals) until no adjacent pair is a token."""
    ranks = model.mergeable_ranks
    ids: list[int] = []
    for pretoken in regex.findall(model.pattern, text):
        parts = [bytes([b]) for b in pretoken.encode("utf-8")]
        while True:
            candidates = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            candidates = [(rank, i) for rank, i in candidates if rank is not None]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[part] for part in parts)
    return ids


def assert_well_formed(model: BPEModel) -> None:
    ranks = model.mergeable_ranks
    assert [ranks[bytes([b])] for b in range(256)] == list(range(256))
    assert sorted(ranks.values()) == list(range(len(ranks)))
    for rank, (left, right) in enumerate(model.merges, start=256):
        assert ranks[left + right] == rank
        assert ranks[left] < rank and ranks[right] < rank
    assert list(model.special_tokens.values()) == list(range(len(ranks), model.vocab_size))


# ----------------------------------------------------------------- the classic example


def test_classic_aaabdaaabac():
    # "aaabdaaabac" is one letter run, so one pre-token: a a a b d a a a b a c.
    # Pair counts: aa 4 (two overlapping in each "aaa"), ab 2, bd 1, da 1, ba 1, ac 1.
    # 1. (a, a) with 4  -> aa a b d aa a b a c   (left to right, no overlap)
    #    now (aa, a) 2, (a, b) 2, (b, d) 1, (d, aa) 1, (b, a) 1, (a, c) 1.
    # 2. tie at 2 between (aa, a) and (a, b): the smallest (left, right) bytes wins, and
    #    (b"a", b"b") < (b"aa", b"a") because b"a" < b"aa"  -> aa ab d aa ab a c
    # 3. (aa, ab) with 2  -> aaab d aaab a c; every pair now occurs once.
    # With min_frequency=2 training stops here. With min_frequency=1 the ties go by bytes:
    # 4. (a, c) (b"a" is the smallest left) -> aaab d aaab ac
    # 5. (aaab, ac) beats (aaab, d) since b"ac" < b"d" -> aaab d aaabac
    # 6. (aaab, d) -> aaabd aaabac    7. (aaabd, aaabac) -> one token.
    model = train_bpe(["aaabdaaabac"], 300)
    assert model.merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")]
    assert model.stopped_early and model.vocab_size == 259 and "min_frequency" in model.stop_reason

    model = train_bpe(["aaabdaaabac"], 300, min_frequency=1)
    assert model.merges == [
        (b"a", b"a"),
        (b"a", b"b"),
        (b"aa", b"ab"),
        (b"a", b"c"),
        (b"aaab", b"ac"),
        (b"aaab", b"d"),
        (b"aaabd", b"aaabac"),
    ]
    assert "no pairs left" in model.stop_reason
    assert model.to_tiktoken().encode("aaabdaaabac") == [262]


# ----------------------------------------------------------------- against the reference


@pytest.mark.parametrize(
    "pattern", [DEFAULT_PATTERN, GPT4_PATTERN, GPT2_PATTERN], ids=["llama3", "gpt4", "gpt2"]
)
def test_merges_equal_reference_on_english(english, pattern):
    texts = [english[:6000], english[6000:12000]]
    model = train_bpe(texts, 256 + 400, pattern=pattern, workers=1)
    assert model.merges == reference_train(texts, 256 + 400, pattern, min_frequency=2)
    assert len(model.merges) == 400 and not model.stopped_early
    assert_well_formed(model)


@pytest.mark.parametrize("seed", [0, 1])
def test_merges_equal_reference_on_random_unicode(seed):
    texts = [random_unicode(seed, 600), random_unicode(seed + 100, 300)]
    model = train_bpe(texts, 256 + 300, min_frequency=1, workers=1)
    assert model.merges == reference_train(texts, 256 + 300, DEFAULT_PATTERN, min_frequency=1)
    assert_well_formed(model)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(alphabet="ab c\nαé😀1'", max_size=40), max_size=5),
    st.integers(0, 3),
    st.sampled_from([DEFAULT_PATTERN, GPT4_PATTERN, GPT2_PATTERN]),
)
def test_merges_equal_reference_property(texts, min_frequency, pattern):
    # Tiny alphabets make many ties and merges whose bytes already are a token. The
    # patterns differ on whitespace at the end of a text ("\n " is one GPT-4 pre-token,
    # two Llama 3 ones), so each is checked against the reference with itself.
    if not any(regex.findall(pattern, t) for t in texts):
        with pytest.raises(TrainingError):
            train_bpe(texts, 300, pattern=pattern, min_frequency=min_frequency)
        return
    model = train_bpe(texts, 300, pattern=pattern, min_frequency=min_frequency, workers=1)
    assert model.merges == reference_train(texts, 300, pattern, min_frequency)
    assert_well_formed(model)


# ----------------------------------------------------------------- tiktoken


def test_tiktoken_roundtrips_and_matches_greedy_by_rank(english):
    model = train_bpe([english], 1000)
    encoding = model.to_tiktoken()
    samples = [english[:5000], random_unicode(7, 300), "Hello, world!  It's   1234567 \r\n\n end"]
    for text in samples:
        ids = encoding.encode(text)
        assert encoding.decode(ids) == text
        assert ids == greedy_by_rank(text, model)
    # The same ranks built by hand, exactly as tiktoken documents it.
    by_hand = tiktoken.Encoding(
        "x", pat_str=model.pattern, mergeable_ranks=model.mergeable_ranks, special_tokens={}
    )
    assert by_hand.encode(english[:2000]) == encoding.encode(english[:2000])
    # Training compresses its own text: well under one token per byte.
    assert len(encoding.encode(english)) < 0.4 * len(english.encode())


# ----------------------------------------------------------------- special tokens, min_frequency


def test_special_tokens_get_ids_after_merges(english):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = "<|endoftext|>".join([english[:4000], english[4000:8000], english[8000:12000]] * 5)
    model = train_bpe([corpus], 700, special_tokens=specials)
    assert len(model.merges) == 700 - 256 - 3 and model.vocab_size == 700
    assert model.special_tokens == {"<|endoftext|>": 697, "<|im_start|>": 698, "<|im_end|>": 699}
    # Separators are not trained on: no merge glues pieces of a special token.
    assert all(b"<|" not in left + right and b"|>" not in left + right for left, right in model.merges)
    assert model.merges == reference_train([corpus], 700, DEFAULT_PATTERN, 2, tuple(specials))
    encoding = model.to_tiktoken()
    ids = encoding.encode("hi<|im_start|>there<|im_end|>", allowed_special="all")
    assert 698 in ids and 699 in ids
    assert encoding.decode(ids) == "hi<|im_start|>there<|im_end|>"


def test_special_tokens_with_spaces_survive_block_cuts(tmp_path, monkeypatch):
    # Cut points fall before spaces and after newlines, so a special token holding either
    # could be cut in two at a batch or file-block border; the cutter steps around them.
    specials = ["<| user |>", "<|end\nturn|>"]
    corpus = "".join(
        f"{random_unicode(i, 8)}<| user |>{random_unicode(i + 50, 8)}<|end\nturn|>" for i in range(300)
    )
    expected = reference_train([corpus], 600, DEFAULT_PATTERN, 2, tuple(specials))
    monkeypatch.setattr(train_module, "BATCH_CHARS", 400)
    assert train_bpe([corpus], 600, special_tokens=specials, workers=1).merges == expected
    path = tmp_path / "corpus.txt"
    path.write_text(corpus, encoding="utf-8")
    monkeypatch.setattr(train_module, "READ_BYTES", 11)
    assert train_bpe_from_files([path], 600, special_tokens=specials, workers=1).merges == expected


def test_min_frequency_stops_early(english):
    full = train_bpe([english[:3000]], 5000, min_frequency=1)
    assert "no pairs left" in full.stop_reason
    stopped = train_bpe([english[:3000]], 5000, min_frequency=3)
    assert stopped.stopped_early and "min_frequency 3" in stopped.stop_reason
    assert 0 < len(stopped.merges) < len(full.merges)
    assert stopped.merges == reference_train([english[:3000]], 5000, DEFAULT_PATTERN, 3)
    # A threshold above every pair count learns nothing.
    assert train_bpe(["aaabdaaabac"], 300, min_frequency=5).merges == []


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("texts", [[], [""], ["", ""], iter([]), ["<|endoftext|>"]])
def test_empty_corpus_is_an_error(texts):
    with pytest.raises(TrainingError, match="empty corpus"):
        train_bpe(texts, 300, special_tokens=["<|endoftext|>"])


def test_argument_errors():
    assert issubclass(TrainingError, ValueError)
    with pytest.raises(TrainingError, match="at least 256"):
        train_bpe(["hello"], 255)
    with pytest.raises(TrainingError, match="258"):
        train_bpe(["hello"], 257, special_tokens=["<a>", "<b>"])
    train_bpe(["hello"], 258, special_tokens=["<a>", "<b>"])  # exactly enough room
    with pytest.raises(TrainingError, match="duplicate special token '<a>'"):
        train_bpe(["hello"], 1000, special_tokens=["<a>", "<b>", "<a>"])
    with pytest.raises(TrainingError, match="non-empty"):
        train_bpe(["hello"], 1000, special_tokens=[""])
    with pytest.raises(TrainingError, match="pattern"):
        train_bpe(["hello"], 1000, pattern="(unclosed")
    with pytest.raises(TrainingError, match="str"):
        train_bpe([b"bytes"], 1000)  # type: ignore[list-item]
    with pytest.raises(TrainingError, match="workers"):
        train_bpe(["hello"], 1000, workers=0)
    with pytest.raises(TrainingError, match="not a str"):
        train_bpe("hello", 1000)


# ----------------------------------------------------------------- files and streaming


def test_files_stream_in_blocks_and_equal_in_memory(tmp_path, monkeypatch):
    text = random_unicode(3, 2000)
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeff".encode() + text.encode("utf-8"))  # a BOM is skipped
    expected = train_bpe([text], 600, workers=1)
    # Tiny blocks: multi-byte characters and pre-tokens straddle every block border.
    monkeypatch.setattr(train_module, "READ_BYTES", 7)
    model = train_bpe_from_files([path], 600, workers=1)
    assert model.merges == expected.merges
    assert train_bpe_from_files(str(path), 600, workers=1).merges == expected.merges  # one path
    assert model.stats["bytes"] == len(text.encode("utf-8"))


def test_invalid_utf8_names_file_and_offset(tmp_path, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_text("fine text\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo wörld ".encode() * 10 + b"\xff tail")
    monkeypatch.setattr(train_module, "READ_BYTES", 5)
    with pytest.raises(TrainingError, match=r"bad\.txt: not valid UTF-8 at byte offset 140"):
        train_bpe_from_files([good, bad], 300)
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes(b"abc" + "é".encode()[:1])
    with pytest.raises(TrainingError, match=r"truncated\.txt: not valid UTF-8 at byte offset 3"):
        train_bpe_from_files([truncated], 300)


def test_unreadable_files(tmp_path):
    with pytest.raises(TrainingError, match=r"missing\.txt: cannot read at byte offset 0"):
        train_bpe_from_files([tmp_path / "missing.txt"], 300)
    with pytest.raises(TrainingError, match="cannot read"):
        train_bpe_from_files([tmp_path], 300)  # a directory


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab1 \n\t\r\x0b.'é日\u00a0\u0301", max_size=120))
def test_cut_points_are_pretoken_boundaries(text):
    # Long texts and file blocks are cut "after a newline before a non-space" or "before a
    # space before a non-space"; for both patterns no pre-token crosses such a point.
    cuts = {
        train_module._last_safe_cut(text, lowest, end)
        for end in range(2, len(text) + 1)
        for lowest in (1, end // 2)
    }
    cuts.discard(-1)
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        whole = regex.findall(pattern, text)
        for cut in cuts:
            split = regex.findall(pattern, text[:cut]) + regex.findall(pattern, text[cut:])
            assert split == whole, (pattern, cut)
    for max_chars in (5, 17):
        assert "".join(train_module._safe_cuts(text, max_chars)) == text


def test_parallel_counting_equals_serial(english, tmp_path, monkeypatch):
    # Small batches and a low threshold make the trainer spawn its two workers.
    monkeypatch.setattr(train_module, "BATCH_CHARS", 3000)
    monkeypatch.setattr(train_module, "PARALLEL_MIN_BYTES", 10_000)
    texts = [english, random_unicode(5, 2000)]
    serial = train_bpe(texts, 900, workers=1)
    parallel = train_bpe(iter(texts), 900, workers=2)  # a stream: the pool starts midway
    assert parallel.merges == serial.merges
    assert parallel.stats["pretokens"] == serial.stats["pretokens"]
    path = tmp_path / "corpus.txt"
    path.write_text(english, encoding="utf-8")
    from_file = train_bpe_from_files([path], 900, workers=2)  # known size: the pool starts at once
    assert from_file.merges == train_bpe([english], 900, workers=1).merges


def test_order_of_texts_does_not_matter(english):
    lines = english.splitlines(keepends=True)[:400]
    shuffled = lines[:]
    random.Random(0).shuffle(shuffled)
    assert train_bpe(lines, 600, workers=1).merges == train_bpe(shuffled, 600, workers=1).merges


def test_progress_goes_to_stderr(capsys):
    train_bpe(["the cat sat on the mat " * 50], 270, progress=True, workers=1)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "counting:" in captured.err and "MB/s" in captured.err
    assert "merging:" in captured.err and "merges/s" in captured.err
