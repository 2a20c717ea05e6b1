"""Fine-tuning: lmforge's full / LoRA / QLoRA / DoRA steps vs peft + transformers' `Trainer`, on a CPU.

The same model, data, batches and recipe on both sides, so that only the implementations differ:

1. **Model**: SmolLM2-135M-Instruct (lmforge's `smollm2` sample, a GGUF, dequantized to
   fp32), written once as a Hugging Face folder (`save_checkpoint`) that both sides load:
   lmforge with `load_checkpoint`, transformers with `AutoModelForCausalLM.from_pretrained`.
2. **Batches**: conversations of an SFT sample (`identity` by default), split, encoded
   (chat template, assistant-only labels) and packed once by lmforge (`PackedSFT`), then
   saved: every contender reads the same token rows in the same order. transformers gets
   the packed rows as `position_ids` that restart at every example, `labels` in its own
   convention and `shift_labels` (lmforge's next-token labels, as trl's padding-free
   collator passes them), with `use_cache=False`: transformers' causal mask then keeps
   each example to itself on SDPA (`masking_utils.find_packed_sequence_indices`), the
   same computation as lmforge's `packed_causal_mask`. (With `use_cache=True`, the
   config's default, transformers builds a cache during training and skips that
   detection: examples would attend across their seams.) The first step's losses must
   agree within 1e-4 (relative, fp32): the check that both compute the same thing.
3. **Recipe** (`SFTRecipe`): AdamW (torch's fused kernel on both sides, as lmforge's
   `build_optimizer` and transformers' default `adamw_torch_fused`), the same betas, eps
   and weight decay on the same tensors (matrices: LoRA's A and B, or for full
   fine-tuning the hidden matrices but not the embedding, norms or DoRA's magnitudes),
   the same lr with linear warmup and cosine per step (lmforge's `lr_at`, given to the
   Trainer as a `LambdaLR`), gradients clipped at 1.0; LoRA r=16, alpha=32, all linear
   layers of the blocks, dropout 0 (deterministic), and the same initial A matrices (saved
   once, loaded by both). QLoRA: bitsandbytes gets lmforge's 8-bit codes of the NF4 block
   scales (`nf4_absmax_codes`), so both dequantize to the same weights. `check_same_recipe`
   asserts the trainable tensors (by transformers' name), their decay and every step's lr
   agree before a run; the workers record the lrs actually applied, compared afterwards.
4. **Contenders**, each in its own subprocess (so peak memory is its own):
   - lmforge: `lmforge.tune.finetune.apply_method` (full, lora, qlora; DoRA is lora with
     `dora=True`), `build_optimizer`, and its `Trainer`, one `train_step` at a time;
   - the anchor: transformers' `LlamaForCausalLM` (QLoRA: loaded 4-bit with
     `BitsAndBytesConfig(load_in_4bit, nf4, double quant)` + `prepare_model_for_kbit_training`
     without gradient checkpointing), peft's `get_peft_model(LoraConfig(...))`, and
     `transformers.Trainer` (sequential sampler, the optimizer and scheduler above).
   Measured: trainable parameters, peak RSS (`memory_mb`), the median and best step time
   after `--skip` warm-up steps, the training loss per step, the held-out assistant loss before
   and after, and for QLoRA the bytes of the quantized base weights vs fp32.
5. **A chat sample** (`--only chat`): greedy replies of SmolLM2 from lmforge's engine before
   and after a LoRA SFT on the identity sample (`lmforge.tune.finetune.finetune`, merged).

    python benchmarks/bench_finetune.py --only train --methods full lora qlora dora --repeat 2  # docs' table
    python benchmarks/bench_finetune.py --only chat                 # the chat sample
    python benchmarks/bench_finetune.py --only train --methods lora --steps 3 --skip 1 --rows 2  # smoke
    python benchmarks/bench_finetune.py --json results.json         # full, lora, qlora once, then the chat
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from anchors import require
from machine import announce
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.model.config import human_count
from lmforge.model.hf import state_dict_to_hf
from lmforge.model.transformer import Transformer
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.schedule import ScheduleConfig, lr_at
from lmforge.train.trainer import TrainConfig, Trainer
from lmforge.tune.finetune import SFT_OBJECTIVE, FinetuneConfig, apply_method, parameter_counts
from lmforge.tune.lora import LoRAConfig, add_lora
from lmforge.tune.peft_io import peft_tensor_name
from lmforge.tune.qlora import base_weight_bytes

#: what lmforge is run against (benchmarks/anchors.py); bitsandbytes only for QLoRA,
#: accelerate because transformers' Trainer will not start without it
ANCHORS = ("transformers", "peft", "accelerate", "bitsandbytes")
METHODS = ("full", "lora", "qlora", "dora")
TOOLS = ("lmforge", "peft")
TOOL_LABELS = {"lmforge": "lmforge", "peft": "peft + transformers Trainer"}
#: peak learning rates: full fine-tuning moves every weight, so it takes a smaller one
METHOD_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "dora": 2e-4}
FIRST_LOSS_RTOL = 1e-4


# ------------------------------------------------------------------------- the shared recipe
@dataclass(frozen=True)
class SFTRecipe:
    """What both sides train with; lmforge's fine-tuning defaults where it has them."""

    method: str
    steps: int  # optimizer steps, timing warm-up included: the schedule spans all of them
    lr: float
    warmup: int = 2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    r: int = 16
    alpha: float = 32.0
    seed: int = 0

    @classmethod
    def for_method(cls, method: str, steps: int, **kw: Any) -> SFTRecipe:
        return cls(method=method, steps=steps, lr=kw.pop("lr", None) or METHOD_LR[method], **kw)

    @property
    def adapter(self) -> bool:
        return self.method != "full"

    def lora(self) -> LoRAConfig:
        return LoRAConfig(r=self.r, alpha=self.alpha, dropout=0.0, target_modules="all-linear",
                          dora=self.method == "dora")

    def optim(self) -> OptimConfig:
        return OptimConfig(name="adamw", lr=self.lr, weight_decay=self.weight_decay, beta1=self.betas[0],
                           beta2=self.betas[1], eps=self.eps)

    def schedule(self) -> ScheduleConfig:
        return ScheduleConfig(kind="cosine", warmup_steps=self.warmup, min_lr_ratio=self.min_lr_ratio)

    def lr_factor(self, step: int) -> float:
        """The multiplier of the peak lr at optimizer step `step` (0-based)."""
        return lr_at(step, self.steps, 1.0, self.schedule())

    def finetune_config(self) -> FinetuneConfig:
        lmforge_method = "lora" if self.method == "dora" else self.method
        return FinetuneConfig(method=lmforge_method, lora=self.lora(), optim=self.optim())  # type: ignore[arg-type]


