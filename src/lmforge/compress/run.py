"""`lmforge quantize` and `lmforge prune` as functions: load, calibrate, compress, measure, write.

Both return a summary dict (what `--json` prints) and write the output folder atomically.
With `measure=True` the model's perplexity on held-out text (the Python tutorial by
default, never used for calibration) is computed before and after, so a user sees what
the compression cost in the same command.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.compress.calibration import (
    CalibrationError,
    calibration_windows,
    default_calibration_files,
    default_heldout_files,
    heldout_windows,
    token_stream,
)
from lmforge.compress.grid import Grid, GridError
from lmforge.compress.prune import PruneError, Sparsity, prune_model
from lmforge.compress.qat import INITS
from lmforge.compress.quantize import CALIBRATED, quantize_model
from lmforge.compress.structured import STRUCTURES, shrink_model
from lmforge.eval.perplexity import perplexity
from lmforge.infer.quant import QuantizedLinear
from lmforge.infer.quantized_folder import save_quantized
from lmforge.model.checkpoint import save_checkpoint

HELDOUT_WINDOWS = 32  # x seq_len tokens of held-out text for --measure


def _say(quiet: bool):
    return (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr, flush=True))


def _check_damp(damp: float) -> None:
    if not 0 < damp < 1:
        raise ValueError(f"--damp must be between 0 and 1 (a fraction of the Hessian's mean diagonal), "
                         f"got {damp}")


def _load(spec: str, output: str, samples: int, seq_len: int):
    """The model to compress, once the settings that need no model have been checked."""
    from lmforge.infer.loading import load_model

    if samples < 1 or seq_len < 2:
        raise CalibrationError(f"need at least 1 sample of at least 2 tokens, got --samples {samples} "
                               f"--seq-len {seq_len}")
    loaded = load_model(spec)
    target = Path(output).expanduser()
    if target.resolve() == loaded.path.resolve():
        raise ValueError(f"-o {output} is the model being compressed; write somewhere else")
    markers = ("lmforge.json", "config.json", "model.safetensors")
    if target.is_dir() and any(target.iterdir()) and not any((target / m).exists() for m in markers):
        raise ValueError(f"-o {output} is a folder holding something other than a model; it would be "
                         f"replaced: choose a new or empty folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"-o {output} is a file; the output is a folder")
    if any(isinstance(m, QuantizedLinear) for m in loaded.model.modules()):
        raise ValueError(f"{spec} is already quantized: compress a float model (a checkpoint, a GGUF file "
                         f"or a sample)")
    return loaded


def _calibration(loaded, files: Sequence[str] | None, samples: int, seq_len: int, seed: int):
    sources = list(files) if files else default_calibration_files()
    windows = calibration_windows(token_stream(loaded.tokenizer, sources), samples, seq_len, seed)
    vocab = loaded.model.config.vocab_size
    if int(windows.max()) >= vocab:
        raise CalibrationError(f"the calibration tokens reach id {int(windows.max())}, past the model's "
                               f"vocabulary ({vocab}): token shards made with another tokenizer?")
    return windows, sources


def stored_bytes(path: Path) -> int:
    """Bytes of a model's weights on disk: a file (GGUF), or a folder's safetensors files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _measure(model, tokenizer, heldout: Sequence[str] | None, seq_len: int, say) -> dict[str, float]:
    windows = heldout_windows(token_stream(tokenizer, list(heldout) if heldout else default_heldout_files()),
                              seq_len, limit=HELDOUT_WINDOWS)
    result = perplexity(model, windows, progress=say)
    return {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens}


