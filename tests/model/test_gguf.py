"""GGUF reading, dequantization, llama mapping and export, checked against references.

The `gguf` package (llama.cpp's own Python reader) and transformers' GGUF loader are
the oracles; lmforge never imports `gguf` at run time, only these tests do.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmforge.formats.ggml import GGMLType, dequantize, quantize_q8_0
from lmforge.formats.gguf import GGUFError, GGUFFile, TensorData, ValueType, write_gguf
from lmforge.model.config import ModelConfig, preset
from lmforge.model.gguf import export_gguf, load_gguf_model, tensor_names
from lmforge.model.layers.rope import RotaryEmbedding, apply_rope
from lmforge.model.transformer import Transformer

# --------------------------------------------------------------------------- helpers


def tiny_llama(**overrides) -> ModelConfig:
    values = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=128,
                  position="rope", rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                  qkv_bias=False, out_bias=False, mlp_bias=False, norm_bias=False, tie_embeddings=False)
    return ModelConfig(**(values | overrides))


def random_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random (norm gains and biases too), so no mapping mistake can hide."""
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.2 for k, v in Transformer(config).state_dict().items()}


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    return dataclasses.replace(a, extra={}) == dataclasses.replace(b, extra={})


TOKENIZER = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(256)],
             "tokenizer.ggml.token_type": [1] * 256, "tokenizer.ggml.bos_token_id": 1}


def rewrite(src: Path, dst: Path, *, metadata: dict | None = None, drop: tuple[str, ...] = (),
            extra_tensors: tuple[TensorData, ...] = ()) -> Path:
    """Copy a GGUF with some metadata changed or tensors added (to craft bad inputs)."""
    f = GGUFFile(src)
    values = {k: v for k, v in f.metadata.items() if k not in drop} | (metadata or {})
    types = {k: t for k, t in f.metadata_types.items() if k in values and k not in (metadata or {})}
    tensors = [TensorData(t.name, t.shape, t.ggml_type, f.raw(t.name)) for t in f.tensors.values()]
    return write_gguf(dst, values, tensors + list(extra_tensors), types=types)


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    config = tiny_llama()
    return export_gguf(tmp_path / "tiny.gguf", config, random_state(config), TOKENIZER, "f32")


# --------------------------------------------------------------------------- dequantization


def test_every_smollm2_tensor_dequantizes_exactly_like_gguf(smollm2_gguf, smollm2_file):
    reader = gguf.GGUFReader(smollm2_gguf)
    seen = set()
    for ref in reader.tensors:
        ours = smollm2_file.tensor(ref.name)
        expected = gguf.quants.dequantize(ref.data, ref.tensor_type)
        assert ours.dtype == np.float32 and ours.shape == expected.shape
        assert np.array_equal(ours, expected), ref.name
        seen.add(ref.tensor_type.name)
    assert seen == {"F32", "Q8_0", "Q4_1"}


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_matches_gguf_on_data_gguf_quantized(kind):
    qtype = gguf.GGMLQuantizationType[kind]
    weights = np.random.default_rng(1).standard_normal((16, 512)).astype(np.float32)
    raw = np.ascontiguousarray(gguf.quants.quantize(weights, qtype)).view(np.uint8)
    ours = dequantize(raw, GGMLType[kind], weights.shape)
    assert np.array_equal(ours, gguf.quants.dequantize(raw, qtype).reshape(weights.shape))
    assert np.abs(ours - weights).max() < 0.5  # and it is still the same data


def random_k_blocks(kind: str, n_blocks: int, seed: int = 2) -> np.ndarray:
    """Random but valid K-quant super-blocks: random bits, with finite f16 super-scales."""
    rng = np.random.default_rng(seed)
    size = {"Q4_K": 144, "Q6_K": 210}[kind]
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scale_bytes = {"Q4_K": slice(0, 4), "Q6_K": slice(208, 210)}[kind]  # d, dmin / d
    n_scales = (scale_bytes.stop - scale_bytes.start) // 2
    scales = rng.uniform(-0.05, 0.05, (n_blocks, n_scales)).astype(np.float16)
    blocks[:, scale_bytes] = scales.view(np.uint8)
    return blocks


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quants_match_gguf_on_random_blocks(kind):
    blocks = random_k_blocks(kind, 64)
    ours = dequantize(blocks, GGMLType[kind], (4, 16 * 256))
    expected = gguf.quants.dequantize(blocks.reshape(4, -1), gguf.GGMLQuantizationType[kind])
    assert np.array_equal(ours, expected)


