"""WordPiece (BERT) against HF `tokenizers` on all-MiniLM-L6-v2's own tokenizer.json: the same ids on
real multilingual text, on hand-picked hard strings, and, character by character, on every code
point up to U+2FFFF (where only Unicode-version differences may disagree)."""

from __future__ import annotations

import json
import unicodedata

import pytest

from lmforge.hub import SampleError
from lmforge.tokenizer.errors import TokenizerError
from lmforge.tokenizer.wordpiece import WordPiece, load_wordpiece

tokenizers = pytest.importorskip("tokenizers")

TRICKY = [
    "", " ", "\n\t \r\n", "Hello, world!", "Café résumé naïve façade; ÀÉÎÕÜ ÅNGSTRÖM",
    "北京大学的学生 and 東京", "日本語のテキストです。カタカナ", "한국어 텍스트", "Ελληνικά: ΟΔΟΣ ΣΑΣ σοφός",
    "İstanbul ıI", "Straße ﬁnance ﬀ", "emoji 😀🥰👍🏽 👨‍👩‍👧 🇫🇷", "control\x00chars\x07\x1b[0m ok",
    "zero\u200bwidth\ufeffbom\u200d", "replacement \ufffd char", "nbsp\u00a0ideographic\u3000space\u2028line",
    "a" * 100, "a" * 101, "ж" * 100, "ж" * 101, "x" * 300 + " tail", "[CLS] special [MASK] tokens [SEP]",
    "[cls] lower [UNK][PAD]", "don't stop—here… «quoted» “curly” ‘single’", "$100+50=<150>^`|~ #tag @user",
    "e\u0301 vs é; n\u0303", "مرحبا بالعالم", "שלום עולם", "สวัสดีครับ", "नमस्ते दुनिया", "∑∫√∞ ≠ ≤",
    "ℌ𝔢𝔩𝔩𝔬 𝐛𝐨𝐥𝐝", "1234567890" * 12, "https://example.com/a-b_c.d?x=1&y=2#frag",
    "snake_case and kebab-case and CamelCaseWords", "ＦＵＬＬＷＩＤＴＨ ｈａｌｆ", "tab\there",
    "\u0130\u0307",
]


@pytest.fixture(scope="module")
def ours(minilm) -> WordPiece:
    return load_wordpiece(minilm)


@pytest.fixture(scope="module")
def theirs(minilm):
    hf = tokenizers.Tokenizer.from_file(str(minilm / "tokenizer.json"))
    hf.no_truncation()
    hf.no_padding()
    return hf


def hotpotqa_paragraphs(n: int) -> list[str]:
    from lmforge.eval.qa import qa_path

    try:
        path = qa_path("hotpotqa", quiet=True)
    except SampleError as err:
        pytest.skip(f"HotpotQA sample unavailable: {err}")
    data = json.loads(path.read_text(encoding="utf-8"))
    return list(dict.fromkeys("".join(s) for item in data for _, s in item["context"]))[:n]


def handbook_texts(handbook) -> list[str]:
    """The whole text of two pages in each of the handbook's 26 languages (CJK, Arabic, Persian, ...)."""
    import lxml.html

    texts = []
    for language in sorted(p for p in handbook.iterdir() if p.is_dir()):
        for page in sorted(language.glob("*.html"))[5:7]:
            root = lxml.html.parse(str(page), lxml.html.HTMLParser(encoding="utf-8")).getroot()
            texts.append(root.text_content())
    return texts


def test_ids_equal_hf_on_real_text(ours, theirs, handbook):
    texts = hotpotqa_paragraphs(2000) + handbook_texts(handbook)
    assert len(texts) > 2000 and sum(map(len, texts)) > 1_000_000
    expected = [e.ids for e in theirs.encode_batch(texts)]
    got = ours.encode_batch(texts)
    wrong = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not wrong, f"{len(wrong)} texts differ, first: {texts[wrong[0]][:200]!r}"
    assert sum(map(len, got)) > 300_000
    assert sum(ours.unk_id in ids for ids in got) > 0  # the hard cases really occur


