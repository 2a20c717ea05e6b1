"""llama.cpp loads lmforge's GGUF export and computes the same next-token logits.

SmolLM2 is read from its Q4_1 GGUF, exported by lmforge as F32 and Q8_0, and run by
llama.cpp (through llama-cpp-python) next to lmforge's own `Transformer`; small random
models cover the options a llama GGUF can carry (biases, untied head, head_dim, linear
RoPE scaling, experts). Skipped where llama-cpp-python is not installed (failed in CI).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.formats.ggml import GGMLType
from lmforge.model.config import ModelConfig
from lmforge.model.gguf import export_gguf, load_gguf_model
from lmforge.model.transformer import Transformer

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = b"The capital of France is a city where"
GREEDY_STEPS = 6


def test_llama_cpp_was_built_for_this_cpu_without_amx():
    """`make llamacpp` builds natively but without AMX (whose code dies with SIGILL on the Xeons
    here); AVX2 and friends must still be on wherever this CPU has them."""
    info = llama_cpp.llama_print_system_info().decode()
    features = dict(part.strip().split(" = ") for part in info.split("|") if " = " in part)
    features = {k.split(":")[-1].strip(): v for k, v in features.items()}
    assert not [k for k, v in features.items() if k.startswith("AMX") and v == "1"], info
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    for flag, name in (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX512")):
        assert (features.get(name) == "1") == (flag in cpu), (name, info)


def llama_cpp_model(path, *, f32_cache: bool = False) -> llama_cpp.Llama:
    """llama.cpp keeps keys and values in f16 by default; `f32_cache` removes that rounding."""
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False,
                           **cache)


def llama_cpp_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] for every position of `ids`, evaluated from an empty context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def lmforge_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def lmforge_greedy(model: Transformer, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(lmforge_logits(model, ids)[-1].argmax()))
    return ids[-steps:]


def llama_cpp_greedy(llm: llama_cpp.Llama, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding through llama.cpp's own KV cache, one token per step."""
    llm.reset()
    llm.eval(ids)
    chosen = []
    for _ in range(steps):
        chosen.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(chosen[-1:])
    return chosen


def test_f32_export_gives_lmforge_logits_in_llama_cpp(
    smollm2_loaded, smollm2_lmforge, smollm2_tokenizer_metadata, smollm2_prompt_ids, tmp_path
):
    config, state, _ = smollm2_loaded
    path = export_gguf(tmp_path / "smollm2-f32.gguf", config, state, smollm2_tokenizer_metadata, "f32")
    llm = llama_cpp_model(path, f32_cache=True)
    ids = smollm2_prompt_ids[0].tolist()
    assert llm.tokenize(PROMPT, add_bos=False) == ids  # the exported tokenizer works in llama.cpp too
    ours, theirs = lmforge_logits(smollm2_lmforge, ids), llama_cpp_logits(llm, ids)
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(ours).max()  # float32 summation order only
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    llm.close()


def test_q8_0_export_decodes_like_lmforge_in_llama_cpp(
    smollm2_loaded, smollm2_tokenizer_metadata, smollm2_prompt_ids, tmp_path
):
    config, state, _ = smollm2_loaded
    path = export_gguf(tmp_path / "smollm2-q8_0.gguf", config, state, smollm2_tokenizer_metadata, "q8_0")
    q8_config, q8_state, _ = load_gguf_model(path)  # lmforge runs the very same Q8_0 weights
    model = Transformer(q8_config).eval()
    model.load_state_dict(q8_state)
    llm = llama_cpp_model(path)
    ids = smollm2_prompt_ids[0].tolist()
    ours, theirs = lmforge_logits(model, ids), llama_cpp_logits(llm, ids)
    # llama.cpp also rounds the activations to 8 bits inside each quantized matmul, so "close", not
    # "equal": measured max |diff| 1.0 and mean 0.2 for logits up to 28; SmolLM2's own Q4_1 file
    # shows the same gap (1.4 and 0.25), so it is llama.cpp's arithmetic, not the export.
    diff, scale = np.abs(ours - theirs), np.abs(ours).max()
    assert diff.max() < 0.1 * scale and diff.mean() < 0.02 * scale
    assert lmforge_greedy(model, ids, GREEDY_STEPS) == llama_cpp_greedy(llm, ids, GREEDY_STEPS)
    llm.close()


