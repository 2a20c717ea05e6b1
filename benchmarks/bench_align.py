"""Alignment throughput: rollouts on lmforge's `Engine` vs transformers' `generate`, and a DPO step vs trl.

Two parts, on SmolLM2-135M-Instruct (lmforge's `smollm2` sample, dequantized to fp32 and
written once as a Hugging Face folder that both sides load), each contender in its own
subprocess with the same torch threads (`--threads`), so neither inherits the other's
memory, caches or thread pools:

1. **rollout** (`--only rollout`): the same N chat prompts (basic_arithmetic problems of
   `lmforge.eval.verifiable`, rendered by lmforge's chat template into token ids that both sides
   get as they are) x k samples x `max_new_tokens`, temperature 1, no top-k/top-p, EOS and
   the chat's end-of-turn tokens stopping a row on both sides.
   - lmforge: `lmforge.align.rollout.sample_rollouts` (what GRPO/PPO call): a fresh `Engine`
     over the policy (its build is timed too), all N x k requests batched, KV-cached.
   - transformers: `model.generate` on the same ids, left-padded with an attention mask,
     `do_sample=True`, `num_return_sequences=k`, the same max_new_tokens and stop ids.
   Counted on both sides: the generated tokens of each row up to and including its stop
   token (`generated_lengths`; lmforge's completions end with it), never the padding that
   `generate` keeps writing into finished rows. Rollout tokens/s = those tokens / wall time
   of the call; one warm-up call each (a few tokens) first; the median of `--repeat` runs.
   The two sides draw different samples (different generators), so their lengths differ;
   the table prints both.
2. **dpo** (`--only dpo`): DPO steps (sigmoid, beta 0.1) on the same pairs, in the same order,
   `--rows` pairs per step, truncated to `--max-length` (keep the start, trl's rule).
   - lmforge: `PreferenceSource` + `cache_reference_logps` (the reference pass, once, before
     training) + the one `Trainer` with `PreferenceObjective`, one `train_step` at a time.
   - trl: `DPOTrainer`'s own loop (`train()`), `precompute_ref_log_probs=True` (its
     reference pass, also once before training), `bf16=False` (transformers turns bf16
     autocast on by default on CPUs that have it), `gradient_checkpointing=False` (DPOConfig
     turns it on by default; lmforge does not recompute activations), no logging, saving or
     evaluation.
   The recipe is bench_finetune's `SFTRecipe`, shared: AdamW (torch's fused kernel) with
   betas (0.9, 0.999), eps 1e-8, no weight decay, a constant lr, gradients clipped at 1.0;
   `--method lora`: r=16, alpha=32, all linear layers of the blocks, dropout 0, the same
   initial A matrices on both sides (peft's `get_peft_model` on trl's side); `--method full`:
   every weight. Both sides must see the same batches: the token ids and completion masks of
   every row of every step are hashed on both sides and compared before the times are
   reported. The first step's loss is ln 2 on both sides (policy = reference); the
   log-probs of that step and the losses of the later steps (after identical updates)
   must agree too: their relative differences are printed. Warm-up steps (`--skip`) are
   excluded; the median step time of the rest counts.

    python benchmarks/bench_align.py --json align.json                       # both parts, LoRA (~10 min here)
    python benchmarks/bench_align.py --only dpo --method lora full           # DPO, both methods
    python benchmarks/bench_align.py --only rollout --prompts 16 --samples 4 --max-new-tokens 64
    python benchmarks/bench_align.py --smoke                                 # a quick look (~1-2 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from anchors import require
from bench_finetune import SFTRecipe, anchor_model, anchor_recipe, initial_adapter, lmforge_recipe, memory_mb
from machine import announce
from safetensors.torch import load_file, save_file

from lmforge.train.batch import IGNORE_INDEX

#: what lmforge is run against (benchmarks/anchors.py): transformers' generate and trl's DPOTrainer
#: (with peft for LoRA, accelerate because transformers' Trainer will not start without it, and
#: datasets because DPOTrainer reads a `datasets.Dataset`)
ANCHORS = ("transformers", "trl", "peft", "accelerate", "datasets")
PARTS = ("rollout", "dpo")
ROLLOUT_TOOLS = ("lmforge", "transformers")
DPO_TOOLS = ("lmforge", "trl")
LABELS = {"lmforge": "lmforge", "transformers": "transformers generate", "trl": "trl DPOTrainer"}
METHOD_LR = {"full": 5e-6, "lora": 5e-5}
LOSS_RTOL = 1e-4  # first-step log-probs and later losses, relative (fp32 on both sides)


# ------------------------------------------------------------------------- rollouts: both sides
@dataclass
class RolloutRun:
    """One batch of rollouts: each row's generated ids (up to and including its stop) and the wall time."""

    completions: list[list[int]]
    seconds: float

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completions]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def stopped(self, stop_ids: Iterable[int]) -> int:
        """Rows that ended on a stop token (the others ran to max_new_tokens)."""
        stops = set(stop_ids)
        return sum(1 for c in self.completions if c and c[-1] in stops)


