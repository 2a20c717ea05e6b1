"""Hostile data files: shard indexes that point outside their folder, archives that are not
archives, gzip cut off mid-member, JSON nested past the stack. Shard problems are one
`DataInputError`; reader problems are a counted drop with a reason, never a crash.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from lmforge.data.decode import decode_bytes
from lmforge.data.document import StageStats
from lmforge.data.errors import DataInputError
from lmforge.data.readers import discover_inputs, read_input
from lmforge.data.shards import load_shard_set

SHARD = "train-00000.safetensors"


# ------------------------------------------------------------------------------ token shards
def _shard_bytes(tokens: int = 100, starts: tuple[int, ...] = (0, 50)) -> bytes:
    return save({"tokens": np.arange(tokens, dtype=np.uint16), "doc_starts": np.asarray(starts, np.int64)})


def _shard_folder(root: Path, names: list, *, shard: bytes | None = None, meta: object = None) -> Path:
    folder = root / "shards"
    folder.mkdir(parents=True)
    (folder / SHARD).write_bytes(shard if shard is not None else _shard_bytes())
    if meta is None:
        meta = {"vocab_size": 100, "splits": {"train": {"shards": names, "tokens": 100}}}
    (folder / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return folder


def _refused(folder: Path) -> str:
    with pytest.raises(DataInputError) as caught:
        load_shard_set(folder)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_well_formed_shard_folder_loads(tmp_path):
    meta, shards = load_shard_set(_shard_folder(tmp_path, [SHARD]))
    assert len(shards[0]) == 100 and shards[0].doc_starts.tolist() == [0, 50]


@pytest.mark.parametrize("name", ["../outside.safetensors", "../../../../etc/passwd", "/etc/passwd",
                                  "sub/../../outside.safetensors", "..", ""])
def test_shard_names_must_stay_inside_the_folder(tmp_path, name):
    (tmp_path / "outside.safetensors").write_bytes(_shard_bytes())
    assert "is not a file name inside" in _refused(_shard_folder(tmp_path, [name]))


def test_a_shard_symlinked_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "outside.safetensors").write_bytes(_shard_bytes())
    folder = _shard_folder(tmp_path, ["link.safetensors"])
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    assert "outside" in _refused(folder)


def test_a_shard_symlinked_within_the_folder_loads(tmp_path):
    folder = _shard_folder(tmp_path, ["link.safetensors"])
    (folder / "link.safetensors").symlink_to(SHARD)
    assert len(load_shard_set(folder)[1][0]) == 100


@pytest.mark.parametrize("meta,message", [
    ("[1, 2]", "no 'splits' object"),
    ("[" * 10_000 + "]" * 10_000, "nested"),
    ({"splits": {"train": {"shards": SHARD}}}, "no list of shard file names"),
    ({"splits": {"train": {"shards": [1]}}}, "no list of shard file names"),
    ({"vocab_size": "50k", "splits": {"train": {"shards": [SHARD]}}}, "vocab_size"),
])
def test_malformed_meta_json_is_named(tmp_path, meta, message):
    assert message in _refused(_shard_folder(tmp_path, [], meta=meta))


@pytest.mark.parametrize("starts", [(0, -5), (0, 500), (50, 0)])
def test_doc_starts_must_be_ordered_offsets_into_the_tokens(tmp_path, starts):
    folder = _shard_folder(tmp_path, [SHARD], shard=_shard_bytes(starts=starts))
    assert "doc_starts" in _refused(folder)


def test_a_deeply_nested_shard_header_is_refused(tmp_path):
    header = b'{"tokens": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    folder = _shard_folder(tmp_path, [SHARD], shard=struct.pack("<Q", len(header)) + header)
    assert "nested" in _refused(folder)


# ------------------------------------------------------------------------------ readers
def _read(path: Path) -> tuple[list, StageStats]:
    stats = StageStats("read")
    return [doc for item in discover_inputs([path]) for doc in read_input(item, stats)], stats


def _warc(gzipped: bool, pages: int = 3) -> bytes:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=gzipped)
    for i in range(pages):
        body = b"<html><body>" + b"page %d " % i * 200 + b"</body></html>"
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(f"http://example.com/{i}", "response",
                                                      payload=io.BytesIO(body), http_headers=headers))
    return buffer.getvalue()


@pytest.mark.parametrize("data", [b"just some text, not gzip\n" * 40, b"<html><body>a page</body></html>",
                                  bytes(range(256)) * 8])
def test_a_warc_gz_that_is_no_archive_is_one_counted_drop(tmp_path, data):
    (tmp_path / "x.warc.gz").write_bytes(data)
    docs, stats = _read(tmp_path / "x.warc.gz")
    assert docs == [] and dict(stats.dropped) == {"not_warc": 1}


@pytest.mark.parametrize("keep", [3, 10, 0.8])
def test_gzip_cut_off_is_a_counted_truncated_archive(tmp_path, keep):
    data = _warc(gzipped=True)
    cut = data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep]
    (tmp_path / "cut.warc.gz").write_bytes(cut)
    docs, stats = _read(tmp_path / "cut.warc.gz")
    assert len(docs) < 3 and stats.dropped["truncated_archive"] == 1


def test_complete_archives_count_no_drop(tmp_path):
    for name, data in [("a.warc.gz", _warc(True)), ("b.warc", _warc(False)), ("c.warc.gz", _warc(False))]:
        (tmp_path / name).write_bytes(data)
        docs, stats = _read(tmp_path / name)
        assert len(docs) == 3 and not stats.dropped, name
    (tmp_path / "empty.warc.gz").write_bytes(gzip.compress(b""))
    assert dict(_read(tmp_path / "empty.warc.gz")[1].dropped) == {"empty": 1}


@pytest.mark.parametrize("name,data", [
    ("rows.jsonl.gz", b'{"text": "not gzip at all"}\n'),
    ("rows.jsonl.gz", gzip.compress(b'{"text": "x"}\n' * 2000)[:40]),
    ("page.txt.gz", gzip.compress(b"some text " * 2000)[:30]),
])
def test_bad_gzip_in_other_readers_is_a_counted_drop(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    docs, stats = _read(tmp_path / name)
    assert docs == [] and dict(stats.dropped) == {"bad_gzip": 1}


def test_json_lines_nested_past_the_stack_or_with_huge_numbers_are_bad_json(tmp_path):
    lines = ['{"text": "kept"}', "[" * 100_000 + "]" * 100_000, '{"text": "x", "n": ' + "9" * 5000 + "}",
             '{"text": "nested metadata", "metadata": "' + "[" * 100_000 + '"}']
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    docs, stats = _read(tmp_path / "rows.jsonl")
    assert [d.text for d in docs] == ["kept", "nested metadata"] and stats.dropped["bad_json"] == 2


@pytest.mark.parametrize("charset", ["rot13", "base64", "zlib", "punycode", "undefined", "unicode_escape",
                                     "utf-7", "utf-16"])
def test_charsets_that_are_no_charset_decode_as_utf8(charset):
    page = f'<html><meta charset="{charset}"><body>caf\\x41 \u00e9</body></html>'.encode()
    assert "caf\\x41 \u00e9" in decode_bytes(page)
