"""Fine-tuning as one call: a base model, conversations and a method in; a PEFT adapter (or a
whole model), metrics and a summary out. It runs through the same `Trainer` as pretraining:
only the data (packed chat rows whose labels cover the assistant's tokens) and what the
optimizer sees (the adapter's parameters) differ.

Methods:
- `full`: every weight trains (the most memory: weights, gradients and two Adam moments);
- `lora`: low-rank updates on the frozen base (tune/lora.py);
- `qlora`: the same over a base stored in NF4 (tune/qlora.py);
- `ia3`: learned rescaling of keys, values and the feed-forward input (tune/ia3.py);
- `prefix`: trained keys and values every query may attend to (tune/prefix.py);
- `adapter`: bottleneck adapters after each sublayer (tune/adapters.py).

Outputs, under `output`: `checkpoints/step-N/` (resumable: each an adapter folder or a
model folder, plus trainer_state/), `adapter/` (a PEFT folder with the tokenizer) or
`model/` (a checkpoint folder), `merged/` with `merge: true` (base + adapter as one
ordinary checkpoint, which `lmforge export` turns into GGUF), `metrics.jsonl`,
`metrics.png` and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.atomic import atomic_write
from lmforge.config import ConfigKeyError
from lmforge.model.config import human_count
from lmforge.train.checkpoint import FullModel, ModelStore, resume_point
from lmforge.train.objectives import CausalLMObjective
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.pretrain import schedule_change_note, seed_everything
from lmforge.train.schedule import ScheduleConfig, lr_at
from lmforge.train.trainer import Probe, TrainConfig, Trainer, resolve_device
from lmforge.tune.adapters import BottleneckConfig, add_bottleneck
from lmforge.tune.ia3 import IA3Config, add_ia3, merge_ia3
from lmforge.tune.lora import LoRAConfig, add_lora, merge_lora
from lmforge.tune.peft_io import (
    AdapterStore,
    bottleneck_adapter_config,
    ia3_adapter_config,
    lora_adapter_config,
    prefix_adapter_config,
    save_bottleneck,
    save_ia3,
    save_lora,
    save_prefix,
)
from lmforge.tune.prefix import PrefixConfig, add_prefix
from lmforge.tune.qlora import add_qlora, base_weight_bytes

Method = Literal["full", "lora", "qlora", "ia3", "prefix", "adapter"]
MERGEABLE = ("lora", "qlora", "ia3")  # the others add computation that no single matrix holds


@dataclass
class SFTDataConfig:
    source: str = ""  # a JSONL/JSON file of conversations, or an SFT sample (chitchat, squad, ...)
    limit: int | None = None  # use only the first N conversations
    val_fraction: float = 0.05  # held out, by a hash of each conversation
    pack: bool = True  # several conversations per row (each sees only itself)


@dataclass
class FinetuneConfig:
    model: str = ""  # checkpoint folder, run folder, .gguf file, or a sample name (smollm2)
    method: Method = "lora"
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # lora and qlora
    ia3: IA3Config = field(default_factory=IA3Config)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    adapter: BottleneckConfig = field(default_factory=BottleneckConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=100, batch_tokens=8 * 512, micro_batch=4, seq_len=512, eval_interval=25, eval_batches=4,
        checkpoint_interval=50, keep_checkpoints=2, log_interval=5))
    output: str = "runs/finetune"
    seed: int = 0
    resume: str = "auto"  # auto: the newest checkpoint under output if any; never; or a folder
    merge: bool = False  # also write output/merged: base + adapter as one checkpoint


#: the LM head only where a loss is taken, not on prompts (the same loss and gradients)
SFT_OBJECTIVE = CausalLMObjective(only_labelled=True)


def apply_method(model: nn.Module, config: FinetuneConfig) -> ModelStore:
    """Make `model` trainable the way `config.method` says; what its checkpoints hold."""
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return FullModel(source="lmforge finetune")
    if config.method in ("lora", "qlora"):
        names = (add_lora if config.method == "lora" else add_qlora)(model, config.lora)
        adapter_config = lora_adapter_config(config.lora, names, config.model)
    elif config.method == "ia3":
        names = add_ia3(model, config.ia3)
        adapter_config = ia3_adapter_config(config.ia3, names, config.model)
    elif config.method == "prefix":
        config.prefix.validate(pack=config.data.pack)
        add_prefix(model, config.prefix)
        adapter_config = prefix_adapter_config(config.prefix, model.config, config.model)
    elif config.method == "adapter":
        add_bottleneck(model, config.adapter)
        adapter_config = bottleneck_adapter_config(config.adapter, config.model)
    else:
        raise ConfigKeyError(f"method: {config.method!r} is not one of full, lora, qlora, ia3, prefix, "
                             "adapter")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return AdapterStore(adapter_config, trainable)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters; NF4 weights count by their element count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen += sum(2 * b.numel() for name, b in model.named_buffers() if name.endswith(".packed"))
    return trainable, trainable + frozen


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finetune(config: FinetuneConfig, *, quiet: bool = False, probe: Probe | None = None) -> dict[str, Any]:
    """Load, adapt, train, write the outputs; the summary (also in output/summary.json).

    `probe`: benchmark tasks scored at each evaluation point, as in `pretrain`."""
    from lmforge.infer.loading import load_model
    from lmforge.tune.datasets import load_conversations
    from lmforge.tune.sft_data import PackedSFT, split_examples

    if not config.model:
        raise ConfigKeyError("model is required: --model PATH, a run folder or a sample name (smollm2)")
    if not config.data.source:
        raise ConfigKeyError("data.source is required: --data FILE or a sample (chitchat, squad, hotpotqa, "
                             "identity, mtbench)")
    if config.merge and config.method not in (*MERGEABLE, "full"):
        raise ConfigKeyError(f"merge: a {config.method} adapter cannot be merged into the weights (it adds "
                             "computation of its own); run it with --adapter instead")
    config.schedule.validate()
    cfg = config.train
    cfg.accumulation()
    seed_everything(config.seed)
    device = resolve_device(cfg.device)

    loaded = load_model(config.model, device=str(device))
    model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.seq_len > model.config.max_seq_len:
        raise ConfigKeyError(f"train.seq_len ({cfg.seq_len}) exceeds the model's context "
                             f"({model.config.max_seq_len})")
    conversations = load_conversations(config.data.source, config.data.limit, quiet=quiet)
    train_convs, val_convs = split_examples(conversations, config.data.val_fraction, config.seed)
    train_data = PackedSFT.from_conversations(tokenizer, train_convs, cfg.seq_len, seed=config.seed,
                                              pack=config.data.pack)
    val_data = (PackedSFT.from_conversations(tokenizer, val_convs, cfg.seq_len, seed=config.seed,
                                             pack=config.data.pack, shuffle=False) if val_convs else None)

    store = apply_method(model, config)
    model.train()
    optimizer = build_optimizer(model, config.optim)
    trainable, total = parameter_counts(model)

    def lr_factor(step: int) -> float:
        return lr_at(step, cfg.steps, 1.0, config.schedule)

    run_config = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    trainer = Trainer(model, SFT_OBJECTIVE, optimizer, lr_factor, train_data, cfg, config.output,
                      val_data=val_data, run_config=run_config, tokenizer=tokenizer, quiet=quiet,
                      model_store=store, probe=probe)
    output = Path(config.output)
    start = resume_point(config.resume, config.output)
    if start is not None:
        trainer.resume(start)
        note = schedule_change_note(trainer.resumed_state, trainer.step, cfg.steps, config.schedule)
        if note and not quiet:
            print(f"finetune: note: {note}", file=sys.stderr, flush=True)
    elif trainer.metrics_path.exists():
        trainer.metrics_path.unlink()  # a fresh run: an old log would mix two runs
    with atomic_write(output / "recipe.json", "w") as f:
        f.write(json.dumps(run_config, indent=2))
    if not quiet:
        print(f"finetune: {config.method} on {loaded.path.name}: {human_count(trainable)} of "
              f"{human_count(total)} parameters train ({100 * trainable / total:.2f}%)\n"
              f"  train: {train_data.stats.describe()}\n"
              + (f"  held out: {val_data.stats.describe()}" if val_data else "  held out: none"),
              file=sys.stderr, flush=True)
    summary = trainer.fit()
    summary.update(write_outputs(model, config, tokenizer, output))
    stored, fp32 = base_weight_bytes(model)
    summary.update(method=config.method, trainable_parameters=trainable, parameters=total,
                   peak_rss_mb=round(peak_rss_mb(), 1), train_examples=train_data.stats.examples,
                   val_examples=val_data.stats.examples if val_data else 0,
                   packing_efficiency=round(train_data.stats.efficiency, 4))
    if stored:
        summary.update(nf4_base_bytes=stored, fp32_base_bytes=fp32)
    with atomic_write(output / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary


def write_outputs(model: nn.Module, config: FinetuneConfig, tokenizer: Any, output: Path) -> dict[str, str]:
    """The final adapter or model folder, and with `merge` the merged checkpoint."""
    from lmforge.model.checkpoint import save_checkpoint

    written: dict[str, str] = {}
    extra = {"source": f"lmforge finetune ({config.method}) of {config.model}"}
    if config.method == "full":
        save_checkpoint(output / "model", model, tokenizer=tokenizer, extra=extra)
        written["model"] = str(output / "model")
        return written
    save, settings = {"lora": (save_lora, config.lora), "qlora": (save_lora, config.lora),
                      "ia3": (save_ia3, config.ia3), "prefix": (save_prefix, config.prefix),
                      "adapter": (save_bottleneck, config.adapter)}[config.method]
    save(model, output / "adapter", settings, base_model=config.model, tokenizer=tokenizer)
    written["adapter"] = str(output / "adapter")
    if config.merge:
        if config.method == "qlora":  # merge onto the full-precision base, not its NF4 copy
            from lmforge.infer.loading import load_model
            from lmforge.tune.peft_io import load_lora

            base = load_model(config.model).model
            load_lora(base, output / "adapter")
            model = base
        with torch.no_grad():
            merged = merge_ia3(model) if config.method == "ia3" else merge_lora(model)
        save_checkpoint(output / "merged", merged, tokenizer=tokenizer, extra=extra)
        written["merged"] = str(output / "merged")
    return written


