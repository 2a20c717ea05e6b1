"""The reward model: Bradley-Terry as trl computes it, scores transformers reproduces from the saved
folder, a preference learnt through the one `Trainer` and judged on pairs it never saw.

`tokenizer` is conftest's byte-level tokenizer (EOS, no pad token)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from lmforge.align.reward import (
    RewardModel,
    RewardModelError,
    RewardModelStore,
    RewardObjective,
    bradley_terry_loss,
    load_reward_model,
    reward_accuracy,
    save_reward_model,
    score_texts,
)
from lmforge.model.checkpoint import save_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.trainer import TrainConfig, Trainer

PAD = 0
TINY_LLAMA = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                  position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False,
                  mlp_bias=False, norm_bias=False, tie_embeddings=False)
TINY_GPT2 = dict(d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)  # the defaults are GPT-2's


def tiny_model(family: str = "llama", vocab: int = 96, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    sizes = TINY_LLAMA if family == "llama" else TINY_GPT2
    return Transformer(ModelConfig(vocab_size=vocab, **sizes)).eval()


# ---------------------------------------------------------------------------------- pair batches
Pair = tuple[list[int], list[int], list[int]]  # prompt, chosen completion, rejected completion


def pair_batch(pairs: list[Pair], margins: list[float] | None = None) -> Batch:
    """Pairs -> a `Batch` by the pair-batch convention (both sides right-padded with PAD to one T)."""
    width = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)

    def side(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.full((len(pairs), width), PAD)
        labels = torch.full((len(pairs), width), IGNORE_INDEX)
        for i, (prompt, *completions) in enumerate(pairs):
            seq = prompt + completions[k]
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(completions[k])
        return ids, labels, torch.tensor([len(p) + len(x[k]) for p, *x in pairs])

    chosen, chosen_labels, chosen_length = side(0)
    rejected, rejected_labels, rejected_length = side(1)
    extras = {"rejected_ids": rejected, "rejected_labels": rejected_labels, "chosen_length": chosen_length,
              "rejected_length": rejected_length}
    if margins is not None:
        extras["margin"] = torch.tensor(margins)
    return Batch(chosen, chosen_labels, extras=extras)


class PairSource:
    """A `BatchSource` over a fixed list of pairs: cycles through them; a resumable position."""

    def __init__(self, pairs: list[Pair]) -> None:
        self.pairs, self.position = pairs, 0

    def next_batch(self, rows: int) -> Batch:
        picked = [self.pairs[(self.position + i) % len(self.pairs)] for i in range(rows)]
        self.position += rows
        return pair_batch(picked)

    def first_batches(self, rows: int, max_batches: int):
        for begin in range(0, min(len(self.pairs), rows * max_batches), rows):
            yield pair_batch(self.pairs[begin:begin + rows])

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def random_pairs(n: int, vocab: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    words = range(1, vocab)  # never PAD: transformers finds a row's end by the first pad from the right

    def draw(low: int, high: int) -> list[int]:
        return [rng.choice(words) for _ in range(rng.randint(low, high))]

    return [(draw(2, 6), draw(1, 7), draw(1, 7)) for _ in range(n)]


def sorted_preference(n: int, seed: int, vocab: int = 64) -> list[Pair]:
    """Chosen completions are four tokens in ascending order; rejected ones the same tokens out of order
    (the same bag of tokens: only their order tells the two apart)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.sample(range(4, vocab), 6)
        chosen = sorted(rng.sample(range(4, vocab), 4))
        rejected = list(chosen)
        while rejected == chosen:
            rng.shuffle(rejected)
        out.append((prompt, chosen, rejected))
    return out


