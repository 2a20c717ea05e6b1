"""The DPO family: ln 2 at the first step, sequence log-probs, every loss against trl on the same tiny Llama
(same weights, same tokens, same beta), the formulas trl cannot express on hand-computed numbers, and
DPO training that raises held-out reward accuracy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.align.conftest import byte_tokenizer, save_hf_folder, tiny_llama

from lmforge.align.dpo import (
    KTOObjective,
    PreferenceObjective,
    dpo_losses,
    kto_losses,
    orpo_log_odds,
    preference_metrics,
    sequence_logps,
    simpo_losses,
)
from lmforge.align.preferences import (
    LabelledCompletion,
    PreferencePair,
    PreferenceSource,
    cache_reference_logps,
    split_preferences,
)
from lmforge.train.batch import IGNORE_INDEX

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")
PAIRS = [{"prompt": f"Question {i}: is {i} even?", "chosen": " yes" if i % 2 == 0 else " no, it is odd",
          "rejected": " no" if i % 2 == 0 else " yes, it is even" + "!" * (i % 3)} for i in range(6)]


CHAT_PAIRS = [{"prompt": [{"role": "system", "content": "Answer yes or no."},
                          {"role": "user", "content": row["prompt"]}],
               "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
               "rejected": [{"role": "assistant", "content": row["rejected"].strip()}]} for row in PAIRS]


def pairs(rows: list[dict] = PAIRS) -> list[PreferencePair]:
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


# ============================================================================ first principles
def test_sigmoid_loss_is_ln2_when_the_policy_is_the_reference(tokenizer):
    model = tiny_llama(0)
    source = PreferenceSource.from_examples(tokenizer, pairs(), 128, seed=0)
    cache_reference_logps(source, model, rows=4)  # other rows per batch than training: the sums must not care
    loss, metrics = PreferenceObjective(beta=0.1).loss(model, source.next_batch(3))
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/margins"] == 0
    # and with the reference run live instead of cached
    live = PreferenceObjective(beta=0.5, ref_model=tiny_llama(0)).loss(model, source.batch([0, 1]))[0]
    assert abs(live.item() - math.log(2)) < 1e-6


def test_sequence_logps_equals_the_sum_over_a_full_softmax(tokenizer):
    model = tiny_llama(3)
    batch = PreferenceSource.from_examples(tokenizer, pairs(), 128, shuffle=False).batch([0, 1, 2])
    logits = model(batch.input_ids).logits.log_softmax(-1)
    mask = batch.labels != IGNORE_INDEX
    expected = (logits.gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(1)
    ours = sequence_logps(model, batch.input_ids, batch.labels)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # the completion only: the chosen side's labelled tokens are exactly the completion plus EOS
    text = tokenizer.decode(batch.labels[0][mask[0]].tolist())
    assert text == PAIRS[0]["chosen"] + "<|endoftext|>"


def test_losses_on_hand_computed_numbers():
    c, r = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])  # log-ratios; d = 2, -2
    beta, eps = 0.5, 0.2
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731 (log sigmoid)
    sig = dpo_losses(c, r, beta=beta)
    assert sig.tolist() == pytest.approx([-ls(1.0), -ls(-1.0)], abs=1e-6)
    cdpo = dpo_losses(c, r, beta=beta, label_smoothing=eps)
    expected = [-0.8 * ls(1) - 0.2 * ls(-1), -0.8 * ls(-1) - 0.2 * ls(1)]
    assert cdpo.tolist() == pytest.approx(expected, abs=1e-6)
    robust = dpo_losses(c, r, loss="robust", beta=beta, label_smoothing=eps)
    assert robust.tolist() == pytest.approx([(-0.8 * ls(1) + 0.2 * ls(-1)) / 0.6,
                                             (-0.8 * ls(-1) + 0.2 * ls(1)) / 0.6], abs=1e-6)
    ipo = dpo_losses(c, r, loss="ipo", beta=beta, chosen_tokens=torch.tensor([2, 1]),
                     rejected_tokens=torch.tensor([4, 2]))
    assert ipo.tolist() == pytest.approx([(1.0 - 0 - 1) ** 2, (-1.0 - 0.5 - 1) ** 2], abs=1e-6)
    simpo = simpo_losses(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=0.5)
    assert simpo.item() == pytest.approx(-ls(2.0 * 1.0 - 0.5), abs=1e-6)
    p_w, p_l = 0.5, 0.25  # per-token average probabilities: odds 1 and 1/3
    log_odds = orpo_log_odds(torch.tensor([math.log(p_w)]), torch.tensor([math.log(p_l)]))
    assert log_odds.item() == pytest.approx(math.log(1 / (1 / 3)), abs=1e-6)
    kto = kto_losses(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), torch.tensor(0.5), beta=2.0,
                     undesirable_weight=3.0)
    assert kto.tolist() == pytest.approx([1 - 1 / (1 + math.exp(-1.0)), 3 * (1 - 1 / (1 + math.exp(1.0)))])


# ============================================================================ parity with trl
@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' LlamaForCausalLM and tokenizer for the policy (seed 0) and reference (seed 1) weights."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    folders = {name: save_hf_folder(tiny_llama(seed), root / name)
               for name, seed in (("policy", 0), ("ref", 1))}

    def load(name: str):
        return transformers.AutoModelForCausalLM.from_pretrained(folders[name])

    return load, transformers.AutoTokenizer.from_pretrained(folders["policy"]), root


def _trl_args(config_class, root, **kwargs):
    """fp32 throughout (transformers turns bf16 on by default where the CPU has it); one batch of all rows."""
    return config_class(output_dir=str(root / "trl"), per_device_train_batch_size=len(PAIRS), report_to=[],
                        use_cpu=True, bf16=False, seed=0, save_strategy="no", dataloader_num_workers=0,
                        **kwargs)


def _unpadded(ids: torch.Tensor, attention: torch.Tensor) -> list[tuple[int, ...]]:
    return sorted(tuple(row[mask.bool()].tolist()) for row, mask in zip(ids, attention, strict=True))


def _ours_unpadded(ids: torch.Tensor, lengths: torch.Tensor) -> list[tuple[int, ...]]:
    return sorted(tuple(row[:n].tolist()) for row, n in zip(ids, lengths.tolist(), strict=True))


@pytest.mark.parametrize(("loss_type", "label_smoothing", "rows"), [
    ("sigmoid", 0.0, PAIRS), ("ipo", 0.0, PAIRS), ("robust", 0.1, PAIRS),
    ("sigmoid", 0.0, CHAT_PAIRS),  # rendered by the chat template, by trl and by us
], ids=["sigmoid", "ipo", "robust", "sigmoid-chat"])
def test_dpo_losses_equal_trls_dpo_trainer(hf, tokenizer, loss_type, label_smoothing, rows):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    load, hf_tokenizer, root = hf
    beta = 0.3
    args = _trl_args(trl.DPOConfig, root, max_length=None, beta=beta, loss_type=[loss_type],
                     label_smoothing=label_smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(load("policy"), ref_model=load("ref"), args=args,
                                 processing_class=hf_tokenizer,
                                 train_dataset=datasets.Dataset.from_list(rows))
    trl_batch = next(iter(trainer.get_train_dataloader()))  # trl's own tokenization and collation
    trainer.model.train()  # trl files metrics by the model's mode (dropout is off in both)
    trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    source = PreferenceSource.from_examples(tokenizer, pairs(rows), 1024, shuffle=False)
    cache_reference_logps(source, tiny_llama(1))
    batch = source.batch(range(len(PAIRS)))
    # the same token sequences went in (trl's batch is [chosen; rejected], in its sampler's order)
    n = len(PAIRS)
    assert _unpadded(trl_batch["input_ids"][:n], trl_batch["attention_mask"][:n]) == \
        _ours_unpadded(batch.input_ids, batch.extras["chosen_length"])
    assert _unpadded(trl_batch["input_ids"][n:], trl_batch["attention_mask"][n:]) == \
        _ours_unpadded(batch.extras["rejected_ids"], batch.extras["rejected_length"])
    objective = PreferenceObjective(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing)
    loss, metrics = objective.loss(tiny_llama(0), batch)
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    for key in REWARD_KEYS:
        assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key
    assert abs(metrics["rewards/margins"]) > 0.01  # the reference (seed 1) is not the policy (seed 0)


def test_cdpo_equals_trls_label_smoothed_sigmoid_formula(hf):
    """trl 1.16's DPO `sigmoid` ignores label_smoothing; the cDPO formula lives in CPO's `sigmoid`, a function
    of its two inputs' difference: fed the DPO log-ratios it is cDPO with a reference."""
    cpo = pytest.importorskip("trl.experimental.cpo")
    chosen, rejected = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([0.1, 0.4, -0.5])
    trainer = _cpo_like(cpo.CPOTrainer, beta=0.7, label_smoothing=0.15, loss_type="sigmoid")
    trl_losses, *_ = cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)
    ours = dpo_losses(chosen, rejected, beta=0.7, label_smoothing=0.15)
    torch.testing.assert_close(ours, trl_losses, atol=1e-6, rtol=0)


