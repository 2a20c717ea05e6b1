"""Resumable training checkpoints: the model folder plus `trainer_state/`.

    checkpoints/step-000100/
        config.json, model.safetensors, lmforge.json, ...   (lmforge.model.checkpoint)
        trainer_state/optimizer.safetensors   every optimizer tensor, flattened by name
        trainer_state/rng.safetensors         torch (and CUDA) RNG states: uint8 tensors
        trainer_state/state.json              step, data position, optimizer scalars and
                                              hyperparameters, numpy/python RNG, run config

Everything is written into a hidden staging folder and renamed into place last (the
`lmforge.atomic.atomic_folder`), so a `kill -9` at any moment leaves either a
complete checkpoint or none; `latest_checkpoint` ignores staging folders, and the next
save deletes any that a killed run left behind. Resuming restores every piece of state that influences the
next step, which is what makes a resumed loss curve bit-identical to an unbroken one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.atomic import atomic_folder
from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors
from lmforge.formats.strictjson import JSONInputError, read_json
from lmforge.model.checkpoint import load_checkpoint, load_config, save_checkpoint
from lmforge.model.config import ModelConfig

STATE_DIR = "trainer_state"
STEP_PATTERN = re.compile(r"^step-(\d+)$")


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (other architecture, missing state)."""


# ---------------------------------------------------------------------------------- optimizer state
def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch's optimizer state dict -> (tensors named "state.<param>.<key>", JSON for everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------- RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, mt, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(mt), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, mt, gauss_next = meta["python"]
    random.setstate((version, tuple(mt), gauss_next))