def _finish(summary: dict[str, Any], loaded, output: str, report: dict[str, Any], measure: bool,
            heldout, seq_len: int, before: dict | None, say) -> dict[str, Any]:
    if measure:
        say("measuring the compressed model on held-out text")
        summary["heldout_after"] = _measure(loaded.model, loaded.tokenizer, heldout, seq_len, say)
        summary["heldout_before"] = before
    if any(isinstance(m, QuantizedLinear) for m in loaded.model.modules()):
        folder = save_quantized(output, loaded.model, tokenizer=loaded.tokenizer, report=report,
                                source=str(loaded.path))
    else:  # pruned: an ordinary float checkpoint (transformers loads it), zeros in place or smaller
        folder = save_checkpoint(output, loaded.model, tokenizer=loaded.tokenizer,
                                 extra={"source": str(loaded.path), "compression": report})
    summary["output"] = str(folder)
    summary["bytes_before"] = stored_bytes(loaded.path)
    summary["bytes_after"] = stored_bytes(folder)
    return summary


def quantize_command(model: str, method: str, bits: int, output: str, *, group_size: int = 64,
                     calibration: Sequence[str] | None = None, samples: int = 128, seq_len: int = 512,
                     act_order: bool | None = None, damp: float = 0.01, head: str = "int8",
                     activations: str = "dynamic", alpha: float | None = None, measure: bool = False,
                     heldout: Sequence[str] | None = None, seed: int = 0, qat: dict[str, Any] | None = None,
                     quiet: bool = False) -> dict[str, Any]:
    """`qat`: the qat method's settings (init, data, steps, lr, ranges, batch), None otherwise."""
    say = _say(quiet)
    grid = Grid(bits, group_size)
    qat = dict(qat or {})
    if qat and method != "qat":
        raise GridError(f"{', '.join('--' + k for k in qat)}: options of --method qat")
    rounding = (qat.pop("init", None) or "rtn") if method == "qat" else method  # what rounds first
    if rounding not in INITS and method == "qat":
        raise GridError(f"--init must be one of {', '.join(INITS)} (what rounds the weights before "
                        f"training), got {rounding!r}")
    if act_order and rounding != "gptq":
        raise GridError("--act-order is a GPTQ option (rtn and awq round every weight on its own)")
    act_order = rounding == "gptq" if act_order is None else act_order  # gptq: on unless --no-act-order
    if method == "smoothquant" and bits != 8:
        raise GridError(f"smoothquant rounds weights and activations to 8 bits: use --bits 8 (got {bits})")
    if method != "smoothquant" and (activations != "dynamic" or alpha is not None):
        raise GridError("--activations and --alpha are smoothquant options (the other methods keep float "
                        "activations)")
    _check_damp(damp)
    loaded = _load(model, output, samples, seq_len)
    windows = None
    if rounding in CALIBRATED:
        windows, sources = _calibration(loaded, calibration, samples, seq_len, seed)
        say(f"calibrating on {windows.shape[0]} windows of {windows.shape[1]} tokens from {len(sources)} "
            f"source(s)")
    elif calibration:
        raise GridError(f"{rounding} uses no calibration text (drop --calibration"
                        + ("; qat trains on --data)" if method == "qat" else ")"))
    before = _measure(loaded.model, loaded.tokenizer, heldout, seq_len, say) if measure else None
    if method == "qat":
        report = _qat(loaded, grid, rounding, windows, qat, seq_len=seq_len, seed=seed, head=head,
                      act_order=act_order, damp=damp, quiet=quiet, say=say)
    else:
        report = quantize_model(loaded.model, method, grid, calibration=windows, head=head,
                                act_order=act_order, damp=damp, activations=activations, alpha=alpha,
                                progress=say)
    summary = {"command": "quantize", "model": model, "method": method, "bits": bits,
               "group_size": report.group_size, "head": head, "act_order": act_order,
               "layers": report.layers, "calibration_tokens": report.calibration_tokens,
               "weight_bytes_per_token_before": report.bytes_before,
               "weight_bytes_per_token_after": report.bytes_after, "seconds": report.seconds,
               "description": report.describe()}
    if method == "qat":
        summary["qat"] = {k: v for k, v in report.details.items() if k != "init_details"}
    record = {k: v for k, v in summary.items() if k != "description"} | {"details": report.details}
    return _finish(summary, loaded, output, record, measure, heldout, seq_len, before, say)


