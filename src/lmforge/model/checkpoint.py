"""Checkpoint folders in the Hugging Face layout, written atomically and read defensively.

A folder holds `config.json`, `model.safetensors`, `generation_config.json`, the
tokenizer's files and `lmforge.json` (the full `ModelConfig` plus provenance). When an
HF family can express the model, `config.json` and the tensor names are that family's,
so `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it unchanged;
otherwise both are lmforge-native (`"architectures": ["LmforgeTransformer"]`).

Weights are only ever safetensors: a pickle can run code when loaded. Every file is
checked before its bytes are trusted (header length, JSON, offsets inside the file,
tensor names and shapes against the config) so a bad folder fails with a sentence
that says what is wrong, not with a stack trace from deep inside a library.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
from contextlib import AbstractContextManager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.atomic import atomic_folder
from lmforge.formats.safetensors_reader import FLOAT_DTYPES, SafetensorsError, load_tensors, read_header
from lmforge.formats.strictjson import JSONInputError, read_json
from lmforge.model.config import ConfigError, ModelConfig
from lmforge.model.hf import (
    ARCHITECTURES,
    CheckpointError,
    check_exportable,
    check_shapes,
    check_state_dict,
    config_from_hf,
    config_to_hf,
    expected_state,
    hf_model_type,
    hf_model_type_of,
    normalize_hf_names,
    state_dict_from_hf,
    state_dict_to_hf,
)
from lmforge.model.transformer import Transformer

__all__ = ["CheckpointError", "load_checkpoint", "load_config", "read_safetensors_header", "save_checkpoint"]

CONFIG_NAME = "config.json"
LMFORGE_NAME = "lmforge.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_NAME = "generation_config.json"
NATIVE_ARCHITECTURE = "LmforgeTransformer"
MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json, lmforge.json, the shard index: kilobytes in practice
FORMAT_VERSION = 1

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


# ---------------------------------------------------------------------------------- safetensors headers
def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a .safetensors file, reading no tensor data.

    `lmforge.formats.safetensors_reader` checks the header length against the file size
    and a 100 MB cap, the JSON with a depth bound, and that the tensors tile the data
    exactly, so a truncated download or a stray file fails here with a clear `CheckpointError`.
    """
    try:
        return read_header(path).tensors
    except SafetensorsError as err:
        raise CheckpointError(str(err)) from err


