"""Read documents from WARC/ARC archives, HTML files, plain text, JSONL and Parquet.

`discover_inputs` turns the paths a user typed (files and folders) into a sorted list
of `InputFile`s; `read_input` yields the `Document`s of one of them. Everything that
cannot become a document (a truncated archive, an image in a crawl, a page in a broken
encoding, a malformed JSON line) is counted in the reader's `StageStats` under a short
reason and skipped, so bad input shows up in the report instead of ending the run.

Ids are stable across runs: a WARC record keeps its ``WARC-Record-ID`` (as FineWeb
does), every other record is named by its file (relative to the input the user gave)
and its position in it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.decode import decode_bytes, looks_binary
from lmforge.data.document import Document, StageStats
from lmforge.data.errors import DataInputError, UnreadablePayload
from lmforge.data.rst import rst_to_text

# Suffix (lower case) -> reader format. Longest suffixes are tried first.
FORMATS: dict[str, str] = {
    ".warc.gz": "warc", ".warc": "warc", ".arc.gz": "warc", ".arc": "warc",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text", ".text": "text", ".md": "text", ".rst": "rst", ".rst.txt": "rst",
}
READER_FORMATS = ("auto", "warc", "html", "text", "rst", "jsonl", "parquet")
HTML_CONTENT_TYPES = ("text/html", "application/xhtml+xml")
GZIP_MAGIC = b"\x1f\x8b"
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)  # not gzip; cut off; damaged inside
_TAIL_LIMIT = 1 << 16  # what may follow an archive's last record: a few blank lines


@dataclass(frozen=True)
class InputFile:
    """One file to read: its path, the name documents get their ids from, and its format."""

    path: str
    name: str
    format: str
    size: int


def format_of(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(suffix):
            return FORMATS[suffix]
    return None


def discover_inputs(paths: Sequence[str | os.PathLike[str]], input_format: str = "auto", *,
                    exclude: str | os.PathLike[str] | None = None) -> list[InputFile]:
    """Expand files and folders into a sorted, de-duplicated list of readable inputs.

    Inside folders only files with a known suffix are taken (a docs tree also holds
    images, CSS and JavaScript); a file named explicitly is always taken, and a format
    that cannot be told from its suffix is sniffed from its first bytes when read.
    Files under `exclude` (the run's own output folder) are never inputs.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    if input_format not in READER_FORMATS:
        raise DataInputError(f"unknown input format {input_format!r}; "
                             f"choose from {', '.join(READER_FORMATS)}")
    found: dict[str, InputFile] = {}
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.exists():
            raise DataInputError(f"input {raw} does not exist")
        base = root.resolve().parent
        if root.is_file():
            candidates = [(root.resolve(), True)]
        else:
            candidates = [(p.resolve(), False) for p in sorted(root.rglob("*")) if p.is_file()]
        for path, explicit in candidates:
            if skip is not None and path.is_relative_to(skip):
                continue
            fmt = input_format if input_format != "auto" else format_of(path)
            if fmt is None and not explicit:
                continue
            key = str(path)
            if key not in found:
                found[key] = InputFile(path=key, name=path.relative_to(base).as_posix(),
                                       format=fmt or "auto", size=path.stat().st_size)
    if not found:
        raise DataInputError(f"no readable input files in {', '.join(map(str, paths))} "
                             f"(known suffixes: {', '.join(sorted(FORMATS))})")
    items = sorted(found.values(), key=lambda item: item.name)
    names = [item.name for item in items]
    if len(set(names)) != len(names):  # same relative name under two inputs: fall back to full paths
        items = sorted((InputFile(i.path, i.path.lstrip("/"), i.format, i.size) for i in items),
                       key=lambda item: item.name)
    return items


def sniff_format(path: str) -> str:
    """Guess the format of a file whose suffix says nothing, from its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head[:2] == GZIP_MAGIC:
        with gzip.open(path, "rb") as handle:
            try:
                head = handle.read(512)
            except (OSError, EOFError, zlib.error):
                return "text"
    stripped = head.lstrip()
    if stripped.startswith((b"WARC/", b"filedesc://")):
        return "warc"
    if stripped[:1] == b"<":
        return "html"
    if stripped[:1] == b"{":
        return "jsonl"
    if head.startswith(b"PAR1"):
        return "parquet"
    return "text"


def read_input(item: InputFile, stats: StageStats) -> Iterator[Document]:
    """All documents of one input file; failures are counted in `stats`, never raised."""
    fmt = item.format if item.format != "auto" else sniff_format(item.path)
    reader = {"warc": read_warc, "html": read_html_file, "text": read_text_file, "rst": read_rst_file,
              "jsonl": read_jsonl, "parquet": read_parquet}[fmt]
    try:
        yield from reader(item, stats)
    except UnreadablePayload as err:  # a whole file refused before any of it was read (bad gzip)
        _skip(stats, err.reason)
    except OSError as err:  # unreadable file (permissions, vanished, I/O error)
        stats.docs_in += 1
        stats.dropped[f"unreadable_file_{type(err).__name__}"] += 1


def _emit(stats: StageStats, doc: Document) -> Document:
    stats.docs_in += 1
    stats.kept += 1
    stats.chars_out += len(doc.text)
    return doc


def _skip(stats: StageStats, reason: str) -> None:
    stats.docs_in += 1
    stats.dropped[reason] += 1


# ------------------------------------------------------------------------ WARC / ARC
def read_warc(item: InputFile, stats: StageStats) -> Iterator[Document]:
    """HTML responses of a WARC or ARC file (plain or gzipped), with URL and crawl date.

    Only successful (2xx) responses whose content type is HTML (or unstated) become
    documents; requests, metadata and revisit records are counted in `stats.counters`.
    A truncated or corrupt archive yields what precedes the damage and counts one
    ``truncated_archive`` (warcio meets damage with many exception types; each means
    the same here: nothing after this point can be trusted). warcio ends *quietly* where
    a gzip member is cut off, so whatever follows the last record must be blank (inside
    complete gzip members) or it counts as ``truncated_archive`` too. A file that starts
    neither with a gzip member nor with a WARC/ARC header (a page or a text file named
    ``.warc.gz``) counts one ``not_warc``: warcio would read its lines as bogus ARC records.
    """
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    is_arc = ".arc" in item.name.lower() and ".warc" not in item.name.lower()
    with open(item.path, "rb") as handle:
        head = handle.read(64)
        handle.seek(0)
        if not head.startswith(GZIP_MAGIC) and not head.lstrip().startswith((b"WARC/", b"filedesc://")):
            _skip(stats, "empty" if not head else "not_warc")
            return
        records = ArchiveIterator(handle, arc2warc=True)
        index = seen = end = 0
        while True:
            doc: Document | None = None
            reason: str | None = None
            try:
                record = next(records)
                seen += 1
                if record.rec_type in ("response", "resource"):
                    try:
                        doc = _warc_document(record, item, records, index, is_arc)
                        index += 1
                    except UnreadablePayload as err:
                        reason = err.reason
                else:
                    stats.counters[f"warc_{record.rec_type}_records"] += 1
                truncated = _truncated(record)
                end = records.get_record_offset() + records.get_record_length()
            except StopIteration:
                if problem := _ending_problem(item.path, end, head.startswith(GZIP_MAGIC), seen):
                    _skip(stats, problem)
                return
            except (ArchiveLoadFailed, EOFError, OSError, ValueError, UnicodeDecodeError, zlib.error):
                truncated = True
            except (AttributeError, TypeError, IndexError, KeyError):  # warcio on headers cut mid-line
                truncated = True
            if truncated:  # whatever this record held is incomplete, and nothing follows it
                _skip(stats, "truncated_archive")
                return
            if reason is not None:
                _skip(stats, reason)
            elif doc is not None:
                yield _emit(stats, doc)


def _ending_problem(path: str, end: int, gzipped: bool, records: int) -> str | None:
    """Why the bytes after the last record (at `end`) are a drop, or None when they are just blank.

    Blank means whitespace, inside gzip members that are complete; anything else is the
    start of a record the file lost its end of (or an archive that held no record at all).
    """
    with open(path, "rb") as handle:
        handle.seek(end)
        tail = handle.read(_TAIL_LIMIT + 1)
    text = tail
    if gzipped:
        text = b""
        while tail:
            member = zlib.decompressobj(wbits=31)
            try:
                text += member.decompress(tail, _TAIL_LIMIT)
            except zlib.error:
                return "truncated_archive"
            if not member.eof:
                return "truncated_archive"
            tail = member.unused_data
    if len(text) > _TAIL_LIMIT or text.strip():
        return "truncated_archive"
    return None if records else "empty"


def _truncated(record: Any) -> bool:
    """Read what is left of the record; True when the file ends before its declared length.

    A record with no length at all is the remains of headers cut off mid-member: warcio
    makes a "record" of whatever a truncated gzip member decompressed to.
    """
    raw = record.raw_stream
    while raw.read(1 << 16):
        pass
    if record.rec_headers is None or record.rec_headers.get_header("Content-Length") is None:
        return True
    return getattr(raw, "limit", 0) > 0


def _warc_document(record: Any, item: InputFile, records: Any, index: int, is_arc: bool) -> Document:
    """A Document from one response record (or `UnreadablePayload` saying why not).

    The payload must be read before asking `records` for the record's offset: asking
    first makes warcio skip to the end of the record.
    """
    headers = record.http_headers
    content_type = headers.get_header("Content-Type") if headers is not None else \
        record.rec_headers.get_header("Content-Type")
    if headers is not None:
        status = headers.get_statuscode() or ""
        if not status.startswith("2"):
            raise UnreadablePayload(f"http_status_{status[:1] or 'x'}xx")
    mime = (content_type or "text/html").split(";")[0].strip().lower()
    if mime not in HTML_CONTENT_TYPES:
        raise UnreadablePayload("not_html", mime)
    payload = record.content_stream().read()
    offset = records.get_record_offset()
    text = decode_bytes(payload, content_type, html=True)
    record_id = record.rec_headers.get_header("WARC-Record-ID")
    doc_id = record_id if (record_id and not is_arc) else f"{item.name}@{offset}"
    metadata: dict[str, Any] = {"source": item.name, "content_type": "html", "record": index}
    if date := record.rec_headers.get_header("WARC-Date"):
        metadata["date"] = date
    return Document(id=doc_id, text=text, url=record.rec_headers.get_header("WARC-Target-URI"),
                    metadata=metadata)


# ------------------------------------------------------------------------ HTML and text files
def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it is named .gz; bad gzip is `UnreadablePayload("bad_gzip")`."""
    if path.lower().endswith(".gz"):
        with gzip.open(path, "rb") as handle:
            try:
                return handle.read()
            except GZIP_ERRORS as err:
                raise UnreadablePayload("bad_gzip", str(err)) from err
    with open(path, "rb") as handle:
        return handle.read()


def read_html_file(item: InputFile, stats: StageStats) -> Iterator[Document]:
    """One HTML page from a file; its id is the file's name relative to the input."""
    try:
        text = decode_bytes(_read_bytes(item.path), html=True)
    except UnreadablePayload as err:
        _skip(stats, err.reason)
        return
    yield _emit(stats, Document(id=item.name, text=text, url=None,
                                metadata={"source": item.name, "content_type": "html"}))


def read_text_file(item: InputFile, stats: StageStats) -> Iterator[Document]:
    """A whole text file as one document (UTF-8, strictly: a text file declares no charset)."""
    try:
        text = decode_bytes(_read_bytes(item.path), html=False)
    except UnreadablePayload as err:
        _skip(stats, err.reason)
        return
    yield _emit(stats, Document(id=item.name, text=text, url=None,
                                metadata={"source": item.name, "content_type": "text"}))


def read_rst_file(item: InputFile, stats: StageStats) -> Iterator[Document]:
    """A reStructuredText source as one document, its markup removed (`lmforge.data.rst`)."""
    for doc in read_text_file(item, stats):
        doc.text = rst_to_text(doc.text)
        doc.metadata["markup"] = "rst"
        yield doc


# ------------------------------------------------------------------------ JSONL and Parquet
def row_to_document(row: dict[str, Any], default_id: str, source: str) -> Document:
    """A JSON/Parquet row (``text`` required; ``id``, ``url``, anything else) as a Document.

    A ``metadata`` mapping (or a JSON string of one, as lmforge's Parquet writer stores
    it) is unpacked, so lmforge's own output reads back unchanged.
    """
    text = row.get("text")
    if not isinstance(text, str):
        raise UnreadablePayload("no_text_field")
    metadata: dict[str, Any] = {}
    nested = row.get("metadata")
    if isinstance(nested, str):
        try:
            nested = json.loads(nested)
        except (ValueError, RecursionError):  # not JSON, a 4,300-digit number, or nested past the stack
            nested = {"metadata": nested}
    if isinstance(nested, dict):
        metadata.update(nested)
    for key, value in row.items():
        if key not in ("text", "id", "url", "metadata") and value is not None:
            metadata["source" if key == "file_path" else key] = value
    metadata.setdefault("source", source)
    doc_id = row.get("id")
    url = row.get("url")
    return Document(id=str(doc_id) if doc_id not in (None, "") else default_id, text=text,
                    url=str(url) if url else None, metadata=metadata)


def read_jsonl(item: InputFile, stats: StageStats) -> Iterator[Document]:
    """One document per JSON line; malformed lines count as ``bad_json``."""
    raw = _read_bytes(item.path)
    if looks_binary(raw):
        _skip(stats, "binary")
        return
    for number, line in enumerate(io.BytesIO(raw)):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise UnreadablePayload("bad_json")
            doc = row_to_document(row, f"{item.name}#{number}", item.name)
        except UnreadablePayload as err:
            _skip(stats, err.reason)
            continue
        except (ValueError, RecursionError):  # bad JSON or UTF-8, a 4,300-digit number, nested too deep
            _skip(stats, "bad_json")
            continue
        yield _emit(stats, doc)


def read_parquet(item: InputFile, stats: StageStats) -> Iterator[Document]:
    """Rows of a Parquet file with a ``text`` column (FineWeb's layout, or lmforge's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(item.path)
    except (pa.ArrowException, OSError):
        _skip(stats, "bad_parquet")
        return
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                try:
                    doc = row_to_document(row, f"{item.name}#{number}", item.name)
                except UnreadablePayload as err:
                    _skip(stats, err.reason)
                    continue
                finally:
                    number += 1
                yield _emit(stats, doc)
    except (pa.ArrowException, OSError):
        _skip(stats, "bad_parquet")
