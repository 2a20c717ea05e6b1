"""A LoRA exported for llama.cpp: llama.cpp runs base + adapter with lmforge's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.model.gguf import export_gguf
from lmforge.tune.gguf_lora import export_lora_gguf
from lmforge.tune.lora import LoRAConfig, add_lora, lora_layers
from lmforge.tune.peft_io import AdapterError

from .conftest import tiny_llama

IDS = [1, 5, 9, 33, 2, 71, 40, 12, 8, 90]


def _tokenizer_metadata(vocab: int) -> dict:
    """A byte-free toy vocabulary: llama.cpp needs some tokenizer to open the file."""
    tokens = [f"t{i}" for i in range(vocab)]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * vocab, "tokenizer.ggml.merges": []}


@pytest.mark.parametrize("rslora", [False, True])
def test_llama_cpp_runs_base_plus_our_lora(tmp_path, rslora):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_llama()
    base_gguf = export_gguf(tmp_path / "base.gguf", model.config, model.state_dict(),
                            _tokenizer_metadata(model.config.vocab_size), "f32")
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, rslora=rslora)
    add_lora(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    adapter = export_lora_gguf(model, config, tmp_path / "lora.gguf")
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(adapter), n_ctx=64, n_threads=2,
                          logits_all=True, verbose=False, **cache)
    llm.eval(IDS)
    with torch.no_grad():
        ours = model(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(np.array(llm.scores[:len(IDS)]), ours, atol=2e-3, rtol=2e-3)
    # and the adapter matters: without it llama.cpp gives other logits
    plain = llama_cpp.Llama(model_path=str(base_gguf), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    plain.eval(IDS)
    assert np.abs(np.array(plain.scores[:len(IDS)]) - ours).max() > 1e-2


def test_dora_is_refused_with_the_way_out(tmp_path):
    model = tiny_llama()
    config = LoRAConfig(r=2, dora=True)
    add_lora(model, config)
    with pytest.raises(AdapterError, match="merge the adapter"):
        export_lora_gguf(model, config, tmp_path / "x.gguf")