# ---------------------------------------------------------------------------------- the loss itself
def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    by_hand = -sum(math.log(1 / (1 + math.exp(-d))) for d in (2.0, -2.0, 0.0)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(by_hand, abs=1e-6)
    margin = torch.tensor([1.0, 0.0, -1.0])
    with_margin = -sum(math.log(1 / (1 + math.exp(-d))) for d in (1.0, -2.0, 1.0)) / 3
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(with_margin, abs=1e-6)
    centred = by_hand + 0.1 * (2.0**2 + 0.0**2 + 1.0**2) / 3
    assert bradley_terry_loss(chosen, rejected, None, 0.1).item() == pytest.approx(centred, abs=1e-6)
    # a pair ranked wrongly by a huge gap: a large finite loss, not inf
    assert math.isfinite(bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0])).item())


def test_a_row_is_scored_at_its_last_real_token_whatever_the_padding():
    model = RewardModel(tiny_model(), head_std=1.0)
    ids = torch.randint(1, 96, (1, 9))
    alone = model(ids, torch.tensor([9]))
    padded = torch.cat([ids, torch.full((1, 5), 7)], dim=1)  # any padding token: it is never attended to
    assert torch.allclose(model(padded, torch.tensor([9])), alone, atol=1e-6)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] % 95) + 1
    assert not torch.allclose(model(changed, torch.tensor([9])), alone)  # the last real token counts
    with pytest.raises(RewardModelError, match="1..9"):
        model(ids, torch.tensor([0]))


def test_the_backbone_keeps_the_base_weights_and_drops_only_the_lm_head():
    base = tiny_model()
    model = RewardModel(base)
    ids = torch.randint(1, 96, (2, 7))
    hidden = model.backbone(ids).logits  # final normed hidden states
    assert torch.allclose(base.lm_head(hidden), base(ids).logits, atol=1e-5)
    assert "lm_head.weight" not in model.backbone.state_dict()
    assert model.score.weight.std().item() < 0.05  # the head starts small: rewards near 0, loss near ln 2
    assert bradley_terry_loss(*model(torch.cat([ids, ids]), torch.tensor([7, 5, 3, 7])).chunk(2)).item() \
        == pytest.approx(math.log(2), abs=0.05)


# ---------------------------------------------------------------------------------- parity with trl
def _hf_tokenizer(vocab: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<1>"))
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token=f"<{PAD}>", eos_token="<2>")