def checkpoint_tensors(folder: str | Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every tensor in a folder's weights (one file or an index of shards): name -> (file, header entry)."""
    folder = Path(folder)
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.exists():
        return {name: (single, info) for name, info in read_safetensors_header(single).items()}
    if not index.exists():
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise CheckpointError(f"{folder}: only pickle weights (.bin/.pt) found; lmforge never unpickles "
                                  "weights (it can run code) - convert them to safetensors first")
        raise CheckpointError(f"{folder}: no weights ({WEIGHTS_NAME} or {INDEX_NAME}) in the folder")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: has no weight_map object")
    headers: dict[str, dict[str, dict[str, Any]]] = {}
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("..", "."):
            raise CheckpointError(f"{index}: shard {file_name!r} (for {name!r}) is not a file in this folder")
        if file_name not in headers:
            headers[file_name] = read_safetensors_header(folder / file_name)
        if name not in headers[file_name]:
            raise CheckpointError(f"{index}: maps {name!r} to {file_name}, which does not contain it")
        out[name] = (folder / file_name, headers[file_name][name])
    return out


# ---------------------------------------------------------------------------------- loading
def _read_json(path: Path, *, allow_nonfinite: bool = False) -> dict[str, Any]:
    """A JSON object from the folder: bounded in size and depth; NaN, Infinity and repeated keys refused."""
    try:
        value = read_json(path, max_bytes=MAX_JSON_BYTES, allow_nonfinite=allow_nonfinite)
    except JSONInputError as err:
        raise CheckpointError(f"{path}: not readable JSON ({err.reason})") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _config_and_names(folder: Path, *, strict: bool = True) -> tuple[ModelConfig, str | None]:
    """The folder's config, and the HF model_type its tensor names use (None: lmforge names)."""
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a checkpoint is a folder, this is a file")
    lmforge_file, config_file = folder / LMFORGE_NAME, folder / CONFIG_NAME
    if lmforge_file.exists():
        info = _read_json(lmforge_file, allow_nonfinite=True)  # its free-form "extra" may hold an inf
        if not isinstance(info.get("config"), dict):
            raise CheckpointError(f"{lmforge_file}: has no 'config' object")
        config = _native_config(info["config"], lmforge_file)
        weights = info.get("weights")
        names = weights.get("names", "lmforge") if isinstance(weights, dict) else "lmforge"
        if not isinstance(names, str) or (names != "lmforge" and names not in ARCHITECTURES):
            raise CheckpointError(f"{lmforge_file}: unknown tensor naming {names!r}")
        return config, (None if names == "lmforge" else names)
    if not config_file.exists():
        raise CheckpointError(f"{folder}: missing {CONFIG_NAME} (and {LMFORGE_NAME}): not a checkpoint")
    hf = _read_json(config_file)
    if hf.get("architectures") == [NATIVE_ARCHITECTURE] or hf.get("model_type") == "lmforge":
        bookkeeping = ("architectures", "model_type", "dtype", "torch_dtype")
        values = {k: v for k, v in hf.items() if k not in bookkeeping}
        return _native_config(values, config_file), None
    model_type = hf_model_type_of(hf)
    config = config_from_hf(hf, strict=strict)
    config.extra["source"] = str(folder)
    _check_buildable(config, config_file)
    return config, model_type


def _native_config(values: dict[str, Any], source: Path) -> ModelConfig:
    """A `ModelConfig` from lmforge's own field names; NaN/inf and sizes that build no model are refused."""
    for key, value in values.items():
        if key != "extra" and (where := _nonfinite(value, key)):
            raise CheckpointError(f"{source}: invalid model config: {where} is not a finite number")
    try:
        config = ModelConfig.from_dict(values)
    except (ConfigError, TypeError, AttributeError) as err:  # the last two: a value of the wrong type
        raise CheckpointError(f"{source}: invalid model config: {err}") from err
    _check_buildable(config, source)
    return config


def _nonfinite(value: Any, where: str) -> str | None:
    """The path of the first NaN or infinity inside `value`, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        return next((w for k, v in value.items() if (w := _nonfinite(v, f"{where}.{k}"))), None)
    if isinstance(value, list):
        return next((w for i, v in enumerate(value) if (w := _nonfinite(v, f"{where}[{i}]"))), None)
    return None


def _check_buildable(config: ModelConfig, source: Path) -> None:
    """Builds the model on the meta device (no memory): a size of the wrong type (`true`) fails here."""
    try:
        expected_state(config)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: the config does not describe a model lmforge can build "
                              f"({type(err).__name__}: {err})") from err


def load_config(folder: str | Path, *, strict: bool = True) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder (lmforge.json first, else config.json), loading no weights."""
    return _config_and_names(Path(folder), strict=strict)[0]


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_checkpoint(
    folder: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> tuple[Transformer, ModelConfig]:
    """Loads a checkpoint folder written by lmforge or by `transformers` -> (model in eval mode, config).

    `dtype=None` keeps the stored dtype. Names and shapes are checked against the config
    from the headers alone, before any tensor data is read. `strict=False` tolerates HF
    config fields lmforge does not recognise (they are listed in config.extra).
    """
    folder = Path(folder)
    config, model_type = _config_and_names(folder, strict=strict)
    target_dtype = _as_dtype(dtype)
    files = checkpoint_tensors(folder)

    if model_type is None:
        canonical: dict[str, str | None] = {name: name for name in files}
        expected_meta = expected_state(config)
    else:
        canonical = normalize_hf_names(list(files), model_type)
        fused = any(name.endswith(".experts.gate_up_proj") for name in canonical.values() if name)
        expected_meta = state_dict_to_hf(expected_state(config), config, model_type, fused_experts=fused)
        if config.tie_embeddings and "lm_head.weight" in canonical.values():  # a redundant copy some save
            expected_meta["lm_head.weight"] = torch.empty(config.vocab_size, config.d_model, device="meta")
    expected = {k: tuple(v.shape) for k, v in expected_meta.items()}
    found = {canonical[n]: tuple(info["shape"]) for n, (_, info) in files.items() if canonical[n] is not None}
    check_shapes(found, expected, f"{folder}: the weights")
    _check_dtypes(files, canonical, expected_meta)

    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, (path, _info) in files.items():
        if canonical[name] is not None:
            by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            loaded, _ = load_tensors(path, names)
        except SafetensorsError as err:
            raise CheckpointError(str(err)) from err
        tensors.update({canonical[name]: tensor for name, tensor in loaded.items()})  # type: ignore[misc]

    state = tensors if model_type is None else state_dict_from_hf(tensors, config, model_type)
    # dtype None keeps the stored one; the RoPE table stays fp32 (a blanket .to(bf16) would round it)
    return Transformer.from_state_dict(config, state, dtype=target_dtype, device=device).eval(), config


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def _check_dtypes(files: Mapping[str, tuple[Path, dict[str, Any]]], canonical: Mapping[str, str | None],
                  expected: Mapping[str, torch.Tensor]) -> None:
    """Every stored dtype must fit the tensor it fills: floating weights from F32/BF16/F16/F64 only.

    Read from the headers, so an int or bool tensor where weights belong (or float bytes
    labelled I32) is refused by name before any data is read, instead of failing deep in
    `load_state_dict` or, worse, being cast to float and loading as garbage.
    """
    for name, (path, info) in files.items():
        ours = canonical[name]
        if ours is None or ours not in expected:
            continue
        want = expected[ours].dtype
        allowed = FLOAT_DTYPES if want.is_floating_point else (_SAFETENSORS_DTYPE.get(want, str(want)),)
        if info["dtype"] not in allowed:
            kind = "floating-point weights" if want.is_floating_point else "dtype"
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {info['dtype']}, but the model "
                                  f"needs {kind} ({' or '.join(allowed)})")


# ---------------------------------------------------------------------------------- saving
def save_checkpoint(
    folder: str | Path,
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    config: ModelConfig | None = None,
    *,
    tokenizer: Any = None,
    generation_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    hf_family: str | None = None,
) -> Path:
    """Writes a checkpoint folder atomically (temp folder, fsync, rename) and returns its path.

    HF layout (config.json + names that `transformers` loads) when a family can express
    the config, else lmforge-native. `hf_family` (e.g. "mistral") forces a family, and
    is an error if that family cannot express the config. `extra` is stored in
    lmforge.json (its "source" key, if any, becomes the provenance); `dtype` casts
    floating tensors before writing. A tokenizer is written with `tokenizer.save(folder)`.
    """
    folder = Path(folder)
    if config is None:
        config = getattr(model_or_state_dict, "config", None)
        if not isinstance(config, ModelConfig):
            raise CheckpointError("save_checkpoint needs a ModelConfig (the model has none)")
    state = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
             else dict(model_or_state_dict))
    target_dtype = _as_dtype(dtype)
    state = {k: _prepared(v, target_dtype) for k, v in state.items()}
    check_state_dict(state, config, what="the state dict to save")

    hf_meta = config.extra.get("hf") if isinstance(config.extra.get("hf"), dict) else {}
    model_type: str | None
    if hf_family is not None:
        check_exportable(config, hf_family)
        model_type, hf_export = hf_family, ARCHITECTURES[hf_family]
    else:
        try:
            source = hf_meta.get("model_type")
            model_type = hf_model_type(config, source if source in ARCHITECTURES else None)
            hf_export = ARCHITECTURES[model_type]
        except CheckpointError as err:  # not expressible: the lmforge-native layout, and why
            model_type, hf_export = None, str(err)

    dtype_name = _main_dtype(state)
    ids = _token_ids(hf_meta, tokenizer)
    if model_type is not None:
        tensors = state_dict_to_hf(state, config, model_type)
        config_json = config_to_hf(config, model_type=model_type, dtype=dtype_name, **ids)
    else:
        tensors = state
        config_json = {"architectures": [NATIVE_ARCHITECTURE], "model_type": "lmforge",
                       **_jsonable(config.to_dict()), "dtype": dtype_name}
    provenance = {
        "format": "lmforge-checkpoint", "format_version": FORMAT_VERSION, "lmforge_version": _version(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source": (extra or {}).get("source") or config.extra.get("source") or "lmforge",
        "config": _jsonable(config.to_dict()),
        "weights": {"file": WEIGHTS_NAME, "names": model_type or "lmforge", "dtype": dtype_name},
        "hf_export": hf_export,
        "extra": _jsonable(extra or {}),
    }
    generation = _jsonable({k: v for k, v in ids.items() if v is not None} | dict(generation_config or {}))

    with _checkpoint_folder(folder) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_NAME, config_json)
        _write_json(tmp / GENERATION_NAME, generation)
        _write_json(tmp / LMFORGE_NAME, provenance)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return folder


