"""Helpers for the data tests. The real pages (fixtures `handbook`, `python_docs`, `warcs`)
come from tests/conftest.py; tests copy small subsets into their own folders so each run
processes a few dozen pages, not thousands.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

from lmforge.data.pipeline import PrepareConfig


def copy_into(folder: Path, files: Iterable[tuple[Path, str]]) -> Path:
    """Copy (source, relative destination) pairs under `folder`; returns `folder`."""
    for source, relative in files:
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return folder


def only(*stages: str, **changes) -> PrepareConfig:
    """A config with only the named optional stages enabled (reading and writing always run)."""
    config = PrepareConfig(**changes)
    for name in ("url_filter", "extract", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb",
                 "pii"):
        getattr(config, name).enabled = name in stages
    config.dedup.exact = "dedup" in stages
    config.dedup.minhash.enabled = "dedup" in stages
    return config


HANDBOOK_PAGES = ["apt.html", "basic-configuration.html", "case-study.html", "debian-packaging.html",
                  "foreword.html", "installation.html", "packaging-system.html", "security.html",
                  "solving-problems.html", "unix-services.html"]


@pytest.fixture(scope="session")
def handbook_pages(handbook) -> list[str]:
    """Ten chapter pages that exist in every language of the handbook."""
    names = [name for name in HANDBOOK_PAGES if all((handbook / lang / name).exists()
                                                       for lang in ("en-US", "fr-FR", "de-DE", "ja-JP"))]
    assert len(names) >= 8
    return names
