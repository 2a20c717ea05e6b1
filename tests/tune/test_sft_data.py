"""SFT batches: assistant-only labels from SmolLM2's real template, truncation, the held-out split,
packing that never lets examples see each other, and a resumable order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.train.objectives import CausalLMObjective
from lmforge.tune.sft_data import (
    PackedSFT,
    SFTDataError,
    SFTExample,
    encode_example,
    encode_examples,
    pack_first_fit,
    split_examples,
)

END = "<|im_end|>"  # SmolLM2's end of turn (ChatML)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def chat(i: int, turns: int = 1, system: bool = False) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": f"You are bot number {i}."}] if system else []
    for t in range(turns):
        messages += [{"role": "user", "content": f"Question {t} of conversation {i}: what is {i} + {t}?"},
                     {"role": "assistant", "content": f"It is {i + t}." + " Indeed." * ((i * 7 + t) % 5)}]
    return messages


def labelled_text(tokenizer, labels) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


# ============================================================================ labels
def test_labels_are_exactly_the_assistant_replies_and_their_end_of_turn(tokenizer):
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "And of Italy? Reply like an assistant would: Rome"},
                {"role": "assistant", "content": "Rome, of course."}]
    ids, labels = encode_example(tokenizer, messages)
    assert len(ids) == len(labels) and labels[-1] == IGNORE_INDEX
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False),
                                   add_bos=False, add_eos=False)
    assert labelled_text(tokenizer, labels) == f"Paris{END}Rome, of course.{END}"
    for t, label in enumerate(labels):  # each label is the next token
        assert label == IGNORE_INDEX or label == ids[t + 1]
    # the first labelled position reads the assistant header and predicts the reply's first token
    first = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(ids[:first + 1]).endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_system_and_user_tokens_are_never_labelled(tokenizer):
    # SmolLM2's template adds its own system prompt when there is none: not learnt either
    for system in (False, True):
        messages = chat(3, turns=3, system=system)
        ids, labels = encode_example(tokenizer, messages)
        replies = "".join(m["content"] + END for m in messages if m["role"] == "assistant")
        assert labelled_text(tokenizer, labels) == replies
        rendered = tokenizer.decode(ids)
        assert ("You are a helpful AI assistant named SmolLM" in rendered) is not system
        assert "Question" not in labelled_text(tokenizer, labels) and "bot number" not in replies


def test_long_examples_are_cut_and_examples_with_nothing_to_learn_dropped(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Short."}]
    long_reply = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two " * 200}]
    fits = chat(1)
    full_reply = encode_example(tokenizer, long_reply)
    examples, truncated, dropped = encode_examples(tokenizer, [long_prompt, long_reply, fits], seq_len=128)
    assert (truncated, dropped) == (2, 1)  # the long prompt is cut before its reply: dropped
    assert len(examples) == 2 and len(examples[0]) == 128
    assert examples[0].ids.tolist() == full_reply[0][:128]  # the start is kept
    assert examples[0].labels.tolist() == full_reply[1][:128]  # the cut-off token is still a real target
    assert examples[1].ids.tolist() == encode_example(tokenizer, fits)[0]


# ============================================================================ split
def test_the_held_out_split_is_stable_and_keeps_duplicates_together():
    conversations = [chat(i) for i in range(1000)]
    train, val = split_examples(conversations, 0.1, seed=0)
    assert len(train) + len(val) == 1000 and 60 < len(val) < 140
    assert split_examples(conversations, 0.1, seed=0) == (train, val)  # a pure function of the text
    assert split_examples(list(reversed(conversations)), 0.1)[1] == list(reversed(val))  # not of the order
    assert split_examples(conversations, 0.1, seed=1)[1] != val
    assert split_examples(conversations + [val[0]], 0.1)[1] == val + [val[0]]  # a repeat cannot leak
    assert split_examples(conversations, 0.0) == (conversations, [])
    # everything drawn for validation: the first one trains instead
    assert split_examples([chat(0)], 0.99999) == ([chat(0)], [])
    with pytest.raises(SFTDataError):
        split_examples(conversations, 1.0)


# ============================================================================ packing
def test_first_fit_puts_each_example_in_the_first_row_with_room():
    assert pack_first_fit([6, 5, 4, 3, 2], range(5), 10) == [[0, 2], [1, 3, 4]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 500).tolist()
    rows = pack_first_fit(lengths, rng.permutation(500).tolist(), 64)
    assert sorted(k for row in rows for k in row) == list(range(500))
    assert all(sum(lengths[k] for k in row) <= 64 for row in rows)
    # first fit: no example could have gone into an earlier row
    free = [64] * len(rows)
    for r, row in enumerate(rows):
        for k in row:
            assert all(free[q] < lengths[k] for q in range(r))
        free[r] -= sum(lengths[k] for k in row)


@pytest.fixture(scope="module")
def source(tokenizer):
    conversations = [chat(i, turns=1 + i % 3, system=i % 4 == 0) for i in range(40)]
    return PackedSFT.from_conversations(tokenizer, conversations, seq_len=256, seed=3)


def segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, stop) of each sequence in a row: where the positions restart."""
    starts = [0] + [t for t in range(1, len(positions)) if positions[t] != positions[t - 1] + 1]
    return list(zip(starts, starts[1:] + [len(positions)], strict=True))