# ---------------------------------------------------------------------------------- what holds the model
class ModelStore(Protocol):
    """How a checkpoint holds the model being trained: the whole model (pretraining, full
    fine-tuning), or only what trains (an adapter over a frozen base, lmforge.tune)."""

    def write(self, folder: Path, model_state: Mapping[str, torch.Tensor], config: ModelConfig,
              tokenizer: Any, step: int) -> None:
        """Write the model part of a checkpoint into `folder` (the staging folder)."""
        ...

    def read(self, folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
        """The tensors `write` stored, by the trained model's parameter names (checks they fit `config`)."""
        ...


class FullModel:
    """The whole model as a checkpoint folder (Hugging Face layout where the family allows)."""

    def __init__(self, source: str = "lmforge pretrain") -> None:
        self.source = source

    def write(self, folder: Path, model_state: Mapping[str, torch.Tensor], config: ModelConfig,
              tokenizer: Any, step: int) -> None:
        save_checkpoint(folder, model_state, config, tokenizer=tokenizer,
                        extra={"source": self.source, "step": step})

    def read(self, folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
        check_same_architecture(folder, config)
        loaded, _ = load_checkpoint(folder, dtype=torch.float32)
        return loaded.state_dict()


# ---------------------------------------------------------------------------------- save / find / load
def save_training_checkpoint(
    checkpoints: str | Path,
    step: int,
    model: nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    state: dict[str, Any],
    *,
    keep: int = 3,
    tokenizer: Any = None,
    config: ModelConfig | None = None,
    store: ModelStore | None = None,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then delete all but the newest `keep`.

    `model` and `optimizer` may be their state dicts (with `config`): distributed training
    gathers the full state first (lmforge.train.parallel) and writes it in this same layout.
    `store` decides what of the model is written (default: all of it).
    """
    checkpoints = Path(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    for stale in checkpoints.glob(".*"):  # staging folders of a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoints / f"step-{step:06d}"
    with atomic_folder(final) as staging:  # fsyncs every file, then renames the whole folder into place
        model_state = model.state_dict() if isinstance(model, nn.Module) else model
        config = config or model.config  # type: ignore[union-attr]
        (store or FullModel()).write(staging, model_state, config, tokenizer, step)
        folder = staging / STATE_DIR
        folder.mkdir()
        opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        opt_tensors, opt_meta = flatten_optimizer_state(opt_state)
        save_file(opt_tensors, str(folder / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(folder / "rng.safetensors"))
        full = {"format": "lmforge-trainer-state", "step": step, **state, "optimizer": opt_meta,
                "rng": rng_meta}
        (folder / "state.json").write_text(json.dumps(full, indent=1), encoding="utf-8")
    for old in list_checkpoints(checkpoints)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints: str | Path) -> list[Path]:
    """Complete checkpoints (with trainer state) in `checkpoints`, oldest first."""
    folder = Path(checkpoints)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := STEP_PATTERN.match(p.name)) and (p / STATE_DIR / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints: str | Path) -> Path | None:
    found = list_checkpoints(checkpoints)
    return found[-1] if found else None


def resume_point(resume: str, output: str | Path) -> Path | None:
    """A run's `resume` setting -> the checkpoint to continue from: "auto" (the newest under
    output/checkpoints, if any), "never", or a checkpoint folder."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(Path(output) / "checkpoints")
    folder = Path(resume)
    if not folder.is_dir():
        raise ResumeError(f"resume: {folder} is not a checkpoint folder")
    return folder


def check_same_architecture(folder: Path, config: ModelConfig) -> None:
    saved = {k: v for k, v in load_config(folder).to_dict().items() if k != "extra"}
    wanted = {k: v for k, v in config.to_dict().items() if k != "extra"}
    differ = [f"{k}: checkpoint {saved.get(k)!r}, config {wanted.get(k)!r}"
              for k in sorted(wanted) if saved.get(k) != wanted.get(k)]
    if differ:
        raise ResumeError(f"cannot resume from {folder}: it holds another architecture ({'; '.join(differ)})")


def read_training_checkpoint(folder: str | Path, config: ModelConfig, store: ModelStore | None = None,
                             ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state dict, optimizer state dict, state.json) of a checkpoint for `config`; restores the RNG.

    The model state is what `store` wrote: the whole model, or only an adapter's tensors."""
    folder = Path(folder)
    state_dir = folder / STATE_DIR
    if not (state_dir / "state.json").is_file():
        raise ResumeError(f"{folder} has no {STATE_DIR}/state.json: "
                          "it is a model, not a resumable checkpoint")
    model_state = (store or FullModel()).read(folder, config)
    try:
        state = read_json(state_dir / "state.json", allow_nonfinite=True)  # ours: a clip of inf is fine
        opt_tensors, _ = load_tensors(state_dir / "optimizer.safetensors")
        rng_tensors, _ = load_tensors(state_dir / "rng.safetensors")
    except (JSONInputError, SafetensorsError) as err:
        raise ResumeError(f"cannot resume from {folder}: {err}") from err
    _check_trainer_state(folder, state, opt_tensors, rng_tensors)
    set_rng_state(rng_tensors, state["rng"])
    return model_state, unflatten_optimizer_state(opt_tensors, state["optimizer"]), state


def _check_trainer_state(folder: Path, state: Any, opt_tensors: Mapping[str, torch.Tensor],
                         rng_tensors: Mapping[str, torch.Tensor]) -> None:
    """The shapes `set_rng_state` and `unflatten_optimizer_state` rely on, checked before either runs.

    A damaged or hand-edited trainer_state/ must fail here, naming the part, not half-way
    through restoring the RNG (leaving it changed) or inside torch's optimizer.
    """
    def bad(why: str) -> ResumeError:
        return ResumeError(f"cannot resume from {folder}: {STATE_DIR}/{why}")

    if not isinstance(state, dict):
        raise bad("state.json is not a JSON object")
    for key in ("step", "tokens_seen"):
        if not (isinstance(state.get(key), int) and not isinstance(state[key], bool) and state[key] >= 0):
            raise bad(f"state.json: {key!r} must be a non-negative integer, got {state.get(key)!r}")
    if not isinstance(state.get("data"), dict):
        raise bad("state.json lacks the data position ('data' object)")
    optimizer, rng = state.get("optimizer"), state.get("rng")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("scalars"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise bad("state.json lacks the optimizer's scalars and param_groups")
    if not all(k.isdigit() and isinstance(v, dict) for k, v in optimizer["scalars"].items()):
        raise bad("state.json has malformed optimizer scalars")
    for name, tensor in opt_tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise bad(f"optimizer.safetensors holds {name!r}, not a 'state.<param>.<key>' tensor")
        if not (tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32)):
            raise bad(f"optimizer.safetensors: {name!r} has dtype {tensor.dtype}, not an optimizer state")
    if not isinstance(rng, dict):
        raise bad("state.json has no 'rng' record")
    try:  # on throwaway generators: the run's own RNG is touched only once all of it is known good
        torch.Generator().set_state(rng_tensors["torch"])
        kind, pos, has_gauss, cached = rng["numpy"]
        keys = rng_tensors["numpy.keys"].numpy().astype(np.uint32)
        np.random.RandomState().set_state((kind, keys, pos, has_gauss, cached))
        version, mt, gauss_next = rng["python"]
        random.Random().setstate((version, tuple(mt), gauss_next))
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as err:
        raise bad(f"rng.safetensors and state.json's 'rng' do not hold a valid RNG state ({err!r})") from err


def load_model_state(model: nn.Module, model_state: Mapping[str, torch.Tensor]) -> None:
    """Load a checkpoint's model state: all of the model, or (an adapter's checkpoint) every
    trainable tensor and nothing else, the frozen rest staying as the base model has it."""
    own = model.state_dict()
    unexpected = sorted(set(model_state) - set(own))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(own) - set(model_state))
    if unexpected or (missing and not trainable.isdisjoint(missing)):
        raise ResumeError(f"the checkpoint does not fit this model: unexpected {unexpected[:4]}, missing "
                          f"{sorted(trainable & set(missing))[:4] or missing[:4]}")
    with torch.no_grad():
        model.load_state_dict(model_state, strict=not missing)


def load_training_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             store: ModelStore | None = None) -> dict:
    """Restore model weights, optimizer and RNG in place; return state.json (step, data position, ...)."""
    model_state, optimizer_state, state = read_training_checkpoint(folder, model.config, store)
    load_model_state(model, model_state)
    optimizer.load_state_dict(optimizer_state)
    return state