# ------------------------------------------------------------------------- names on both sides
def hf_param_name(model: Transformer, name: str) -> str:
    """lmforge parameter name -> the name of the same tensor in transformers (and PEFT's files)."""
    if ".lora_" in name:
        return peft_tensor_name(name, model.config)
    [hf] = state_dict_to_hf({name: torch.empty(0)}, model.config, "llama")
    return hf


def peft_param_name(name: str) -> str:
    """A parameter of a peft model -> the tensor name PEFT saves it under: no adapter name
    ("default"), and DoRA's magnitude without its module's `.weight`."""
    name = name.replace(".default", "")
    return re.sub(r"lora_magnitude_vector\.weight$", "lora_magnitude_vector", name)


def initial_adapter(model: Transformer, recipe: SFTRecipe) -> dict[str, torch.Tensor]:
    """LoRA's starting tensors (A random as PEFT draws it, B zero, DoRA's magnitudes ||W||) under
    PEFT's names: both sides start from these, so their curves can agree after step 1 too."""
    torch.manual_seed(recipe.seed)
    add_lora(model, recipe.lora())
    return {peft_tensor_name(n, model.config): p.detach().clone().contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def copy_initial(named: list[tuple[str, nn.Parameter]], init: Mapping[str, torch.Tensor]) -> None:
    """Copy `init` into the trainable parameters (named by PEFT tensor names); both sets must be equal."""
    ours = {name for name, _ in named}
    if ours != set(init):
        raise AssertionError(f"trainable tensors differ from the initial adapter's: only here "
                             f"{sorted(ours - set(init))[:3]}, only there {sorted(set(init) - ours)[:3]}")
    with torch.no_grad():
        for name, p in named:
            p.copy_(init[name].to(p.dtype))


def lrs_by_group(groups: list[dict[str, Any]]) -> dict[str, float]:
    return {group.get("name", str(i)): group["lr"] for i, group in enumerate(groups)}


# ------------------------------------------------------------------------- lmforge's side
def lmforge_recipe(model: Transformer, recipe: SFTRecipe, init: Mapping[str, torch.Tensor] | None = None
                   ) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    """lmforge's fine-tuning path: `apply_method` (what `lmforge finetune` does), the initial
    adapter, `build_optimizer` (decay groups) and the schedule function."""
    torch.manual_seed(recipe.seed)
    apply_method(model, recipe.finetune_config())
    if recipe.adapter:
        copy_initial([(hf_param_name(model, n), p) for n, p in model.named_parameters() if p.requires_grad],
                     init or {})
    return build_optimizer(model, recipe.optim()), recipe.lr_factor


def lmforge_decay(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each trainable tensor's weight decay, under transformers' / PEFT's name."""
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    return {hf_param_name(model, n): decay[id(p)] for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------- the anchor's side
def anchor_model(folder: Path, recipe: SFTRecipe, init: Mapping[str, torch.Tensor] | None = None,
                 nf4_scales: Mapping[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """transformers' model from `folder`, made trainable the peft way, with the same initial adapter;
    and notes. QLoRA with `nf4_scales`: bitsandbytes' 8-bit absmax codes replaced by lmforge's
    (`nf4_absmax_codes`); the notes say what share of them changed."""
    import peft
    import transformers

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    notes: dict[str, Any] = {}
    if recipe.method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False  # a cache in training would turn off the packed-sequence mask
    if recipe.method == "qlora":
        if nf4_scales is not None:
            notes["nf4_scales_changed"] = use_nf4_scales(model, nf4_scales)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if not recipe.adapter:
        model.requires_grad_(True)
        return model, notes
    lora = recipe.lora()
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules="all-linear",
                             use_dora=lora.dora, bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    trainable = [(peft_param_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    copy_initial(trainable, init or {})
    return model, notes


def nf4_absmax_codes(model: Transformer) -> dict[str, torch.Tensor]:
    """lmforge's 8-bit codes of each linear layer's NF4 block scales, by transformers' module name.

    The 4-bit weights, the offset and the second-level scales lmforge writes are bitsandbytes'
    bytes; the 8-bit codes of the first-level scales differ on a few percent of blocks by one
    step of the code (tune/nf4.py: bitsandbytes' native CPU kernel picks a neighbouring code
    there). Giving the anchor these codes makes both QLoRA runs dequantize to the same floats.
    """
    from lmforge.tune.lora import target_module_names
    from lmforge.tune.nf4 import quantize_nf4

    return {hf_param_name(model, f"{name}.weight").removesuffix(".weight"):
            quantize_nf4(model.get_submodule(name).weight).absmax_codes
            for name in target_module_names(model, "all-linear")}


def use_nf4_scales(model: nn.Module, codes: Mapping[str, torch.Tensor]) -> float:
    """Put `codes` into bitsandbytes' 4-bit layers; the share of block scales that changed."""
    import bitsandbytes as bnb

    changed = total = 0
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if set(layers) != set(codes):
        raise AssertionError("the 4-bit layers are not the layers lmforge quantizes")
    for name, module in layers.items():
        state = module.weight.quant_state
        changed += int((state.absmax != codes[name]).sum())
        total += state.absmax.numel()
        state.absmax = codes[name].clone()
    return changed / max(1, total)


def anchor_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on the trainable matrices but the embedding tables and the LM head (lmforge's rule;
    found by module, so a tied head is its embedding); none on vectors. Groups keep their names."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embeddings.add(id(model.get_output_embeddings().weight))
    named: dict[str, list[tuple[str, nn.Parameter]]] = {"decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            named["decay" if p.dim() >= 2 and id(p) not in embeddings else "no_decay"].append((name, p))
    return [{"name": group, "names": [peft_param_name(n) for n, _ in pairs], "params": [p for _, p in pairs],
             "weight_decay": weight_decay if group == "decay" else 0.0} for group, pairs in named.items()]


def anchor_recipe(model: nn.Module, recipe: SFTRecipe) -> tuple[torch.optim.Optimizer, Any]:
    """torch's fused AdamW (transformers' `adamw_torch_fused`) and a `LambdaLR` on lmforge's schedule."""
    optimizer = torch.optim.AdamW(anchor_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                  betas=recipe.betas, eps=recipe.eps, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)


def anchor_decay(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {name: group["weight_decay"] for group in optimizer.param_groups for name in group["names"]}


def check_same_recipe(ours: Transformer, ours_optimizer: torch.optim.Optimizer,
                      lr_factor: Callable[[int], float], anchor_optimizer: torch.optim.Optimizer,
                      scheduler: Any, steps: int) -> int:
    """Raise AssertionError unless both train the same tensors with the same decay and schedule the
    same lr for every group at every step; the number of trainable tensors."""
    mine, theirs = lmforge_decay(ours, ours_optimizer), anchor_decay(anchor_optimizer)
    if mine != theirs:
        differ = sorted(n for n in mine.keys() | theirs.keys() if mine.get(n) != theirs.get(n))
        raise AssertionError("trainable tensors or their decay differ: " + ", ".join(
            f"{n} (lmforge {mine.get(n)}, anchor {theirs.get(n)})" for n in differ[:6]))
    ours_base = {g["name"]: g["base_lr"] for g in ours_optimizer.param_groups}
    anchor_base = dict(zip((g["name"] for g in anchor_optimizer.param_groups), scheduler.base_lrs))
    if ours_base != anchor_base:
        raise AssertionError(f"peak lrs differ: lmforge {ours_base}, anchor {anchor_base}")
    for step in range(steps):
        for (name, base), fn in zip(anchor_base.items(), scheduler.lr_lambdas):
            if not math.isclose(base * lr_factor(step), base * fn(step), rel_tol=1e-12, abs_tol=0.0):
                raise AssertionError(f"lr differs at step {step} in group {name}")
    return len(mine)


# ------------------------------------------------------------------------- the batches
def to_anchor_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """A packed lmforge batch as transformers takes it: `labels` in its convention (the token
    itself, shifted inside the loss), `shift_labels` (exactly lmforge's next-token labels,
    used instead), and `position_ids` restarting at each example."""
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    labels[:, 1:] = batch.labels[:, :-1]
    positions = batch.positions if batch.positions is not None else \
        torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
    return {"input_ids": batch.input_ids, "labels": labels, "shift_labels": batch.labels.contiguous(),
            "position_ids": positions.contiguous()}


class FixedBatches:
    """A `BatchSource` that hands out saved batches in order (the same ones the anchor reads)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.index = batches, 0

    def next_batch(self, rows: int) -> Batch:
        batch = self.batches[self.index]
        if batch.rows != rows:
            raise ValueError(f"saved batches have {batch.rows} rows, the trainer asked for {rows}")
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def save_batches(path: Path, train: list[Batch], val: list[Batch]) -> None:
    tensors = {}
    for split, batches in (("train", train), ("val", val)):
        for key in ("input_ids", "labels", "positions"):
            tensors[f"{split}.{key}"] = torch.stack([getattr(b, key) for b in batches]).contiguous()
    save_file(tensors, str(path))


def load_batches(path: Path) -> dict[str, list[Batch]]:
    tensors = load_file(str(path))
    return {split: [Batch(*row) for row in zip(*(tensors[f"{split}.{key}"]
                                               for key in ("input_ids", "labels", "positions")))]
            for split in ("train", "val")}


@torch.no_grad()
def held_out_loss(logits_of: Callable[[Batch], torch.Tensor], batches: list[Batch]) -> float:
    """Mean cross-entropy over every labelled (assistant) token of the held-out rows."""
    total, count = 0.0, 0
    for batch in batches:
        logits = logits_of(batch).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((batch.labels != IGNORE_INDEX).sum())
    return total / max(1, count)


# ------------------------------------------------------------------------- one contender, in-process
def run_lmforge(folder: Path, recipe: SFTRecipe, batches: dict[str, list[Batch]],
                init: Mapping[str, torch.Tensor] | None, run_dir: Path) -> dict[str, Any]:
    """lmforge: load, `apply_method`, its optimizer and `Trainer`, one timed `train_step` at a time."""
    from lmforge.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(folder)
    optimizer, lr_factor = lmforge_recipe(model, recipe, init)
    trainable, total = parameter_counts(model)
    model.eval()
    before = held_out_loss(lambda b: model(b.input_ids, b.positions).logits, batches["val"])
    train = batches["train"][:recipe.steps]
    rows, seq_len = train[0].input_ids.shape
    config = TrainConfig(steps=recipe.steps, batch_tokens=rows * seq_len, micro_batch=rows, seq_len=seq_len,
                         grad_clip=recipe.grad_clip, eval_interval=0, checkpoint_interval=0,
                         log_interval=10**9, device="cpu")
    trainer = Trainer(model, SFT_OBJECTIVE, optimizer, lr_factor, FixedBatches(train), config, run_dir,
                      quiet=True)
    losses, lrs, seconds = [], [], []
    for _ in range(recipe.steps):
        start = time.perf_counter()
        record = trainer.train_step()
        seconds.append(time.perf_counter() - start)
        if record is None:
            raise SystemExit("lmforge: a non-finite step")
        losses.append(record["loss"])
        lrs.append(lrs_by_group(optimizer.param_groups))
    model.eval()
    after = held_out_loss(lambda b: model(b.input_ids, b.positions).logits, batches["val"])
    stored, fp32 = base_weight_bytes(model)
    return {"trainable_parameters": trainable, "parameters": total, "losses": losses, "lrs": lrs,
            "step_seconds": seconds, "val_loss_before": before, "val_loss_after": after,
            "decay": lmforge_decay(model, optimizer), "base_bytes": stored, "base_fp32_bytes": fp32}


def anchor_base_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of bitsandbytes' 4-bit layers as stored: packed weights, absmax and its double
    quantization, bytes of the same weights in fp32); (0, 0) without 4-bit layers."""
    import bitsandbytes as bnb

    stored = fp32 = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight, state = module.weight, module.weight.quant_state
            parts = [weight, state.absmax]
            if state.nested:
                parts += [state.state2.absmax, state.offset]
            stored += sum(t.numel() * t.element_size() for t in parts)
            fp32 += 4 * module.in_features * module.out_features
    return stored, fp32


def run_anchor(folder: Path, recipe: SFTRecipe, batches: dict[str, list[Batch]],
               init: Mapping[str, torch.Tensor] | None, run_dir: Path,
               nf4_scales: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """peft + transformers: the model of `anchor_model`, trained by `transformers.Trainer` on the
    saved batches in order; losses and lrs recorded as the Trainer computes them."""
    import transformers

    model, notes = anchor_model(folder, recipe, init, nf4_scales)
    optimizer, scheduler = anchor_recipe(model, recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.eval()
    before = held_out_loss(lambda b: model(**_forward_inputs(b)).logits, batches["val"])
    train = batches["train"][:recipe.steps]
    rows = [{k: v[i] for k, v in to_anchor_inputs(batch).items()} for batch in train
            for i in range(batch.rows)]

    class RecordingTrainer(transformers.Trainer):
        """The stock Trainer; it only notes each step's loss and lrs as they are used."""

        losses: list[torch.Tensor] = []
        lrs: list[dict[str, float]] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.lrs.append(lrs_by_group(self.optimizer.param_groups))
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append((loss[0] if return_outputs else loss).detach())
            return loss

    class Clock(transformers.TrainerCallback):
        marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    args = transformers.TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=train[0].rows, gradient_accumulation_steps=1,
        max_steps=recipe.steps, max_grad_norm=recipe.grad_clip, learning_rate=recipe.lr,
        weight_decay=recipe.weight_decay, adam_beta1=recipe.betas[0], adam_beta2=recipe.betas[1],
        adam_epsilon=recipe.eps, train_sampling_strategy="sequential", logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, remove_unused_columns=False, disable_tqdm=True, seed=recipe.seed)
    clock = Clock()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=rows, data_collator=_stack,
                               optimizers=(optimizer, scheduler), callbacks=[clock])
    trainer.train()
    model.eval()
    after = held_out_loss(lambda b: model(**_forward_inputs(b)).logits, batches["val"])
    stored, fp32 = anchor_base_bytes(model) if recipe.method == "qlora" else (0, 0)
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    return {"trainable_parameters": trainable, "parameters": sum(p.numel() for p in model.parameters()),
            "losses": [float(x) for x in trainer.losses], "lrs": trainer.lrs, "step_seconds": seconds,
            "val_loss_before": before, "val_loss_after": after, "decay": anchor_decay(optimizer),
            "base_bytes": stored, "base_fp32_bytes": fp32, **notes}


def _forward_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    inputs = to_anchor_inputs(batch)
    return {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"]}


def _stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


RUNNERS = {"lmforge": run_lmforge, "peft": run_anchor}


# ------------------------------------------------------------------------- worker and driver
def memory_mb() -> tuple[float, float]:
    """(resident now, peak resident) of this process, in MiB.

    Linux's `VmHWM` is the peak of this program's own memory. `ru_maxrss` is not, for a child:
    the kernel carries it over from the process that forked it, so every worker would start
    at the driver's peak (about 1 GB here, the model it prepared). Elsewhere, `ru_maxrss`.
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return peak, peak


def worker(args: argparse.Namespace) -> int:
    """One contender in this (fresh) process; its results as JSON in `args.out`."""
    torch.set_num_threads(args.threads)
    rss_start = memory_mb()[0]
    tool, method = args.worker.split(":")
    recipe = SFTRecipe.for_method(method, args.skip + args.steps, seed=args.seed, lr=args.lr)
    work = Path(args.work)
    batches = load_batches(work / "batches.safetensors")
    init = load_file(str(work / "adapter-init-dora.safetensors" if method == "dora" else
                         work / "adapter-init.safetensors")) if recipe.adapter else None
    started = time.perf_counter()
    extra = {}
    if tool == "peft" and method == "qlora" and (work / "nf4-scales.safetensors").exists():
        extra["nf4_scales"] = load_file(str(work / "nf4-scales.safetensors"))
    result = RUNNERS[tool](work / "base", recipe, batches, init, work / f"run-{tool}-{method}", **extra)
    result.update(tool=tool, method=method, peak_rss_mb=memory_mb()[1], rss_after_imports_mb=rss_start,
                  wall_seconds=time.perf_counter() - started, load_average=os.getloadavg(),
                  recipe=asdict(recipe), threads=torch.get_num_threads())
    Path(args.out).write_text(json.dumps(result))
    return 0


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The shared inputs, once: the model folder, the packed batches, the initial adapters."""
    from lmforge.infer.loading import load_model
    from lmforge.model.checkpoint import save_checkpoint
    from lmforge.tune.datasets import load_conversations
    from lmforge.tune.sft_data import PackedSFT, split_examples

    loaded = load_model(args.model)
    save_checkpoint(work / "base", loaded.model, tokenizer=loaded.tokenizer)
    conversations = load_conversations(args.data, args.limit, quiet=True)
    train_convs, val_convs = split_examples(conversations, args.val_fraction, args.seed)
    train = PackedSFT.from_conversations(loaded.tokenizer, train_convs, args.seq_len, seed=args.seed)
    val = PackedSFT.from_conversations(loaded.tokenizer, val_convs, args.seq_len, seed=args.seed,
                                       shuffle=False)
    steps = args.skip + args.steps
    train_batches = [train.next_batch(args.rows) for _ in range(steps)]
    val_batches = list(val.first_batches(args.rows, args.val_batches))
    if val_batches[-1].rows != args.rows:
        val_batches.pop()
    save_batches(work / "batches.safetensors", train_batches, val_batches)
    for method, name in (("lora", "adapter-init"), ("dora", "adapter-init-dora")):
        if any(m in args.methods for m in ((method, "qlora") if method == "lora" else (method,))):
            recipe = SFTRecipe.for_method(method, steps, seed=args.seed)
            adapter = initial_adapter(load_model(work / "base").model, recipe)
            save_file(adapter, str(work / f"{name}.safetensors"))
    if "qlora" in args.methods and not args.bnb_own_scales:
        save_file(nf4_absmax_codes(loaded.model), str(work / "nf4-scales.safetensors"))
    tokens = sum(int((b.labels != IGNORE_INDEX).sum()) for b in train_batches)
    info = {"model": str(loaded.path), "data": args.data, "train": train.stats.describe(),
            "held_out": val.stats.describe(), "rows_per_step": args.rows, "seq_len": args.seq_len,
            "steps": steps, "assistant_tokens_per_step": tokens / steps,
            "val_rows": len(val_batches) * args.rows}
    print(f"  model: {loaded.path.name} (fp32), {human_count(loaded.model.num_parameters())} parameters\n"
          f"  data: {args.data}; train {info['train']}\n  held out: {info['held_out']} "
          f"({info['val_rows']} rows evaluated)\n  per step: {args.rows} packed rows x {args.seq_len} tokens "
          f"({tokens / steps:.0f} assistant tokens on average); {args.skip} warm-up + {args.steps} timed "
          "steps", flush=True)
    return info


def spawn(args: argparse.Namespace, work: Path, tool: str, method: str, tag: str) -> dict[str, Any]:
    out = work / f"result-{tool}-{method}-{tag}.json"
    command = [sys.executable, __file__, "--worker", f"{tool}:{method}", "--work", str(work),
               "--out", str(out), "--threads", str(args.threads), "--steps", str(args.steps),
               "--skip", str(args.skip), "--seed", str(args.seed),
               *(["--lr", str(args.lr)] if args.lr else [])]
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tool} {method} failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["load_before"] = load
    timed = result["step_seconds"][args.skip:]
    print(f"  {method:<5} {TOOL_LABELS[tool]:<28} step median {statistics.median(timed):6.2f} s, best "
          f"{min(timed):.2f}, worst {max(timed):.2f}; loss {result['losses'][0]:.4f} -> "
          f"{result['losses'][-1]:.4f}, "
          f"held-out {result['val_loss_before']:.4f} -> {result['val_loss_after']:.4f}, peak RSS "
          f"{result['peak_rss_mb']:,.0f} MB (load {load:.1f})", flush=True)
    return result


def compare(method: str, runs: dict[str, list[dict[str, Any]]], skip: int) -> dict[str, Any]:
    """One method's row: each tool's medians over repeats, the ratios and the agreement checks."""
    ours, theirs = runs["lmforge"][0], runs["peft"][0]
    if ours["decay"] != theirs["decay"]:
        raise AssertionError(f"{method}: the two runs trained different tensors or decays")
    if ours["lrs"] != theirs["lrs"] and not all(
            a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-12) for k in a)
            for a, b in zip(ours["lrs"], theirs["lrs"], strict=True)):
        raise AssertionError(f"{method}: the lrs applied differ between the two runs")
    first = (ours["losses"][0], theirs["losses"][0])
    rel = abs(first[0] - first[1]) / abs(first[1])
    gaps = [abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])]
    row: dict[str, Any] = {"method": method, "first_loss": first, "first_loss_rel_diff": rel,
                           "max_loss_gap": max(gaps), "lr_steps_checked": len(ours["lrs"])}
    for tool, results in runs.items():
        medians = [statistics.median(r["step_seconds"][skip:]) for r in results]
        row[tool] = {"step_seconds": statistics.median(medians), "step_seconds_per_repeat": medians,
                     "best_step_seconds": min(min(r["step_seconds"][skip:]) for r in results),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
                     "rss_after_imports_mb": results[0]["rss_after_imports_mb"],
                     "trainable_parameters": results[0]["trainable_parameters"],
                     "losses": results[0]["losses"], "val_loss_before": results[0]["val_loss_before"],
                     "val_loss_after": results[0]["val_loss_after"], "base_bytes": results[0]["base_bytes"],
                     "base_fp32_bytes": results[0]["base_fp32_bytes"],
                     "load": [r["load_before"] for r in results]}
    row["speedup"] = row["peft"]["step_seconds"] / row["lmforge"]["step_seconds"]
    row["speedup_best"] = row["peft"]["best_step_seconds"] / row["lmforge"]["best_step_seconds"]
    if "nf4_scales_changed" in theirs:
        row["nf4_scales_changed"] = theirs["nf4_scales_changed"]
        print(f"  {method}: bitsandbytes read lmforge's 8-bit codes of the NF4 scales ("
              f"{100 * theirs['nf4_scales_changed']:.2f}% of its own differed by a code step)", flush=True)
    agree = "agree" if rel <= FIRST_LOSS_RTOL else "DISAGREE"
    print(f"  {method}: first-step loss lmforge {first[0]:.6f}, peft {first[1]:.6f} (relative difference "
          f"{rel:.1e}: {agree}); largest gap over {len(gaps)} steps {max(gaps):.2e}; lrs equal at every "
          f"step; lmforge {row['speedup']:.2f}x the anchor's steps/s (median step), "
          f"{row['speedup_best']:.2f}x (best step)", flush=True)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n  | method | tool | trainable params | peak RSS | step: median (best) | train loss "
          "(first -> last) | held-out loss (before -> after) | base weights vs fp32 |\n"
          "  |---|---|---|---|---|---|---|---|")
    for row in rows:
        for tool in TOOLS:
            side = row[tool]
            stored, fp32 = side["base_bytes"], side["base_fp32_bytes"]
            base = (f"{stored / 2**20:.1f} / {fp32 / 2**20:.1f} MiB = {100 * stored / fp32:.1f}%"
                    if stored else "")
            print(f"  | {row['method']} | {TOOL_LABELS[tool]} | {side['trainable_parameters']:,} | "
                  f"{side['peak_rss_mb']:,.0f} MiB | {side['step_seconds']:.2f} s "
                  f"({side['best_step_seconds']:.2f} s) | "
                  f"{side['losses'][0]:.4f} -> {side['losses'][-1]:.4f} | "
                  f"{side['val_loss_before']:.4f} -> {side['val_loss_after']:.4f} | {base} |", flush=True)
    print("\n  | method | lmforge / anchor, steps per second: median (best) step | first-step loss, relative "
          "difference | largest train-loss gap |\n  |---|---|---|---|")
    for row in rows:
        print(f"  | {row['method']} | **{row['speedup']:.2f}x** ({row['speedup_best']:.2f}x) | "
              f"{row['first_loss_rel_diff']:.1e} | {row['max_loss_gap']:.1e} |", flush=True)


def benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    info = prepare(args, work)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {t: [] for t in TOOLS} for m in args.methods}
    for repeat in range(args.repeat):
        for method in args.methods:  # alternate which tool goes first, so drifting load hits both alike
            order = TOOLS if (repeat + args.methods.index(method)) % 2 == 0 else TOOLS[::-1]
            for tool in order:
                runs[method][tool].append(spawn(args, work, tool, method, str(repeat)))
    print(flush=True)
    rows = [compare(method, runs[method], args.skip) for method in args.methods]
    print_table(rows)
    bad = [row["method"] for row in rows if row["first_loss_rel_diff"] > FIRST_LOSS_RTOL]
    if bad:
        print(f"\n  first-step losses disagree for {', '.join(bad)}: those rows do not compare one "
              "computation", flush=True)
    return {"data": info, "rows": rows, "runs": runs}


# ------------------------------------------------------------------------- the chat sample
CHAT_QUESTIONS = ("Who are you?", "Who created you?", "Are you ChatGPT?", "What is the capital of France?")


def chat_sample(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Greedy replies before and after a LoRA SFT on the identity sample, through lmforge's engine."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.tune.finetune import SFTDataConfig, finetune

    def replies(spec: str | Path) -> list[str]:
        engine = Engine.from_pretrained(spec, max_batch_size=1)
        params = SamplingParams(temperature=0.0, max_tokens=args.chat_tokens)
        out = []
        for question in CHAT_QUESTIONS:
            prompt = engine.tokenizer.encode_chat_prompt([{"role": "user", "content": question}])
            out.append("".join(event.text for event in engine.generate(prompt, params)).strip())
        return out

    before = replies(args.model)
    config = FinetuneConfig(
        model=args.model, method="lora", data=SFTDataConfig(source="identity"),
        lora=LoRAConfig(r=16, alpha=32.0), optim=OptimConfig(lr=args.chat_lr, weight_decay=0.0),
        schedule=ScheduleConfig(warmup_steps=5),
        train=TrainConfig(steps=args.chat_steps, batch_tokens=4 * 256, micro_batch=4, seq_len=256,
                          eval_interval=args.chat_steps, eval_batches=4, checkpoint_interval=0,
                          log_interval=10, device="cpu"),
        output=str(work / "identity-lora"), merge=True, resume="never")
    started = time.perf_counter()
    summary = finetune(config, quiet=True)
    seconds = time.perf_counter() - started
    after = replies(summary["merged"])
    print(f"  LoRA SFT on identity: {args.chat_steps} steps of 4 x 256 tokens, lr {args.chat_lr:g}, "
          f"{seconds:.0f} s; final loss {summary['final_loss']:.3f}, held-out "
          f"{summary.get('val_loss', math.nan):.3f}"
          f"\n  equivalent command: lmforge finetune --model {args.model} --data identity --method lora "
          f"-o runs/identity --merge --optim.lr={args.chat_lr:g} --optim.weight_decay=0 "
          f"--schedule.warmup_steps=5 --train.steps={args.chat_steps} --train.micro_batch=4 "
          f"--train.batch_tokens=1024 --train.seq_len=256\n", flush=True)
    for question, a, b in zip(CHAT_QUESTIONS, before, after):
        print(f"  Q: {question}\n    before: {a!r}\n    after:  {b!r}", flush=True)
    return {"questions": CHAT_QUESTIONS, "before": before, "after": after, "steps": args.chat_steps,
            "lr": args.chat_lr, "seconds": seconds, "final_loss": summary["final_loss"],
            "val_loss": summary.get("val_loss")}


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads, the same for every contender")
    parser.add_argument("--only", choices=["train", "chat"], action="append")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["full", "lora", "qlora"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="identity", help="an SFT sample or a conversations file")
    parser.add_argument("--limit", type=int, help="use only the first N conversations")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--val-batches", type=int, default=2, help="held-out batches of --rows rows")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per contender")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps before the timed ones")
    parser.add_argument("--lr", type=float, help="peak lr for every method (default: full 2e-5, else 2e-4)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender (the median counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bnb-own-scales", action="store_true",
                        help="QLoRA: let bitsandbytes keep its own 8-bit codes of the NF4 scales (by "
                             "default it gets lmforge's, so both dequantize to the same weights)")
    parser.add_argument("--chat-steps", type=int, default=60)
    parser.add_argument("--chat-lr", type=float, default=1e-3)
    parser.add_argument("--chat-tokens", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--work", type=Path, help="prepare the shared inputs here and keep them (default: a "
                                                   "temporary folder)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # tool:method, run by the driver
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    parts = args.only or ["train", "chat"]
    if "train" in parts:
        require("transformers", "peft", "accelerate", *(("bitsandbytes",) if "qlora" in args.methods else ()))
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            raise SystemExit(f"bench_finetune.py: needs transformers 5 (its Trainer's "
                             f"train_sampling_strategy and packed-sequence masks), found "
                             f"{transformers.__version__}: pip install -U transformers")
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": announce(ANCHORS), "threads": args.threads}
    print(flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        if args.work:
            args.work.mkdir(parents=True, exist_ok=True)
        tmp = str(args.work or tmp)
        if "train" in parts:
            print(f"1. one fine-tuning step, lmforge vs peft + transformers' Trainer ({args.threads} "
                  "threads)", flush=True)
            results["train"] = benchmark(args, Path(tmp))
        if "chat" in parts:
            print("\n2. a chat sample before and after LoRA SFT (greedy, lmforge's engine)", flush=True)
            results["chat"] = chat_sample(args, Path(tmp))
    results["load_after"] = os.getloadavg()
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
