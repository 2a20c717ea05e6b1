"""Training speed: lmforge's training step and recipe vs transformers' GPT-2, on one CPU.

1. **Step throughput**: tokens/s of one optimizer step (forward + backward + gradient
   clipping + AdamW) of lmforge's `Transformer`, driven by lmforge's own
   `Trainer.train_step`, against `transformers.GPT2LMHeadModel` at the same GPT-2 config,
   with the same initial weights (copied from lmforge's model), on the same batches, in
   fp32 and in bf16 autocast, eager. The first step's losses must agree (they are the
   same model on the same batch): a check that the comparison is like for like. The
   transformers side gets torch's fused AdamW (what its `Trainer` uses by default on
   torch >= 2.8, `adamw_torch_fused`) with the decay groups of `Recipe`. In bf16 the two
   do not run the same kernel on a CPU without AVX-512 BF16 / AMX: lmforge's `Linear`
   rounds to bf16 and multiplies on the fp32 GEMM, transformers gets PyTorch's generic
   bf16 matmul (printed at the start: its GFLOP/s). Timing rounds
   alternate (lmforge, transformers, lmforge, ...) and the median counts, so the other
   tenants of a shared machine slow both alike. MFU = tokens/s x FLOPs per token
   (`ModelConfig.flops_per_token`) / the matmul peak measured in every round
   (`measure_matmul_flops`, in the step's precision, as the trainer's `peak_flops: measure`).
2. **Time to a target validation loss** on lmforge's python-docs sample (tokenized with a
   4,096-token BPE trained on it): three runs, stepped in turn, one optimizer step each,
   so that they share the machine's ups and downs:
   - the anchor: transformers GPT-2 + torch AdamW + warmup/cosine to zero (`Recipe`);
   - lmforge's GPT-2 with the same weights, data and recipe (isolates implementation
     speed); before the race `check_same_recipe` asserts that both decay the same
     tensors and schedule the same lr at every step, and during it every step's lrs
     are compared again, so the two runs differ in implementation only;
   - lmforge's llama-style model (RoPE, RMSNorm, SwiGLU, GQA) of about the same size
     with the same AdamW recipe, and with lmforge's own: Muon on the hidden matrices +
     AdamW elsewhere, warmup-stable-decay.
   The target is the anchor's final validation loss (or `--target`); each run reports
   the training seconds (evaluation excluded) and steps until its validation loss first
   reached it.

    python benchmarks/bench_train.py                                   # everything (about 2 hours here)
    python benchmarks/bench_train.py --only speed --models 14m --precisions fp32 --rounds 5
    python benchmarks/bench_train.py --only loss                       # the race of docs/benchmarks.md
    python benchmarks/bench_train.py --only loss --steps 4 --eval-every 2 --race-micro-batch 2  # smoke
    python benchmarks/bench_train.py --json results.json

Speed does not depend on the weights' values, so part 1 trains on random token ids.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from anchors import require
from machine import announce
from torch import nn

from lmforge.data.samples import python_docs_dir
from lmforge.data.shards import (
    TokenizeConfig,
    TokenShard,
    load_shard_set,
    read_documents_from,
    tokenize_documents,
)
from lmforge.hub import cache_dir
from lmforge.model.config import ModelConfig, human_count, preset
from lmforge.model.hf import config_to_hf, state_dict_to_hf
from lmforge.model.transformer import Transformer
from lmforge.train.data import TokenWindows
from lmforge.train.objectives import CausalLMObjective
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.schedule import ScheduleConfig, lr_at
from lmforge.train.trainer import TrainConfig, Trainer, measure_matmul_flops

#: what lmforge is run against (benchmarks/anchors.py)
ANCHORS = ("transformers",)
CACHE = Path(os.environ.get("LMFORGE_BENCH_DATA") or cache_dir() / "bench-data")
CPU = torch.device("cpu")

#: GPT-2-shaped configurations for the throughput part: a small one (14.2M parameters,
#: GPT-2's layout with a 8,192-token vocabulary) and GPT-2 small itself (124M).
MODELS: dict[str, Callable[[], ModelConfig]] = {
    "14m": lambda: ModelConfig(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, d_ff=1536,
                               max_seq_len=1024),
    "124m": lambda: preset("gpt2"),
}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------- the two models
def hf_gpt2(config: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """transformers' GPT2LMHeadModel holding exactly lmforge's weights (tied head, no dropout)."""
    import transformers

    values = config_to_hf(config, model_type="gpt2", bos_token_id=0, eos_token_id=0)
    values = {k: v for k, v in values.items()
              if k not in ("architectures", "model_type", "dtype", "torch_dtype")}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**values))
    missing, unexpected = model.load_state_dict(state_dict_to_hf(state, config, "gpt2"), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise RuntimeError("transformers' LM head is not tied to its embedding")
    return model


# ------------------------------------------------------------------------- the shared recipe
@dataclass(frozen=True)
class Recipe:
    """The GPT-2 + AdamW recipe both implementations train with: AdamW, linear warmup, then a
    half cosine to zero, gradients clipped at 1.0.

    The choices are lmforge's library defaults (`train/optim.py`, `train/schedule.py`); the
    anchor adopts them rather than the library copying transformers' `Trainer`, whose
    defaults differ in two places that used to make this race unequal:

    - weight decay goes to the hidden matrices only, not to biases, norm gains or embedding
      tables (the token embedding, which is also the tied LM head, and the positions):
      transformers' `Trainer` decays every embedding;
    - warmup runs lr * (step + 1) / warmup, so step 0 already learns and step
      `warmup - 1` reaches the peak, and the cosine reaches 0 exactly at the last step:
      `get_cosine_schedule_with_warmup` gives step 0 an lr of 0 (a step that moves nothing)
      and so ran one step behind lmforge's schedule all the way.
    """

    lr: float
    steps: int
    warmup: int
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8

    def optim(self) -> OptimConfig:
        return OptimConfig(name="adamw", lr=self.lr, weight_decay=self.weight_decay, beta1=self.betas[0],
                           beta2=self.betas[1], eps=self.eps)

    def schedule(self) -> ScheduleConfig:
        return ScheduleConfig(kind="cosine", warmup_steps=self.warmup, min_lr_ratio=0.0)

    def lr_factor(self, step: int) -> float:
        """The multiplier of the peak lr at optimizer step `step` (0-based)."""
        return lr_at(step, self.steps, 1.0, self.schedule())


def lmforge_recipe(model: Transformer,
                   recipe: Recipe) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    """lmforge's side: its own optimizer builder (decay groups included) and schedule function."""
    return build_optimizer(model, recipe.optim()), recipe.lr_factor