def generated_lengths(new_tokens: torch.Tensor, stop_ids: Iterable[int]) -> list[int]:
    """Per row of `generate`'s new tokens [R, G]: tokens up to and including the first stop id, or G.

    After a row stops, `generate` keeps filling it with the pad id (which may itself be a
    stop id): none of that is generated text and none of it counts."""
    stops = torch.tensor(sorted(set(stop_ids)), dtype=new_tokens.dtype)
    hit = torch.isin(new_tokens, stops)
    first = hit.int().argmax(1) + 1  # argmax finds the first of equal maxima
    return torch.where(hit.any(1), first, new_tokens.shape[1]).tolist()


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [N, T], prompts right-aligned as a decoder-only `generate` needs."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def lmforge_rollouts(model: torch.nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *,
                     samples: int, max_new_tokens: int, temperature: float, stop_ids: Sequence[int],
                     seed: int = 0) -> RolloutRun:
    """`sample_rollouts` as GRPO calls it, every request in one engine batch; temperature 0 is greedy."""
    from lmforge.align.rollout import RolloutConfig, sample_rollouts

    requests = samples * len(prompt_ids)
    config = RolloutConfig(samples_per_prompt=samples, prompts_per_rollout=len(prompt_ids),
                           max_new_tokens=max_new_tokens, temperature=temperature, max_batch_size=requests,
                           seed=seed)
    seeds = [seed * 1_000_003 + j for j in range(requests)]
    started = time.perf_counter()
    done = sample_rollouts(model, list(range(len(prompt_ids))), prompt_ids, config, seeds,
                           tokenizer=tokenizer, stop_ids=stop_ids)
    return RolloutRun([list(c) for c in done.completion_ids], time.perf_counter() - started)


def transformers_rollouts(model: Any, prompt_ids: Sequence[Sequence[int]], *, samples: int,
                          max_new_tokens: int, temperature: float, stop_ids: Sequence[int], pad_id: int,
                          seed: int = 0) -> RolloutRun:
    """`generate` on the same ids, batched and left-padded, k sequences per prompt; temperature 0 is greedy.

    The generation config is built here, whole, so nothing of the folder's
    generation_config.json (top_k 50 is transformers' default) changes the distribution."""
    import transformers

    if temperature > 0:
        ids, mask = left_pad(prompt_ids, pad_id)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                        num_return_sequences=samples)
    else:  # generate refuses num_return_sequences > 1 when greedy: the prompts repeated instead, adjacent
        ids, mask = left_pad([p for p in prompt_ids for _ in range(samples)], pad_id)
        sampling = dict(do_sample=False)
    config = transformers.GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                                           pad_token_id=pad_id, use_cache=True, **sampling)
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    seconds = time.perf_counter() - started
    new = out[:, ids.shape[1]:]
    return RolloutRun([row[:n].tolist() for row, n in zip(new, generated_lengths(new, stop_ids))], seconds)


def rollout_prompts(tokenizer: Any, n: int, seed: int = 0) -> list[list[int]]:
    """`n` held-out basic_arithmetic problems as chat prompts (system + question, generation prompt)."""
    from lmforge.eval.verifiable import get_task

    problems = get_task("basic_arithmetic").problems("test", n, seed)
    return [list(tokenizer.encode_chat_prompt(p.prompt)) for p in problems]


# ------------------------------------------------------------------------- DPO: the shared recipe and data
@dataclass(frozen=True)
class DPOSettings:
    """What both DPO sides run with, besides the optimizer recipe."""

    rows: int = 4  # pairs per optimizer step (8 without activation checkpointing: trl passes 19 GB)
    max_length: int = 512  # tokens per sequence (prompt + completion), the start kept
    beta: float = 0.1


