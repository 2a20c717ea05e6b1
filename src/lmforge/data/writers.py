"""Write documents as Parquet (FineWeb's columns) or JSONL, atomically.

A shard is written to ``NAME.<pid>.tmp`` and renamed to ``NAME`` only once complete, so a
reader (or a resumed run) never sees half a shard: a file either exists whole or not
at all. The rename is atomic on POSIX file systems when both names share a folder.

Parquet columns follow FineWeb: ``text``, ``id``, ``url``, ``date``, ``file_path``,
``language``, ``language_score``, then ``metadata``: the rest of the document's
metadata as a JSON string (Parquet wants one schema per file; metadata varies).
JSONL rows are ``{"text", "id", "url", "metadata": {...}}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from lmforge.data.document import Document

OUTPUT_FORMATS = ("parquet", "jsonl")
_FLAT_KEYS = ("date", "language", "language_score")


class DocumentWriter:
    """Context manager writing documents to one file; the file appears only on success.

    Use ``with DocumentWriter(path, "parquet") as out: out.write(doc)``. An exception
    inside the block removes the temporary file and leaves no output.
    """

    def __init__(self, path: str | os.PathLike[str], fmt: str = "parquet", *,
                 rows_per_group: int = 2048) -> None:
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; choose from {', '.join(OUTPUT_FORMATS)}")
        self.path = Path(path)
        self.format = fmt
        self.count = 0
        self.chars = 0
        # the process id in the name: two processes can never interleave writes to one file
        self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self._rows: list[Document] = []
        self._rows_per_group = rows_per_group
        self._parquet: Any = None
        self._jsonl: Any = None

    def __enter__(self) -> DocumentWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.format == "jsonl":
            self._jsonl = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        return self

    def write(self, doc: Document) -> None:
        self.count += 1
        self.chars += len(doc.text)
        if self._jsonl is not None:
            row = {"text": doc.text, "id": doc.id, "url": doc.url, "metadata": doc.metadata}
            self._jsonl.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            return
        self._rows.append(doc)
        if len(self._rows) >= self._rows_per_group:
            self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._tmp, parquet_schema(), compression="zstd")
        if self._rows:
            self._parquet.write_table(pa.Table.from_pylist([parquet_row(d) for d in self._rows],
                                                           schema=parquet_schema()))
            self._rows = []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._jsonl is not None:
                self._jsonl.flush()
                os.fsync(self._jsonl.fileno())
                self._jsonl.close()
            elif exc_type is None:
                self._flush_parquet()  # also creates an empty file with the schema for zero rows
                self._parquet.close()
            elif self._parquet is not None:
                self._parquet.close()
        finally:
            if exc_type is None:
                os.replace(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)


def parquet_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("text", pa.string()), ("id", pa.string()), ("url", pa.string()), ("date", pa.string()),
        ("file_path", pa.string()), ("language", pa.string()), ("language_score", pa.float64()),
        ("metadata", pa.string()),
    ])


def parquet_row(doc: Document) -> dict[str, Any]:
    meta = doc.metadata
    rest = {k: v for k, v in meta.items() if k not in _FLAT_KEYS and k != "source"}
    score = meta.get("language_score")
    return {
        "text": doc.text, "id": doc.id, "url": doc.url,
        "date": str(meta["date"]) if meta.get("date") is not None else None,
        "file_path": meta.get("source"), "language": meta.get("language"),
        "language_score": float(score) if score is not None else None,
        "metadata": json.dumps(rest, ensure_ascii=False, sort_keys=True, default=str),
    }


def read_documents(path: str | os.PathLike[str]) -> list[Document]:
    """All documents of a file lmforge wrote (Parquet or JSONL), in order; for tests and tools."""
    from lmforge.data.document import StageStats
    from lmforge.data.readers import InputFile, format_of, read_input

    path = Path(path)
    item = InputFile(str(path), path.name, format_of(path) or "auto", path.stat().st_size)
    return list(read_input(item, StageStats("read")))