@pytest.mark.parametrize("with_margin,center", [(False, None), (True, None), (False, 0.05), (True, 0.2)])
def test_loss_and_gradients_equal_trl_reward_trainer(tmp_path, with_margin, center):
    """trl's `RewardTrainer.compute_loss` on a transformers `LlamaForSequenceClassification`, our
    objective on the same weights (saved by transformers, loaded by lmforge) and the same pairs."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, num_labels=1, pad_token_id=PAD)
    hf = transformers.LlamaForSequenceClassification(config)
    with torch.no_grad():
        hf.score.weight.normal_(std=1.0)  # rewards of order 1, so margins and centring matter
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_reward_model(tmp_path / "hf")

    pairs = random_pairs(6, 96, seed=1)
    margins = [0.0, 0.5, 1.0, -0.3, 2.0, 0.25]
    rows = {"chosen_ids": [p + c for p, c, _ in pairs], "rejected_ids": [p + r for p, _, r in pairs]}
    if with_margin:
        rows["margin"] = margins
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                            center_rewards_coefficient=center, per_device_train_batch_size=6,
                            save_strategy="no")
    trainer = trl.RewardTrainer(model=hf, args=args, train_dataset=datasets.Dataset.from_dict(rows),
                                processing_class=_hf_tokenizer(96))
    hf.eval()
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    theirs = trainer.compute_loss(hf, inputs)
    theirs.backward()

    ours.eval()
    batch = pair_batch(pairs, margins if with_margin else None)
    loss, metrics = RewardObjective(center_rewards_coefficient=center).loss(ours, batch)
    loss.backward()
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert abs(loss.item() - math.log(2)) > 0.05  # rewards differ: the comparison has teeth
    logged = trainer._metrics["eval"]
    assert metrics["accuracy"].item() == pytest.approx(logged["accuracy"][-1], abs=1e-6)
    assert metrics["margin"].item() == pytest.approx(logged["margin"][-1], abs=1e-5)
    torch.testing.assert_close(ours.score.weight.grad, hf.score.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.backbone.embed.weight.grad, hf.model.embed_tokens.weight.grad,
                               atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- the folder
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformers_reproduces_the_saved_reward_model(tmp_path, tokenizer, family):
    transformers = pytest.importorskip("transformers")
    model = RewardModel(tiny_model(family, vocab=tokenizer.vocab_size), head_std=1.0).eval()
    folder = save_reward_model(tmp_path / "rm", model, tokenizer=tokenizer)

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForSequenceClassification",
                                        "gpt2": "GPT2ForSequenceClassification"}[family]]
    assert config["num_labels"] == 1 and config["pad_token_id"] == tokenizer.eos_token_id  # no pad: EOS pads
    assert (folder / "tokenizer.json").is_file() and not list(tmp_path.glob(".rm*"))  # no staging left behind
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    prefix = "model." if family == "llama" else "transformer."
    assert "score.weight" in names and all(n == "score.weight" or n.startswith(prefix) for n in names)

    texts = ["the cat sat", "on the mat with 12 apples and 84 pears", "said the dog"]
    rows = [tokenizer.encode(t) for t in texts]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), config["pad_token_id"])
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        ours = model(ids, lengths)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert ours.std() > 0.1  # distinct scores, not all ~0

    loaded, loaded_tokenizer = load_reward_model(folder)
    with torch.no_grad():
        assert torch.equal(loaded(ids, lengths), ours)
    assert loaded_tokenizer.encode(texts[1]) == rows[1]
    scored = score_texts(loaded, loaded_tokenizer, texts, [""] * 3)  # other padding widths: not bit-equal
    assert scored == pytest.approx(ours.tolist(), rel=1e-5, abs=1e-5)


def test_a_base_checkpoint_becomes_a_reward_model_with_a_fresh_head(tmp_path, tokenizer):
    base = tiny_model(vocab=tokenizer.vocab_size)
    save_checkpoint(tmp_path / "sft", base, tokenizer=tokenizer)
    model, loaded_tokenizer = load_reward_model(tmp_path / "sft")
    assert model.pad_token_id == tokenizer.eos_token_id
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size
    for name, tensor in base.state_dict().items():
        if not name.startswith("lm_head."):
            assert torch.equal(model.backbone.state_dict()[name], tensor), name


def test_bad_inputs_fail_with_a_sentence(tmp_path):
    model = RewardModel(tiny_model())
    batch = pair_batch(random_pairs(2, 96, seed=0))
    del batch.extras["rejected_length"]
    with pytest.raises(RewardModelError, match="missing: rejected_length"):
        RewardObjective().loss(model, batch)
    alibi = Transformer(ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16,
                                    position="alibi"))
    with pytest.raises(RewardModelError, match="ForSequenceClassification"):
        save_reward_model(tmp_path / "alibi", RewardModel(alibi), pad_token_id=0)
    with pytest.raises(RewardModelError, match="no pad token id"):
        save_reward_model(tmp_path / "nopad", model)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(RewardModelError, match="refusing to replace"):
        save_reward_model(tmp_path / "notes", model, pad_token_id=0)


# ---------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("seed", [0, 1])
def test_the_trainer_learns_a_preference_that_holds_on_unseen_pairs(tmp_path, seed):
    torch.set_num_threads(1)
    train, held_out = sorted_preference(2000, seed), sorted_preference(256, seed + 100)
    assert not {tuple(p + c) for p, c, _ in train} & {tuple(p + c) for p, c, _ in held_out}
    torch.manual_seed(seed)
    model = RewardModel(tiny_model(vocab=64, seed=seed), pad_token_id=PAD)
    before = reward_accuracy(model, PairSource(held_out))
    config = TrainConfig(steps=250, batch_tokens=16 * 16, micro_batch=16, seq_len=16, eval_interval=0,
                         checkpoint_interval=0, log_interval=50, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    trainer = Trainer(model, RewardObjective(), optimizer, lambda step: 1.0, PairSource(train), config,
                      tmp_path / "run", quiet=True, model_store=RewardModelStore(PAD))
    summary = trainer.fit()
    after = reward_accuracy(model, PairSource(held_out))
    assert after > 0.85 and after > before + 0.2, (before, after)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= set(records[-1])
    assert records[-1]["margin"] > records[0]["margin"] + 1.0
    # the run's checkpoint is a classifier folder holding exactly the trained model
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert summary["steps"] == 250 and checkpoint is not None
    reloaded, _ = load_reward_model(checkpoint)
    assert reward_accuracy(reloaded, PairSource(held_out)) == after


def test_score_texts_batches_in_any_order_and_matches_one_at_a_time(tokenizer):
    model = RewardModel(tiny_model(vocab=tokenizer.vocab_size), head_std=1.0,
                        pad_token_id=tokenizer.eos_token_id)
    prompts = ["the cat", "the dog said", "with 3 apples", "on the mat"]
    completions = [" sat on the mat", " 7 pears", "", " and 21 pears, said the cat"]
    batched = score_texts(model, tokenizer, prompts, completions, batch_size=3)
    for prompt, completion, score in zip(prompts, completions, batched):
        ids = tokenizer.encode(prompt) + tokenizer.encode(completion, add_bos=False, add_eos=False)
        with torch.no_grad():
            alone = model(torch.tensor([ids]), torch.tensor([len(ids)])).item()
        assert score == pytest.approx(alone, abs=1e-5)
    assert len(set(batched)) == 4 and model.training
    with pytest.raises(RewardModelError, match="2 prompts but 1 completions"):
        score_texts(model, tokenizer, prompts[:2], completions[:1])


def test_accumulated_micro_batches_give_the_whole_batch_loss():
    """The Trainer averages micro-batch losses: with equal micro-batches that is the whole batch's mean."""
    model = RewardModel(tiny_model(), head_std=1.0)
    pairs = random_pairs(8, 96, seed=3)
    objective = RewardObjective(center_rewards_coefficient=0.01)
    whole, _ = objective.loss(model, pair_batch(pairs))
    halves = [objective.loss(model, pair_batch(pairs[i:i + 4]))[0] for i in (0, 4)]
    assert whole.item() == pytest.approx((halves[0] + halves[1]).item() / 2, abs=1e-5)


