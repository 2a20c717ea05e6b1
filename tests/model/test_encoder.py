"""The BERT encoder against transformers' BertModel on all-MiniLM-L6-v2: the same hidden states for a
padded batch of real text, padding that changes nothing, pooling as sentence-transformers pools, and
folders it cannot run faithfully refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.model.encoder import (
    Encoder,
    EncoderConfig,
    SentenceEncoder,
    encoder_name,
    load_encoder,
    load_sentence_encoder,
    pool,
)
from lmforge.model.hf import CheckpointError
from lmforge.tokenizer.wordpiece import load_wordpiece

TEXTS = ["A short query.", "Ed Wood is a 1994 American biographical period comedy-drama film directed by Tim "
         "Burton.", "北京大学 – Peking University; café résumé", "x " * 300]


def batch(minilm, texts=TEXTS, max_length=256) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = load_wordpiece(minilm)
    rows = [tokenizer.encode(t, max_length=max_length) for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
    return ids, mask


@pytest.fixture(scope="module")
def encoder(minilm) -> Encoder:
    return load_encoder(minilm)


def test_config_reads_bert(minilm):
    config = EncoderConfig.from_hf(json.loads((minilm / "config.json").read_text()))
    c = config.layers
    assert (c.d_model, c.n_layers, c.n_heads, c.d_ff, c.max_seq_len, c.norm_eps, c.mlp) == \
        (384, 6, 12, 1536, 512, 1e-12, "gelu")
    assert config.type_vocab_size == 2


def test_hidden_states_equal_transformers(minilm, encoder):
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(str(minilm), attn_implementation="eager").eval()
    ids, mask = batch(minilm)
    assert mask.sum(1).tolist()[-1] == 256 and not mask.all()  # the long text is cut; the others are padded
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = encoder(ids, mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=2e-5, rtol=1e-4)


def test_padding_changes_nothing(minilm, encoder):
    ids, mask = batch(minilm)
    with torch.inference_mode():
        together = encoder(ids, mask)
        assert not together[~mask].any()  # padding positions hold zeros, not stale values
        for i in range(len(TEXTS)):
            n = int(mask[i].sum())
            alone = encoder(ids[i:i + 1, :n], mask[i:i + 1, :n])
            torch.testing.assert_close(alone[0], together[i, :n], atol=1e-5, rtol=1e-5)


def test_pooling_modes():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, -1.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 2.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]


def test_sentence_encoder_reads_modules_and_pooling(minilm):
    model = load_sentence_encoder(minilm)
    assert (model.pooling, model.normalize, model.max_seq_length, model.dim) == ("mean", True, 256, 384)
    ids, mask = batch(minilm)
    with torch.inference_mode():
        vectors = model(ids, mask)
    assert vectors.dtype == torch.float32 and vectors.shape == (4, 384)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(4))


def test_dtype_follows_the_weights(minilm):
    full = load_sentence_encoder(minilm)
    half = load_sentence_encoder(minilm, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    ids, mask = batch(minilm, TEXTS[:3])  # short: bf16 matmuls are slow on CPUs without them
    with torch.inference_mode():
        a, b = full(ids, mask), half(ids, mask)
    assert b.dtype == torch.float32 and float((a * b).sum(1).min()) > 0.99


@pytest.mark.gpu
def test_runs_on_cuda_unchanged(minilm):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = load_sentence_encoder(minilm)
    gpu = load_sentence_encoder(minilm, device="cuda")
    ids, mask = batch(minilm)
    with torch.inference_mode():
        expected, got = cpu(ids, mask), gpu(ids.cuda(), mask.cuda()).cpu()
    assert float((expected * got).sum(1).min()) > 0.9999


def test_hf_names_map_onto_the_encoder():
    assert encoder_name("encoder.layer.3.attention.self.query.weight") == "layers.3.attn.q_proj.weight"
    assert encoder_name("bert.encoder.layer.0.output.LayerNorm.bias") == "layers.0.mlp_norm.bias"
    assert encoder_name("embeddings.token_type_embeddings.weight") == "type_embed.weight"
    assert encoder_name("pooler.dense.weight") is None and encoder_name("embeddings.position_ids") is None
    assert encoder_name("cls.predictions.bias") == "cls.predictions.bias"  # kept: reported as unexpected


def copy_folder(minilm, tmp_path):
    """A copy of the folder to edit, its 91 MB of weights linked rather than copied."""
    folder = tmp_path / "model"
    shutil.copytree(minilm, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "model.safetensors").symlink_to(minilm / "model.safetensors")
    return folder


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "relu"}, "hidden_act = 'relu' is not supported"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"model_type": "roberta"}, "model_type = 'roberta'"),
    ({"hidden_size": 385}, "divisible"),
    ({"num_hidden_layers": 7}, "missing tensor"),
])
def test_configs_it_cannot_run_are_refused(minilm, tmp_path, change, message):
    folder = copy_folder(minilm, tmp_path)
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_encoder(folder)


def test_unsupported_modules_and_pooling_are_refused(minilm, tmp_path):
    folder = copy_folder(minilm, tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    (folder / "modules.json").write_text(json.dumps(modules + [dense]))
    with pytest.raises(CheckpointError, match="Dense"):
        load_sentence_encoder(folder)
    (folder / "modules.json").write_text(json.dumps(modules))
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling | {"pooling_mode_cls_token": True}))
    with pytest.raises(CheckpointError, match="pooling"):
        load_sentence_encoder(folder)


def test_plain_bert_folder_pools_by_mean_without_normalising(minilm, tmp_path):
    folder = copy_folder(minilm, tmp_path)
    (folder / "modules.json").unlink()
    model = load_sentence_encoder(folder)
    assert isinstance(model, SentenceEncoder) and (model.pooling, model.normalize) == ("mean", False)
