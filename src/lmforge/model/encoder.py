"""A BERT-style encoder for sentence embeddings (all-MiniLM-L6-v2 and its kin), beside the decoder.

    ids -> word + position + token-type embeddings -> LayerNorm
        -> n_layers x [x = norm(x + attention(x)); x = norm(x + MLP(x))]
        -> hidden states -> mean over the text's real tokens -> divide by its length (L2)

What makes it an encoder rather than the decoder of `transformer.py`:
- attention is bidirectional: every token sees every token of its text, before and after it;
  the only mask hides the padding that batches texts of different lengths together;
- the LayerNorm comes after each residual add (post-norm, the original Transformer's order),
  so there is no final norm; positions are learned, and a token-type embedding (BERT's
  "sentence A or B") is added, always type 0 for a single text;
- the output is not a next-token distribution but one vector per text: sentence-transformers
  trains MiniLM so that the mean of its hidden states over the real tokens, scaled to unit
  length, puts texts of similar meaning close together (cosine = dot product).

Attention and MLP are the decoder's own layers (`layers.attention.Attention` is given the
padding mask instead of the causal one; `layers.mlp.MLP` with exact GELU). A sentence-transformers
folder says how to pool in `modules.json` and `1_Pooling/config.json`; those are read, and a
module or pooling mode this file does not implement is an error rather than a silent change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.formats.safetensors_reader import SafetensorsError, load_tensors
from lmforge.formats.strictjson import JSONInputError, read_json
from lmforge.model.checkpoint import checkpoint_tensors
from lmforge.model.config import ConfigError, ModelConfig
from lmforge.model.hf import CheckpointError, check_shapes
from lmforge.model.layers.attention import Attention
from lmforge.model.layers.mlp import MLP
from lmforge.model.layers.norms import make_norm

Pooling = Literal["mean", "cls", "max"]


@dataclass(frozen=True)
class EncoderConfig:
    """The decoder's `ModelConfig` for the shared layers, plus what only BERT has."""

    layers: ModelConfig
    type_vocab_size: int = 2

    @classmethod
    def from_hf(cls, values: dict[str, Any], source: str | Path = "config.json") -> EncoderConfig:
        """A BERT `config.json`; fields that would change what the weights compute, set to something
        this encoder does not do, are refused by name."""
        refusals = {"model_type": ("bert",), "hidden_act": ("gelu",),
                    "position_embedding_type": ("absolute",), "is_decoder": (False,),
                    "add_cross_attention": (False,)}
        for key, allowed in refusals.items():
            if key in values and values[key] not in allowed:
                raise CheckpointError(f"{source}: {key} = {values[key]!r} is not supported by lmforge's "
                                      f"encoder (it implements {allowed[0]!r})")
        try:
            layers = ModelConfig(
                vocab_size=values["vocab_size"], d_model=values["hidden_size"],
                n_layers=values["num_hidden_layers"], n_heads=values["num_attention_heads"],
                d_ff=values["intermediate_size"],
                max_seq_len=values["max_position_embeddings"], position="learned", norm="layernorm",
                norm_eps=values.get("layer_norm_eps", 1e-12), mlp="gelu", tie_embeddings=False)
            return cls(layers, int(values.get("type_vocab_size", 2)))
        except KeyError as err:
            raise CheckpointError(f"{source}: a BERT config needs {err.args[0]!r}") from None
        except (ConfigError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: {err}") from None


class EncoderLayer(nn.Module):
    """Post-norm block: x = norm(x + attention(x)), then x = norm(x + mlp(x)).

    Only attention needs the texts side by side ([B, T, d], padded to the longest); every other
    step works token by token, so it runs on the real tokens alone ([N, d]): the padding a batch
    of mixed lengths needs costs the MLP, two thirds of the work, nothing.
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn = Attention(config, layer_index)
        self.attn_norm = make_norm(config)
        self.mlp = MLP(config)
        self.mlp_norm = make_norm(config)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [N, d]: the batch's real tokens in order; mask [B, T]: where they sit when padded."""
        padded = tokens.new_zeros(*mask.shape, tokens.shape[-1])
        padded[mask] = tokens
        attended = self.attn(padded, None, mask[:, None, None, :])[mask]  # each query sees its text's keys
        x = self.attn_norm(tokens + attended)
        return self.mlp_norm(x + self.mlp(x))


class Encoder(nn.Module):
    """ids [B, T] and a padding mask [B, T] (True = real token) -> hidden states [B, T, d] (0 at padding)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config.layers
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model)
        self.type_embed = nn.Embedding(config.type_vocab_size, c.d_model)
        self.embed_norm = make_norm(c)
        self.layers = nn.ModuleList(EncoderLayer(c, i) for i in range(c.n_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        length, limit = ids.shape[1], self.config.layers.max_seq_len
        if length > limit:
            raise ValueError(f"{length} tokens, but this encoder has positions for {limit}")
        positions = torch.arange(length, device=ids.device)
        types = self.type_embed.weight[0] if token_types is None else self.type_embed(token_types)
        x = self.embed_norm(self.embed(ids) + self.pos_embed(positions) + types)
        tokens = x[mask]
        for layer in self.layers:
            tokens = layer(tokens, mask)
        out = torch.zeros_like(x)  # padding positions: zeros
        out[mask] = tokens
        return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling = "mean") -> torch.Tensor:
    """[B, T, d] -> [B, d] in float32: the mean (or max) over real tokens, or the first ([CLS]) token."""
    hidden = hidden.float()
    if mode == "cls":
        return hidden[:, 0]
    keep = mask[..., None]
    if mode == "max":
        return hidden.masked_fill(~keep, float("-inf")).amax(dim=1)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)


class SentenceEncoder(nn.Module):
    """An `Encoder`, its pooling and (optionally) L2 normalisation, as a sentence-transformers folder
    stacks them: ids [B, T] and mask [B, T] -> embeddings [B, d] (float32)."""

    def __init__(self, encoder: Encoder, *, pooling: Pooling = "mean", normalize: bool = True,
                 max_seq_length: int = 512, lowercase: bool = False) -> None:
        super().__init__()
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize
        self.max_seq_length = min(max_seq_length, encoder.config.layers.max_seq_len)
        self.lowercase = lowercase  # sentence-transformers' do_lower_case: text lowercased before tokenizing

    @property
    def dim(self) -> int:
        return self.encoder.config.layers.d_model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        vectors = pool(self.encoder(ids, mask), mask, self.pooling)
        return torch.nn.functional.normalize(vectors, dim=-1) if self.normalize else vectors


# ------------------------------------------------------------------------------------------ loading
_LAYER_NAMES = {"attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
                "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.o_proj",
                "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "mlp.up_proj",
                "output.dense": "mlp.down_proj", "output.LayerNorm": "mlp_norm"}
_EMBEDDING_NAMES = {"word_embeddings": "embed", "position_embeddings": "pos_embed",
                    "token_type_embeddings": "type_embed", "LayerNorm": "embed_norm"}
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
_EMBEDDING = re.compile(r"embeddings\.(\w+)\.(weight|bias)")
_UNUSED = re.compile(r"(embeddings\.position_ids|embeddings\.token_type_ids|pooler\..*)")


def encoder_name(hf_name: str) -> str | None:
    """The `Encoder` parameter an HF BertModel tensor fills (None: a buffer or the unused pooler)."""
    name = hf_name.removeprefix("bert.")
    if _UNUSED.fullmatch(name):
        return None
    if (m := _LAYER.fullmatch(name)) and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if (m := _EMBEDDING.fullmatch(name)) and m.group(1) in _EMBEDDING_NAMES:
        return f"{_EMBEDDING_NAMES[m.group(1)]}.{m.group(2)}"
    return hf_name  # kept as is, so that the shape check names it as unexpected


def load_encoder(folder: str | Path, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> Encoder:
    """A BERT folder (config.json + model.safetensors, as transformers writes it) -> `Encoder` in eval mode.

    Names and shapes are checked from the safetensors headers before any data is read;
    `dtype=None` keeps the stored dtype.
    """
    folder = Path(folder)
    config = EncoderConfig.from_hf(_json_object(folder / "config.json"), folder / "config.json")
    files = checkpoint_tensors(folder)
    names = {hf: encoder_name(hf) for hf in files}
    with torch.device("meta"):
        model = Encoder(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes({names[k]: tuple(info["shape"]) for k, (_, info) in files.items() if names[k]}, expected,
                 f"{folder}: the weights")
    state: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(path for path, _ in files.values()):
        wanted = [k for k, (p, _) in files.items() if p == path and names[k]]
        try:
            tensors, _ = load_tensors(path, wanted)
        except SafetensorsError as err:
            raise CheckpointError(str(err)) from err
        state.update({names[k]: t for k, t in tensors.items()})  # type: ignore[misc]
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{folder}: {name} is stored as {tensor.dtype}, not as floating-point "
                                  "weights")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def load_sentence_encoder(folder: str | Path, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None) -> SentenceEncoder:
    """A sentence-transformers folder: the encoder plus what modules.json, 1_Pooling/config.json and
    sentence_bert_config.json say to do with its output. A plain BERT folder (no modules.json) gets
    sentence-transformers' own default: mean pooling, no normalisation."""
    folder = Path(folder)
    pooling: Pooling = "mean"
    normalize = False
    modules_path = folder / "modules.json"
    modules = _json(modules_path) if modules_path.is_file() else []
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{modules_path}: expected a list of modules")
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer" and module.get("path", "") in ("", "."):
            continue
        if kind == "Pooling":
            pooling = _pooling_mode(folder / str(module.get("path", "")) / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise CheckpointError(f"{modules_path}: module {module.get('type')!r} at {module.get('path')!r} "
                                  "is not supported by lmforge's sentence encoder (it implements "
                                  "Transformer, Pooling and Normalize)")
    settings_path = folder / "sentence_bert_config.json"
    settings = _json_object(settings_path) if settings_path.is_file() else {}
    encoder = load_encoder(folder, device=device, dtype=dtype)
    max_seq_length = settings.get("max_seq_length") or encoder.config.layers.max_seq_len
    if not isinstance(max_seq_length, int) or max_seq_length < 3:
        raise CheckpointError(f"{settings_path}: max_seq_length must be an integer of at least 3")
    return SentenceEncoder(encoder, pooling=pooling, normalize=normalize, max_seq_length=max_seq_length,
                           lowercase=bool(settings.get("do_lower_case", False)))


def _pooling_mode(path: Path) -> Pooling:
    config = _json_object(path)
    modes = {key for key, value in config.items() if key.startswith("pooling_mode_") and value}
    known: dict[str, Pooling] = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                                 "pooling_mode_max_tokens": "max"}
    if len(modes) != 1 or next(iter(modes)) not in known:
        raise CheckpointError(f"{path}: pooling {sorted(modes) or 'none'} is not supported (lmforge pools by "
                              "exactly one of mean, cls or max)")
    return known[modes.pop()]


def _json(path: Path) -> Any:
    try:
        return read_json(path)
    except JSONInputError as err:
        raise CheckpointError(f"{path}: not readable JSON ({err.reason})") from err


def _json_object(path: Path) -> dict[str, Any]:
    value = _json(path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value