def test_q4_k_hand_made_block():
    """One block decoded by hand: sub-block 5 borrows the top bits of bytes 1 and 5."""
    block = np.zeros(144, dtype=np.uint8)
    block[0:2] = np.array([0.5], np.float16).view(np.uint8)  # d
    block[2:4] = np.array([0.25], np.float16).view(np.uint8)  # dmin
    block[4 + 1] = 0b11_000011  # scale of sub-block 1 = 3; top bits 3 go to scale 5
    block[4 + 5] = 0b01_000010  # min of sub-block 1 = 2; top bits 1 go to min 5
    block[4 + 9] = 0x21  # low nibble: scale 5 = 3 << 4 | 1 = 49; high nibble: min 5 = 1 << 4 | 2 = 18
    block[16 + 64: 16 + 96] = 0x97  # sub-blocks 4 (low nibbles, 7) and 5 (high nibbles, 9)
    w = dequantize(block, GGMLType.Q4_K, (256,))
    assert np.all(w[32:64] == 0.5 * 3 * 0 - 0.25 * 2)
    assert np.all(w[160:192] == 0.5 * 49 * 9 - 0.25 * 18)


def test_quantize_q8_0_is_bit_identical_to_llama_cpp_reference():
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((8, 256)).astype(np.float32)
    weights[0, :32] = 0  # an all-zero block: d = 0, q = 0
    weights[1, :32] = [127, *np.arange(-15.5, 15.0)]  # d = 1, so x.5 values are ties: roundf(2.5) = 3
    weights[2, :32] = np.float32(0.5) * np.sign(rng.standard_normal(32)) + np.arange(32) / 64
    ours = quantize_q8_0(weights)
    assert np.array_equal(ours, gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0))


def test_unsupported_tensor_type_is_a_clear_error(tmp_path):
    data = np.random.default_rng(4).integers(0, 256, 2 * 176, dtype=np.uint8)
    path = write_gguf(tmp_path / "q5k.gguf", {"general.architecture": "llama"},
                      [TensorData("blk.0.ffn_down.weight", (2, 256), GGMLType.Q5_K, data)])
    f = GGUFFile(path)  # the header is still readable
    assert f.tensors["blk.0.ffn_down.weight"].ggml_type == GGMLType.Q5_K
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_down\.weight'.*Q5_K"):
        f.tensor("blk.0.ffn_down.weight")


# --------------------------------------------------------------------------- container


def as_float32(value):
    return [as_float32(v) for v in value] if isinstance(value, list) else np.float32(value).item()


def test_metadata_and_tensor_infos_match_gguf_reader(smollm2_gguf, smollm2_file):
    reader = gguf.GGUFReader(smollm2_gguf)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(smollm2_file.metadata) == list(fields)
    for key, field in fields.items():
        ours, theirs = smollm2_file.metadata[key], field.contents()
        assert [int(t) for t in smollm2_file.metadata_types[key]] == [int(t) for t in field.types], key
        if field.types[-1] == gguf.GGUFValueType.FLOAT32:
            assert as_float32(ours) == as_float32(theirs), key
        else:
            assert ours == theirs, key
    assert smollm2_file.version == 3 and smollm2_file.data_offset == reader.data_offset
    assert [t.name for t in reader.tensors] == list(smollm2_file.tensors)
    for ref in reader.tensors:
        info = smollm2_file.tensors[ref.name]
        assert info.shape == tuple(int(d) for d in reversed(ref.shape))
        assert info.ggml_type == int(ref.tensor_type)
        assert (info.offset, info.nbytes) == (ref.data_offset, ref.n_bytes)


def test_writer_reproduces_smollm2_byte_for_byte(smollm2_gguf, smollm2_file, tmp_path):
    """Read every key (with its type) and every tensor's bytes, write them back: the same file."""
    tensors = [TensorData(t.name, t.shape, t.ggml_type, smollm2_file.raw(t.name))
               for t in smollm2_file.tensors.values()]
    types = smollm2_file.metadata_types
    copy = write_gguf(tmp_path / "copy.gguf", smollm2_file.metadata, tensors, types=types)
    assert copy.read_bytes() == Path(smollm2_gguf).read_bytes()


