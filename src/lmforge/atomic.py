"""Writing files so that a crash never leaves a half-written one behind.

Everything lmforge writes (checkpoints, GGUF files, tokenizers, data shards) goes to a
temporary name in the target's own folder, is flushed to disk, and is then renamed over
the target: a rename within one file system is atomic, so readers see the old file or
the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
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