def dpo_recipe(method: str, steps: int, lr: float | None = None, seed: int = 0) -> SFTRecipe:
    """bench_finetune's recipe with trl's optimizer defaults: AdamW betas (0.9, 0.999), no weight decay,
    a constant lr (no warm-up, cosine floor = peak), clipping at 1.0; LoRA r=16, alpha=32, all-linear."""
    return SFTRecipe(method=method, steps=steps, lr=lr or METHOD_LR[method], warmup=0, min_lr_ratio=1.0,
                     weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0, seed=seed)


def arithmetic_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """On-policy-like pairs without sampling: a basic_arithmetic prompt, a right and a wrong boxed answer."""
    from lmforge.eval.verifiable import get_task

    rows = []
    for problem in get_task("basic_arithmetic").problems("train", n, seed):
        right = problem.answer
        try:
            wrong = str(int(right) + 1)
        except ValueError:
            wrong = right + "1"
        rows.append({"prompt": problem.prompt,
                     "chosen": [{"role": "assistant", "content": f"The answer is \\boxed{{{right}}}."}],
                     "rejected": [{"role": "assistant", "content": f"The answer is \\boxed{{{wrong}}}."}]})
    return rows


def preference_rows(data: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first `n` rows (trl's JSON shape) of `champ-pairs`, a preference file, or `arithmetic`."""
    from lmforge.align.preferences import load_preferences

    if data == "arithmetic":
        return arithmetic_pairs(n, seed)
    examples = load_preferences(data, n, quiet=True)
    if len(examples) < n:
        raise SystemExit(f"bench_align.py: {data} has {len(examples)} pairs, the run needs {n} (--rows x "
                         "(--skip + --steps)); lower them")
    return [asdict(e) for e in examples]


def _row_digest(ids: Sequence[int], completion: Sequence[int]) -> str:
    """A row's token ids and which of them are completion (take a loss), as one short hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    h.update(bytes(int(c) for c in completion))
    return h.hexdigest()


def lmforge_batch_digests(batch: Any) -> list[str]:
    """[chosen rows..., rejected rows...] of a pair batch: ids up to each row's length, and the completion
    mask in trl's terms (token t is completion where lmforge's label at t-1 is set)."""
    out = []
    e = batch.extras
    for ids, labels, lengths in ((batch.input_ids, batch.labels, e["chosen_length"]),
                                 (e["rejected_ids"], e["rejected_labels"], e["rejected_length"])):
        for row, lab, n in zip(ids, labels, lengths.tolist()):
            completion = torch.zeros(n, dtype=torch.bool)
            completion[1:] = lab[:n - 1] != IGNORE_INDEX
            out.append(_row_digest(row[:n].tolist(), completion.tolist()))
    return out


def trl_batch_digests(batch: Mapping[str, torch.Tensor]) -> list[str]:
    """trl's collated batch ([chosen; rejected] rows, attention and completion masks), digested as
    `lmforge_batch_digests` does."""
    out = []
    for ids, mask, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        keep = mask.bool()
        out.append(_row_digest(ids[keep].tolist(), completion[keep].tolist()))
    return out


# ------------------------------------------------------------------------- DPO: one contender, in-process
def run_lmforge_dpo(folder: Path, recipe: SFTRecipe, settings: DPOSettings, rows: list[dict[str, Any]],
                    init: Mapping[str, torch.Tensor] | None, run_dir: Path) -> dict[str, Any]:
    """lmforge: encode, cache the reference log-probs (the untouched model), make the policy trainable
    (`apply_method`, the shared initial adapter), then the Trainer, one timed `train_step` at a time."""
    from lmforge.align.dpo import PreferenceObjective
    from lmforge.align.preferences import PreferenceSource, cache_reference_logps, example_from_row
    from lmforge.infer.loading import load_model
    from lmforge.train.trainer import TrainConfig, Trainer
    from lmforge.tune.finetune import parameter_counts

    loaded = load_model(folder)
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    examples = [example_from_row(r) for r in rows]
    source = PreferenceSource.from_examples(tokenizer, examples, settings.max_length, shuffle=False)
    cache_reference_logps(source, model, rows=settings.rows)
    prepare_seconds = time.perf_counter() - started  # tokenization and the reference pass
    digests = [lmforge_batch_digests(source.batch(range(i * settings.rows, (i + 1) * settings.rows)))
               for i in range(recipe.steps)]
    optimizer, lr_factor = lmforge_recipe(model, recipe, init)
    trainable, total = parameter_counts(model)
    model.train()
    config = TrainConfig(steps=recipe.steps, batch_tokens=settings.rows * settings.max_length,
                         micro_batch=settings.rows, seq_len=settings.max_length, grad_clip=recipe.grad_clip,
                         eval_interval=0, checkpoint_interval=0, log_interval=10**9, device="cpu")
    objective = PreferenceObjective(loss_type="sigmoid", beta=settings.beta)
    trainer = Trainer(model, objective, optimizer, lr_factor, source, config, run_dir, quiet=True)
    losses, chosen, rejected, seconds = [], [], [], []
    for _ in range(recipe.steps):
        start = time.perf_counter()
        record = trainer.train_step()
        seconds.append(time.perf_counter() - start)
        if record is None:
            raise SystemExit("lmforge: a non-finite DPO step")
        losses.append(record["loss"])
        chosen.append(record["logps/chosen"])
        rejected.append(record["logps/rejected"])
    return {"trainable_parameters": trainable, "parameters": total, "losses": losses, "logps_chosen": chosen,
            "logps_rejected": rejected, "step_seconds": seconds, "prepare_seconds": prepare_seconds,
            "digests": digests, "pairs": len(source), "stats": source.stats.describe()}


def run_trl_dpo(folder: Path, recipe: SFTRecipe, settings: DPOSettings, rows: list[dict[str, Any]],
                init: Mapping[str, torch.Tensor] | None, run_dir: Path) -> dict[str, Any]:
    """trl: transformers' model (peft-wrapped for LoRA, the shared initial adapter), the same optimizer
    groups and lr, `DPOTrainer` with precomputed reference log-probs, its own `train()` loop."""
    import datasets
    import transformers
    import trl

    model, _ = anchor_model(folder, recipe, init)
    optimizer, scheduler = anchor_recipe(model, recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = trl.DPOConfig(
        output_dir=str(run_dir), per_device_train_batch_size=settings.rows, gradient_accumulation_steps=1,
        max_steps=recipe.steps, max_length=settings.max_length, beta=settings.beta, loss_type=["sigmoid"],
        precompute_ref_log_probs=True, precompute_ref_batch_size=settings.rows, learning_rate=recipe.lr,
        # DPOConfig's default is True (TrainingArguments' is False): recomputing activations in the
        # backward halves the memory for about a third more compute; lmforge does not checkpoint
        gradient_checkpointing=False,
        max_grad_norm=recipe.grad_clip, bf16=False, use_cpu=True, train_sampling_strategy="sequential",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0,
        dataloader_pin_memory=False, disable_tqdm=True, seed=recipe.seed)

    class RecordingDPOTrainer(trl.DPOTrainer):
        """The stock DPOTrainer; it only notes each step's loss and log-probs as computed (its own
        metric lists are emptied when it logs, at the end of training)."""

        losses: list[torch.Tensor] = []
        logps: dict[str, list[float]] = {"logps/chosen": [], "logps/rejected": []}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append((loss[0] if return_outputs else loss).detach())
            for key, values in self.logps.items():
                values.append(float(self._metrics["train"][key][-1]))
            return loss

    class Clock(transformers.TrainerCallback):
        marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    clock = Clock()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the reference pass's progress bar
    started = time.perf_counter()
    trainer = RecordingDPOTrainer(model=model, ref_model=None, args=args, processing_class=tokenizer,
                                  train_dataset=datasets.Dataset.from_list(rows),
                                  optimizers=(optimizer, scheduler), callbacks=[clock])
    prepare_seconds = time.perf_counter() - started  # tokenization and the reference pass
    loader = iter(trainer.get_train_dataloader())
    digests = [trl_batch_digests(next(loader)) for _ in range(recipe.steps)]
    trainer.train()
    return {"trainable_parameters": trainable, "parameters": sum(p.numel() for p in model.parameters()),
            "losses": [float(x) for x in trainer.losses], "logps_chosen": trainer.logps["logps/chosen"],
            "logps_rejected": trainer.logps["logps/rejected"],
            "step_seconds": [b - a for a, b in zip(clock.marks, clock.marks[1:])],
            "prepare_seconds": prepare_seconds, "digests": digests, "pairs": len(trainer.train_dataset)}


DPO_RUNNERS = {"lmforge": run_lmforge_dpo, "trl": run_trl_dpo}


def compare_dpo(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, float]:
    """The agreement checks of two DPO runs: AssertionError unless both trained on the same rows in the same
    order; the relative differences of the first step's loss and log-probs and the largest loss gap."""
    if ours["digests"] != theirs["digests"]:
        step = next(i for i, (a, b) in enumerate(zip(ours["digests"], theirs["digests"])) if a != b)
        raise AssertionError(f"the two DPO runs saw different token rows (first at step {step + 1}): their "
                             "tokenization, truncation or order differs")

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    steps = min(len(ours["losses"]), len(theirs["losses"]))
    return {"first_loss_rel_diff": rel(ours["losses"][0], theirs["losses"][0]),
            "first_logps_chosen_rel_diff": rel(ours["logps_chosen"][0], theirs["logps_chosen"][0]),
            "first_logps_rejected_rel_diff": rel(ours["logps_rejected"][0], theirs["logps_rejected"][0]),
            "max_loss_rel_diff": max(rel(a, b) for a, b in
                                     zip(ours["losses"][:steps], theirs["losses"][:steps]))}


