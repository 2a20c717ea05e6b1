"""`Batch`: loss masks and packed rows, and a masked dataset through the same loop as pretraining."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.train.objectives import CausalLMObjective
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.parallel.data import DataParallel
from lmforge.train.trainer import TrainConfig, Trainer

VOCAB = 32


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                   max_seq_len=64, position="rope", norm="rmsnorm", mlp="swiglu"))


def test_windows_become_inputs_and_shifted_labels():
    windows = torch.arange(10).reshape(2, 5)
    batch = Batch.from_windows(windows)
    assert batch.input_ids.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert batch.labels.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
    assert int(batch.loss_tokens()) == 8
    assert batch.slice(1, 2).input_ids.tolist() == [[5, 6, 7, 8]]
    with pytest.raises(ValueError, match="one shape"):
        Batch(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_masked_positions_take_no_loss_and_no_gradient():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = torch.randint(0, VOCAB, (2, 12))
    labels[:, :7] = IGNORE_INDEX  # the "prompt": no loss there
    batch = Batch(ids, labels)
    loss, metrics = CausalLMObjective().loss(model, batch)
    logits = model(ids).logits
    want = F.cross_entropy(logits[:, 7:].reshape(-1, VOCAB), labels[:, 7:].reshape(-1))
    torch.testing.assert_close(loss, want)
    # the loss does not depend on the logits at masked positions
    logits = model(ids).logits.detach().requires_grad_(True)
    from lmforge.train.objectives import next_token_loss

    next_token_loss(logits, labels).backward()
    assert logits.grad[:, :7].abs().max() == 0 and logits.grad[:, 7:].abs().max() > 0
    # a batch with no labelled position is a zero loss, not NaN
    empty = Batch(ids, torch.full_like(labels, IGNORE_INDEX))
    assert float(CausalLMObjective().loss(model, empty)[0].detach()) == 0.0


def test_packed_examples_do_not_see_each_other():
    """Two examples packed into one row (positions restart) score exactly as when run alone."""
    model = _model()
    a, b = torch.randint(0, VOCAB, (1, 7)), torch.randint(0, VOCAB, (1, 5))
    alone = [CausalLMObjective().loss(model, Batch.from_windows(x))[0] for x in (a, b)]
    ids = torch.cat([a[:, :-1], b[:, :-1]], dim=1)
    labels = torch.cat([a[:, 1:], b[:, 1:]], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(4)]).unsqueeze(0)
    packed, _ = CausalLMObjective().loss(model, Batch(ids, labels, positions))
    want = (alone[0] * 6 + alone[1] * 4) / 10  # the mean over all ten labelled positions
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-6)


class EchoTask:
    """Rows of random tokens; only the last four positions are labelled, each with its own input token.

    A `BatchSource` that is not token windows: the loss mask hides the "prompt".
    """

    def __init__(self, seed: int, length: int = 10) -> None:
        self.seed, self.length, self.drawn = seed, length, 0

    def _rows(self, start: int, rows: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        ids = torch.randint(0, VOCAB, (rows, self.length), generator=g)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -4:] = ids[:, -4:]
        return Batch(ids, labels)

    def next_batch(self, rows: int) -> Batch:
        batch = self._rows(self.drawn, rows)
        self.drawn += rows
        return batch

    def first_batches(self, rows: int, max_batches: int) -> Iterator[Batch]:
        for i in range(max_batches):
            yield self._rows(10**9 + i * rows, rows)

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = int(state["drawn"])


def test_a_masked_dataset_trains_through_the_pretraining_loop(tmp_path):
    model = _model()
    config = TrainConfig(steps=60, batch_tokens=16 * 10, micro_batch=8, seq_len=10, eval_interval=30,
                         eval_batches=2, checkpoint_interval=30, log_interval=100, device="cpu")
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3))
    trainer = Trainer(model, CausalLMObjective(), optimizer, lambda step: 1.0, EchoTask(1), config,
                      tmp_path, val_data=EchoTask(2), quiet=True)
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] > 2.5  # near ln 32 = 3.47: a guess among the vocabulary
    assert summary["val_loss"] < 0.5  # learnt to echo, on rows it never trained on
    state_file = tmp_path / "checkpoints" / "step-000060" / "trainer_state" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["data"] == {"drawn": 60 * 16}  # the source's own position is what resumes


def test_data_parallel_ranks_split_a_masked_packed_batch():
    ids = torch.arange(24).reshape(4, 6)
    positions = torch.tensor([0, 1, 2, 0, 1, 2]).repeat(4, 1)
    batch = Batch(ids, ids.clone(), positions)
    shares = []
    for rank in range(2):
        dp = DataParallel(torch.device("cpu"), rank, 2)

        class Source:
            def next_batch(self, rows: int) -> Batch:
                return batch

        shares.append(dp.rank_batches(Source()).next_batch(2))  # type: ignore[arg-type]
    assert torch.equal(torch.cat([s.input_ids for s in shares]), ids)
    assert torch.equal(torch.cat([s.positions for s in shares]), positions)


def test_the_head_only_where_labelled_gives_the_same_loss_and_gradients():
    """SFT's objective skips the LM head on unlabelled positions: same loss, same gradients."""
    ids = torch.randint(0, VOCAB, (3, 12))
    labels = torch.randint(0, VOCAB, (3, 12))
    labels[:, :7] = IGNORE_INDEX
    labels[1, 9] = IGNORE_INDEX
    grads = []
    for only_labelled in (False, True):
        model = _model()
        loss, _ = CausalLMObjective(only_labelled=only_labelled).loss(model, Batch(ids, labels))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (full_loss, full_grads), (head_loss, head_grads) = grads
    torch.testing.assert_close(head_loss, full_loss)
    for a, b in zip(full_grads, head_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