@pytest.mark.parametrize("text", TRICKY, ids=lambda t: repr(t[:20]))
def test_ids_equal_hf_on_hard_strings(ours, theirs, text):
    expected = theirs.encode(text)
    assert ours.encode(text) == expected.ids
    assert ours.tokenize(text) == expected.tokens[1:-1]


def test_words_over_100_characters_are_one_unknown(ours):
    assert ours.encode("a" * 100, add_special_tokens=False) != [ours.unk_id]
    assert ours.encode("a" * 101, add_special_tokens=False) == [ours.unk_id]
    assert ours.encode("ж" * 101 + " ok", add_special_tokens=False)[0] == ours.unk_id  # characters, not bytes


def test_truncation_keeps_cls_and_sep_like_hf(ours, minilm):
    hf = tokenizers.Tokenizer.from_file(str(minilm / "tokenizer.json"))
    hf.no_padding()
    text = " ".join(hotpotqa_paragraphs(40))
    for length in (256, 17, 3, 2):
        hf.enable_truncation(length)
        assert ours.encode(text, max_length=length) == hf.encode(text).ids
    assert ours.encode("", max_length=2) == [ours.cls_id, ours.sep_id]
    with pytest.raises(TokenizerError, match="no room"):
        ours.encode("text", max_length=1)


def test_every_code_point_agrees_but_where_unicode_changed(ours, theirs):
    """Each character between two letters: normalized text and words as HF's. A disagreement is
    allowed only for a character unassigned in Unicode 3.2 or re-categorised since (HF's Rust crates
    and Python carry different Unicode versions); anything else is a bug in the pipeline."""
    old = unicodedata.ucd_3_2_0
    disagree, unexplained = 0, []
    for cp in range(0x30000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        char = chr(cp)
        text = f"a{char}b"
        hf_normalized = theirs.normalizer.normalize_str(text)
        normalized = ours.normalize(text)
        hf_words = [w for w, _ in theirs.pre_tokenizer.pre_tokenize_str(hf_normalized)]
        same = normalized == hf_normalized and ours.pre_tokenize(normalized) == hf_words
        if not same:
            disagree += 1
            if old.category(char) != "Cn" and old.category(char) == unicodedata.category(char):
                unexplained.append(f"U+{cp:04X} {unicodedata.name(char, '?')}")
    assert not unexplained, unexplained[:20]
    assert disagree < 1000  # of 194,560: all in scripts and symbols added since Unicode 3.2


def test_decode_equals_hf(ours, theirs):
    texts = hotpotqa_paragraphs(200) + ["don't do that , ok ?", "[CLS] x [SEP]"]
    for text in texts:
        ids = theirs.encode(text).ids
        assert ours.decode(ids) == theirs.decode(ids)


def test_vocab_txt_gives_the_same_ids(ours, minilm):
    from_txt = load_wordpiece(minilm / "vocab.txt")
    for text in hotpotqa_paragraphs(300) + TRICKY:
        assert from_txt.encode(text) == ours.encode(text)


def test_unsupported_or_broken_files_are_one_clear_error(minilm, tmp_path):
    spec = json.loads((minilm / "tokenizer.json").read_text(encoding="utf-8"))
    cases = {
        "is not WordPiece": {**spec, "model": {**spec["model"], "type": "BPE"}},
        "normalizer 'NFC' is not supported": {**spec, "normalizer": {"type": "NFC"}},
        "pre-tokenizer 'Whitespace' is not supported": {**spec, "pre_tokenizer": {"type": "Whitespace"}},
        "no 'model' section": {k: v for k, v in spec.items() if k != "model"},
        "has no unk token": {**spec, "model": {**spec["model"], "unk_token": "<unk>"}},
    }
    for message, broken in cases.items():
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(TokenizerError, match=message):
            load_wordpiece(path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a readable JSON file"):
        load_wordpiece(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or vocab.txt"):
        load_wordpiece(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="encodes text"):
        load_wordpiece(minilm).encode(b"bytes")  # type: ignore[arg-type]