def _main_dtype(state: Mapping[str, torch.Tensor]) -> str:
    """The dtype holding most of the weights, for config.json's `dtype` (some models keep norms in fp32)."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return str(max(sizes, key=sizes.__getitem__) if sizes else torch.float32).removeprefix("torch.")


def _prepared(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def _token_ids(hf_meta: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """bos/eos/pad ids: from the config's HF provenance, else from the tokenizer if it has them."""
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf_meta.get(key)
        if value is None and tokenizer is not None:
            value = getattr(tokenizer, key, None)
        ids[key] = value if isinstance(value, int | list) else None
    return ids


def _jsonable(value: Any) -> Any:
    """Round-trips through JSON so that a value that cannot be stored fails before anything is written."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot store {value!r} as JSON: {err}") from err


def _version() -> str:
    try:
        return metadata.version("lmforge")
    except metadata.PackageNotFoundError:
        return "unknown"


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _looks_like_checkpoint(folder: Path) -> bool:
    markers = (CONFIG_NAME, LMFORGE_NAME, WEIGHTS_NAME, INDEX_NAME)
    return not any(folder.iterdir()) or any((folder / m).exists() for m in markers)


def _checkpoint_folder(target: Path) -> AbstractContextManager[Path]:
    """`atomic_folder` that refuses to replace a folder holding something else than a checkpoint."""
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder")
    if target.exists() and not _looks_like_checkpoint(target):
        raise CheckpointError(f"refusing to replace {target}: it is not empty and holds no checkpoint")
    return atomic_folder(target)
