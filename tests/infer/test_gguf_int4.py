"""A Q4_0/Q4_1 GGUF quantized to int4 keeps the file's own weights: no second rounding."""

import numpy as np
import torch

from lmforge.formats.ggml import GGMLType, decode_q4, dequantize, encode_q4_1
from lmforge.infer.engine import Engine
from lmforge.infer.quant import Int4Linear
from lmforge.infer.sampling import SamplingParams


def test_q4_blocks_decode_to_the_codes_steps_and_offsets_they_hold():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (6, 64)).astype(np.uint8)
    step = rng.random((6, 2)).astype(np.float16).astype(np.float32)
    offset = -rng.random((6, 2)).astype(np.float16).astype(np.float32)
    back = decode_q4(encode_q4_1(codes, step, offset), GGMLType.Q4_1, 6, 64)
    assert (back[0] == codes).all() and (back[1] == step).all() and (back[2] == offset).all()
    # Q4_0 (w = d * (q - 8)) read as step d and offset -8d gives llama.cpp's own dequantization
    q4_0 = np.concatenate([step[:, :1].astype("<f2").view(np.uint8),
                           (codes[:, :16] | (codes[:, 16:32] << 4))], axis=1)
    c, s, o = decode_q4(q4_0, GGMLType.Q4_0, 6, 32)
    assert np.array_equal(c * s[:, :, None].repeat(32, -1).reshape(6, 32) + o.repeat(32, 1),
                          dequantize(q4_0, GGMLType.Q4_0, (6, 32)))


def test_smollm2_int4_is_exactly_the_files_q4_1_weights(smollm2, smollm2_gguf):
    engine = Engine.from_pretrained(smollm2_gguf, quantize="int4")
    float_weights = dict(smollm2.model.named_parameters())
    layers = {n: m for n, m in engine.model.named_modules() if isinstance(m, Int4Linear) and n != "lm_head"}
    assert len(layers) == 30 * 7 and all(m.group_size == 32 for m in layers.values())
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize(), float_weights[f"{name}.weight"]), name
    prompt = smollm2.tokenizer.encode("The capital of France is")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(engine.model(torch.tensor([ids])).logits[0, -1].argmax()))
    tokens = engine.complete([prompt], SamplingParams(temperature=0, max_tokens=6))[0].token_ids
    assert tokens == ids[len(prompt):]
