"""Tiny models and a byte-level chat tokenizer for alignment tests, in lmforge and in transformers.

The tokenizer has no merges (one token per byte, plus ChatML's specials), so any text
tokenizes the same whole or in pieces: trl's tokenization and ours cannot drift apart at
a prompt/completion seam, which keeps parity tests about the losses, not the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import one_torch_thread

from lmforge.model.checkpoint import save_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import CHATML_TEMPLATE
from lmforge.tokenizer.pretokenize import GPT2_PATTERN

SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
TINY_ALIGN_LLAMA = dict(vocab_size=260, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                        max_seq_len=256, position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False,
                        out_bias=False, mlp_bias=False, tie_embeddings=False)


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens, then <|endoftext|> (EOS), <|im_start|>, <|im_end|>; ChatML template."""
    return Tokenizer.from_tiktoken({bytes([i]): i for i in range(256)}, GPT2_PATTERN, SPECIALS,
                                   eos_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def tiny_llama(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**(TINY_ALIGN_LLAMA | overrides))).eval()


def save_hf_folder(model: Transformer, folder: Path) -> Path:
    """The model and the byte tokenizer as a Hugging Face folder (LlamaForCausalLM + tokenizer.json)."""
    save_checkpoint(folder, model, tokenizer=byte_tokenizer())
    return folder


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return byte_tokenizer()


@pytest.fixture
def tiny():
    """A factory: tiny(seed) -> a tiny random Llama (eval mode)."""
    return tiny_llama


one_thread = one_torch_thread("package")