# ------------------------------------------------------------------------- workers (fresh processes)
def worker(args: argparse.Namespace) -> int:
    """One contender in this process: `rollout:TOOL` or `dpo:TOOL:METHOD`; results as JSON in `args.out`."""
    torch.set_num_threads(args.threads)
    rss_start = memory_mb()[0]
    work = Path(args.work)
    settings = json.loads((work / "settings.json").read_text())
    part, tool, *rest = args.worker.split(":")
    if part == "rollout":
        result = rollout_worker(work, tool, settings["rollout"])
    else:
        method = rest[0]
        s = settings["dpo"]
        recipe = dpo_recipe(method, s["skip"] + s["steps"], s["lr"], s["seed"])
        init = load_file(str(work / "adapter-init.safetensors")) if recipe.adapter else None
        result = DPO_RUNNERS[tool](work / "base", recipe, DPOSettings(**s["settings"]), s["rows"], init,
                                   work / f"run-{tool}-{method}")
        result["recipe"] = asdict(recipe)
    result.update(tool=tool, peak_rss_mb=memory_mb()[1], rss_after_imports_mb=rss_start,
                  threads=torch.get_num_threads(), load_average=os.getloadavg())
    Path(args.out).write_text(json.dumps(result))
    return 0


def rollout_worker(work: Path, tool: str, s: Mapping[str, Any]) -> dict[str, Any]:
    """A warm-up call (a few tokens), then `repeat` timed calls on the saved prompts."""
    if tool == "lmforge":
        from lmforge.infer.loading import load_model

        loaded = load_model(work / "base")

        def call(tokens: int, seed: int) -> RolloutRun:
            return lmforge_rollouts(loaded.model, loaded.tokenizer, s["prompt_ids"], samples=s["samples"],
                                    max_new_tokens=tokens, temperature=s["temperature"],
                                    stop_ids=s["stop_ids"], seed=seed)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32).eval()

        def call(tokens: int, seed: int) -> RolloutRun:
            return transformers_rollouts(model, s["prompt_ids"], samples=s["samples"], max_new_tokens=tokens,
                                         temperature=s["temperature"], stop_ids=s["stop_ids"],
                                         pad_id=s["pad_id"], seed=seed)

    call(min(8, s["max_new_tokens"]), 10**6)  # warm-up: first-call allocations, kernels, lazy imports
    runs = [call(s["max_new_tokens"], s["seed"] + r) for r in range(s["repeat"])]
    return {"tokens": [r.tokens for r in runs], "seconds": [r.seconds for r in runs],
            "tokens_per_s": [r.tokens_per_s for r in runs], "rows": len(runs[0].completions),
            "stopped": [r.stopped(s["stop_ids"]) for r in runs], "lengths": runs[0].lengths}


