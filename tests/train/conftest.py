"""Tiny real token shards: a BPE tokenizer trained on the system's license texts, and their shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import one_torch_thread

from lmforge.data.document import Document
from lmforge.data.shards import TokenizeConfig, tokenize_documents
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe

LICENSES = Path("/usr/share/common-licenses")
VOCAB = 384


def license_paragraphs() -> list[Document]:
    docs = []
    for path in sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()):
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, para in enumerate(p.strip() for p in text.split("\n\n")):
            if len(para) > 40:
                docs.append(Document(id=f"{path.name}-{i}", text=para))
    return docs


one_thread = one_torch_thread("package")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    docs = license_paragraphs()
    model = train_bpe((d.text for d in docs[:400]), VOCAB - 1, workers=1)
    eot = len(model.mergeable_ranks)
    return Tokenizer.from_tiktoken(model.mergeable_ranks, model.pattern, {"<|endoftext|>": eot},
                                   eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    if not LICENSES.is_dir():
        pytest.skip("no /usr/share/common-licenses on this machine")
    folder = tmp_path_factory.mktemp("shards")
    tokenize_documents(license_paragraphs(), tiny_tokenizer, folder, TokenizeConfig(val_fraction=0.1),
                       tokenizer_name="tiny-bpe")
    return folder