def test_every_value_type_round_trips(tmp_path):
    metadata = {"u8": 255, "i8": -128, "u16": 65535, "i16": -32768, "u32": 2**32 - 1, "i32": -(2**31),
                "f32": 0.1, "bool": True, "str": "héllo ✓", "u64": 2**64 - 1, "i64": -(2**63), "f64": 0.1,
                "strs": ["a", "", "ü"], "ints": [1, -2, 3], "floats": [0.5, -1.25], "bools": [True, False],
                "nested": [[1, 2], [3]], "empty": []}
    types = {"u8": (ValueType.UINT8,), "i8": (ValueType.INT8,), "u16": (ValueType.UINT16,),
             "i16": (ValueType.INT16,), "u64": (ValueType.UINT64,), "i64": (ValueType.INT64,),
             "i32": (ValueType.INT32,), "f64": (ValueType.FLOAT64,),
             "nested": (ValueType.ARRAY, ValueType.ARRAY, ValueType.INT32)}
    path = write_gguf(tmp_path / "kv.gguf", metadata, [], types=types)
    ours = GGUFFile(path)
    assert ours.metadata == metadata
    assert ours.metadata_types["f32"] == (ValueType.FLOAT32,)
    assert ours.metadata_types["strs"] == (ValueType.ARRAY, ValueType.STRING)
    reader = gguf.GGUFReader(path)
    for key in metadata:
        if key not in ("nested", "f32"):  # gguf.GGUFReader.contents() flattens nested arrays
            assert reader.fields[key].contents() == metadata[key], key
    assert np.float32(reader.fields["f32"].contents()) == np.float32(0.1)


def test_reads_version_2(tiny_gguf, tmp_path):
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(data)
    f2, f3 = GGUFFile(v2), GGUFFile(tiny_gguf)
    assert f2.version == 2 and f2.metadata == f3.metadata
    assert np.array_equal(f2.tensor("token_embd.weight"), f3.tensor("token_embd.weight"))


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a GGUF file"),
    (b"PK\x03\x04" + bytes(100), "not a GGUF file"),
    (b"GGUF\x01\x00\x00\x00" + bytes(16), "unsupported GGUF version 1"),
    (b"GGUF\x04\x00\x00\x00" + bytes(16), "unsupported GGUF version 4"),
    (b"GGUF\x00\x00\x00\x03" + bytes(16), "big-endian"),
    (b"GGUF\x03\x00\x00\x00" + struct.pack("<QQ", 0, 1), "truncated"),
    (b"GGUF\x03\x00\x00\x00" + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99),
     "unknown value type 99"),
])
def test_bad_headers_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message):
        GGUFFile(path)


def test_truncated_smollm2_is_a_clear_error(smollm2_gguf, tmp_path):
    whole = Path(smollm2_gguf)
    for size, message in [(100_000, r"truncated file: metadata 'tokenizer.ggml.tokens'"),
                          (2_000_000, r"tensor '.*' data .* runs past the end of the file")]:
        cut = tmp_path / f"cut{size}.gguf"
        with open(whole, "rb") as src:
            cut.write_bytes(src.read(size))
        with pytest.raises(GGUFError, match=message):
            GGUFFile(cut)