def spawn(args: argparse.Namespace, work: Path, job: str) -> dict[str, Any]:
    out = work / f"result-{job.replace(':', '-')}.json"
    command = [sys.executable, __file__, "--worker", job, "--work", str(work), "--out", str(out),
               "--threads", str(args.threads)]
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{job} failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["load_before"] = load
    return result


# ------------------------------------------------------------------------- the driver
def prepare_model(args: argparse.Namespace, work: Path) -> Any:
    """The model folder both sides load (once per run)."""
    from lmforge.infer.loading import load_model
    from lmforge.model.checkpoint import save_checkpoint
    from lmforge.model.config import human_count

    loaded = load_model(args.model)
    if not (work / "base").exists():
        save_checkpoint(work / "base", loaded.model, tokenizer=loaded.tokenizer)
    print(f"  model: {loaded.path.name} (fp32), {human_count(loaded.model.num_parameters())} parameters",
          flush=True)
    return loaded


def rollout_part(args: argparse.Namespace, work: Path, loaded: Any) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = rollout_prompts(tokenizer, args.prompts, args.seed)
    settings = {"prompt_ids": prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "stop_ids": loaded.stop_ids(), "pad_id": pad,
                "repeat": args.repeat, "seed": args.seed}
    _write_settings(work, rollout=settings)
    lengths = [len(p) for p in prompts]
    print(f"  {args.prompts} basic_arithmetic chat prompts ({min(lengths)}-{max(lengths)} tokens) x "
          f"{args.samples} samples x up to {args.max_new_tokens} new tokens, temperature "
          f"{args.temperature:g}, stop ids {loaded.stop_ids()}; a warm-up call, then {args.repeat} timed",
          flush=True)
    runs = {}
    for tool in ROLLOUT_TOOLS:
        r = runs[tool] = spawn(args, work, f"rollout:{tool}")
        print(f"  {LABELS[tool]:<22} {statistics.median(r['tokens_per_s']):7.1f} tokens/s (runs: "
              f"{', '.join(f'{t:.1f}' for t in r['tokens_per_s'])}); {r['tokens'][0]} tokens in "
              f"{r['seconds'][0]:.1f} s, {r['stopped'][0]}/{r['rows']} rows stopped before the limit, mean "
              f"length {r['tokens'][0] / r['rows']:.1f}; peak RSS {r['peak_rss_mb']:,.0f} MB (load "
              f"{r['load_before']:.1f})", flush=True)
    speedup = statistics.median(runs["lmforge"]["tokens_per_s"]) / statistics.median(
        runs["transformers"]["tokens_per_s"])
    print(f"  rollout tokens/s, lmforge / transformers generate: **{speedup:.2f}x** (goal >= 3x)", flush=True)
    return {"settings": {k: v for k, v in settings.items() if k != "prompt_ids"},
            "prompt_tokens": [len(p) for p in prompts], "runs": runs, "speedup": speedup}