def _qat(loaded, grid: Grid, init: str, windows, options: dict[str, Any], *, seq_len: int, seed: int,
         head: str, act_order: bool, damp: float, quiet: bool, say):
    """Round by `init`, train through the rounding on `options["data"]` (default: the calibration
    default, the Python HOWTOs), convert: the qat method's report."""
    from lmforge.compress.qat import QATConfig, qat_quantize

    sources = list(options.pop("data", None) or default_calibration_files())
    ranges = options.pop("ranges", None) or "learn"
    config = QATConfig(**options, learn_ranges=ranges == "learn", seq_len=seq_len, seed=seed)
    config.validate()
    tokens = token_stream(loaded.tokenizer, sources)
    if int(tokens.max()) >= loaded.model.config.vocab_size:
        raise CalibrationError(f"the training tokens reach id {int(tokens.max())}, past the model's "
                               f"vocabulary ({loaded.model.config.vocab_size}): token shards made with "
                               f"another tokenizer?")
    say(f"qat: training on {len(tokens):,} tokens from {len(sources)} source(s), {config.steps} steps of "
        f"{config.batch} x {config.seq_len} tokens")
    return qat_quantize(loaded.model, grid, tokens, config, init=init, calibration=windows, head=head,
                        act_order=act_order, damp=damp, tokenizer=loaded.tokenizer, quiet=quiet, progress=say)


def prune_command(model: str, method: str, sparsity: str, output: str, *,
                  calibration: Sequence[str] | None = None, samples: int = 128, seq_len: int = 512,
                  damp: float = 0.01, measure: bool = False, heldout: Sequence[str] | None = None,
                  seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    say = _say(quiet)
    pattern = Sparsity.parse(sparsity)
    if method in STRUCTURES and pattern.structured:
        raise PruneError(f"{method} pruning removes a fraction (0.25), not an n:m pattern")
    _check_damp(damp)
    loaded = _load(model, output, samples, seq_len)
    windows = None
    if method != "magnitude":
        windows, sources = _calibration(loaded, calibration, samples, seq_len, seed)
        say(f"calibrating on {windows.shape[0]} windows of {windows.shape[1]} tokens from {len(sources)} "
            f"source(s)")
    elif calibration:
        raise PruneError("magnitude pruning uses no calibration text (drop --calibration)")
    before = _measure(loaded.model, loaded.tokenizer, heldout, seq_len, say) if measure else None
    if method in STRUCTURES:
        loaded.model, shrunk = shrink_model(loaded.model, method, pattern.fraction, windows, progress=say)
        summary = {"command": "prune", "model": model, "method": method, "sparsity": str(pattern),
                   "kept": shrunk.kept, "parameters_before": shrunk.parameters_before,
                   "parameters_after": shrunk.parameters_after,
                   "calibration_tokens": shrunk.calibration_tokens,
                   "seconds": shrunk.seconds, "description": shrunk.describe()}
    else:
        report = prune_model(loaded.model, method, pattern, calibration=windows, damp=damp, progress=say)
        summary = {"command": "prune", "model": model, "method": method, "sparsity": str(pattern),
                   "layers": report.layers, "zeros": report.zeros, "weights": report.weights,
                   "calibration_tokens": report.calibration_tokens, "seconds": report.seconds,
                   "description": report.describe()}
    record = {k: v for k, v in summary.items() if k != "description"}
    return _finish(summary, loaded, output, record, measure, heldout, seq_len, before, say)


def describe(summary: dict[str, Any]) -> str:
    lines = [summary["description"],
             f"size: {summary['bytes_before'] / 1e6:.1f} MB ({summary['model']}) -> "
             f"{summary['bytes_after'] / 1e6:.1f} MB ({summary['output']})"]
    before, after = summary.get("heldout_before"), summary.get("heldout_after")
    if before and after:
        lines.append(f"held-out perplexity ({after['tokens']:,} tokens never used for calibration): "
                     f"{before['perplexity']:.3f} -> {after['perplexity']:.3f}")
    return "\n".join(lines)
