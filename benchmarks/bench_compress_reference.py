"""GPTQ and AWQ against their reference implementation: llm-compressor on the same model, text and scorer.

lmforge's GPTQ and AWQ (`lmforge.compress`) and llm-compressor's (vLLM's quantization
library: `GPTQModifier`, `AWQModifier` + `QuantizationModifier`, run by `oneshot`) start
from the same float model (the `smollm2` sample dequantized to fp32, written as a
transformers folder by `lmforge export`), calibrate on the same windows of the Python
HOWTOs and are scored on the same held-out windows of the Python tutorial, both built by
bench_compress.text_windows. The grid is 4 bits, asymmetric, groups of 64 (SmolLM2's
576-wide inputs cannot take 128), as lmforge's rows in bench_compress; the LM head is left
in fp32 on both sides here (llm-compressor's recipes ignore `lm_head`; bench_compress's
rows round it to int8, which costs about +0.04).

Scoring: llm-compressor leaves a transformers model whose linear layers hold their weight,
`weight_scale` and `weight_zero_point`; each weight is dequantized with compressed-tensors'
own `fake_quantize` and loaded into lmforge's Transformer, which lmforge's `perplexity`
scores like every other row. The same model is also scored through transformers with
llm-compressor's forward (fake quantization applied on every call): the two must agree,
which shows the conversion is exact.

    python benchmarks/bench_compress_reference.py --samples 32 --json ref.json  # ~1 hour on 2 cores
    python benchmarks/bench_compress_reference.py --smoke                       # a quick look

llm-compressor pins its transformers (<=5.17) and compressed-tensors: run it in its own
environment (`pip install torch==<lmforge's> llmcompressor`, then `pip install -e . --no-deps`
and lmforge's runtime dependencies).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import require  # noqa: E402
from bench_compress import QUANTIZED, text_windows  # noqa: E402
from machine import announce  # noqa: E402

from lmforge.compress.grid import Grid  # noqa: E402
from lmforge.compress.quantize import quantize_model  # noqa: E402
from lmforge.eval.perplexity import perplexity  # noqa: E402
from lmforge.infer.loading import load_model  # noqa: E402
from lmforge.model.hf import state_dict_from_hf  # noqa: E402

#: what lmforge is run against: llm-compressor and what it runs on (compressed-tensors' grids,
#: a transformers model, a datasets.Dataset of calibration ids)
ANCHORS = ("llmcompressor", "compressed_tensors", "transformers", "datasets")
BITS, GROUP = 4, 64
#: lmforge's rows: bench_compress's definitions (label -> method and options), head left in fp32,
#: plus GPTQ without true-sequential order (llm-compressor calibrates a block's layers together)
LMFORGE = [("RTN 4-bit g64", {}), ("GPTQ 4-bit g64", {}), ("GPTQ 4-bit g64 act-order", {}),
           ("GPTQ 4-bit g64, not true-sequential", {"sequential": False}), ("AWQ 4-bit g64", {})]
#: llm-compressor's rows: (label, recipe kind, options)
REFERENCE = [
    ("RTN 4-bit g64", "rtn", {}),
    ("AWQ 4-bit g64", "awq", {}),  # duo scaling (its default), no clipping search
    ("GPTQ 4-bit g64", "gptq", {"actorder": None}),
    ("GPTQ 4-bit g64 act-order static", "gptq", {"actorder": "static"}),  # its default ("weight" is an alias)
    ("AWQ 4-bit g64, mse observer", "awq", {"observer": "mse"}),  # a searched range per group
]


def reference_scheme(observer: str | None = None) -> dict[str, Any]:
    """llm-compressor's config group for lmforge's grid: int4, asymmetric, groups of 64, every Linear."""
    weights: dict[str, Any] = {"num_bits": BITS, "type": "int", "symmetric": False, "strategy": "group",
                               "group_size": GROUP}
    if observer:
        weights["observer"] = observer
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def reference_recipe(kind: str, options: dict[str, Any]) -> list:
    """The modifiers `oneshot` runs; `lm_head` ignored, as llm-compressor's examples do."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    scheme = reference_scheme(options.get("observer"))
    if kind == "rtn":
        return [QuantizationModifier(config_groups=scheme, ignore=["lm_head"])]
    if kind == "gptq":  # damping 1% and blocks of 128 columns: its defaults, and lmforge's
        return [GPTQModifier(config_groups=scheme, ignore=["lm_head"], actorder=options["actorder"],
                             dampening_frac=0.01, block_size=128)]
    if kind == "awq":
        return [AWQModifier(), QuantizationModifier(config_groups=scheme, ignore=["lm_head"])]
    raise ValueError(f"unknown recipe kind {kind!r}")