def test_failed_write_leaves_the_old_file_alone(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(GGUFError):
        write_gguf(target, {"ok": 1}, [TensorData("w", (3, 32), GGMLType.Q8_0, np.zeros(5, np.uint8))])
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


# --------------------------------------------------------------------------- llama mapping


def test_smollm2_config(smollm2_loaded):
    config, state, metadata = smollm2_loaded
    assert same_architecture(config, preset("smollm2-135m"))
    assert "lm_head.weight" not in state and all(t.dtype == torch.float32 for t in state.values())
    assert metadata["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(smollm2_gguf, smollm2_lmforge, smollm2_prompt_ids):
    import transformers

    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    path = Path(smollm2_gguf)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = smollm2_lmforge(smollm2_prompt_ids).logits
        theirs = reference(smollm2_prompt_ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3


def llama_cpp_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's default RoPE: channels (2i, 2i+1) of each head are rotated together. x [H, T, hd]."""
    hd, positions = x.shape[-1], torch.arange(x.shape[-2], dtype=torch.float64)
    angles = positions[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = angles.cos().float(), angles.sin().float()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def test_exported_q_k_rows_suit_llama_cpp_rope(tmp_path):
    """Scores from the file's W_q/W_k with llama.cpp's RoPE equal lmforge's with rotate-half."""
    config = tiny_llama(n_kv_heads=4)
    state = random_state(config)
    f = GGUFFile(export_gguf(tmp_path / "m.gguf", config, state, TOKENIZER, "f32"))
    x = torch.randn(5, config.d_model)
    H, hd = config.n_heads, config.dim_per_head

    def heads(w: torch.Tensor) -> torch.Tensor:
        return (x @ w.T).view(5, H, hd).transpose(0, 1)  # [H, T, hd]

    cos, sin = RotaryEmbedding(hd, config.rope_theta)(torch.arange(5)[None])
    q = apply_rope(heads(state["blocks.0.attn.q_proj.weight"]), cos[0], sin[0])
    k = apply_rope(heads(state["blocks.0.attn.k_proj.weight"]), cos[0], sin[0])
    q_cpp = llama_cpp_rope(heads(torch.tensor(f.tensor("blk.0.attn_q.weight"))), config.rope_theta)
    k_cpp = llama_cpp_rope(heads(torch.tensor(f.tensor("blk.0.attn_k.weight"))), config.rope_theta)
    assert not torch.allclose(q, q_cpp)  # the layouts differ ...
    scores, scores_cpp = q @ k.transpose(-1, -2), q_cpp @ k_cpp.transpose(-1, -2)
    torch.testing.assert_close(scores, scores_cpp, rtol=1e-4, atol=1e-4)  # ... the scores do not


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": True},
    {"qkv_bias": True, "out_bias": True, "mlp_bias": True},
    {"head_dim": 32, "sliding_window": 16, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"n_experts": 4, "n_experts_per_token": 2},
])
def test_f32_export_round_trips_exactly(tmp_path, overrides):
    config = tiny_llama(**overrides)
    state = random_state(config)
    path = export_gguf(tmp_path / "m.gguf", config, state, TOKENIZER, "f32")
    loaded, loaded_state, metadata = load_gguf_model(path)
    assert same_architecture(loaded, config)
    assert loaded_state.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded_state[name], tensor), name
    assert metadata["tokenizer.ggml.tokens"] == TOKENIZER["tokenizer.ggml.tokens"]
    model, reloaded = Transformer(config).eval(), Transformer(loaded).eval()
    model.load_state_dict(state)
    reloaded.load_state_dict(loaded_state)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_0_export_round_trip_within_tolerance(tmp_path, dtype):
    config = tiny_llama()
    state = random_state(config)
    path = export_gguf(tmp_path / "m.gguf", config, state, TOKENIZER, dtype)
    f = GGUFFile(path)
    matrix_type = {"f16": GGMLType.F16, "q8_0": GGMLType.Q8_0}[dtype]
    assert f.tensors["blk.0.ffn_up.weight"].ggml_type == matrix_type
    assert f.tensors["blk.0.attn_norm.weight"].ggml_type == GGMLType.F32  # 1-D stays F32
    assert f.metadata["general.file_type"] == {"f16": 1, "q8_0": 7}[dtype]
    _, loaded, _ = load_gguf_model(path)
    for name, tensor in state.items():
        if tensor.dim() == 1:
            assert torch.equal(loaded[name], tensor)
        elif dtype == "f16":
            torch.testing.assert_close(loaded[name], tensor, rtol=1e-3, atol=1e-4)
        else:  # Q8_0: half a step (max|block| / 127), plus up to 127 times the f16 rounding of the step
            blocks = tensor.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            assert ((loaded[name].reshape(-1, 32) - blocks).abs() <= 0.57 * step + 1e-7).all(), name


def test_qwen2_file_loads_without_permutation(tmp_path):
    """qwen2 GGUFs keep Hugging Face's q/k row order (llama.cpp runs them with NeoX RoPE)."""
    config = tiny_llama(qkv_bias=True, tie_embeddings=True)
    state = random_state(config)
    metadata = {"general.architecture": "qwen2", "qwen2.context_length": 128, "qwen2.embedding_length": 64,
                "qwen2.block_count": 2, "qwen2.feed_forward_length": 96, "qwen2.attention.head_count": 4,
                "qwen2.attention.head_count_kv": 2, "qwen2.rope.freq_base": 10000.0,
                "qwen2.attention.layer_norm_rms_epsilon": 1e-6} | TOKENIZER
    tensors = [TensorData(theirs, tuple(state[ours].shape), GGMLType.F32, state[ours].numpy())
               for ours, theirs in tensor_names(config).items()]
    loaded, loaded_state, _ = load_gguf_model(write_gguf(tmp_path / "qwen.gguf", metadata, tensors))
    assert same_architecture(loaded, config)
    assert all(torch.equal(loaded_state[k], v) for k, v in state.items())


@pytest.mark.parametrize(("change", "message"), [
    ({"general.architecture": "gpt2"}, "general.architecture 'gpt2' is not supported"),
    ({"llama.attention.layer_norm_epsilon": 1e-5}, "cannot express .*llama.attention.layer_norm_epsilon"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, "rope.scaling.type 'yarn'"),
    ({"llama.rope.dimension_count": 8}, "partial rotary"),
    ({"llama.attention.head_count": [4, 4]}, "per-layer"),
    ({"split.count": 3}, "3-file split"),
])
def test_inexpressible_metadata_is_an_error(tiny_gguf, tmp_path, change, message):
    bad = rewrite(tiny_gguf, tmp_path / "bad.gguf", metadata=change)
    with pytest.raises(GGUFError, match=message):
        load_gguf_model(bad)


def test_unplaceable_and_missing_tensors_are_errors(tiny_gguf, tmp_path):
    freqs = TensorData("rope_freqs.weight", (8,), GGMLType.F32, np.ones(8, np.float32))
    with pytest.raises(GGUFError, match="rope_freqs"):
        load_gguf_model(rewrite(tiny_gguf, tmp_path / "a.gguf", extra_tensors=(freqs,)))
    extra = TensorData("blk.0.mystery.weight", (4,), GGMLType.F32, np.ones(4, np.float32))
    with pytest.raises(GGUFError, match=r"no place for these tensors: blk\.0\.mystery\.weight"):
        load_gguf_model(rewrite(tiny_gguf, tmp_path / "b.gguf", extra_tensors=(extra,)))
    f = GGUFFile(tiny_gguf)
    kept = [TensorData(t.name, t.shape, t.ggml_type, f.raw(t.name)) for t in f.tensors.values()
            if t.name != "blk.1.ffn_up.weight"]
    with pytest.raises(GGUFError, match="missing tensor 'blk.1.ffn_up.weight'"):
        load_gguf_model(write_gguf(tmp_path / "c.gguf", f.metadata, kept, types=f.metadata_types))


def test_export_refuses_what_llama_cannot_express(tmp_path):
    gpt2 = preset("gpt2")
    with pytest.raises(GGUFError, match="position='learned'.*norm='layernorm'.*mlp='gelu_tanh'"):
        export_gguf(tmp_path / "g.gguf", gpt2, {}, TOKENIZER)
    config = tiny_llama()
    with pytest.raises(GGUFError, match="only hold tokenizer"):
        export_gguf(tmp_path / "t.gguf", config, random_state(config), {"general.name": "x"})
    state = random_state(config)
    del state["blocks.1.mlp.up_proj.weight"]
    with pytest.raises(GGUFError, match="missing.*blocks.1.mlp.up_proj.weight"):
        export_gguf(tmp_path / "m.gguf", config, state, TOKENIZER)
    assert not list(tmp_path.iterdir())


def test_smollm2_q8_0_export_reads_back_in_gguf_and_lmforge(smollm2_loaded, smollm2_file,
                                                           smollm2_tokenizer_metadata, tmp_path):
    config, state, _ = smollm2_loaded
    path = export_gguf(tmp_path / "smollm2-q8_0.gguf", config, state, smollm2_tokenizer_metadata, "q8_0")
    reader = gguf.GGUFReader(path)
    ours = GGUFFile(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    for key, value in smollm2_tokenizer_metadata.items():
        assert reader.fields[key].contents() == value, key
        assert ours.metadata_types[key] == smollm2_file.metadata_types[key], key
    for ref in reader.tensors[:20]:
        assert np.array_equal(ours.tensor(ref.name), gguf.quants.dequantize(ref.data, ref.tensor_type))
    loaded, loaded_state, _ = load_gguf_model(path)
    assert same_architecture(loaded, config)
    name = "blocks.3.attn.q_proj.weight"
    torch.testing.assert_close(loaded_state[name], state[name], atol=0.02, rtol=0.02)


def test_tensors_are_read_only_views_of_the_mapped_file(smollm2_file):
    """GGUFFile maps the file rather than reading it: opening costs the header, not 98 MB."""
    assert not smollm2_file.raw("token_embd.weight").flags.writeable
    assert not smollm2_file.tensor("blk.0.attn_norm.weight").flags.writeable  # F32: no copy at all
