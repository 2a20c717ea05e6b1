"""Saving and loading: HF tokenizer.json/tokenizer_config.json, GGUF metadata, load_tokenizer."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import tokenizers

from lmforge.atomic import default_file_mode
from lmforge.formats.gguf import write_gguf
from lmforge.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train
from lmforge.tokenizer.pretokenize import ByteLevel, PreTokenizer, Split
from lmforge.tokenizer.ranks import read_tiktoken_file

HARD_CASES: list[str] = json.loads(Path(__file__).with_name("hard_cases.json").read_text())


@pytest.fixture(scope="module")
def cl100k(tiktoken_encodings) -> Tokenizer:
    ranks, pattern, specials, _ = tiktoken_encodings["cl100k_base"]
    return Tokenizer.from_tiktoken(ranks, pattern, specials)


@pytest.fixture(scope="module")
def samples(prose_text) -> list[str]:
    return [prose_text[:20000], *HARD_CASES]


@pytest.mark.parametrize("name", ["gpt2", "smollm2_tok", "cl100k"])
def test_saved_tokenizer_json_gives_the_same_ids_in_hf(request, tmp_path, samples, name):
    tok: Tokenizer = request.getfixturevalue(name)
    tok.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in samples:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text, add_bos=False, add_eos=False)
        assert hf.encode(text).ids == tok.encode(text)  # BOS/EOS as the post-processor adds them
    ids = tok.encode(samples[0])
    assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_save_and_load_round_trip(smollm2_tok, tmp_path, samples):
    smollm2_tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.spec.vocab == smollm2_tok.spec.vocab and again.spec.merges == smollm2_tok.spec.merges
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)
    assert again.add_bos is False and again.special_tokens == smollm2_tok.special_tokens
    assert again.chat_template == smollm2_tok.chat_template
    assert again.pretokenizer == smollm2_tok.pretokenizer and again.spec.gguf_pre == "smollm"
    for text in samples[:10]:
        assert again.encode(text) == smollm2_tok.encode(text)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["chat_template"] == smollm2_tok.chat_template


def test_save_rewrites_a_stale_chat_template_file(smollm2_tok, tmp_path):
    (tmp_path / "chat_template.jinja").write_text("stale")
    smollm2_tok.save(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == smollm2_tok.chat_template
    assert load_tokenizer(tmp_path).chat_template == smollm2_tok.chat_template
    # Written through lmforge.atomic: readable as a plain open() would leave them, no temp files left.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == default_file_mode(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"
    ]


def test_transformers_loads_a_saved_tokenizer(smollm2_tok, tmp_path, samples):
    import transformers

    smollm2_tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello 123"}]
    for prompt in (True, False):
        assert hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        ) == smollm2_tok.apply_chat_template(messages, add_generation_prompt=prompt)
    assert hf.eos_token == "<|im_end|>" and hf.bos_token == "<|im_start|>"
    for text in samples[:8]:
        assert hf(text)["input_ids"] == smollm2_tok.encode(text)


@pytest.mark.parametrize("name", ["gpt2", "smollm2_tok", "cl100k"])
def test_gguf_metadata_round_trip(request, samples, name):
    tok: Tokenizer = request.getfixturevalue(name)
    metadata = tok.gguf_metadata()
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert (
        len(metadata["tokenizer.ggml.tokens"]) == len(metadata["tokenizer.ggml.token_type"]) == tok.vocab_size
    )
    assert all(key.startswith("tokenizer.") for key in metadata)
    again = Tokenizer.from_gguf_metadata(metadata).without_fast_path()  # (spares the fast-path check)
    assert again.vocab_size == tok.vocab_size
    assert (again.bos_token_id, again.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert again.special_tokens == tok.special_tokens and again.chat_template == tok.chat_template
    for text in samples:
        assert again.encode(text) == tok.encode(text)


def test_smollm2_gguf_metadata_is_what_the_file_holds(smollm2_tok, smollm2_metadata):
    metadata = smollm2_tok.gguf_metadata()
    for key in (
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ):
        assert (
            list(metadata[key]) == list(smollm2_metadata[key])
            if isinstance(metadata[key], list)
            else metadata[key] == smollm2_metadata[key]
        ), key


def test_written_gguf_file_loads_back(smollm2_tok, tmp_path):
    path = write_gguf(
        tmp_path / "tok.gguf", {"general.architecture": "llama", **smollm2_tok.gguf_metadata()}, []
    )
    again = load_tokenizer(path).without_fast_path()
    assert again.encode("Hello 123 <|im_end|>") == smollm2_tok.encode("Hello 123 <|im_end|>")


def test_load_tokenizer_paths(smollm2_gguf, smollm2_tok, gpt2_files, gpt2, tmp_path):
    # (The reference encoder spares each fresh tokenizer the fast-path check.)
    from_file = load_tokenizer(smollm2_gguf)
    assert from_file.spec.vocab == smollm2_tok.spec.vocab and from_file.spec.merges == smollm2_tok.spec.merges
    assert from_file.without_fast_path().encode("a  1") == smollm2_tok.encode("a  1")
    vocab, merges = gpt2_files
    from_folder = load_tokenizer(vocab.parent)  # encoder.json + vocab.bpe
    assert from_folder.without_fast_path().encode("Hello 12") == gpt2.encode("Hello 12")
    gpt2.save(tmp_path)
    assert load_tokenizer(tmp_path / "tokenizer.json").without_fast_path().encode("Hi") == gpt2.encode("Hi")


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_a_trained_tokenizer_runs_saves_and_exports(pattern, tmp_path, prose_text):
    model = train.train_bpe(
        [prose_text[:60000]],
        700,
        pattern=getattr(train, f"{pattern.upper()}_PATTERN"),
        special_tokens=["<|endoftext|>"],
    )
    tok = Tokenizer.from_tiktoken(model.mergeable_ranks, model.pattern, model.special_tokens)
    assert tok.backend == "tiktoken"
    text = prose_text[60000:70000] + " <|endoftext|> naïve 12345"
    expected = model.to_tiktoken().encode(text, allowed_special="all")
    assert tok.encode(text) == tok.without_fast_path().encode(text) == expected
    tok.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(text, add_special_tokens=False).ids == expected
    if tok.pretokenizer.name is None:  # a regex llama.cpp has no name for cannot go into a GGUF
        with pytest.raises(TokenizerError, match="no GGUF name"):
            tok.gguf_metadata()
        return
    metadata = tok.gguf_metadata()
    assert metadata["tokenizer.ggml.pre"] == tok.pretokenizer.name
    assert Tokenizer.from_gguf_metadata(metadata).without_fast_path().encode(text) == expected


def test_gguf_needs_a_named_pre_tokenizer(gpt2):
    odd = Tokenizer(
        type(gpt2.spec)(
            vocab=gpt2.spec.vocab,
            merges=gpt2.spec.merges,
            pretokenizer=PreTokenizer((Split(r"\w+|\W+"), ByteLevel(use_regex=False))),
        )
    )
    with pytest.raises(TokenizerError, match="no GGUF name"):
        odd.gguf_metadata()


def test_save_tiktoken_round_trips_a_trained_tokenizer(tmp_path):
    text = Path("/usr/share/common-licenses/GPL-3").read_text(encoding="utf-8")
    model = train.train_bpe([text], 400, pattern=train.GPT2_PATTERN, special_tokens=["<|endoftext|>"])
    tok = Tokenizer.from_tiktoken(model.mergeable_ranks, model.pattern, model.special_tokens)
    tok.save_tiktoken(tmp_path / "ranks.tiktoken")
    again = Tokenizer.from_tiktoken_file(tmp_path / "ranks.tiktoken", model.pattern, model.special_tokens)
    sample = text[:3000] + "<|endoftext|>"
    assert again.encode(sample) == tok.encode(sample)
    assert (tmp_path / "ranks.tiktoken").read_text().splitlines()[0] == "AA== 0"  # byte 0x00 has rank 0


def test_save_tiktoken_reuses_the_fast_path_ranks(gpt2, tiktoken_encodings, tmp_path, monkeypatch):
    """GPT-2 loaded from its merges: the ranks the fast-path check made are written, not made again."""
    assert gpt2.backend == "tiktoken"

    def no_second_check(*args, **kwargs):
        raise AssertionError("save_tiktoken re-ran the rank check")

    monkeypatch.setattr("lmforge.tokenizer.tokenizer.rank_table", no_second_check)
    gpt2.save_tiktoken(tmp_path / "gpt2.tiktoken")
    assert read_tiktoken_file(tmp_path / "gpt2.tiktoken") == tiktoken_encodings["gpt2"][0]


def test_repr_does_not_run_the_fast_path_check(gpt2):
    fresh = Tokenizer(gpt2.spec)
    assert "not chosen yet" in repr(fresh) and fresh._fast is None and fresh.fast_path_reason is None
    assert fresh.backend == "tiktoken" and "backend='tiktoken'" in repr(fresh)