@pytest.mark.parametrize("overrides", [
    {"tie_embeddings": False, "qkv_bias": True, "out_bias": True, "mlp_bias": True},
    {"head_dim": 32, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500000.0},
    {"n_experts": 4, "n_experts_per_token": 2},
])
def test_variants_of_llama_mean_the_same_in_llama_cpp(overrides, smollm2_tokenizer_metadata, tmp_path):
    """Small random models with the options llama's GGUF can carry, run by both sides in F32."""
    config = ModelConfig(**({
        "vocab_size": 49152, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
        "max_seq_len": 256, "position": "rope", "norm": "rmsnorm", "norm_eps": 1e-6, "mlp": "swiglu",
        "qkv_bias": False, "out_bias": False, "mlp_bias": False, "norm_bias": False,
        "tie_embeddings": True} | overrides))
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # biases and norm gains random too
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    path = export_gguf(tmp_path / "tiny.gguf", config, model.state_dict(), smollm2_tokenizer_metadata, "f32")
    llm = llama_cpp_model(path, f32_cache=True)
    ids = list(range(100, 140))
    ours, theirs = lmforge_logits(model, ids), llama_cpp_logits(llm, ids)
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(ours).max()
    llm.close()


@pytest.mark.parametrize("bits", [4, 3])
def test_a_gptq_model_exports_its_own_codes_to_q4_1(bits, smollm2_tokenizer_metadata, tmp_path):
    """`lmforge quantize` output -> GGUF: the int4 layers' codes, steps and offsets become Q4_1 blocks
    as they are (groups of 64 are pairs of blocks sharing a step), the int8 head Q8_0: llama.cpp
    runs the weights GPTQ chose, not a second rounding of them."""
    from lmforge.compress.grid import Grid
    from lmforge.compress.quantize import quantize_model
    from lmforge.export import gguf_state
    from lmforge.formats.ggml import GGMLType

    config = ModelConfig(vocab_size=49152, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
                         max_seq_len=256, position="rope", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                         qkv_bias=False, out_bias=False, mlp_bias=False, norm_bias=False, tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(config).eval().requires_grad_(False)
    for p in model.parameters():
        if p.dim() == 2:
            p.mul_(10.0)
    calibration = torch.randint(100, 2000, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, "gptq", Grid(bits, 64), calibration=calibration)
    state, blocks = gguf_state(model)
    assert {kind for kind, _ in blocks.values()} == {GGMLType.Q4_1, GGMLType.Q8_0}
    path = export_gguf(tmp_path / "gptq.gguf", config, state, smollm2_tokenizer_metadata, "f16",
                       blocks=blocks)
    _, read_back, _ = load_gguf_model(path)
    for key, (kind, _) in blocks.items():
        if kind == GGMLType.Q4_1:  # exactly the quantizer's numbers
            assert torch.equal(read_back[key], state[key]), key
        else:  # the int8 head's per-row scale, rounded to f16
            assert torch.allclose(read_back[key], state[key], rtol=2e-3, atol=1e-6), key
    llm = llama_cpp_model(path)
    ids = list(range(100, 140))
    ours, theirs = lmforge_logits(model, ids), llama_cpp_logits(llm, ids)
    # llama.cpp rounds activations to 8 bits in quantized matmuls (see the Q8_0 test): close, not equal
    assert np.abs(ours - theirs).max() < 0.1 * np.abs(ours).max()
    llm.close()


def test_a_quantized_smollm2_decodes_the_same_in_llama_cpp(smollm2_lmforge, smollm2_tokenizer_metadata,
                                                          smollm2_prompt_ids, tmp_path):
    import copy

    from lmforge.compress.grid import Grid
    from lmforge.compress.quantize import quantize_model
    from lmforge.export import gguf_state

    model = copy.deepcopy(smollm2_lmforge)
    quantize_model(model, "rtn", Grid(4, 64))
    state, blocks = gguf_state(model)
    path = export_gguf(tmp_path / "smollm2-rtn4.gguf", model.config, state, smollm2_tokenizer_metadata, "f16",
                       blocks=blocks)
    llm = llama_cpp_model(path)
    ids = smollm2_prompt_ids[0].tolist()
    assert lmforge_greedy(model, ids, GREEDY_STEPS) == llama_cpp_greedy(llm, ids, GREEDY_STEPS)
    llm.close()


LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q4_k": 14}


@pytest.mark.parametrize("dtype", list(LLAMA_FTYPES))
def test_block_exports_are_llama_cpps_own_quantization_byte_for_byte(dtype, smollm2_tokenizer_metadata,
                                                                      tmp_path):
    """llama.cpp's quantizer (`llama_model_quantize`, every matrix in one type) and lmforge's export
    write the same bytes for every projection: the same reference algorithms (Q4_K's scale search
    included), the same W_q/W_k row order."""
    from lmforge.formats.gguf import GGUFFile

    config = ModelConfig(vocab_size=49152, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512,
                         max_seq_len=256, position="rope", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                         qkv_bias=False, out_bias=False, mlp_bias=False, norm_bias=False, tie_embeddings=True)
    torch.manual_seed(0)
    state = Transformer(config).state_dict()
    f32 = export_gguf(tmp_path / "f32.gguf", config, state, smollm2_tokenizer_metadata, "f32")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = LLAMA_FTYPES[dtype], True, 2
    theirs = tmp_path / "llama.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    ours = GGUFFile(export_gguf(tmp_path / "ours.gguf", config, state, smollm2_tokenizer_metadata, dtype))
    theirs = GGUFFile(theirs)
    matrices = [n for n, t in ours.tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
    assert len(matrices) == 14
    for name in matrices:
        assert ours.tensors[name].ggml_type == theirs.tensors[name].ggml_type == GGMLType[dtype.upper()], name
        assert np.array_equal(np.asarray(ours.raw(name)), np.asarray(theirs.raw(name))), name


NEAR_TIE = 0.25  # logits: a top-2 gap this small can flip under llama.cpp's 8-bit activations


@pytest.mark.parametrize(("dtype", "mode", "types"), [
    ("q8_0", "int8", {"Q8_0": 211, "F32": 61}),
    ("q4_0", "int4", {"Q4_0": 210, "Q8_0": 1, "F32": 61}),
    # rows of 576 are no multiple of Q4_K's 256: those fall back to Q4_1, as llama.cpp's quantizer
    # falls back too; ffn_down (1536 inputs) is Q4_K
    ("q4_k", None, {"Q4_1": 180, "Q4_K": 30, "Q8_0": 1, "F32": 61}),
])
def test_smollm2_block_exports_decode_the_same_greedy_tokens_in_llama_cpp_and_the_engine(
    dtype, mode, types, smollm2_loaded, smollm2_tokenizer_metadata, smollm2_prompt_ids, tmp_path
):
    """The same GGUF in llama.cpp and in lmforge's engine (the file's Q8_0/Q4_0 blocks in its int8/int4
    layers; Q4_K dequantized): the same greedy tokens where precision allows. llama.cpp rounds
    activations to 8 bits inside quantized matmuls, so logits differ slightly: along llama.cpp's
    greedy path every token must be lmforge's choice too, except at a near tie (both sides' top-2
    gap under NEAR_TIE logits, the same two tokens), and the engine's own greedy run must follow
    llama.cpp's up to the first such tie. (Measured: Q8_0 and Q4_K agree on all 6 tokens; Q4_0
    flips at the 6th, where the two sides' gaps are 0.11 and 0.18.)"""
    from collections import Counter

    from lmforge.formats.gguf import GGUFFile
    from lmforge.infer.engine import Engine
    from lmforge.infer.quant import QuantizedLinear
    from lmforge.infer.sampling import SamplingParams

    config, state, _ = smollm2_loaded
    path = export_gguf(tmp_path / f"smollm2-{dtype}.gguf", config, state, smollm2_tokenizer_metadata, dtype)
    assert Counter(t.ggml_type.name for t in GGUFFile(path).tensors.values()) == types
    engine = Engine.from_pretrained(path, quantize=mode)
    quantized = [m for m in engine.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == (211 if mode else 0)  # every matrix holds the file's numbers as they are
    ids = smollm2_prompt_ids[0].tolist()
    llm = llama_cpp_model(path)
    theirs = llama_cpp_greedy(llm, ids, GREEDY_STEPS)
    their_logits = llama_cpp_logits(llm, ids + theirs)[len(ids) - 1:-1]
    llm.close()
    with torch.no_grad():
        our_logits = engine.model(torch.tensor([ids + theirs])).logits[0, len(ids) - 1:-1].numpy()
    first_tie = GREEDY_STEPS
    for step, (token, ours_row, theirs_row) in enumerate(zip(theirs, our_logits, their_logits)):
        if int(ours_row.argmax()) != token:
            pair = set(np.argsort(ours_row)[-2:].tolist())
            assert pair == set(np.argsort(theirs_row)[-2:].tolist()) and token in pair, step
            for row in (ours_row, theirs_row):
                top = np.sort(row)[-2:]
                assert top[1] - top[0] < NEAR_TIE, (step, top)
            first_tie = min(first_tie, step)
    ours = engine.complete([ids], SamplingParams(temperature=0, max_tokens=GREEDY_STEPS))[0].token_ids
    assert ours[:first_tie] == theirs[:first_tie] and first_tie >= GREEDY_STEPS - 1