def test_saved_folder_is_what_lmforge_and_the_store_read(tmp_path):
    """A checkpoint written by the store reads back as the model's own state dict."""
    model = RewardModel(tiny_model(), head_std=1.0)
    store = RewardModelStore(PAD)
    (tmp_path / "ckpt").mkdir()
    store.write(tmp_path / "ckpt", model.state_dict(), model.config, None, 7)
    state = store.read(Path(tmp_path / "ckpt"), model.config)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["lmforge"]["step"] == 7


def _reward_trainer(model: RewardModel, pairs: list[Pair], run: Path, steps: int) -> Trainer:
    config = TrainConfig(steps=steps, batch_tokens=8 * 16, micro_batch=4, seq_len=16, eval_interval=0,
                         checkpoint_interval=10, log_interval=10, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return Trainer(model, RewardObjective(center_rewards_coefficient=0.01), optimizer, lambda step: 1.0,
                   PairSource(pairs), config, run, quiet=True, model_store=RewardModelStore(PAD))


def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path):
    """Two micro-batches a step; resumed at step 10, a run ends with the weights of one never stopped."""
    pairs = sorted_preference(200, seed=5)
    straight = RewardModel(tiny_model(vocab=64, seed=5), pad_token_id=PAD)
    _reward_trainer(straight, pairs, tmp_path / "straight", 20).fit()
    resumed = RewardModel(tiny_model(vocab=64, seed=6), pad_token_id=PAD)  # other weights: all must come back
    trainer = _reward_trainer(resumed, pairs, tmp_path / "resumed", 20)
    trainer.resume(tmp_path / "straight" / "checkpoints" / "step-000010")
    assert trainer.step == 10
    trainer.fit()
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
