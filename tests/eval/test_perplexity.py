"""Perplexity equals what transformers computes as the language-modelling loss on the same windows."""

import math

import pytest
import torch
from tests.align.conftest import save_hf_folder, tiny_llama

from lmforge.eval.perplexity import perplexity


def test_perplexity_is_exp_of_transformers_mean_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_llama(seed=3)
    folder = save_hf_folder(model, tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = torch.randint(0, 256, (5, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = float(reference(input_ids=windows, labels=windows).loss)
    result = perplexity(model, windows, batch_size=2)
    assert result.tokens == 5 * 39
    assert result.nll == pytest.approx(loss, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)


def test_a_model_that_knows_the_text_is_less_perplexed(tmp_path):
    model = tiny_llama(seed=0)
    repeated = torch.tensor([[7, 8, 9, 10] * 8] * 2)
    before = perplexity(model, repeated).perplexity
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        logits = model(repeated).logits[:, :-1]
        targets = repeated[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert perplexity(model, repeated).perplexity < before / 10
    assert model.training  # restored