def test_packed_rows_hold_every_example_once_and_pad_without_loss(tokenizer, source):
    stats = source.stats
    assert stats.examples == 40 and (stats.truncated, stats.dropped) == (0, 0)
    epoch = source.next_batch(len(source))  # one epoch: every row once
    source.load_state_dict({**source.state_dict(), "epoch": 0, "index": 0})
    fixed = list(source.first_batches(rows=8, max_batches=100))  # the validation rows: unshuffled
    for batch in (epoch, Batch(*(torch.cat(t) for t in zip(*((b.input_ids, b.labels, b.positions)
                                                                for b in fixed), strict=True)))):
        assert batch.input_ids.shape[1] == 256 and batch.positions is not None
        assert int(batch.loss_tokens()) == stats.assistant_tokens
    assert epoch.rows == stats.rows and len(fixed) == 3
    batch, seen = epoch, []
    for ids, labels, positions in zip(batch.input_ids, batch.labels, batch.positions, strict=True):
        for start, stop in segments(positions):
            piece = ids[start:stop].tolist()
            if tokenizer.decode(piece[:1]) == "<|im_start|>":
                seen.append(piece)
            else:  # padding: the pad id, no loss
                assert stop == 256 and set(piece) == {tokenizer.pad_token_id}
                assert (labels[start:stop] == IGNORE_INDEX).all()
    assert sorted(seen) == sorted(e.ids.tolist() for e in source.examples)
    assert stats.tokens / (stats.rows * 256) == stats.efficiency > 0.8
    line = stats.describe()
    assert line.startswith("40 examples, ") and "packing efficiency" in line and "\n" not in line


