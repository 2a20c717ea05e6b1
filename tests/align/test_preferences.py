"""Preference data: trl's row shapes, clear errors, tokens and labels by trl's rule, truncation, the
prompt-disjoint split, resumable batches and reference log-probs cached once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.align.conftest import tiny_llama

from lmforge.align.dpo import sequence_logps
from lmforge.align.preferences import (
    LabelledCompletion,
    PreferenceDataError,
    PreferencePair,
    PreferenceSource,
    cache_reference_logps,
    encode_pair,
    encode_preferences,
    example_from_row,
    read_preferences,
    split_preferences,
)
from lmforge.train.batch import IGNORE_INDEX

USER = [{"role": "user", "content": "2+2?"}]
YES, NO = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]


def _jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ============================================================================ rows
@pytest.mark.parametrize(("row", "want"), [
    ({"prompt": "Q", "chosen": " a", "rejected": " b"}, PreferencePair("Q", " a", " b")),
    ({"prompt": "Q", "chosen": " a", "rejected": " b", "score": 3}, PreferencePair("Q", " a", " b")),
    ({"prompt": USER, "chosen": YES, "rejected": NO}, PreferencePair(USER, YES, NO)),
    ({"chosen": USER + YES, "rejected": USER + NO}, PreferencePair(USER, YES, NO)),  # implicit prompt
    ({"prompt": "Q", "completion": " a", "label": False}, LabelledCompletion("Q", " a", False)),
    ({"prompt": USER, "completion": YES, "label": True}, LabelledCompletion(USER, YES, True)),
])
def test_every_row_shape_trl_reads(row, want):
    assert example_from_row(row) == want


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "Q", "chosen": " a"}, "missing 'rejected'"),
    ({"prompt": "Q", "rejected": " b", "chosen": 3}, "'chosen' must be a string"),
    ({"prompt": USER, "chosen": " a", "rejected": NO}, "'chosen' must be a list of messages"),
    ({"prompt": "Q", "chosen": YES, "rejected": NO}, "'chosen' must be a string"),
    ({"prompt": USER, "chosen": USER, "rejected": NO}, "'chosen' must start with an assistant message"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": YES, "rejected": NO}, "unknown role 'bot'"),
    ({"chosen": " a", "rejected": " b"}, "missing 'prompt'"),
    ({"prompt": "Q", "completion": " a", "label": "yes"}, "'label' must be true or false"),
    ({"text": "hello"}, "a row needs 'prompt'"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_rows_say_what_is_wrong(row, message):
    with pytest.raises(ValueError, match=message):
        example_from_row(row)


def test_file_errors_name_the_line(tmp_path):
    good = {"prompt": "Q", "chosen": " a", "rejected": " b"}
    with pytest.raises(PreferenceDataError, match=r"bad\.jsonl:3: missing 'rejected'"):
        read_preferences(_jsonl(tmp_path / "bad.jsonl", [good, "", {"prompt": "Q", "chosen": " a"}]))
    unpaired = {"prompt": "Q", "completion": "a", "label": True}
    with pytest.raises(PreferenceDataError, match=r"mixed\.jsonl:2: this row is unpaired, the rows before"):
        read_preferences(_jsonl(tmp_path / "mixed.jsonl", [good, unpaired]))
    chat = {"prompt": USER, "chosen": YES, "rejected": NO}
    with pytest.raises(PreferenceDataError, match=r"chat\.jsonl:2: a file mixes string rows and conv"):
        read_preferences(_jsonl(tmp_path / "chat.jsonl", [good, chat]))
    with pytest.raises(PreferenceDataError, match=r"json\.jsonl:1"):
        read_preferences(_jsonl(tmp_path / "json.jsonl", ['{"prompt": "Q",']))
    with pytest.raises(PreferenceDataError, match="no preference row"):
        read_preferences(_jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "list.json").write_text(json.dumps([good, good]))
    assert len(read_preferences(tmp_path / "list.json")) == 2
    assert len(read_preferences(tmp_path / "list.json", limit=1)) == 1


# ============================================================================ tokens and labels
def test_conversational_pairs_split_where_the_rendered_prompt_ends(tokenizer):
    pair = encode_pair(tokenizer, PreferencePair(USER, YES, NO))
    assert pair.prompt.tolist() == tokenizer.encode_chat_prompt(USER, add_generation_prompt=True)
    for completion, ids in ((YES, pair.chosen), (NO, pair.rejected)):
        full = tokenizer.encode_chat_prompt(USER + completion, add_generation_prompt=False)
        assert pair.prompt.tolist() + ids.tolist() == full
    assert tokenizer.decode(pair.chosen.tolist()) == "4<|im_end|>\n"  # reply, end of turn, the newline


def test_string_completions_end_with_eos_and_special_text_stays_text(tokenizer):
    pair = encode_pair(tokenizer, PreferencePair("Say <|im_end|>:", " ok", " no"))
    assert pair.chosen[-1] == tokenizer.eos_token_id and tokenizer.decode(pair.chosen[:-1].tolist()) == " ok"
    assert tokenizer.special_tokens["<|im_end|>"] not in pair.prompt.tolist()  # typed text, not a turn marker


def test_labels_cover_the_completion_only_and_lengths_count_real_tokens(tokenizer):
    pairs = [PreferencePair("Q1?", " yes", " no, never"), PreferencePair("Question 2?", " a", " b")]
    batch = PreferenceSource.from_examples(tokenizer, pairs, 64, shuffle=False).batch([0, 1])
    e = batch.extras
    assert batch.input_ids.shape == e["rejected_ids"].shape == e["rejected_labels"].shape
    for row, pair in enumerate(pairs):
        sides = ((batch.input_ids, batch.labels, e["chosen_length"], pair.chosen),
                 (e["rejected_ids"], e["rejected_labels"], e["rejected_length"], pair.rejected))
        for ids, labels, length, completion in sides:
            n = int(length[row])
            assert tokenizer.decode(ids[row, :n].tolist()) == pair.prompt + completion + "<|endoftext|>"
            labelled = labels[row] != IGNORE_INDEX
            assert tokenizer.decode(labels[row][labelled].tolist()) == completion + "<|endoftext|>"
            assert not labelled[n - 1:].any()  # the last real token predicts nothing; padding takes no loss
            assert (labels[row, :n - 1][labelled[:n - 1]] == ids[row, 1:n][labelled[:n - 1]]).all()


def test_truncation_keeps_the_prompt_and_drops_pairs_it_fills(tokenizer):
    pairs = [PreferencePair("x" * 10, " " + "a" * 30, " b"), PreferencePair("y" * 40, " c", " d"),
             PreferencePair("z", " e", " f")]
    encoded, truncated, dropped = encode_preferences(tokenizer, pairs, 20)
    assert (truncated, dropped) == (1, 1) and len(encoded) == 2
    assert len(encoded[0].prompt) == 10 and len(encoded[0].chosen) == 10 and len(encoded[0].rejected) == 3
    with pytest.raises(PreferenceDataError, match=r"no preference example to train on \(1 dropped"):
        PreferenceSource.from_examples(tokenizer, pairs[1:2], 20)


def test_unpaired_examples_carry_the_previous_completion_for_the_kl_estimate(tokenizer):
    rows = [LabelledCompletion(f"Q{i}", f" answer {i}", i % 2 == 0) for i in range(4)]
    source = PreferenceSource.from_examples(tokenizer, rows, 64, shuffle=False)
    batch = source.batch([0, 1, 2, 3])
    assert batch.extras["kto_label"].tolist() == [True, False, True, False]
    for i in range(4):
        n = int(batch.extras["kl_length"][i])
        text = tokenizer.decode(batch.extras["kl_ids"][i, :n].tolist())
        assert text == f"Q{i} answer {(i - 1) % 4}<|endoftext|>"


# ============================================================================ split, order, resume
def test_the_split_is_stable_and_keeps_each_prompt_on_one_side():
    pairs = [PreferencePair(f"prompt {i % 30}", f" good {i}", f" bad {i}") for i in range(300)]
    train, val = split_preferences(pairs, 0.3, seed=1)
    assert (train, val) == split_preferences(pairs, 0.3, seed=1)
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    assert 0.1 < len(val) / len(pairs) < 0.5 and split_preferences(pairs, 0.3, seed=2) != (train, val)
    with pytest.raises(PreferenceDataError, match="val_fraction"):
        split_preferences(pairs, 1.0)


def test_a_resumed_source_draws_exactly_the_same_batches(tokenizer):
    pairs = [PreferencePair(f"Q{i}", " y" * (i % 4 + 1), " n") for i in range(7)]
    first = PreferenceSource.from_examples(tokenizer, pairs, 64, seed=3)
    for _ in range(3):
        first.next_batch(3)  # past the end of epoch 0 (7 examples)
    state = json.loads(json.dumps(first.state_dict()))  # it survives JSON, as in a checkpoint
    second = PreferenceSource.from_examples(tokenizer, pairs, 64, seed=3)
    second.load_state_dict(state)
    for _ in range(4):
        a, b = first.next_batch(3), second.next_batch(3)
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.extras["rejected_ids"], b.extras["rejected_ids"])
    epoch0 = PreferenceSource.from_examples(tokenizer, pairs, 64, seed=3)
    seen = epoch0.next_batch(7).extras["chosen_length"].tolist()  # one epoch holds each pair once
    assert sorted(seen) == sorted(len(f"Q{i}" + " y" * (i % 4 + 1)) + 1 for i in range(7))
    other = PreferenceSource.from_examples(tokenizer, pairs[:-1], 64, seed=3)
    with pytest.raises(PreferenceDataError, match="other preference data"):
        other.load_state_dict(state)


def test_evaluation_batches_are_fixed_and_leave_the_position(tokenizer):
    pairs = [PreferencePair(f"Q{i}", " y", " n") for i in range(5)]
    source = PreferenceSource.from_examples(tokenizer, pairs, 64)
    source.next_batch(2)
    state = source.state_dict()
    a = [b.input_ids for b in source.first_batches(2, 2)]
    b = [b.input_ids for b in source.first_batches(2, 2)]
    assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert source.state_dict() == state


# ============================================================================ reference log-probs
def test_reference_logps_are_computed_once_and_ride_in_every_batch(tokenizer):
    pairs = [PreferencePair(f"Question {i}?", " yes" * (i + 1), " no") for i in range(5)]
    source = PreferenceSource.from_examples(tokenizer, pairs, 64, seed=0)
    reference = tiny_llama(7)
    cached = cache_reference_logps(source, reference, rows=2)
    assert cached.shape == (5, 2) and cached.dtype == np.float32
    alone = [source.batch([k]) for k in range(5)]  # each pair scored alone, no padding
    for k, batch in enumerate(alone):
        expected = sequence_logps(reference, batch.input_ids, batch.labels)
        assert cached[k, 0] == pytest.approx(expected.item(), abs=1e-4)
    batch = source.next_batch(3)
    order = [next(k for k in range(5) if alone[k].input_ids[0].tolist() == row[:int(n)].tolist())
             for row, n in zip(batch.input_ids, batch.extras["chosen_length"], strict=True)]
    assert batch.extras["ref_chosen_logps"].tolist() == pytest.approx(cached[order, 0].tolist())
    assert batch.extras["ref_rejected_logps"].tolist() == pytest.approx(cached[order, 1].tolist())
    with pytest.raises(PreferenceDataError, match=r"must be \[5, 2\]"):
        source.set_reference_logps(np.zeros((4, 2)))
