"""The compression benchmark scores llama.cpp's quantized files the way lmforge scores its own.

benchmarks/bench_compress.py puts llama.cpp's Q4_0/Q4_K_M rows beside lmforge's; their
perplexity comes from llama.cpp's logits through `llamacpp_perplexity`. On the SmolLM2
sample itself (Q4_1), lmforge's perplexity of the dequantized model and llama.cpp's of
the file must agree: the same windows, the same convention, the same weights.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.compress.calibration import default_heldout_files, heldout_windows, token_stream
from lmforge.eval.perplexity import perplexity

pytest.importorskip("llama_cpp")


def test_llamacpp_and_lmforge_perplexity_agree_on_the_same_file(smollm2, smollm2_gguf):
    from bench_compress import llamacpp_perplexity

    windows = heldout_windows(token_stream(smollm2.tokenizer, default_heldout_files()[:2]), 64, limit=2)
    theirs, _seconds = llamacpp_perplexity(smollm2_gguf, windows, threads=torch.get_num_threads())
    ours = perplexity(smollm2.model, windows).perplexity
    # llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations; lmforge dequantizes to fp32
    assert theirs == pytest.approx(ours, rel=0.02)