def dpo_part(args: argparse.Namespace, work: Path, loaded: Any) -> dict[str, Any]:
    from lmforge.align.preferences import PreferenceSource, example_from_row

    steps = args.skip + args.steps
    rows = preference_rows(args.data, args.rows * steps, args.seed)
    settings = DPOSettings(rows=args.rows, max_length=args.max_length, beta=args.beta)
    stats = PreferenceSource.from_examples(loaded.tokenizer, [example_from_row(r) for r in rows],
                                           args.max_length, shuffle=False).stats
    if "lora" in args.method:
        from lmforge.infer.loading import load_model

        fresh = load_model(work / "base").model  # initial_adapter wraps the model it is given
        save_file(initial_adapter(fresh, dpo_recipe("lora", steps, seed=args.seed)),
                  str(work / "adapter-init.safetensors"))  # the shared A matrices, under PEFT's names
    results: dict[str, Any] = {"data": args.data, "pairs": stats.describe(), "settings": asdict(settings),
                               "rows": []}
    print(f"  data: {args.data}, {stats.describe()}; {args.rows} pairs per step, max_length "
          f"{args.max_length}, sigmoid loss, beta {args.beta:g}; {args.skip} warm-up + {args.steps} timed "
          "steps", flush=True)
    for method in args.method:
        recipe = dpo_recipe(method, steps, args.lr, args.seed)
        _write_settings(work, dpo={"skip": args.skip, "steps": args.steps, "lr": args.lr, "seed": args.seed,
                                   "settings": asdict(settings), "rows": rows})
        runs = {}
        for tool in (DPO_TOOLS if args.method.index(method) % 2 == 0 else DPO_TOOLS[::-1]):
            r = runs[tool] = spawn(args, work, f"dpo:{tool}:{method}")
            timed = r["step_seconds"][args.skip:]
            print(f"  {method:<4} {LABELS[tool]:<16} step median {statistics.median(timed):6.2f} s (best "
                  f"{min(timed):.2f}, worst {max(timed):.2f}); tokenization + reference pass "
                  f"{r['prepare_seconds']:.1f} s; losses {', '.join(f'{x:.5f}' for x in r['losses'])}; "
                  f"{r['trainable_parameters']:,} "
                  f"trainable; peak RSS {r['peak_rss_mb']:,.0f} MB (load {r['load_before']:.1f})", flush=True)
        checks = compare_dpo(runs["lmforge"], runs["trl"])
        medians = {tool: statistics.median(runs[tool]["step_seconds"][args.skip:]) for tool in DPO_TOOLS}
        speedup = medians["trl"] / medians["lmforge"]
        agree = all(v <= LOSS_RTOL for v in checks.values())
        print(f"  {method}: same token rows and completion masks on both sides at every step; first-step "
              f"loss lmforge {runs['lmforge']['losses'][0]:.6f}, trl {runs['trl']['losses'][0]:.6f} "
              f"(relative difference {checks['first_loss_rel_diff']:.1e}); first-step log-probs chosen "
              f"{checks['first_logps_chosen_rel_diff']:.1e}, rejected "
              f"{checks['first_logps_rejected_rel_diff']:.1e}; largest loss difference over {recipe.steps} "
              f"steps {checks['max_loss_rel_diff']:.1e}: "
              f"{'agree' if agree else 'DISAGREE'}", flush=True)
        print(f"  {method}: DPO step, lmforge / trl DPOTrainer (steps per second, median step): "
              f"**{speedup:.2f}x** (goal >= 1.5x)", flush=True)
        results["rows"].append({"method": method, "recipe": asdict(recipe), "step_seconds": medians,
                                "speedup": speedup, "agree": agree, **checks,
                                "runs": {t: {k: v for k, v in r.items() if k != "digests"}
                                         for t, r in runs.items()}})
    return results


