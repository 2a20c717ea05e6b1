"""The C decode kernels: built for the instruction set this CPU has, never loaded when tampered
with, and a failed build said aloud (the PyTorch path still answers)."""

from __future__ import annotations

import logging

import pytest
import torch

from lmforge.infer import kernels
from lmforge.infer.cache import StaticKVCache
from lmforge.infer.quant import Int8Linear
from lmforge.infer.runner import ModelRunner


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """An empty kernel cache, and no library loaded; restored afterwards."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    yield tmp_path / "kernels"
    kernels.library.cache_clear()


def _greedy_logits(model, ids):
    runner = ModelRunner(model)
    cache = StaticKVCache.for_model(model, 1, 32)
    out = [runner(ids[:, :4], cache, last_only=False)]
    for t in range(4, ids.shape[1]):
        out.append(runner(ids[:, t:t + 1], cache, last_only=False))
    return runner, torch.cat(out, dim=1)


def test_the_build_uses_what_this_cpu_has():
    flags = kernels.cpu_features()
    assert flags, "no CPU flags read from /proc/cpuinfo"
    want = "avx2" if {"avx2", "fma", "f16c"} <= flags else "portable"
    assert kernels.isa() == want
    lib = kernels.library()
    assert lib is not None, kernels.status()
    assert lib.lmf_isa() == kernels.ISA_CODES[want]
    assert kernels.status() == f"built for {want}"


@pytest.mark.parametrize("isa", ["portable", "native"])
def test_each_kernel_path_decodes_like_the_model(fresh_kernels, monkeypatch, tiny, isa):
    if isa == "portable":
        monkeypatch.setenv("LMFORGE_KERNEL_ISA", "portable")
    model = tiny("llama-gqa")
    ids = torch.randint(0, 97, (1, 12))
    runner, logits = _greedy_logits(model, ids)
    assert runner.fast, kernels.status()
    assert kernels.status() == f"built for {kernels.isa()}"
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    # int8 with a scale per 32 inputs (a Q8_0 file's layers) on the same path
    grouped = Int8Linear(torch.randint(-128, 128, (24, 96), dtype=torch.int8), torch.rand(24, 3) / 50)
    x = torch.randn(3, 96)
    torch.testing.assert_close(kernels.linear(grouped.kernel_weight(), x), x @ grouped.dequantize().T,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", ["portable", "native"])
def test_the_read_loop_reads_every_byte_at_a_memory_rate(fresh_kernels, monkeypatch, isa):
    if isa == "portable":
        monkeypatch.setenv("LMFORGE_KERNEL_ISA", "portable")
    rate = kernels.read_bandwidth(64 << 20, repeats=2)  # checks its sum of ones itself
    assert 5e8 < rate < 5e12  # 0.5 GB/s .. 5 TB/s: a real memory rate, on any machine


def test_a_failed_build_is_reported_and_pytorch_answers(fresh_kernels, monkeypatch, tiny):
    monkeypatch.setenv("CC", "/bin/false")
    assert kernels.library() is None
    assert "could not compile decode.c" in kernels.status() and "/bin/false" in kernels.status()
    model = tiny("llama-gqa")
    ids = torch.randint(0, 97, (1, 8))
    runner, logits = _greedy_logits(model, ids)
    assert not runner.fast
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_tampered_library_is_rebuilt_not_loaded(fresh_kernels, caplog):
    assert kernels.library() is not None
    [library] = fresh_kernels.glob("*/lmforge_decode.so")
    good = library.read_bytes()
    tampered = library.with_name("tampered")
    tampered.write_bytes(good[:-16] + b"\0" * 16)  # someone else's bytes in our cache
    tampered.replace(library)  # a new file: the loaded library's pages stay as they were
    kernels.library.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lmforge.infer.kernels"):
        assert kernels.library() is not None
    assert "does not match the sha256" in caplog.text
    assert library.read_bytes() == good


def test_a_forced_isa_must_be_known(monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNEL_ISA", "avx9000")
    with pytest.raises(ValueError, match="choose one of avx2, portable"):
        kernels.isa()