def without_pinning_on_cpu() -> None:
    """llm-compressor 0.14.0.1's AWQ pins its cached activations in page-locked memory, which raises
    "Cannot access accelerator device when none is available" on a machine without one: pinning only
    speeds up host-to-device copies, so on a CPU-only machine it is skipped (the numbers are unchanged)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def reference_quantize(folder: Path, kind: str, options: dict[str, Any],
                       calibration: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """(llm-compressor's quantized transformers model, seconds): `oneshot` on our calibration ids."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    samples, length = calibration.shape
    data = None if kind == "rtn" else Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()})
    without_pinning_on_cpu()
    started = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=reference_recipe(kind, options),
            num_calibration_samples=samples, max_seq_length=length, shuffle_calibration_samples=False)
    return model, time.perf_counter() - started


def dequantized_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """(the model's state dict with every quantized weight replaced by its grid values, layers rounded),
    through compressed-tensors' `fake_quantize`; checks each group holds at most 2^bits values."""
    from compressed_tensors.quantization import fake_quantize

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = 0
    for name, module in model.named_modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None or not hasattr(module, "weight_scale"):
            continue
        with torch.no_grad():
            w = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, args)
        levels = max(len(torch.unique(g)) for g in w.reshape(-1, GROUP)[:: max(w.numel() // GROUP // 64, 1)])
        if levels > 2 ** BITS:
            raise AssertionError(f"{name}: a group of {GROUP} holds {levels} values, more than {2 ** BITS}")
        state[f"{name}.weight"] = w.float()
        layers += 1
    return {k: v for k, v in state.items() if not k.endswith(("_scale", "_zero_point", "_g_idx"))}, layers


def reference_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name)
            for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32,
                        help="calibration windows (bench_compress's table: 32)")
    parser.add_argument("--seq-len", type=int, default=512,
                        help="tokens per window (calibration and held out)")
    parser.add_argument("--heldout-windows", type=int, default=32, help="held-out windows scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-forward", choices=("first", "all", "none"), default="first",
                        help="which llm-compressor rows are also scored through its own forward (the check "
                             "that the dequantized weights are its model)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="labels (substrings, or =the whole label) of the rows to run")
    parser.add_argument("--side", choices=("both", "lmforge", "reference"), default="both",
                        help="run only lmforge's rows or only llm-compressor's (two processes side by side)")
    parser.add_argument("--smoke", action="store_true", help="--samples 4 --seq-len 128 --heldout-windows 2, "
                                                             "a few rows")
    parser.add_argument("--json", default=None, help="also write every number here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples, args.seq_len, args.heldout_windows = 4, 128, 2
        args.only = args.only or ["fp32", "RTN", "GPTQ 4-bit g64 act-order static", "AWQ 4-bit g64"]
    require(*ANCHORS)
    torch.set_num_threads(args.threads)
    machine = announce(("llmcompressor", "compressed-tensors", "transformers"))

    loaded = load_model("smollm2")
    base, tokenizer = loaded.model.requires_grad_(False), loaded.tokenizer
    calibration, heldout = text_windows(tokenizer, args.samples, args.seq_len, args.heldout_windows)
    print(f"\n  model: {loaded.path.name} (fp32), calibration {calibration.shape[0]} x "
          f"{calibration.shape[1]} tokens (Python HOWTOs), held out {heldout.shape[0]} x {heldout.shape[1]} "
          f"tokens (Python tutorial), 4-bit asymmetric groups of {GROUP}, head fp32\n", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-compress-ref-"))
    from lmforge.export import export_model

    folder = work / "smollm2-f32"
    export_model("smollm2", "hf", folder, dtype="f32")

    def wanted(label: str) -> bool:
        """A substring of the label, or the whole label after `=`."""
        return args.only is None or any(label.lower() == s[1:].lower() if s.startswith("=")
                                        else s.lower() in label.lower() for s in args.only)

    rows: list[dict[str, Any]] = []

    def save() -> None:  # after every row: a crash keeps what was measured
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine, "versions": reference_versions(),
                                                   "settings": vars(args), "rows": rows}, indent=2) + "\n")

    def record(side: str, label: str, model: torch.nn.Module, seconds: float, **extra) -> None:
        score = perplexity(model, heldout)
        rows.append({"side": side, "label": label, "perplexity": score.perplexity,
                     "compress_seconds": seconds, "eval_seconds": score.seconds, **extra})
        save()
        own = extra.get("own_forward_perplexity")
        own = f"  (its own forward: {own:.3f})" if own is not None else ""
        print(f"  {side:14s} {label:36s} ppl {score.perplexity:8.3f}  ({seconds:.0f} s to make){own}",
              flush=True)

    if wanted("fp32") and args.side != "lmforge":
        from transformers import AutoModelForCausalLM

        record("lmforge", "fp32", base, 0.0)
        record("transformers", "fp32", AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), 0.0)
    definitions = {label: (method, bits, group, options) for label, method, bits, group, options in QUANTIZED}
    for label, extra in LMFORGE:
        if not wanted(label) or args.side == "reference":
            continue
        method, bits, group, options = definitions[label.split(",")[0]]
        model = copy.deepcopy(base)
        report = quantize_model(model, method, Grid(bits, group), calibration=calibration, head="none",
                                **options, **extra)
        record("lmforge", label, model, report.seconds, method=method, **options, **extra)
        del model
    checked = False
    for label, kind, options in REFERENCE:
        if not wanted(label) or args.side == "lmforge":
            continue
        model, seconds = reference_quantize(folder, kind, options, calibration)
        state, layers = dequantized_state(model)
        ours = copy.deepcopy(base)
        ours.load_state_dict(state_dict_from_hf(state, base.config, "llama"))
        extra = {}
        # its fake-quant forward, through transformers: the same number shows the conversion is exact
        if args.check_forward == "all" or (args.check_forward == "first" and not checked):
            extra["own_forward_perplexity"] = perplexity(model, heldout).perplexity
            checked = True
        record("llm-compressor", label, ours, seconds, method=kind, layers=layers, **extra, **options)
        del model, ours
    report_goals(rows)
    save()
    return 0


def report_goals(rows: list[dict[str, Any]]) -> None:
    """Each method's loss against fp32, lmforge's beside llm-compressor's."""
    by = {(r["side"], r["label"]): r["perplexity"] for r in rows}
    fp32 = by.get(("lmforge", "fp32"))
    if fp32 is None:
        return
    print()
    pairs: list[tuple[str, str]] = [("RTN 4-bit g64", "RTN 4-bit g64"), ("GPTQ 4-bit g64", "GPTQ 4-bit g64"),
                                    ("GPTQ 4-bit g64 act-order", "GPTQ 4-bit g64 act-order static"),
                                    ("AWQ 4-bit g64", "AWQ 4-bit g64")]
    show: Callable[[float | None], str] = lambda p: "-" if p is None else f"+{p - fp32:.3f}"  # noqa: E731
    for ours, theirs in pairs:
        print(f"  {ours:28s} loss vs fp32: lmforge {show(by.get(('lmforge', ours)))}, "
              f"llm-compressor {show(by.get(('llm-compressor', theirs)))}")


if __name__ == "__main__":
    sys.exit(main())
