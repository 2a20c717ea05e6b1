"""Reward models: a scalar score for a (prompt, completion), learnt from pairs a person (or a
verifier) ranked, the second stage of RLHF and the reward function PPO and GRPO can optimise.

The model is the `Transformer` without its LM head, plus one linear map from the final
hidden state to a number (`score`, no bias, as transformers' `LlamaForSequenceClassification`).
A sequence is scored at its last real token, position `length - 1`: under causal attention
that is the one position that has read the whole prompt and completion.

Bradley-Terry. Suppose each completion y has a hidden quality r(x, y) and a rater prefers
y_w to y_l with probability sigmoid(r(x, y_w) - r(x, y_l)) (a logistic choice between
two scores; only their difference matters). The maximum-likelihood reward model is then

    loss = -log sigmoid(r_chosen - r_rejected - m)

averaged over pairs, with an optional per-pair margin m (pairs ranked "much better"
must be separated by more, as in Llama 2). Since adding a constant to every reward
changes nothing, the scale's origin drifts; trl's `center_rewards_coefficient` c adds
c * mean((r_chosen + r_rejected)^2), pulling each pair's mean reward towards 0, so that
rewards from different batches (and PPO's advantages) are on one scale.

The LM head: `Transformer.forward` applies whatever module sits at `lm_head` (inference
installs a quantized copy there). The reward model puts `nn.Identity()` there, so its
"logits" are the final normed hidden states and no vocabulary-sized matmul is computed;
the backbone's config is marked `tie_embeddings` (its only vocabulary matrix is the input
embedding), which is what a `*ForSequenceClassification` folder holds too.

On disk a reward model is a transformers `*ForSequenceClassification` folder (config.json
with `num_labels: 1` and `pad_token_id`; `model.*` or `transformer.*` tensors plus
`score.weight`; the tokenizer's files), so `AutoModelForSequenceClassification`
reproduces its scores. transformers scores the rightmost token that is not
`pad_token_id`; that is our `length - 1` unless a sequence's last real token is the pad
token itself (pad = EOS, and the completion ends with EOS): give such data another pad.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.atomic import atomic_folder
from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors
from lmforge.formats.strictjson import JSONInputError, read_json
from lmforge.model.config import ModelConfig
from lmforge.model.hf import (
    ARCHITECTURES,
    CheckpointError,
    config_from_hf,
    config_to_hf,
    hf_model_type,
    state_dict_from_hf,
    state_dict_to_hf,
)
from lmforge.model.transformer import Transformer
from lmforge.train.batch import Batch

__all__ = ["SEQUENCE_CLASSIFIERS", "RewardModel", "RewardModelError", "RewardModelStore", "RewardObjective",
           "bradley_terry_loss", "is_reward_folder", "load_reward_model", "pair_rewards", "reward_accuracy",
           "save_reward_model", "score_texts"]

#: the transformers class that holds a reward model of each family (one score per sequence)
SEQUENCE_CLASSIFIERS: dict[str, str] = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "mixtral": "MixtralForSequenceClassification",
}
_FAMILY_OF = {arch: family for family, arch in SEQUENCE_CLASSIFIERS.items()}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PAIR_KEYS = ("rejected_ids", "chosen_length", "rejected_length")


class RewardModelError(ValueError):
    """A reward model, folder or batch that cannot be used as asked; the message says why."""


# ---------------------------------------------------------------------------------- the model
class RewardModel(nn.Module):
    """`Transformer` backbone (no LM head) + `score`: hidden state at the last real token -> a scalar.

    Built from any `Transformer` (a base or SFT model): its LM head is dropped, its other
    weights are kept as they are. The head starts at N(0, head_std^2), by default the
    config's `init_std` (0.02), as transformers initialises `score`: small, so the first
    rewards are near 0 and the first loss near ln 2.
    """

    def __init__(self, base: Transformer, *, head_std: float | None = None,
                 pad_token_id: int | None = None) -> None:
        super().__init__()
        config = dataclasses.replace(base.config, tie_embeddings=True, extra=dict(base.config.extra))
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("lm_head.")}
        device = base.embed.weight.device
        try:
            self.backbone = Transformer.from_state_dict(config, state, device=device)
        except RuntimeError as err:  # e.g. a LoRA-wrapped model: other tensor names
            raise RewardModelError(f"a reward model needs a plain Transformer (merge adapters first): "
                                   f"{str(err).splitlines()[0]}") from err
        self.backbone.lm_head = nn.Identity()  # forward returns the final normed hidden states
        self.score = nn.Linear(config.d_model, 1, bias=False, device=device, dtype=base.embed.weight.dtype)
        nn.init.normal_(self.score.weight, std=config.init_std if head_std is None else head_std)
        self.pad_token_id = pad_token_id  # what rows are padded with (transformers finds the end by it)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (right-padded), lengths [B] real tokens per row -> rewards [B], fp32.

        The hidden state at `length - 1` of each row; padding after it is never attended to
        (causal attention), so it cannot change the score.
        """
        B, T = input_ids.shape
        if lengths.shape != (B,):
            raise RewardModelError(f"lengths must be one per row ({B}), got shape {tuple(lengths.shape)}")
        if lengths.device.type == "cpu" and bool(((lengths < 1) | (lengths > T)).any()):
            raise RewardModelError(f"every length must be in 1..{T} (the row's real tokens), got "
                                   f"{lengths.tolist()}")
        hidden = self.backbone(input_ids).logits  # [B, T, d_model]: the head is the identity
        last = hidden[torch.arange(B, device=hidden.device), lengths.to(hidden.device) - 1]  # [B, d]
        return self.score(last).squeeze(-1).float()