def anchor_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The anchor's decay groups: every matrix but the embedding tables (found by module type,
    so the tied head, which is the token embedding's tensor, goes with it) decays; biases and
    LayerNorm gains do not. Each group keeps its parameters' names under `names`."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    named: dict[str, list[tuple[str, nn.Parameter]]] = {"decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        named["decay" if p.dim() >= 2 and id(p) not in embeddings else "no_decay"].append((name, p))
    return [{"name": group, "names": [n for n, _ in pairs], "params": [p for _, p in pairs],
             "weight_decay": weight_decay if group == "decay" else 0.0} for group, pairs in named.items()]


def anchor_recipe(model: nn.Module, recipe: Recipe) -> tuple[torch.optim.Optimizer, Any]:
    """The anchor's side: torch's fused AdamW (transformers' `adamw_torch_fused`) over
    `anchor_param_groups`, and a `LambdaLR` stepped after every optimizer step."""
    optimizer = torch.optim.AdamW(anchor_param_groups(model, recipe.weight_decay), lr=recipe.lr,
                                  betas=recipe.betas, eps=recipe.eps, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)


def decay_by_hf_name(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """lmforge's weight decay per parameter, under transformers' GPT-2 names: each tensor is
    replaced by its decay and sent through the mapping that copied the weights (`state_dict_to_hf`,
    which also fuses q, k, v into c_attn, so their decays must agree)."""
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    flags = {name: torch.full(p.shape, decay_of[id(p)], dtype=torch.float64)  # exact: no fp32 rounding
             for name, p in model.named_parameters()}
    out = {}
    for name, tensor in state_dict_to_hf(flags, model.config, "gpt2").items():
        values = tensor.unique()
        if values.numel() != 1:
            raise AssertionError(f"{name} is fused from lmforge tensors with different weight decays")
        out[name] = float(values)
    return out


def anchor_decay_by_name(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {name: group["weight_decay"] for group in optimizer.param_groups for name in group["names"]}


def lrs_by_group(groups: list[dict[str, Any]], key: str = "lr") -> dict[str, float]:
    return {group.get("name", str(i)): group[key] for i, group in enumerate(groups)}


def same_lrs(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[n], b[n], rel_tol=1e-12, abs_tol=0.0) for n in a)


def check_same_recipe(ours: Transformer, ours_optimizer: torch.optim.Optimizer,
                      lr_factor: Callable[[int], float], anchor_optimizer: torch.optim.Optimizer,
                      scheduler: Any, steps: int) -> None:
    """Raise AssertionError unless the two sides decay the same tensors by the same amount
    and give every group the same lr at every step of `steps`."""
    ours_decay, anchor_decay = decay_by_hf_name(ours, ours_optimizer), anchor_decay_by_name(anchor_optimizer)
    if ours_decay != anchor_decay:
        differ = sorted(n for n in ours_decay.keys() | anchor_decay.keys()
                        if ours_decay.get(n) != anchor_decay.get(n))
        raise AssertionError("weight decay differs: " + ", ".join(
            f"{n} (lmforge {ours_decay.get(n)}, anchor {anchor_decay.get(n)})" for n in differ))
    ours_base = lrs_by_group(ours_optimizer.param_groups, "base_lr")
    anchor_base = dict(zip((g["name"] for g in anchor_optimizer.param_groups), scheduler.base_lrs))
    if ours_base.keys() != anchor_base.keys():
        raise AssertionError(f"param groups differ: lmforge {sorted(ours_base)}, "
                             f"anchor {sorted(anchor_base)}")
    for step in range(steps):  # LambdaLR runs step s at base_lr * lambda(s)
        ours_lr = {name: base * lr_factor(step) for name, base in ours_base.items()}
        anchor_lr = {name: base * fn(step)
                     for (name, base), fn in zip(anchor_base.items(), scheduler.lr_lambdas)}
        if not same_lrs(ours_lr, anchor_lr):
            raise AssertionError(f"lr differs at step {step}: lmforge {ours_lr}, anchor {anchor_lr}")


class HFStep:
    """One optimizer step of transformers' GPT-2, as its Trainer's training step does it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: TokenWindows,
                 micro_batch: int, precision: str, scheduler: Any = None) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.micro_batch, self.precision, self.scheduler = micro_batch, precision, scheduler
        self.last_lrs: dict[str, float] = {}  # each group's lr in the last step

    def __call__(self) -> float:
        self.model.train()
        batch = self.data.next_batch(self.micro_batch)
        inputs, targets = batch.input_ids, batch.labels.contiguous()
        with autocast(self.precision):
            loss = self.model(input_ids=inputs, labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.last_lrs = lrs_by_group(self.optimizer.param_groups)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def evaluate(self, val: TokenWindows, batches: int) -> float:
        self.model.eval()
        losses = []
        for batch in val.first_batches(self.micro_batch, batches):
            with autocast(self.precision):
                logits = self.model(input_ids=batch.input_ids).logits.float()
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1)))
        return float(torch.stack(losses).mean())


def lmforge_trainer(model: Transformer, optimizer: torch.optim.Optimizer, lr_factor: Callable[[int], float],
                    data: TokenWindows, micro_batch: int, seq_len: int, precision: str, run_dir: Path,
                    *, val: TokenWindows | None = None, eval_batches: int = 4, steps: int = 1) -> Trainer:
    config = TrainConfig(steps=steps, batch_tokens=micro_batch * seq_len, micro_batch=micro_batch,
                         seq_len=seq_len, precision=precision,  # type: ignore[arg-type]
                         eval_batches=eval_batches, device="cpu")
    return Trainer(model, CausalLMObjective(), optimizer, lr_factor, data, config, run_dir, val_data=val,
                   quiet=True)


def random_windows(vocab_size: int, seq_len: int, seed: int) -> TokenWindows:
    """Random token ids as one in-memory shard: the speed of a step does not depend on them."""
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=256 * (seq_len + 1), dtype=np.int64)
    return TokenWindows([TokenShard(Path("random-tokens"), tokens, np.zeros(1, np.int64))], seq_len, seed)


# ------------------------------------------------------------------------- 1. throughput
def rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def median_spread(values: list[float]) -> str:
    return f"{rate(statistics.median(values))} ({rate(min(values))}-{rate(max(values))})"


def throughput(name: str, precision: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One model at one precision: the first step's losses, then interleaved timed rounds."""
    config = MODELS[name]()
    seq_len, micro_batch = args.seq_len, args.micro_batch[name]
    tokens = micro_batch * seq_len
    torch.manual_seed(0)
    model = Transformer(config)
    hf = hf_gpt2(config, model.state_dict())
    recipe = Recipe(lr=1e-4, steps=1, warmup=0)  # a constant lr: speed does not depend on the schedule
    trainer = lmforge_trainer(model, build_optimizer(model, recipe.optim()), lambda step: 1.0,
                              random_windows(config.vocab_size, seq_len, 1), micro_batch, seq_len, precision,
                              tmp / f"{name}-{precision}")
    hf_step = HFStep(hf, anchor_recipe(hf, recipe)[0], random_windows(config.vocab_size, seq_len, 1),
                     micro_batch, precision)

    def ours() -> float:
        record = trainer.train_step()
        assert record is not None
        return record["loss"]

    # step 1, same weights, same batch: the losses must agree (and both are warmed up)
    first = ours(), hf_step()
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    agree = abs(first[0] - first[1]) <= tolerance * max(1.0, abs(first[1]))
    print(f"  {name} {precision}: {human_count(config.num_parameters())} parameters, "
          f"{micro_batch} x {seq_len} tokens per step; first-step loss lmforge {first[0]:.6f}, "
          f"transformers {first[1]:.6f} ({'agree' if agree else 'DISAGREE'})", flush=True)
    if not agree:
        raise SystemExit("the two models disagree on the first step: the comparison would be meaningless")

    times: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    peaks: list[float] = []
    for _ in range(args.rounds[name]):
        peaks.append(measure_matmul_flops(CPU, torch.float32, seconds=0.5))
        for label, step in (("lmforge", ours), ("transformers", hf_step)):
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    rates = {label: [tokens / t for t in values] for label, values in times.items()}
    per_round = [a / b for a, b in zip(rates["lmforge"], rates["transformers"])]
    peak = statistics.median(peaks)
    flops = config.flops_per_token(seq_len)
    row: dict[str, Any] = {"model": name, "parameters": config.num_parameters(), "precision": precision,
                           "micro_batch": micro_batch, "seq_len": seq_len, "rounds": args.rounds[name],
                           "first_loss": {"lmforge": first[0], "transformers": first[1]},
                           "fp32_matmul_peak_flops": peak, "flops_per_token": flops}
    for label, values in rates.items():
        median = statistics.median(values)
        row[label] = {"tokens_per_s": values, "median": median, "mfu": median * flops / peak}
        print(f"    {label:<13} {median_spread(values)} tok/s   MFU {100 * median * flops / peak:5.1f}%",
              flush=True)
    row["ratio"] = row["lmforge"]["median"] / row["transformers"]["median"]
    row["ratio_per_round"] = per_round
    print(f"    lmforge / transformers: {row['ratio']:.2f}x (per round {min(per_round):.2f}-"
          f"{max(per_round):.2f}x); fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (median, "
          f"{min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f})", flush=True)
    return row


def print_speed_table(rows: list[dict[str, Any]]) -> None:
    """The throughput rows as docs/benchmarks.md's table."""
    print("\n  | model | precision | micro-batch | lmforge tok/s (MFU) | transformers tok/s (MFU) | ratio |\n"
          "  |---|---|---|---|---|---|")
    for row in rows:
        ours, theirs = (f"{rate(row[side]['median'])} ({100 * row[side]['mfu']:.1f}%)"
                        for side in ("lmforge", "transformers"))
        spread = f"{min(row['ratio_per_round']):.2f}-{max(row['ratio_per_round']):.2f}"
        shape = f"{row['micro_batch']} x {row['seq_len']}"
        print(f"  | {human_count(row['parameters'])} | {row['precision']} | {shape} | {ours} | {theirs} | "
              f"{row['ratio']:.2f}x ({spread}) |", flush=True)
    print(flush=True)


# ------------------------------------------------------------------------- 2. time to a loss
def pydocs_shards(vocab_size: int) -> Path:
    """lmforge's python-docs sample, tokenized with a BPE trained on its tutorial, HOWTOs and reference."""
    folder = CACHE / f"pydocs-{vocab_size}"
    if (folder / "meta.json").exists():
        return folder
    from lmforge.tokenizer.cli import DEFAULT_SPECIAL_TOKENS
    from lmforge.tokenizer.train import train_bpe_from_files

    sources = python_docs_dir() / "_sources"
    texts = sorted(p for part in ("tutorial", "howto", "reference") for p in (sources / part).glob("*.txt"))
    print(f"  training a {vocab_size}-token BPE on {len(texts)} files, tokenizing {sources} ...", flush=True)
    tokenizer = train_bpe_from_files(texts, vocab_size, special_tokens=DEFAULT_SPECIAL_TOKENS).to_tokenizer()
    tokenize_documents(read_documents_from([sources]), tokenizer, folder, TokenizeConfig(val_fraction=0.02),
                       tokenizer_name=f"pydocs-bpe-{vocab_size}")
    return folder


@dataclass
class Run:
    """One contender of the race: a step function, an evaluation, and what it measured."""

    label: str
    parameters: int
    step: Callable[[], float]
    evaluate: Callable[[], float]
    last_lrs: Callable[[], dict[str, float]]  # each param group's lr in the last step
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # training loss per step
    curve: list[dict[str, float]] = field(default_factory=list)

    def reached(self, target: float) -> dict[str, float] | None:
        return next((point for point in self.curve if point["val_loss"] <= target), None)


CONTENDERS = ("anchor", "gpt2", "llama-adamw", "llama")
#: the arguments that shape the race (recorded in its JSON)
RACE_ARGS = ("contenders", "steps", "race_", "warmup", "adamw_lr", "muon_", "decay_fraction", "eval_",
             "vocab", "target", "seed", "threads")


def race(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    folder = pydocs_shards(args.vocab)
    meta, train_shards = load_shard_set(folder, "train")
    _, val_shards = load_shard_set(folder, "val")
    vocab, splits = meta["vocab_size"], meta["splits"]
    seq_len, micro_batch, steps = args.race_seq_len, args.race_micro_batch, args.steps
    print(f"  data: {splits['train']['tokens']:,} training tokens, {splits['val']['tokens']:,} validation "
          f"tokens, vocabulary {vocab}; {micro_batch} x {seq_len} tokens per step, {steps} steps, "
          f"validation every {args.eval_every} steps on {args.eval_batches * micro_batch} windows",
          flush=True)
    val = TokenWindows(val_shards, seq_len, args.seed, shuffle=False)

    def train_windows() -> TokenWindows:  # every contender sees the same batches in the same order
        return TokenWindows(train_shards, seq_len, args.seed)

    runs: dict[str, Run] = {}
    recipe = Recipe(lr=args.adamw_lr, steps=steps, warmup=args.warmup)
    print(f"  the GPT-2 recipe, both implementations: {recipe}", flush=True)
    # the anchor and lmforge's GPT-2: one model (same weights), one recipe, two implementations
    gpt2 = ModelConfig(vocab_size=vocab, d_model=192, n_layers=4, n_heads=6, d_ff=768, max_seq_len=seq_len)
    torch.manual_seed(args.seed)
    ours_gpt2 = Transformer(gpt2)
    ours_optimizer, lr_factor = lmforge_recipe(ours_gpt2, recipe)
    hf = hf_gpt2(gpt2, ours_gpt2.state_dict())
    anchor_optimizer, scheduler = anchor_recipe(hf, recipe)
    check_same_recipe(ours_gpt2, ours_optimizer, lr_factor, anchor_optimizer, scheduler, steps)
    print(f"  checked: the same weight decay on the same {len(decay_by_hf_name(ours_gpt2, ours_optimizer))} "
          f"tensors and the same lr at each of the {steps} steps on both sides", flush=True)
    if "anchor" in args.contenders:
        hf_step = HFStep(hf, anchor_optimizer, train_windows(), micro_batch, "fp32", scheduler)
        runs["anchor"] = Run("transformers GPT-2, AdamW, cosine", gpt2.num_parameters(), hf_step,
                             lambda: hf_step.evaluate(val, args.eval_batches), lambda: hf_step.last_lrs)
    if "gpt2" in args.contenders:
        runs["gpt2"] = trainer_run("lmforge GPT-2, same recipe", ours_gpt2, ours_optimizer, lr_factor,
                                   train_windows(), val, args, tmp / "gpt2")
    # the same recipe on a llama-style model, and lmforge's own recipe on it
    llama = ModelConfig.from_dict(preset("llama-tiny").to_dict() | dict(
        vocab_size=vocab, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512, max_seq_len=seq_len))
    if "llama-adamw" in args.contenders:
        torch.manual_seed(args.seed)
        model = Transformer(llama)
        runs["llama-adamw"] = trainer_run("lmforge llama-style, AdamW, cosine", model,
                                          *lmforge_recipe(model, recipe), train_windows(), val, args,
                                          tmp / "llama-adamw")
    if "llama" in args.contenders:
        torch.manual_seed(args.seed)
        model = Transformer(llama)
        muon = OptimConfig(name="muon", lr=args.muon_lr, muon_adam_lr=args.muon_adam_lr, weight_decay=0.1)
        wsd = ScheduleConfig(kind="wsd", warmup_steps=args.warmup, decay_fraction=args.decay_fraction,
                             min_lr_ratio=0.0)
        runs["llama"] = trainer_run("lmforge llama-style, Muon, WSD", model, build_optimizer(model, muon),
                                    lambda step: lr_at(step, steps, 1.0, wsd), train_windows(), val, args,
                                    tmp / "llama")

    for run in runs.values():
        print(f"  {run.label}: {human_count(run.parameters)} parameters", flush=True)
    pair = [runs[key] for key in ("anchor", "gpt2") if key in runs]
    for step in range(1, steps + 1):
        for run in runs.values():  # one step each, in turn: the machine's load hits all of them alike
            start = time.perf_counter()
            loss = run.step()
            run.seconds += time.perf_counter() - start
            run.losses.append(loss)
            if not math.isfinite(loss):
                raise SystemExit(f"{run.label}: the loss is {loss} at step {step}")
        if len(pair) == 2 and not same_lrs(pair[0].last_lrs(), pair[1].last_lrs()):
            raise AssertionError(f"step {step}: the anchor ran lrs {pair[0].last_lrs()}, lmforge's GPT-2 "
                                 f"{pair[1].last_lrs()}")
        if step % args.eval_every == 0 or step == steps:
            for run in runs.values():
                run.curve.append({"step": step, "seconds": run.seconds, "val_loss": run.evaluate()})
            print(f"  step {step:4d}: " + "   ".join(
                f"{run.curve[-1]['val_loss']:.3f} ({run.seconds:.0f}s)" for run in runs.values()), flush=True)

    first_run = next(iter(runs.values()))
    target = args.target if args.target is not None else first_run.curve[-1]["val_loss"]
    first = first_run.reached(target)
    print(f"\n  target validation loss {target:.3f} "
          f"({'given' if args.target is not None else first_run.label + ', final'})", flush=True)
    agreement = None
    if len(pair) == 2:  # same weights, data and recipe: only the implementations' rounding differs
        gaps = [abs(a - b) for a, b in zip(pair[0].losses, pair[1].losses)]
        agreement = {"first_10_steps": max(gaps[:10]), "all_steps": max(gaps)}
        print(f"  anchor vs lmforge GPT-2, largest training-loss gap: {agreement['first_10_steps']:.2e} "
              f"over the first {min(10, steps)} steps, {agreement['all_steps']:.2e} over all {steps}",
              flush=True)
    results = []
    for run in runs.values():
        hit = run.reached(target)
        row: dict[str, Any] = {
            "run": run.label, "parameters": run.parameters, "final_val_loss": run.curve[-1]["val_loss"],
            "seconds_total": run.seconds, "tokens_per_s": steps * micro_batch * seq_len / run.seconds,
            "curve": run.curve, "target_steps": hit and hit["step"], "target_seconds": hit and hit["seconds"]}
        if hit and first:
            row["speedup"] = first["seconds"] / hit["seconds"]
        results.append(row)
        reach = f"reached at step {hit['step']} after {hit['seconds']:.0f} s" if hit else "not reached"
        speed = f", {row['speedup']:.2f}x faster than the first" if "speedup" in row else ""
        print(f"  {run.label:<34} final {row['final_val_loss']:.3f}, {row['tokens_per_s']:,.0f} tok/s; "
              f"{reach}{speed}", flush=True)
    print(f"\n  | run | params | final val loss | tok/s | reached {target:.3f} |\n  |---|---|---|---|---|",
          flush=True)
    for row in results:
        reach = (f"step {row['target_steps']}, {row['target_seconds']:.0f} s" if row["target_steps"]
                 else f"not within {steps} steps")
        if "speedup" in row and row is not results[0]:
            reach += (f": {row['speedup']:.1f}x faster" if row["speedup"] >= 1
                      else f": {1 / row['speedup']:.1f}x slower")
        print(f"  | {row['run']} | {human_count(row['parameters'])} | {row['final_val_loss']:.3f} | "
              f"{row['tokens_per_s']:,.0f} | {reach} |", flush=True)
    return {"target": target, "steps": steps, "micro_batch": micro_batch, "seq_len": seq_len,
            "gpt2_recipe": dataclasses.asdict(recipe), "loss_agreement": agreement,
            "args": {k: v for k, v in vars(args).items() if k.startswith(RACE_ARGS)},
            "runs": results}


def trainer_run(label: str, model: Transformer, optimizer: torch.optim.Optimizer,
                lr_factor: Callable[[int], float], data: TokenWindows, val: TokenWindows,
                args: argparse.Namespace, run_dir: Path) -> Run:
    """A contender driven by lmforge's own Trainer, one `train_step` at a time."""
    trainer = lmforge_trainer(model, optimizer, lr_factor, data, args.race_micro_batch, args.race_seq_len,
                              "fp32", run_dir, val=val, eval_batches=args.eval_batches, steps=args.steps)

    def step() -> float:
        record = trainer.train_step()
        return record["loss"] if record else math.nan

    return Run(label, model.num_parameters(), step, lambda: trainer.evaluate()["val_loss"],
               lambda: lrs_by_group(optimizer.param_groups))


# ------------------------------------------------------------------------------------ main
def per_model(text: str) -> dict[str, int]:
    """'14m=8,124m=1' (or one number for every model) -> {'14m': 8, '124m': 1}."""
    if "=" not in text:
        return dict.fromkeys(MODELS, int(text))
    values = dict(part.split("=", 1) for part in text.split(","))
    unknown = set(values) - set(MODELS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(sorted(unknown))}; known: "
                                         f"{', '.join(MODELS)}")
    return {name: int(value) for name, value in values.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--only", choices=["speed", "loss"], action="append")
    speed = parser.add_argument_group("1. throughput")
    speed.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    speed.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    speed.add_argument("--seq-len", type=int, default=256)
    speed.add_argument("--micro-batch", type=per_model, default=per_model("14m=4,124m=1"),
                       help="sequences per step (default '14m=4,124m=1')")
    speed.add_argument("--rounds", type=per_model, default=per_model("14m=7,124m=3"),
                       help="timed rounds after the first step (default '14m=7,124m=3')")
    loss = parser.add_argument_group("2. time to a target loss")
    loss.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    loss.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    loss.add_argument("--race-micro-batch", type=int, default=16)
    loss.add_argument("--race-seq-len", type=int, default=256)
    loss.add_argument("--warmup", type=int, default=20)
    loss.add_argument("--adamw-lr", type=float, default=1e-3, help="lr of the AdamW runs (best of 4 tried)")
    loss.add_argument("--muon-lr", type=float, default=0.02)
    loss.add_argument("--muon-adam-lr", type=float, default=3e-3, help="llama: AdamW lr of embeddings, norms")
    loss.add_argument("--decay-fraction", type=float, default=0.3, help="llama: WSD's share of decay steps")
    loss.add_argument("--eval-every", type=int, default=10)
    loss.add_argument("--eval-batches", type=int, default=4)
    loss.add_argument("--vocab", type=int, default=4096)
    loss.add_argument("--target", type=float, help="loss to reach (default: the first run's final)")
    loss.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    require(*ANCHORS)
    torch.set_num_threads(args.threads)
    parts = args.only or ["speed", "loss"]
    results: dict[str, Any] = {"machine": announce(("transformers",)), "threads": args.threads}
    if "speed" in parts and "bf16" in args.precisions:
        bf16 = measure_matmul_flops(CPU, torch.bfloat16, size=512)
        results["bf16_matmul_flops"] = bf16
        print(f"bf16 matmul (512 x 512, no autocast): {bf16 / 1e9:.1f} GFLOP/s; MFU below is against the "
              "fp32 matmul peak, measured in every round", flush=True)
    print(flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "speed" in parts:
            print(f"1. training step throughput, T={args.seq_len}, median of interleaved rounds (min-max)",
                  flush=True)
            results["speed"] = [throughput(name, precision, args, Path(tmp))
                                for name in args.models for precision in args.precisions
                                if name in args.micro_batch and name in args.rounds]
            print_speed_table(results["speed"])
        if "loss" in parts:
            print("2. time to a target validation loss (python-docs sample, fp32)", flush=True)
            results["loss"] = race(args, Path(tmp))
    results["load_after"] = os.getloadavg()
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
