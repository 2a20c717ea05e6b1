"""`lmforge distill` as one call: a teacher, a student (a preset or a checkpoint) and token shards in;
a trained student, metrics, a plot and a summary out.

It runs through the same `Trainer` as pretraining: the data are the same token windows,
and only the objective differs (compress/distill.py), so a student trained with
`distill.alpha: 0` is exactly the same student trained from scratch on the same tokens
in the same order: the baseline distillation has to beat.

Outputs, under `output`: `checkpoints/step-N/` (resumable after a kill at any moment),
`model/` (the student as an ordinary checkpoint folder, with the teacher's tokenizer),
`metrics.jsonl`, `metrics.png`, `recipe.json` and `summary.json`: parameters and bytes
of teacher and student, and their perplexity on held-out text (by default the Python
tutorial, which the shards should not contain).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.atomic import atomic_write
from lmforge.compress.calibration import default_heldout_files, heldout_windows, token_stream
from lmforge.compress.distill import DistillationObjective, DistillError, DistillSettings, check_vocabulary
from lmforge.compress.run import stored_bytes
from lmforge.config import ConfigKeyError
from lmforge.data.shards import TOKENIZER_FOLDER, load_shard_set
from lmforge.eval.perplexity import perplexity
from lmforge.model.config import PRESETS, human_count
from lmforge.model.transformer import Transformer
from lmforge.train.checkpoint import FullModel, resume_point
from lmforge.train.data import TokenWindows
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.pretrain import model_config, schedule_change_note, seed_everything
from lmforge.train.schedule import ScheduleConfig, lr_at
from lmforge.train.trainer import TrainConfig, Trainer, resolve_device

Measured = Literal["teacher", "student"]


@dataclass
class DistillDataConfig:
    folder: str = ""  # token shards made with the teacher's tokenizer (`lmforge tokenize -t TEACHER`)
    bos_align: bool = False  # start every training window at a document start


@dataclass
class DistillConfig:
    teacher: str = ""  # checkpoint or run folder, .gguf file, or a sample name (smollm2)
    student: str = ""  # a model preset (`lmforge info` lists them), or a checkpoint/run folder
    # ModelConfig fields over the student preset (d_model: 128, ...); vocab_size defaults to the teacher's
    student_config: dict[str, Any] = field(default_factory=dict)
    distill: DistillSettings = field(default_factory=DistillSettings)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    # a small student on a CPU (a partial override, `--train.steps=50`, keeps the rest of these)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=20))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=200, batch_tokens=4 * 256, micro_batch=4, seq_len=256, eval_interval=50, eval_batches=4,
        checkpoint_interval=50, keep_checkpoints=2))
    heldout: list[str] = field(default_factory=list)  # text files/folders or shard folders (default: the
    # Python tutorial from the web sample)
    heldout_windows: int = 32  # x train.seq_len tokens of held-out text
    measure: list[Measured] = field(default_factory=lambda: ["teacher", "student"])  # held-out perplexity of
    output: str = "runs/distill"
    seed: int = 0
    resume: str = "auto"  # auto: the newest checkpoint under output if any; never; or a folder


def _say(quiet: bool) -> Callable[[str], None]:
    return (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))


def _check(config: DistillConfig) -> None:
    """Everything that needs no model, before anything is loaded."""
    for key, hint in (("teacher", "--teacher MODEL"), ("student", "--student PRESET|PATH"),
                      ("data.folder", "--data SHARDS (`lmforge tokenize -t TEACHER` output)")):
        value = config.data.folder if key == "data.folder" else getattr(config, key)
        if not value:
            raise ConfigKeyError(f"{key} is required: {hint}")
    config.distill.validate()
    config.schedule.validate()
    config.train.accumulation()
    if config.heldout_windows < 1:
        raise ConfigKeyError(f"heldout_windows must be at least 1, got {config.heldout_windows}")
    if config.student_config and config.student not in PRESETS:
        raise ConfigKeyError(f"student_config changes a preset's fields; the student {config.student!r} is "
                             f"not a preset ({', '.join(sorted(PRESETS))})")


def build_student(spec: str, overrides: dict[str, Any], teacher: Transformer, teacher_tokenizer: Any,
                  device: torch.device) -> tuple[Transformer, str]:
    """The student: a preset (randomly initialised, the teacher's vocabulary unless told otherwise) or a
    checkpoint; (model, where it came from)."""
    vocab = teacher.config.vocab_size
    if spec in PRESETS:
        config = model_config({"preset": spec, "vocab_size": vocab} | overrides)
        if config.vocab_size != vocab:
            raise DistillError(f"student_config.vocab_size {config.vocab_size:,} is not the teacher's "
                               f"{vocab:,}: the student predicts the teacher's tokens (leave vocab_size out)")
        return Transformer(config).to(device), f"preset {spec}"
    from lmforge.infer.loading import load_model
    from lmforge.infer.quant import QuantizedLinear

    try:
        loaded = load_model(spec, device=str(device))
    except FileNotFoundError as err:
        raise DistillError(f"--student {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                           f"model: {err}") from None
    if any(isinstance(m, QuantizedLinear) for m in loaded.model.modules()):
        raise DistillError(f"--student {spec} is quantized: a student trains in float (distil first, then "
                           f"`lmforge quantize` the result)")
    if loaded.model.config.vocab_size != vocab:
        raise DistillError(f"the student {spec} predicts {loaded.model.config.vocab_size:,} tokens and the "
                           f"teacher {vocab:,}: they must share one vocabulary")
    check_vocabulary(teacher_tokenizer, loaded.tokenizer, f"the student {spec}")
    return loaded.model.requires_grad_(True), str(loaded.path)


def _check_shards(folder: str, meta: dict[str, Any], teacher_tokenizer: Any, vocab: int) -> None:
    """The shards must be the teacher's token ids: the same tokenizer, or at least ids it knows."""
    copy = Path(folder) / TOKENIZER_FOLDER
    if copy.is_dir():
        from lmforge.tokenizer import load_tokenizer

        check_vocabulary(teacher_tokenizer, load_tokenizer(copy), f"the shards in {folder}")
    elif meta.get("vocab_size", 0) != vocab:
        raise DistillError(f"the shards in {folder} were made with a {meta.get('vocab_size')}-token "
                           f"tokenizer and the teacher has {vocab:,}: tokenize the text with the teacher's "
                           f"(lmforge tokenize -t TEACHER)")


def heldout_perplexity(model: nn.Module, tokenizer: Any, sources: Sequence[str], seq_len: int, windows: int,
                       say: Callable[[str], None]) -> dict[str, float]:
    """Perplexity on `windows` x `seq_len` tokens of held-out text (the Python tutorial by default)."""
    files = list(sources) if sources else default_heldout_files()
    ids = heldout_windows(token_stream(tokenizer, files), seq_len, limit=windows)
    result = perplexity(model, ids, progress=say)
    return {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens}


def distill(config: DistillConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Load the teacher, build the student, train it on the teacher's distributions, write the outputs;
    the summary (also in output/summary.json)."""
    from lmforge.infer.loading import load_model

    _check(config)
    say = _say(quiet)
    cfg, output = config.train, Path(config.output)
    device = resolve_device(cfg.device)
    teacher = load_model(config.teacher, device=str(device))
    if output.resolve() == teacher.path.resolve():
        raise DistillError(f"-o {config.output} is the teacher; write somewhere else")
    vocab = teacher.model.config.vocab_size
    meta, train_shards = load_shard_set(config.data.folder, "train")
    _check_shards(config.data.folder, meta, teacher.tokenizer, vocab)
    has_val = bool(meta["splits"].get("val", {}).get("tokens"))
    val_shards = load_shard_set(config.data.folder, "val")[1] if has_val else []

    seed_everything(config.seed)  # just before the student: alpha 0 and alpha > 0 start from the same weights
    student, student_source = build_student(config.student, config.student_config, teacher.model,
                                            teacher.tokenizer, device)
    for who, model in (("student", student), ("teacher", teacher.model)):
        if cfg.seq_len > model.config.max_seq_len:
            raise ConfigKeyError(f"train.seq_len ({cfg.seq_len}) exceeds the {who}'s context "
                                 f"({model.config.max_seq_len})")
    student.train()
    objective = DistillationObjective(teacher.model, config.distill)
    optimizer = build_optimizer(student, config.optim)
    train_data = TokenWindows(train_shards, cfg.seq_len, config.seed, bos_align=config.data.bos_align)
    val_data = TokenWindows(val_shards, cfg.seq_len, config.seed, shuffle=False) if val_shards else None

    def lr_factor(step: int) -> float:
        return lr_at(step, cfg.steps, 1.0, config.schedule)

    run_config = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    trainer = Trainer(student, objective, optimizer, lr_factor, train_data, cfg, output, val_data=val_data,
                      bytes_per_token=meta["splits"].get("val", {}).get("bytes_per_token") or None,
                      run_config=run_config, tokenizer=teacher.tokenizer, quiet=quiet,
                      model_store=FullModel(source="lmforge distill"))
    start = resume_point(config.resume, output)
    if start is not None:
        trainer.resume(start)
        note = schedule_change_note(trainer.resumed_state, trainer.step, cfg.steps, config.schedule)
        if note:
            say(f"distill: note: {note}")
    elif trainer.metrics_path.exists():
        trainer.metrics_path.unlink()  # a fresh run: an old log would mix two runs
    with atomic_write(output / "recipe.json", "w") as f:
        f.write(json.dumps(run_config, indent=2))
    s = config.distill
    how = (f"{s.kind} KL at T={s.temperature:g}, alpha {s.alpha:g}" if s.alpha > 0
           else "alpha 0: hard labels only, no teacher")
    say(f"distill: {config.teacher} ({human_count(teacher.model.config.num_parameters())} parameters) -> "
        f"{student_source} ({human_count(student.config.num_parameters())}); {how}; {len(train_data):,} "
        f"windows of {cfg.seq_len} tokens, {cfg.batch_tokens:,} tokens/step, {device}")

    heldout: dict[str, dict[str, float]] = {}
    if "teacher" in config.measure:
        say("distill: the teacher's perplexity on held-out text")
        heldout["teacher"] = heldout_perplexity(teacher.model, teacher.tokenizer, config.heldout, cfg.seq_len,
                                                config.heldout_windows, say)
    summary = trainer.fit()
    model_dir = output / "model"
    from lmforge.model.checkpoint import save_checkpoint

    save_checkpoint(model_dir, student, tokenizer=teacher.tokenizer,
                    extra={"source": f"lmforge distill from {config.teacher}",
                           "distill": dataclasses.asdict(config.distill), "student": student_source})
    if "student" in config.measure:
        say("distill: the student's perplexity on held-out text")
        heldout["student"] = heldout_perplexity(student, teacher.tokenizer, config.heldout, cfg.seq_len,
                                                config.heldout_windows, say)
    summary.update(
        command="distill", teacher=config.teacher, student=student_source, model=str(model_dir),
        kind=s.kind, temperature=s.temperature, alpha=s.alpha,
        teacher_parameters=teacher.model.config.num_parameters(),
        student_parameters=student.config.num_parameters(),
        bytes_before=stored_bytes(teacher.path), bytes_after=stored_bytes(model_dir), heldout=heldout)
    with atomic_write(output / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary


def describe(summary: dict[str, Any]) -> str:
    """The human summary `lmforge distill` prints."""
    how = (f"{summary['kind']} KL at T={summary['temperature']:g}, alpha {summary['alpha']:g}"
           if summary["alpha"] > 0 else "hard labels only (alpha 0)")
    val = f", held-out loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else ""
    lines = [f"distilled ({how}) for {summary['steps_this_run']} steps (to step {summary['steps']}) in "
             f"{summary.get('seconds', 0):.1f}s: final loss {summary['final_loss']:.4f}{val}",
             f"size: teacher {human_count(summary['teacher_parameters'])} parameters, "
             f"{summary['bytes_before'] / 1e6:.1f} MB ({summary['teacher']}) -> student "
             f"{human_count(summary['student_parameters'])} parameters, "
             f"{summary['bytes_after'] / 1e6:.1f} MB ({summary['model']})"]
    heldout = summary.get("heldout") or {}
    if heldout:
        tokens = next(iter(heldout.values()))["tokens"]
        scores = ", ".join(f"{who} {h['perplexity']:.2f}" for who, h in heldout.items())
        lines.append(f"held-out perplexity ({tokens:,} tokens of text not trained on): {scores}")
    lines.append(f"metrics: {summary['metrics']}\nplot: {summary['plot']}")
    return "\n".join(lines)
