"""Writing files so that a crash never leaves a half-written one behind.

Everything lmforge writes (checkpoints, GGUF files, tokenizers, data shards) goes to a
temporary name in the target's own folder, is flushed to disk, and is then renamed over
the target: a rename within one file system is atomic, so readers see the old file or
the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def default_file_mode() -> int:
    """0o666 minus the process umask: what `open()` would have given a new file.

    `tempfile.mkstemp` creates files readable by their owner only, which would make a
    checkpoint unreadable to the other users of a shared machine after the rename.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """`with atomic_write(p) as f: f.write(...)`: p appears complete, or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temp folder next to `target`; on success it replaces `target` whole.

    Replacing renames the old folder aside, renames the new one in, then deletes the old
    one, so at every instant `target` is either the complete old or the complete new
    folder. Files are fsynced and given the umask's default mode first (safetensors and
    mkstemp create owner-only files). On failure the temp folder vanishes.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, default_file_mode())
                _fsync(path)
        _fsync(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{token}"
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            _fsync(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
            _fsync(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flushes a file or folder to disk; folders cannot be opened for fsync on every OS."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