def test_packed_examples_score_exactly_as_when_run_alone(tokenizer, source):
    """Per-example loss in a packed row equals the loss of that example alone: no attention across."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2,
                                    d_ff=64, max_seq_len=256, position="rope", norm="rmsnorm",
                                    mlp="swiglu")).eval()
    examples = {tuple(e.ids.tolist()): e for e in source.examples}
    batch = next(source.first_batches(4, 1))
    with torch.no_grad():
        logits = model(batch.input_ids, batch.positions).logits
        total, compared = torch.zeros(()), 0
        for r in range(4):
            for start, stop in segments(batch.positions[r]):
                example = examples.get(tuple(batch.input_ids[r, start:stop].tolist()))
                if example is None:  # the padding
                    continue
                ids, labels = torch.from_numpy(example.ids)[None], torch.from_numpy(example.labels)
                alone = F.cross_entropy(model(ids).logits[0], labels, ignore_index=IGNORE_INDEX,
                                        reduction="sum")
                packed = F.cross_entropy(logits[r, start:stop], batch.labels[r, start:stop],
                                         ignore_index=IGNORE_INDEX, reduction="sum")
                torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
                total, compared = total + alone, compared + 1
        assert compared >= 8  # several examples in each row
        # the batch's loss is the mean over the labelled tokens of its examples, each as if alone
        loss, _ = CausalLMObjective().loss(model, batch)
        torch.testing.assert_close(loss, total / batch.loss_tokens(), rtol=1e-4, atol=1e-5)


def test_without_packing_each_row_is_one_padded_example(tokenizer):
    conversations = [chat(i) for i in range(6)]
    source = PackedSFT.from_conversations(tokenizer, conversations, seq_len=96, pack=False, shuffle=False)
    batch = source.next_batch(6)
    assert batch.positions is None and batch.input_ids.shape == (6, 96)
    for i, row in enumerate(batch.input_ids):
        ids = encode_example(tokenizer, conversations[i])[0]
        assert row[:len(ids)].tolist() == ids and set(row[len(ids):].tolist()) == {tokenizer.pad_token_id}
    assert source.stats.rows == 6


# ============================================================================ order and resume
def _draws(source: PackedSFT, n: int, rows: int = 3) -> list[torch.Tensor]:
    batches = [source.next_batch(rows) for _ in range(n)]
    return [torch.stack([b.input_ids, b.labels, b.positions]) for b in batches]


def test_a_resumed_source_draws_exactly_the_same_batches(tokenizer):
    conversations = [chat(i, turns=1 + i % 3) for i in range(30)]

    def fresh(seed: int = 5) -> PackedSFT:
        return PackedSFT.from_conversations(tokenizer, conversations, seq_len=192, seed=seed)

    first = fresh()
    per_epoch = len(first)
    before = _draws(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores: plain JSON
    after = _draws(first, per_epoch)  # runs past the end of the epoch into the next
    assert first.epoch >= 1
    resumed = fresh()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, _draws(resumed, per_epoch), strict=True))
    # the whole order is a pure function of the seed; each epoch is shuffled anew
    again = _draws(fresh(), 4 + per_epoch)
    assert all(torch.equal(a, b) for a, b in zip(before + after, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, _draws(fresh(seed=6), 4), strict=True))
    epoch0, epoch1 = fresh()._rows_for(0), fresh()._rows_for(1)
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))
    # a position from other data is refused
    other = PackedSFT.from_conversations(tokenizer, conversations[:-1], seq_len=192, seed=5)
    with pytest.raises(SFTDataError, match="other SFT data"):
        other.load_state_dict(state)
    with pytest.raises(SFTDataError, match="seq_len 192 -> 256"):
        PackedSFT.from_conversations(tokenizer, conversations, seq_len=256, seed=5).load_state_dict(state)


def test_validation_batches_are_fixed_and_do_not_move_the_position(tokenizer, source):
    state = source.state_dict()
    one = [torch.stack([b.input_ids, b.labels]) for b in source.first_batches(2, 3)]
    two = [torch.stack([b.input_ids, b.labels]) for b in source.first_batches(2, 3)]
    assert len(one) == 3 and all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert source.state_dict() == state
    # no shuffling: the first row starts with the first example
    assert one[0][0, 0, :len(source.examples[0])].tolist() == source.examples[0].ids.tolist()
    everything = list(source.first_batches(4, 1000))
    unshuffled = pack_first_fit([len(e) for e in source.examples], range(len(source.examples)), 256)
    assert sum(b.rows for b in everything) == len(unshuffled)  # a short last batch, nothing repeated


def test_nothing_to_train_on_is_a_clear_error(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Short."}]
    why = r"^no SFT example to train on \(1 dropped: no reply in the first 64 tokens\)$"
    with pytest.raises(SFTDataError, match=why):
        PackedSFT.from_conversations(tokenizer, [long_prompt], seq_len=64)
    with pytest.raises(SFTDataError, match="longer than seq_len"):
        PackedSFT([SFTExample(np.zeros(9, np.int64), np.zeros(9, np.int64))], seq_len=8, pad_id=0)


def test_sft_batches_train_through_the_trainer(tokenizer, tmp_path):
    from lmforge.train.optim import OptimConfig, build_optimizer
    from lmforge.train.trainer import TrainConfig, Trainer

    conversations = [chat(i % 4) for i in range(40)]  # four conversations, repeated: learnable
    train, val = split_examples(conversations, 0.3, seed=0)
    data = PackedSFT.from_conversations(tokenizer, train, seq_len=64, seed=0)
    val_data = PackedSFT.from_conversations(tokenizer, val, seq_len=64, shuffle=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                    d_ff=32, max_seq_len=64, position="rope", norm="rmsnorm", mlp="swiglu"))
    config = TrainConfig(steps=8, batch_tokens=2 * 64, micro_batch=2, seq_len=64, eval_interval=8,
                         eval_batches=1, checkpoint_interval=8, log_interval=100, device="cpu")
    trainer = Trainer(model, CausalLMObjective(), build_optimizer(model, OptimConfig(lr=3e-2)),
                      lambda step: 1.0, data, config, tmp_path, val_data=val_data, quiet=True)
    summary = trainer.fit()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert summary["val_loss"] < first - 1  # it learns the replies, scored on held-out rows
    state_file = tmp_path / "checkpoints" / "step-000008" / "trainer_state" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["data"] == data.state_dict() and state["data"]["index"] + state["data"]["epoch"] > 0