def _cpo_like(cls, **attributes):
    """An object with just the attributes trl's `cpo_loss` reads (its method is called unbound)."""

    class Accelerator:
        device = torch.device("cpu")

    holder = type("Holder", (), {})()
    holder.__dict__.update(dict(alpha=0.0, simpo_gamma=0.5, accelerator=Accelerator()) | attributes)
    return holder


def _trl_pair_batch(batch) -> dict[str, torch.Tensor]:
    """Our pair batch in CPO/ORPO's layout: unshifted labels, -100 on the prompt and padding."""
    out = {}
    e = batch.extras
    sides = (("chosen", batch.input_ids, batch.labels, e["chosen_length"]),
             ("rejected", e["rejected_ids"], e["rejected_labels"], e["rejected_length"]))
    for side, ids, labels, lengths in sides:
        trl_labels = torch.full_like(labels, IGNORE_INDEX)
        trl_labels[:, 1:] = labels[:, :-1]
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = (torch.arange(ids.shape[1]) < lengths.unsqueeze(1)).long()
        out[f"{side}_labels"] = trl_labels
    return out


def _reference_free_trainer(kind: str, hf, **config):
    experimental = pytest.importorskip(f"trl.experimental.{kind}")
    datasets = pytest.importorskip("datasets")
    load, hf_tokenizer, root = hf
    config_class = getattr(experimental, f"{kind.upper()}Config")
    trainer_class = getattr(experimental, f"{kind.upper()}Trainer")
    args = _trl_args(config_class, root, max_length=1024, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer_class(load("policy"), args=args, processing_class=hf_tokenizer,
                             train_dataset=datasets.Dataset.from_list(PAIRS))


def test_simpo_equals_trls_cpo_trainer(hf, tokenizer):
    trainer = _reference_free_trainer("cpo", hf, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.7)
    batch = PreferenceSource.from_examples(tokenizer, pairs(), 1024, shuffle=False).batch(range(len(PAIRS)))
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, _trl_pair_batch(batch))
    objective = PreferenceObjective(loss_type="simpo", beta=2.0, simpo_gamma=0.7)
    loss, metrics = objective.loss(tiny_llama(0), batch)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for key in REWARD_KEYS:
        assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key