# ---------------------------------------------------------------------------------- the loss
def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """mean(-log sigmoid(r_c - r_r - margin)) [+ c * mean((r_c + r_r)^2)]; rewards [B] -> a scalar.

    `logsigmoid` rather than log(sigmoid(.)): a pair ranked wrongly by a wide gap gives
    sigmoid ~ 0, whose log would be -inf in floating point.
    """
    difference = chosen.float() - rejected.float()
    if margin is not None:
        difference = difference - margin.to(difference)
    loss = -F.logsigmoid(difference).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen.float() + rejected.float()) ** 2).mean()
    return loss


def pair_rewards(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) of a preference batch, both sides in one forward of 2B rows."""
    missing = [key for key in PAIR_KEYS if key not in batch.extras]
    if missing:
        raise RewardModelError(f"a preference batch needs extras {', '.join(PAIR_KEYS)}; missing: "
                               f"{', '.join(missing)}")
    rejected_ids = batch.extras["rejected_ids"]
    if rejected_ids.shape != batch.input_ids.shape:
        raise RewardModelError(f"chosen {tuple(batch.input_ids.shape)} and rejected "
                               f"{tuple(rejected_ids.shape)} rows must be padded to one shape")
    if batch.positions is not None:
        raise RewardModelError("preference pairs are not packed: a reward batch has no positions")
    ids = torch.cat([batch.input_ids, rejected_ids])
    lengths = torch.cat([batch.extras["chosen_length"], batch.extras["rejected_length"]])
    chosen, rejected = model(ids, lengths).chunk(2)
    return chosen, rejected


class RewardObjective:
    """Bradley-Terry on the pair-batch convention (lmforge.align), for the one `Trainer`.

    `extras["margin"]` [B], when present, is each pair's margin; `center_rewards_coefficient`
    is trl's. Metrics as trl's `RewardTrainer` logs them: `accuracy` (share of pairs with
    r_chosen > r_rejected), `margin` (mean r_chosen - r_rejected), and the mean rewards.
    """

    def __init__(self, *, center_rewards_coefficient: float | None = None) -> None:
        self.center_rewards_coefficient = center_rewards_coefficient

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = pair_rewards(model, batch)
        margin = batch.extras.get("margin")
        loss = bradley_terry_loss(chosen, rejected, margin, self.center_rewards_coefficient)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
                   "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean()}
        return loss, metrics


# ---------------------------------------------------------------------------------- evaluation, scoring
def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def reward_accuracy(model: nn.Module, source_or_batches: Any, *, rows: int = 16,
                    max_batches: int = 1_000_000) -> float:
    """Share of pairs whose chosen side scores higher (ties count as wrong), over held-out pairs.

    `source_or_batches`: a `BatchSource` (its fixed `first_batches(rows, max_batches)`) or
    any iterable of preference `Batch`es.
    """
    batches: Iterable[Batch] = (source_or_batches.first_batches(rows, max_batches)
                                if hasattr(source_or_batches, "first_batches") else source_or_batches)
    was_training = model.training
    model.eval()
    device, right, total = _device_of(model), 0, 0
    try:
        for batch in batches:
            chosen, rejected = pair_rewards(model, batch.to(device))
            right += int((chosen > rejected).sum())
            total += chosen.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise RewardModelError("no preference pairs to measure accuracy on")
    return right / total


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, T] padded on the right with `pad_id`, lengths [B])."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


@torch.no_grad()
def score_texts(model: RewardModel, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str],
                *, batch_size: int = 16) -> list[float]:
    """The reward of each prompt + completion, for PPO and GRPO to use as a reward function.

    Each text is tokenised as preference pairs are: the prompt with the tokenizer's
    defaults (BOS), the completion after it without BOS or EOS. Longer than the model's
    context, the start is cut (the completion is what is judged). Rows of similar length
    are batched together, right-padded; the scores come back in the given order.
    """
    if len(prompts) != len(completions):
        raise RewardModelError(f"{len(prompts)} prompts but {len(completions)} completions")
    if batch_size < 1:
        raise RewardModelError(f"batch_size must be at least 1, got {batch_size}")
    limit = model.config.max_seq_len
    rows = [(tokenizer.encode(p) + tokenizer.encode(c, add_bos=False, add_eos=False))[-limit:]
            for p, c in zip(prompts, completions)]
    if any(not row for row in rows):
        raise RewardModelError("a prompt + completion encodes to no tokens: there is nothing to score")
    pad = next((i for i in (model.pad_token_id, getattr(tokenizer, "pad_token_id", None),
                            getattr(tokenizer, "eos_token_id", None)) if i is not None), 0)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = [0.0] * len(rows)
    was_training = model.training
    model.eval()
    device = _device_of(model)
    try:
        for begin in range(0, len(order), batch_size):
            chunk = order[begin:begin + batch_size]
            ids, lengths = _right_padded([rows[i] for i in chunk], pad)
            for i, value in zip(chunk, model(ids.to(device), lengths).tolist()):
                scores[i] = value
    finally:
        model.train(was_training)
    return scores


# ---------------------------------------------------------------------------------- saving
def _family(config: ModelConfig) -> str:
    """The HF family that expresses the backbone (the one it came from when it still fits)."""
    hf_meta = config.extra.get("hf") if isinstance(config.extra.get("hf"), dict) else {}
    source = hf_meta.get("model_type")
    try:
        return hf_model_type(config, source if source in ARCHITECTURES else None)
    except CheckpointError as err:
        raise RewardModelError(f"a reward model is saved as a transformers *ForSequenceClassification "
                               f"folder, and {err}") from err


def _pad_id(model_pad: int | None, tokenizer: Any, config: ModelConfig) -> int:
    hf_meta = config.extra.get("hf") if isinstance(config.extra.get("hf"), dict) else {}
    candidates = (model_pad, getattr(tokenizer, "pad_token_id", None),
                  getattr(tokenizer, "eos_token_id", None), hf_meta.get("pad_token_id"),
                  hf_meta.get("eos_token_id"))
    for value in candidates:
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise RewardModelError("no pad token id: transformers needs one to find each row's last token; "
                           "pass pad_token_id= (or a tokenizer that has a pad or EOS token)")


def _write_reward_files(folder: Path, state: Mapping[str, torch.Tensor], config: ModelConfig,
                        pad_token_id: int, tokenizer: Any, extra: Mapping[str, Any] | None) -> None:
    """config.json, model.safetensors (and the tokenizer) of a reward model, into an existing folder."""
    from safetensors.torch import save_file

    family = _family(config)
    backbone = {k.removeprefix("backbone."): v.detach().cpu().contiguous()
                for k, v in state.items() if k.startswith("backbone.")}
    if "score.weight" not in state:
        raise RewardModelError("the state to save has no score.weight: not a reward model's")
    tensors = state_dict_to_hf(backbone, config, family)
    tensors["score.weight"] = state["score.weight"].detach().cpu().contiguous()
    dtype = str(tensors["score.weight"].dtype).removeprefix("torch.")
    hf = config_to_hf(config, model_type=family, dtype=dtype, pad_token_id=pad_token_id)
    hf |= {"architectures": [SEQUENCE_CLASSIFIERS[family]], "num_labels": 1,
           "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": pad_token_id}
    if extra:
        hf["lmforge"] = json.loads(json.dumps(dict(extra)))  # provenance; transformers keeps unknown keys
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(folder)


def save_reward_model(folder: str | Path, model: RewardModel, *, tokenizer: Any = None,
                      pad_token_id: int | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a transformers `*ForSequenceClassification` folder, atomically (temp, then rename).

    `pad_token_id` defaults to the model's, else the tokenizer's pad (or EOS) token.
    `extra` (JSON) is kept under config.json's "lmforge" key.
    """
    folder = Path(folder).absolute()
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir())
                                                    and not (folder / CONFIG_NAME).exists())):
        raise RewardModelError(f"refusing to replace {folder}: it exists and holds no model")
    pad = _pad_id(pad_token_id if pad_token_id is not None else model.pad_token_id, tokenizer, model.config)
    with atomic_folder(folder) as tmp:
        _write_reward_files(tmp, model.state_dict(), model.config, pad, tokenizer, extra)
    return folder