def _write_settings(work: Path, **parts: Any) -> None:
    path = work / "settings.json"
    settings = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(settings | parts))


SMOKE = {"prompts": 2, "samples": 2, "max_new_tokens": 8, "repeat": 1, "rows": 2, "steps": 1, "skip": 1,
         "max_length": 128}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PARTS, action="append")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads, the same for every contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a quick look: " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    rollout = parser.add_argument_group("rollout")
    rollout.add_argument("--prompts", type=int, default=16)
    rollout.add_argument("--samples", type=int, default=4, help="k samples per prompt")
    rollout.add_argument("--max-new-tokens", type=int, default=64)
    rollout.add_argument("--temperature", type=float, default=1.0)
    rollout.add_argument("--repeat", type=int, default=2, help="timed rollout calls per side (median)")
    dpo = parser.add_argument_group("dpo")
    dpo.add_argument("--method", nargs="+", choices=["lora", "full"], default=["lora"])
    dpo.add_argument("--data", default="champ-pairs", help="champ-pairs, arithmetic, or a preference file")
    dpo.add_argument("--rows", type=int, default=4, help="pairs per optimizer step")
    dpo.add_argument("--max-length", type=int, default=512)
    dpo.add_argument("--beta", type=float, default=0.1)
    dpo.add_argument("--lr", type=float, help="peak lr (default: lora 5e-5, full 5e-6)")
    dpo.add_argument("--steps", type=int, default=3, help="timed DPO steps per contender")
    dpo.add_argument("--skip", type=int, default=1, help="warm-up DPO steps before the timed ones")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--work", type=Path, help="keep the shared inputs here (default: a temporary folder)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # rollout:TOOL or dpo:TOOL:METHOD, by the driver
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    parts = args.only or list(PARTS)
    require("transformers", *(("trl", "peft", "accelerate", "datasets") if "dpo" in parts else ()))
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": announce(ANCHORS), "threads": args.threads, "smoke": args.smoke}
    print(flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        loaded = prepare_model(args, work)
        if "rollout" in parts:
            print("\n1. rollouts: lmforge's Engine (sample_rollouts) vs transformers' generate "
                  f"({args.threads} threads)", flush=True)
            results["rollout"] = rollout_part(args, work, loaded)
        if "dpo" in parts:
            print("\n2. a DPO step: lmforge's Trainer + PreferenceObjective vs trl's DPOTrainer "
                  f"({args.threads} threads)", flush=True)
            results["dpo"] = dpo_part(args, work, loaded)
    results["load_after"] = os.getloadavg()
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