def test_orpo_equals_trls_orpo_trainer(hf, tokenizer):
    trainer = _reference_free_trainer("orpo", hf, beta=0.25)
    batch = PreferenceSource.from_examples(tokenizer, pairs(), 1024, shuffle=False).batch(range(len(PAIRS)))
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, _trl_pair_batch(batch))
    # trl's NLL covers the prompt too: nll_on_prompt reproduces it
    model = tiny_llama(0)
    loss, metrics = PreferenceObjective(loss_type="orpo", beta=0.25, nll_on_prompt=True).loss(model, batch)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for key in (*REWARD_KEYS, "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key
    # by default the NLL is SFT's, on the chosen completion: the mean -log p over its labelled tokens
    default, default_metrics = PreferenceObjective(loss_type="orpo", beta=0.25).loss(model, batch)
    logits = model(batch.input_ids).logits
    sft = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
    assert default_metrics["nll_loss"].item() == pytest.approx(sft.item(), abs=1e-5)
    assert default.item() == pytest.approx(sft.item() - 0.25 * metrics["log_odds_ratio"].item(), abs=1e-5)


def test_kto_equals_trls_kto_trainer(hf, tokenizer):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    load, hf_tokenizer, root = hf
    rows = [{"prompt": f"Is {i} even?", "completion": " yes" if i % 3 else " no",
             "label": (i % 3 > 0) == (i % 2 == 0)} for i in range(6)]
    assert 0 < sum(r["label"] for r in rows) < len(rows)
    args = _trl_args(trl.KTOConfig, root, max_length=None, beta=0.4, desirable_weight=1.0,
                     undesirable_weight=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.KTOTrainer(load("policy"), ref_model=load("ref"), args=args,
                                 processing_class=hf_tokenizer,
                                 train_dataset=datasets.Dataset.from_list(rows))
    trl_batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    examples = [LabelledCompletion(r["prompt"], r["completion"], r["label"]) for r in rows]
    source = PreferenceSource.from_examples(tokenizer, examples, 1024, shuffle=False)
    cache_reference_logps(source, tiny_llama(1))
    batch = source.batch(range(len(rows)))
    assert _unpadded(trl_batch["KL_input_ids"], trl_batch["KL_attention_mask"]) == \
        _ours_unpadded(batch.extras["kl_ids"], batch.extras["kl_length"])  # the same mismatched pairs
    objective = KTOObjective(beta=0.4, desirable_weight=1.0, undesirable_weight=1.5)
    loss, metrics = objective.loss(tiny_llama(0), batch)
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    for key in (*(k for k in REWARD_KEYS if k != "rewards/accuracies"), "kl"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key


# ============================================================================ it learns
def _rule_pairs(n: int, seed: int) -> list[PreferencePair]:
    """The chosen reply repeats the prompt's letter, the rejected one gives another letter."""
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnop"
    out = []
    for _ in range(n):
        word = "".join(rng.choice(list(letters), size=3))
        letter = word[rng.integers(3)]
        other = rng.choice([c for c in letters if c != letter])
        out.append(PreferencePair(f"{word} pick {letter}:", f" {letter}", f" {other}"))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_steps_raise_held_out_reward_accuracy(tmp_path, seed):
    from lmforge.train.optim import OptimConfig, build_optimizer
    from lmforge.train.trainer import TrainConfig, Trainer

    tokenizer = byte_tokenizer()
    train, val = split_preferences(_rule_pairs(160, seed), 0.25, seed=seed)
    data = PreferenceSource.from_examples(tokenizer, train, 64, seed=seed)
    held_out = PreferenceSource.from_examples(tokenizer, val, 64, shuffle=False)
    reference = tiny_llama(seed, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    for source in (data, held_out):
        cache_reference_logps(source, reference, rows=64)
    model = tiny_llama(seed, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)  # policy = reference
    objective = PreferenceObjective(loss_type="sigmoid", beta=0.1)
    before = preference_metrics(model, objective, held_out.first_batches(64, 1))
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    config = TrainConfig(steps=60, batch_tokens=16 * 64, micro_batch=16, seq_len=64, eval_interval=0,
                         checkpoint_interval=0, log_interval=100, device="cpu")
    trainer = Trainer(model, objective, build_optimizer(model, OptimConfig(lr=5e-3)), lambda step: 1.0, data,
                      config, tmp_path, quiet=True)
    trainer.fit()
    after = preference_metrics(model, objective, held_out.first_batches(64, 1))
    assert after["rewards/accuracies"] >= 0.8, after
    assert after["rewards/margins"] > 0.5 and after["loss"] < 0.7 * math.log(2), after
    print(f"seed {seed}: held-out accuracy {after['rewards/accuracies']:.2f}, margin "
          f"{after['rewards/margins']:.2f}, loss {after['loss']:.3f} ({len(val)} pairs)")
    assert trainer.history[-1]["rewards/margins"] > trainer.history[0]["rewards/margins"]


def test_a_dpo_run_resumed_from_its_checkpoint_ends_where_an_unbroken_run_does(tmp_path):
    from lmforge.train.optim import OptimConfig, build_optimizer
    from lmforge.train.trainer import TrainConfig, Trainer

    tokenizer = byte_tokenizer()
    small = dict(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)

    def run(folder, steps: int, resume: bool = False):
        data = PreferenceSource.from_examples(tokenizer, _rule_pairs(20, 0), 64, seed=5)
        cache_reference_logps(data, tiny_llama(0, **small))  # recomputed by every process: the same numbers
        model = tiny_llama(0, **small)
        config = TrainConfig(steps=steps, batch_tokens=3 * 64, micro_batch=3, seq_len=64, eval_interval=0,
                             checkpoint_interval=2, log_interval=100, device="cpu")
        trainer = Trainer(model, PreferenceObjective(beta=0.2), build_optimizer(model, OptimConfig(lr=1e-2)),
                          lambda step: 1.0, data, config, folder, quiet=True)
        if resume:
            trainer.resume(folder / "checkpoints" / "step-000004")
        trainer.fit()
        return model

    whole = run(tmp_path / "whole", 9)  # 27 rows: the source wraps into its second epoch
    run(tmp_path / "broken", 4)
    resumed = run(tmp_path / "broken", 9, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
