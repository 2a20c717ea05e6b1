"""Alignment as one call: a model, preference data or a verifiable task, and an algorithm in;
a model (or adapter), metrics, a plot and a summary out. Every algorithm runs on the one
`Trainer`; what differs is the `BatchSource` and the `Objective`:

- `reward`: a reward model (Bradley-Terry on preference pairs; align/reward.py);
- `dpo`: DPO and its family (sigmoid, IPO, robust/cDPO, SimPO, ORPO) on pairs; reference
  log-probs computed once before training (align/dpo.py, align/preferences.py);
- `kto`: KTO on completions labelled good or bad one by one;
- `grpo`: rollouts on lmforge's `Engine`, group-normalised advantages (align/grpo.py);
- `ppo`: rollouts, a value head, GAE and KL-shaped rewards (align/ppo.py).

Data: a preference file or sample (`champ-pairs`, `champ-transcripts`, `champ-kto`) for
reward/dpo/kto; a task (`basic_arithmetic`, `chain_sum`, `gsm_symbolic`) for grpo/ppo,
scored by the task's checker or by a trained reward model (`reward_model`); or
`onpolicy:TASK` for dpo: pairs the model makes itself (align/onpolicy.py).

What alignment changed is measured, not assumed: on a task, pass@1 on held-out problems
(never trained on) before and after; on preference data, the held-out loss, reward
accuracy and margin before and after.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.align.grpo import GRPOConfig
from lmforge.align.ppo import PPOConfig
from lmforge.atomic import atomic_write
from lmforge.config import ConfigKeyError
from lmforge.model.config import human_count
from lmforge.train.checkpoint import resume_point
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.pretrain import schedule_change_note, seed_everything
from lmforge.train.schedule import ScheduleConfig, lr_at
from lmforge.train.trainer import Probe, TrainConfig, Trainer, resolve_device
from lmforge.tune.finetune import FinetuneConfig, apply_method, parameter_counts, peak_rss_mb, write_outputs
from lmforge.tune.lora import LoRAConfig

Algorithm = Literal["reward", "dpo", "kto", "grpo", "ppo"]
ALGORITHMS = ("reward", "dpo", "kto", "grpo", "ppo")
ONPOLICY = "onpolicy:"


@dataclass
class AlignDataConfig:
    source: str = ""  # preference file/sample (reward, dpo, kto), a task (grpo, ppo), or onpolicy:TASK (dpo)
    limit: int | None = None  # use only the first N examples of a preference file
    val_fraction: float = 0.1  # preference data held out, by a hash of the prompt
    task_options: dict[str, Any] = field(default_factory=dict)  # the task's settings (min_terms, ...)
    train_problems: int = 256  # task problems drawn from its train split (grpo, ppo, onpolicy)
    eval_problems: int = 64  # held-out task problems for pass@1 before and after (0: skip)
    eval_max_tokens: int = 128
    onpolicy_samples: int = 8  # onpolicy:TASK: answers sampled per problem to find a right and a wrong one
    onpolicy_temperature: float = 1.0


@dataclass
class PreferenceLossConfig:
    loss_type: Literal["sigmoid", "ipo", "robust", "simpo", "orpo"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO (sigmoid) or robust DPO's assumed label noise
    simpo_gamma: float = 0.5
    nll_on_prompt: bool = False  # ORPO: the NLL term also on the prompt (trl's ORPOTrainer does)


@dataclass
class KTOLossConfig:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass
class AlignConfig:
    model: str = ""  # checkpoint or run folder, .gguf file, or a sample name (smollm2)
    algorithm: Algorithm = "dpo"
    method: Literal["full", "lora"] = "lora"  # what of the policy trains (a reward model trains fully)
    data: AlignDataConfig = field(default_factory=AlignDataConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(dropout=0.0))
    dpo: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    kto: KTOLossConfig = field(default_factory=KTOLossConfig)
    center_rewards_coefficient: float | None = None  # reward: trl's centring term
    reward_model: str = ""  # grpo/ppo: a reward folder (align reward's OUT/model); else the task's checker
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=5))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=50, batch_tokens=16 * 256, micro_batch=4, seq_len=256, eval_interval=25, eval_batches=4,
        checkpoint_interval=25, keep_checkpoints=2, log_interval=5))
    output: str = "runs/align"
    seed: int = 0
    resume: str = "auto"  # auto: the newest checkpoint under output if any; never; or a folder


def rows_per_step(cfg: TrainConfig) -> int:
    """Sequences per optimizer step. `train.seq_len` is the longest row (prompt + completion)
    and `train.batch_tokens` is rows per step x seq_len, as in pretraining."""
    return cfg.micro_batch * cfg.accumulation()


def align(config: AlignConfig, *, quiet: bool = False, probe: Probe | None = None) -> dict[str, Any]:
    """Load, train with `config.algorithm`, measure before and after, write the outputs; the summary
    (also in output/summary.json). `probe`: benchmark tasks scored at each evaluation point, as in
    `pretrain`."""
    _validate(config)
    seed_everything(config.seed)
    device = resolve_device(config.train.device)
    if config.algorithm == "reward":
        return _align_reward(config, device, quiet)
    from lmforge.infer.loading import load_model

    loaded = load_model(config.model, device=str(device))
    model, tokenizer = loaded.model, loaded.tokenizer
    if config.train.seq_len > model.config.max_seq_len:
        raise ConfigKeyError(f"train.seq_len ({config.train.seq_len}) exceeds the model's context "
                             f"({model.config.max_seq_len})")
    if config.algorithm in ("grpo", "ppo"):
        return _align_rl(config, model, tokenizer, loaded.stop_ids(), quiet, probe)
    return _align_preferences(config, model, tokenizer, loaded.stop_ids(), quiet, probe)


def _validate(config: AlignConfig) -> None:
    if config.algorithm not in ALGORITHMS:
        raise ConfigKeyError(f"algorithm: {config.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if config.method not in ("full", "lora"):
        raise ConfigKeyError(f"method: {config.method!r} is not one of full, lora")
    if not config.model:
        raise ConfigKeyError("model is required: --model PATH, a run folder or a sample name (smollm2)")
    if not config.data.source:
        onpolicy = ", or onpolicy:TASK" if config.algorithm == "dpo" else ""
        hint = ("a task: basic_arithmetic, chain_sum, gsm_symbolic" if config.algorithm in ("grpo", "ppo")
                else "a preference file (prompt/chosen/rejected JSONL) or a sample: champ-pairs, "
                     f"champ-transcripts, champ-kto{onpolicy}")
        raise ConfigKeyError(f"data.source is required: {hint}")
    if config.data.source.startswith(ONPOLICY) and config.algorithm != "dpo":
        raise ConfigKeyError(f"data.source {config.data.source!r}: on-policy pairs are for dpo only")
    if config.train.eval_tasks and config.algorithm == "reward":
        raise ConfigKeyError("train.eval_tasks scores a language model; a reward model is scored by its "
                             "held-out pair accuracy, which `align reward` reports")
    if config.reward_model and config.algorithm not in ("grpo", "ppo"):
        raise ConfigKeyError("reward_model is for grpo and ppo (the reward of a rollout)")
    # the old-policy log-probs must come from the same computation as training's, bf16 included
    config.grpo.rollout.precision = config.ppo.rollout.precision = config.train.precision
    config.schedule.validate()
    config.train.accumulation()


# ---------------------------------------------------------------------------------- running the Trainer
def _fit(config: AlignConfig, model: nn.Module, objective: Any, train_data: Any, *, val_data: Any = None,
         tokenizer: Any = None, store: Any = None, quiet: bool = False, trained: nn.Module | None = None,
         probe: Probe | None = None) -> dict[str, Any]:
    """The one Trainer over `model`, resumed from `config.output` when a checkpoint is there.

    `trained` is the module whose parameters the optimizer updates (default: `model`)."""
    cfg = config.train
    optimizer = build_optimizer(trained if trained is not None else model, config.optim)

    def lr_factor(step: int) -> float:
        return lr_at(step, cfg.steps, 1.0, config.schedule)

    run_config = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    trainer = Trainer(model, objective, optimizer, lr_factor, train_data, cfg, config.output,
                      val_data=val_data, run_config=run_config, tokenizer=tokenizer, quiet=quiet,
                      model_store=store, probe=probe)
    start = resume_point(config.resume, config.output)
    if start is not None:
        trainer.resume(start)
        note = schedule_change_note(trainer.resumed_state, trainer.step, cfg.steps, config.schedule)
        if note and not quiet:
            print(f"align: note: {note}", file=sys.stderr, flush=True)
    elif trainer.metrics_path.exists():
        trainer.metrics_path.unlink()  # a fresh run: an old log would mix two runs
    with atomic_write(Path(config.output) / "recipe.json", "w") as f:
        f.write(json.dumps(run_config, indent=2))
    return trainer.fit()


def _policy_store(config: AlignConfig, model: nn.Module) -> tuple[FinetuneConfig, Any]:
    """Make the policy trainable as `config.method` says (full or LoRA); (its finetune config, store)."""
    tune = FinetuneConfig(model=config.model, method=config.method, lora=config.lora)
    return tune, apply_method(model, tune)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _finish(config: AlignConfig, summary: dict[str, Any], trained: nn.Module, **fields: Any
            ) -> dict[str, Any]:
    trainable, total = parameter_counts(trained)
    summary.update(algorithm=config.algorithm, method=config.method, trainable_parameters=trainable,
                   parameters=total, peak_rss_mb=round(peak_rss_mb(), 1), **fields)
    with atomic_write(Path(config.output) / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------- reward models
def _align_reward(config: AlignConfig, device: torch.device, quiet: bool) -> dict[str, Any]:
    from lmforge.align.preferences import PreferenceSource, load_preferences, split_preferences
    from lmforge.align.reward import (
        RewardModelStore,
        RewardObjective,
        load_reward_model,
        reward_accuracy,
        save_reward_model,
    )

    model, tokenizer = load_reward_model(config.model, device=str(device))
    if tokenizer is None:
        raise ConfigKeyError(f"model {config.model!r} has no tokenizer: a reward model needs one to read "
                             "text")
    train_data, val_data = _preference_sources(config, tokenizer, load_preferences, split_preferences,
                                               PreferenceSource, quiet)
    if not train_data.paired:
        raise ConfigKeyError(f"data.source {config.data.source!r} holds unpaired (KTO) rows: a reward model "
                             "learns from chosen/rejected pairs")
    for p in model.parameters():
        p.requires_grad_(True)
    before = reward_accuracy(model, val_data) if val_data else None
    objective = RewardObjective(center_rewards_coefficient=config.center_rewards_coefficient)
    summary = _fit(config, model, objective, train_data, val_data=val_data, tokenizer=tokenizer,
                   store=RewardModelStore(model.pad_token_id), quiet=quiet)
    after = reward_accuracy(model, val_data) if val_data else None
    folder = save_reward_model(Path(config.output) / "model", model, tokenizer=tokenizer,
                               extra={"source": f"lmforge align reward of {config.model}"})
    return _finish(config, summary, model, model=str(folder), val_accuracy_before=before,
                   val_accuracy=after, train_examples=len(train_data),
                   val_examples=len(val_data) if val_data else 0)


# ---------------------------------------------------------------------------------- DPO family, KTO
def _preference_sources(config: AlignConfig, tokenizer: Any, load: Any, split: Any, source_cls: Any,
                        quiet: bool, examples: list[Any] | None = None) -> tuple[Any, Any]:
    examples = examples if examples is not None else load(config.data.source, config.data.limit, quiet=quiet)
    train, val = split(examples, config.data.val_fraction, config.seed)
    length = config.train.seq_len
    train_data = source_cls.from_examples(tokenizer, train, length, seed=config.seed)
    val_data = (source_cls.from_examples(tokenizer, val, length, seed=config.seed, shuffle=False)
                if val else None)
    _say(quiet, f"align: {train_data.stats.describe()}"
         + (f"; held out: {val_data.stats.describe()}" if val_data else "; nothing held out"))
    return train_data, val_data


def _align_preferences(config: AlignConfig, model: nn.Module, tokenizer: Any, stop_ids: list[int],
                       quiet: bool, probe: Probe | None = None) -> dict[str, Any]:
    from lmforge.align.dpo import KTOObjective, PreferenceObjective, preference_metrics
    from lmforge.align.preferences import (
        PreferenceSource,
        cache_reference_logps,
        load_preferences,
        split_preferences,
    )

    examples, made = None, {}
    if config.data.source.startswith(ONPOLICY):
        from lmforge.align.onpolicy import onpolicy_pairs
        from lmforge.eval.verifiable import get_task

        task = get_task(config.data.source.removeprefix(ONPOLICY), **config.data.task_options)
        problems = task.problems("train", config.data.train_problems, config.seed)
        examples, made = onpolicy_pairs(model, tokenizer, task, problems,
                                        samples=config.data.onpolicy_samples,
                                        max_new_tokens=config.data.eval_max_tokens,
                                        temperature=config.data.onpolicy_temperature, seed=config.seed,
                                        stop_ids=stop_ids, quiet=quiet)
        if not examples:
            raise ConfigKeyError(f"{config.data.source}: no problem had both a right and a wrong answer "
                                 f"among {config.data.onpolicy_samples} samples; raise "
                                 "data.onpolicy_samples")
        with atomic_write(Path(config.output) / "pairs.jsonl", "w") as f:  # what DPO trained on, to read
            f.writelines(json.dumps(dataclasses.asdict(e)) + "\n" for e in examples)
    train_data, val_data = _preference_sources(config, tokenizer, load_preferences, split_preferences,
                                               PreferenceSource, quiet, examples)
    if config.algorithm == "kto":
        if train_data.paired:
            raise ConfigKeyError(f"data.source {config.data.source!r} holds pairs: kto reads rows of prompt, "
                                 "completion and label (e.g. champ-kto); use dpo for pairs")
        objective: Any = KTOObjective(**dataclasses.asdict(config.kto))
        needs_reference = True
    else:
        if not train_data.paired:
            raise ConfigKeyError(f"data.source {config.data.source!r} holds unpaired (KTO) rows: use "
                                 "--algorithm kto")
        objective = PreferenceObjective(**dataclasses.asdict(config.dpo))
        needs_reference = objective.needs_reference
    if needs_reference:  # the model before any update is the reference: its log-probs, once
        for source in (train_data, val_data):
            if source is not None:
                cache_reference_logps(source, model)
    before = preference_metrics(model, objective, val_data.first_batches(config.train.micro_batch, 64)) \
        if val_data else None
    task_before = _task_eval(config, model, tokenizer, quiet, "before")
    tune, store = _policy_store(config, model)
    model.train()
    summary = _fit(config, model, objective, train_data, val_data=val_data, tokenizer=tokenizer, store=store,
                   quiet=quiet, probe=probe)
    after = preference_metrics(model, objective, val_data.first_batches(config.train.micro_batch, 64)) \
        if val_data else None
    task_after = _task_eval(config, model, tokenizer, quiet, "after")
    summary.update(write_outputs(model, tune, tokenizer, Path(config.output)))
    return _finish(config, summary, model, held_out_before=before, held_out_after=after,
                   train_examples=len(train_data), val_examples=len(val_data) if val_data else 0,
                   **made, **_task_fields(task_before, task_after))


# ---------------------------------------------------------------------------------- GRPO and PPO
def _align_rl(config: AlignConfig, model: nn.Module, tokenizer: Any, stop_ids: list[int],
              quiet: bool, probe: Probe | None = None) -> dict[str, Any]:
    from lmforge.align.grpo import GRPOObjective, grpo_source
    from lmforge.align.ppo import PolicyWithValue, PPOObjective, ValueHeadStore, ppo_source
    from lmforge.align.rollout import per_item
    from lmforge.eval.verifiable import get_task

    task = get_task(config.data.source, **config.data.task_options)
    problems = task.problems("train", config.data.train_problems, config.seed)
    reward_fn, reward_name = per_item(task.reward), f"{task.name}'s checker"
    if config.reward_model:
        reward_fn, reward_name = _reward_model_fn(config.reward_model, tokenizer), config.reward_model
    task_before = _task_eval(config, model, tokenizer, quiet, "before")
    tune, store = _policy_store(config, model)
    model.train()

    def encode(problem: Any) -> list[int]:
        return tokenizer.encode_chat_prompt(problem.prompt)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    common = dict(tokenizer=tokenizer, stop_ids=stop_ids, rows_per_step=rows_per_step(config.train),
                  pad_id=pad)
    _say(quiet, f"align: {config.algorithm} on {len(problems)} {task.name} problems, reward: {reward_name}")
    if config.algorithm == "grpo":
        source = grpo_source(model, problems, encode, reward_fn, config.grpo, **common)
        summary = _fit(config, model, GRPOObjective(config.grpo), source, tokenizer=tokenizer, store=store,
                       quiet=quiet, probe=probe)
    else:
        with_value = PolicyWithValue(model)
        source = ppo_source(with_value, problems, encode, reward_fn, config.ppo, **common)
        summary = _fit(config, with_value, PPOObjective(config.ppo), source, tokenizer=tokenizer,
                       store=ValueHeadStore(store), quiet=quiet, trained=with_value,
                       probe=probe and (lambda _with_value, tok: probe(model, tok)))  # the policy alone
    task_after = _task_eval(config, model, tokenizer, quiet, "after")
    summary.update(write_outputs(model, tune, tokenizer, Path(config.output)))
    return _finish(config, summary, model, reward=reward_name, train_problems=len(problems),
                   **_task_fields(task_before, task_after))


def _reward_model_fn(folder: str, tokenizer: Any) -> Any:
    """A trained reward model as the reward of a rollout: it scores the chat prompt + the completion."""
    from lmforge.align.reward import is_reward_folder, load_reward_model, score_texts

    if not is_reward_folder(folder):
        raise ConfigKeyError(f"reward_model {folder!r} is not a reward-model folder (lmforge align reward "
                             "writes one to OUT/model)")
    reward_model, _ = load_reward_model(folder)
    reward_model.eval()

    def score(prompts: list[Any], completions: list[str]) -> list[float]:
        texts = [tokenizer.decode(tokenizer.encode_chat_prompt(p.prompt)) for p in prompts]
        return score_texts(reward_model, tokenizer, texts, completions)

    return score


# ---------------------------------------------------------------------------------- held-out task accuracy
def _eval_task_name(config: AlignConfig) -> str | None:
    source = config.data.source
    if config.algorithm in ("grpo", "ppo"):
        return source
    return source.removeprefix(ONPOLICY) if source.startswith(ONPOLICY) else None


def _task_eval(config: AlignConfig, model: nn.Module, tokenizer: Any, quiet: bool, when: str) -> Any:
    """Greedy pass@1 on held-out problems of the task (none trained on), or None without a task."""
    from lmforge.align.evaluate import pass_at_1
    from lmforge.align.rollout import sampling_model
    from lmforge.eval.verifiable import get_task

    name = _eval_task_name(config)
    if name is None or config.data.eval_problems <= 0:
        return None
    if when == "before" and resume_point(config.resume, config.output) is not None:
        return None  # a resumed run measured its "before" when it started
    task = get_task(name, **config.data.task_options)
    problems = task.problems("test", config.data.eval_problems, 0)  # the same for every training seed
    result = pass_at_1(sampling_model(model), tokenizer, task, problems,
                       max_tokens=config.data.eval_max_tokens)
    _say(quiet, f"align: held-out {name} pass@1 {when}: {result.accuracies[0]:.3f} "
                f"({len(problems)} problems, greedy)")
    return result


def _task_fields(before: Any, after: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if before is not None:
        fields["pass_at_1_before"] = before.accuracies[0]
    if after is not None:
        fields.update(pass_at_1_after=after.accuracies[0], eval_task=after.task, eval_problems=after.problems)
    return fields


def describe(summary: dict[str, Any]) -> str:
    """The human summary `lmforge align` prints."""
    trainable = human_count(summary["trainable_parameters"])
    lines = [f"aligned ({summary['algorithm']}, {summary['method']}, {trainable} "
             f"trainable parameters) for {summary['steps_this_run']} steps (to step {summary['steps']}) in "
             f"{summary.get('seconds', 0):.1f}s: final loss {summary['final_loss']:.4f}; peak memory "
             f"{summary['peak_rss_mb']:,.0f} MB"]
    if summary.get("val_accuracy") is not None:
        lines.append(f"held-out pair accuracy: {summary['val_accuracy_before']:.3f} -> "
                     f"{summary['val_accuracy']:.3f}")
    before, after = summary.get("held_out_before"), summary.get("held_out_after")
    if before and after:
        keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins") if k in after]
        lines.append("held out: " + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in keys))
    if "pass_at_1_after" in summary:
        was = summary.get("pass_at_1_before")
        was_text = "" if was is None else f"{was:.3f} -> "
        lines.append(f"held-out {summary['eval_task']} pass@1 ({summary['eval_problems']} problems never "
                     f"trained on): {was_text}{summary['pass_at_1_after']:.3f}")
    for key in ("model", "adapter", "merged"):
        if summary.get(key):
            lines.append(f"{key}: {summary[key]}")
    lines.append(f"metrics: {summary['metrics']}\nplot: {summary['plot']}")
    return "\n".join(lines)