# ---------------------------------------------------------------------------------- loading
def _read_config(folder: Path) -> dict[str, Any]:
    try:
        value = read_json(folder / CONFIG_NAME, max_bytes=64 * 1024 * 1024)
    except (JSONInputError, OSError) as err:
        raise RewardModelError(f"{folder / CONFIG_NAME}: not readable JSON ({err})") from err
    if not isinstance(value, dict):
        raise RewardModelError(f"{folder / CONFIG_NAME}: expected a JSON object")
    return value


def is_reward_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding a `*ForSequenceClassification` model."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        return False
    archs = _read_config(path).get("architectures")
    return isinstance(archs, list) and bool(archs) and archs[0] in _FAMILY_OF


def _load_reward_folder(folder: Path, *, dtype: torch.dtype | None, device: str | torch.device,
                        strict: bool = True) -> RewardModel:
    """A `*ForSequenceClassification` folder (ours or transformers') -> `RewardModel`."""
    from lmforge.model.checkpoint import checkpoint_tensors

    hf = _read_config(folder)
    arch = (hf.get("architectures") or [None])[0]
    if arch not in _FAMILY_OF:
        raise RewardModelError(f"{folder}: architecture {arch!r} is not a reward model "
                               f"(one of {', '.join(SEQUENCE_CLASSIFIERS.values())})")
    if hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        raise RewardModelError(f"{folder}: a reward model has one output (num_labels 1), this one has "
                               f"{hf.get('num_labels', len(hf.get('id2label') or {}))}")
    family = _FAMILY_OF[arch]
    causal = {k: v for k, v in hf.items() if k != "lmforge"} | {"architectures": [ARCHITECTURES[family]]}
    config = config_from_hf(causal, strict=strict)
    config = dataclasses.replace(config, tie_embeddings=True)
    try:
        by_file: dict[Path, list[str]] = {}
        for name, (path, _info) in checkpoint_tensors(folder).items():
            by_file.setdefault(path, []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            tensors.update(load_tensors(path, names)[0])
    except SafetensorsError as err:
        raise RewardModelError(str(err)) from err
    score = tensors.pop("score.weight", None)
    if score is None or tuple(score.shape) != (1, config.d_model):
        raise RewardModelError(f"{folder}: score.weight must be [1, {config.d_model}], got "
                               f"{None if score is None else tuple(score.shape)}")
    tensors.pop("lm_head.weight", None)  # a classifier has no LM head; a stray one is not ours to use
    state = state_dict_from_hf(tensors, config, family)
    model = RewardModel(Transformer.from_state_dict(config, state, dtype=dtype, device=device),
                        pad_token_id=hf.get("pad_token_id"))
    with torch.no_grad():
        model.score.weight.copy_(score)
    return model.eval()


def load_reward_model(spec: str | Path, *, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu", head_std: float | None = None,
                      ) -> tuple[RewardModel, Any]:
    """(reward model, tokenizer) from a reward folder, or a fresh head on a base/SFT model.

    `spec` is whatever `--model` takes (a checkpoint or run folder, a .gguf, a sample name).
    A `*ForSequenceClassification` folder loads with its trained head; anything else is a
    language model whose LM head is replaced by a new `score` (N(0, head_std^2)).
    """
    from lmforge.hub import resolve_model_path
    from lmforge.infer.loading import load_model
    from lmforge.tokenizer import load_tokenizer

    path = resolve_model_path(str(spec))
    if path.is_dir() and is_reward_folder(path):
        model = _load_reward_folder(path, dtype=dtype, device=device)
        tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
        return model, tokenizer
    loaded = load_model(path, dtype=dtype or torch.float32, device=str(device))
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RewardModel(loaded.model, head_std=head_std, pad_token_id=pad), tokenizer


# ---------------------------------------------------------------------------------- training checkpoints
class RewardModelStore:
    """How the `Trainer`'s checkpoints hold a reward model: the same classifier folder as the final one."""

    def __init__(self, pad_token_id: int, source: str = "lmforge align reward") -> None:
        self.pad_token_id, self.source = pad_token_id, source

    def write(self, folder: Path, model_state: Mapping[str, torch.Tensor], config: ModelConfig,
              tokenizer: Any, step: int) -> None:
        _write_reward_files(folder, model_state, config, self.pad_token_id, tokenizer,
                            {"source": self.source, "step": step})

    def read(self, folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
        from lmforge.train.checkpoint import ResumeError

        model = _load_reward_folder(folder, dtype=torch.float32, device="cpu")
        saved = {k: v for k, v in model.config.to_dict().items() if k != "extra"}
        wanted = {k: v for k, v in config.to_dict().items() if k != "extra"}
        differ = [f"{k}: checkpoint {saved.get(k)!r}, model {wanted.get(k)!r}"
                  for k in sorted(wanted) if saved.get(k) != wanted.get(k)]
        if differ:
            raise ResumeError(f"cannot resume from {folder}: it holds another reward model "
                              f"({'; '.join(differ)})")
        return model.state_dict()
