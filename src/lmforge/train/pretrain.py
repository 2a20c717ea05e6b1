"""Pretraining as one call: a typed `PretrainConfig` in, a trained checkpoint and a summary out.

The recipe is checked key by key before any work starts: an unknown key or a value of
the wrong type is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.atomic import atomic_write
from lmforge.config import ConfigKeyError, build
from lmforge.data.shards import load_shard_set
from lmforge.model.config import ModelConfig, human_count, preset
from lmforge.model.transformer import Transformer
from lmforge.train.checkpoint import resume_point
from lmforge.train.curriculum import CurriculumConfig, attach_curriculum
from lmforge.train.data import TokenWindows
from lmforge.train.objectives import CausalLMObjective
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.parallel.base import ParallelConfig
from lmforge.train.parallel.launch import init_parallel
from lmforge.train.schedule import ScheduleConfig, lr_at
from lmforge.train.trainer import Probe, TrainConfig, Trainer, resolve_device


@dataclass
class DataConfig:
    folder: str = ""  # token shards written by `lmforge tokenize` (meta.json + *.safetensors)
    bos_align: bool = False  # start every training window at a document start
    tokenizer: str | None = None  # stored with checkpoints; default: the one the shards were tokenized with
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)  # easy windows first (optional)


@dataclass
class PretrainConfig:
    # `preset: llama-tiny` and/or any ModelConfig field (d_model: 128, ...) overriding it
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "llama-tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # torchrun: ddp/fsdp, tensor, pipeline
    output: str = "runs/pretrain"
    seed: int = 1337
    resume: str = "auto"  # auto: the newest checkpoint in output/checkpoints if any; never; or a folder
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact reruns and resumes


def model_config(values: dict[str, Any]) -> ModelConfig:
    """`model:` section -> ModelConfig: a preset's fields, overridden by the fields given."""
    values = dict(values)
    name = values.pop("preset", None)
    base = preset(name).to_dict() if name else {}
    return build(ModelConfig, base | values, prefix="model.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(config: PretrainConfig, *, quiet: bool = False, probe: Probe | None = None) -> dict[str, Any]:
    """Build everything the config names, resume if asked, train, and return the summary.

    `probe` scores benchmark tasks at each evaluation point (`train.eval_tasks`; the CLI passes
    `lmforge.eval.probe.probe_for(config.train)`)."""
    if not config.data.folder:
        raise ConfigKeyError("data.folder is required: a folder of token shards (`lmforge tokenize` output)")
    config.schedule.validate()
    cfg = config.train
    cfg.accumulation()
    mconfig = model_config(config.model)
    if cfg.seq_len > mconfig.max_seq_len:
        raise ConfigKeyError(f"train.seq_len ({cfg.seq_len}) exceeds model.max_seq_len "
                             f"({mconfig.max_seq_len})")
    meta, train_shards = load_shard_set(config.data.folder, "train")
    if meta.get("vocab_size", 0) > mconfig.vocab_size:
        raise ConfigKeyError(f"model.vocab_size ({mconfig.vocab_size}) is smaller than the shards' tokenizer "
                             f"vocabulary ({meta['vocab_size']}); set model.vocab_size: {meta['vocab_size']}")
    val_shards = []
    if meta["splits"].get("val", {}).get("tokens"):
        _, val_shards = load_shard_set(config.data.folder, "val")

    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(config.seed)
    parallel = init_parallel(config.parallel, resolve_device(cfg.device))
    device, quiet = parallel.device, quiet or not parallel.is_main  # under torchrun, rank 0 alone reports
    model = parallel.prepare(Transformer(mconfig).to(device))  # sharded, split or as it is
    optimizer = build_optimizer(model, config.optim)
    train_data = TokenWindows(train_shards, cfg.seq_len, config.seed, bos_align=config.data.bos_align)
    curriculum = attach_curriculum(train_data, config.data.curriculum, device=device,
                                   total_draws=cfg.steps * (cfg.batch_tokens // cfg.seq_len),
                                   cache=Path(config.output) / "curriculum-scores.safetensors")
    if curriculum is not None and not quiet:
        print(f"curriculum: {curriculum.describe()}", file=sys.stderr, flush=True)
    val_data = TokenWindows(val_shards, cfg.seq_len, config.seed, shuffle=False) if val_shards else None
    bytes_per_token = meta["splits"].get("val", {}).get("bytes_per_token") or None
    tokenizer = shards_tokenizer(config.data, meta, quiet=quiet)

    def lr_factor(step: int) -> float:
        return lr_at(step, cfg.steps, 1.0, config.schedule)

    trainer = Trainer(model, CausalLMObjective(), optimizer, lr_factor, train_data, cfg, config.output,
                      val_data=val_data, bytes_per_token=bytes_per_token,
                      run_config=_jsonable(dataclasses.asdict(config)), tokenizer=tokenizer, quiet=quiet,
                      parallel=parallel, probe=probe)
    start = resume_point(config.resume, config.output)
    if start is not None:
        trainer.resume(start)
        note = schedule_change_note(trainer.resumed_state, trainer.step, cfg.steps, config.schedule)
        if note and not quiet:
            print(f"pretrain: note: {note}", file=sys.stderr, flush=True)
    elif trainer.metrics_path.exists() and parallel.is_main:
        trainer.metrics_path.unlink()  # a fresh run: an old log would mix two runs
    if parallel.is_main:
        with atomic_write(Path(config.output) / "recipe.json", "w") as f:
            f.write(json.dumps(trainer.run_config, indent=2))
    if not quiet:
        print(f"pretrain: {human_count(mconfig.num_parameters())} parameters, {len(train_data):,} windows of "
              f"{cfg.seq_len} tokens, {cfg.batch_tokens:,} tokens/step ({trainer.micro_batch} x "
              f"{cfg.seq_len} x {trainer.accum} accumulation), {config.optim.name}, {cfg.precision}, {device}"
              + (f", {parallel.name} over {parallel.world} processes" if parallel.world > 1 else ""),
              file=sys.stderr, flush=True)
    summary = trainer.fit()
    parallel.close()
    summary.update(parameters=mconfig.num_parameters(), rank=parallel.rank, world=parallel.world)
    return summary


def schedule_change_note(state: dict[str, Any] | None, step: int, steps: int,
                         schedule: ScheduleConfig) -> str | None:
    """What resuming with another `train.steps` does to the learning rate, or None if nothing.

    The schedule is a function of (step, total steps): a cosine fitted to the old total is
    re-stretched over the new one, so the learning rate jumps; WSD's flat stretch does not
    depend on the total and simply goes on until the (moved) decay.
    """
    saved = ((state or {}).get("config") or {}).get("train", {}).get("steps")
    if not saved or saved == steps or step >= steps:
        return None
    old, new = lr_at(step, saved, 1.0, schedule), lr_at(step, steps, 1.0, schedule)
    if math.isclose(old, new, rel_tol=1e-9):
        return (f"the run was planned for {saved:,} steps and now trains to {steps:,}: its {schedule.kind} "
                f"schedule continues where it was (learning rate x{new:.3f} of the peak at step {step:,})")
    return (f"the run was planned for {saved:,} steps and now trains to {steps:,}: the {schedule.kind} "
            f"schedule is re-stretched over the new length, so at step {step:,} the learning rate goes from "
            f"x{old:.3f} to x{new:.3f} of the peak (use schedule.kind: wsd to extend runs without a jump)")


def shards_tokenizer(data: DataConfig, meta: dict[str, Any], *, quiet: bool = False) -> Any:
    """The tokenizer stored with every checkpoint: `data.tokenizer` if the recipe names one,
    else the copy `lmforge tokenize` keeps in the shard folder, else the one its meta.json
    names. Without it a checkpoint could not turn its ids back into text."""
    from lmforge.data.shards import TOKENIZER_FOLDER
    from lmforge.tokenizer.tokenizer import load_tokenizer

    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    copy = Path(data.folder) / TOKENIZER_FOLDER
    if copy.is_dir():
        return load_tokenizer(copy)
    named = meta.get("tokenizer")
    try:
        return load_tokenizer(named) if named else None
    except (ValueError, OSError) as err:
        if not quiet:
            print(f"pretrain: warning: the shards' tokenizer {named!r} cannot be opened ({err}); checkpoints "
                  "will hold no tokenizer: set data.tokenizer", file=sys.stderr, flush=True)
        return None




def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
