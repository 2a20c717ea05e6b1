"""Readers on real archives and pages, and on the bad input a crawl really produces."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from lmforge.data.decode import decode_bytes, looks_binary
from lmforge.data.document import Document, StageStats
from lmforge.data.errors import DataInputError, UnreadablePayload
from lmforge.data.readers import discover_inputs, read_input
from lmforge.data.rst import rst_to_text
from lmforge.data.writers import DocumentWriter, read_documents


def read_all(paths, fmt="auto"):
    stats = StageStats("read")
    docs = [doc for item in discover_inputs(paths, fmt) for doc in read_input(item, stats)]
    return docs, stats


def test_warc_yields_html_responses_with_url_date_and_record_id(warcs):
    docs, stats = read_all([warcs / "iana.warc.gz"])
    assert len(docs) == 16  # the 200-OK text/html responses of the iana.org crawl
    assert all(d.url.split("://")[1].startswith("www.iana.org/") for d in docs)
    assert all(d.id.startswith("<urn:uuid:") for d in docs)
    assert all(d.metadata["date"].startswith("2014-") for d in docs)
    assert "<html" in docs[0].text.lower()
    # scripts, images and redirects are not pages
    assert stats.dropped["not_html"] > 0 and stats.dropped["http_status_3xx"] > 0
    assert stats.counters["warc_request_records"] > 0


def test_arc_files_read_with_stable_ids(warcs):
    first, _ = read_all([warcs / "example.arc.gz"])
    again, _ = read_all([warcs / "example.arc.gz"])
    assert len(first) == 1 and first[0].url.startswith("http://example.com")
    assert [d.id for d in first] == [d.id for d in again]  # ARC has no record id: file@offset instead
    assert first[0].id.endswith("example.arc.gz@0") or "@" in first[0].id


def test_truncated_warc_keeps_what_precedes_the_damage(warcs, tmp_path):
    data = (warcs / "iana.warc.gz").read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: len(data) // 2])
    docs, stats = read_all([cut])
    full, _ = read_all([warcs / "iana.warc.gz"])
    assert 0 < len(docs) < len(full)
    assert [d.id for d in docs] == [d.id for d in full[: len(docs)]]
    assert stats.dropped["truncated_archive"] == 1


def test_bad_input_is_counted_not_raised(warcs, handbook, tmp_path):
    """Binary garbage, a broken encoding, corrupt archives: each skipped with its reason."""
    rng = np.random.default_rng(0)
    (tmp_path / "garbage.html").write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    french = (handbook / "fr-FR" / "apt.html").read_text(encoding="utf-8")
    assert "charset=UTF-8" in french or "utf-8" in french.lower()
    (tmp_path / "latin1.html").write_bytes(french.encode("latin-1", errors="replace"))  # says UTF-8, isn't
    (tmp_path / "empty.txt").write_bytes(b"  \n")
    rows = '{"text": "fine", "id": "a"}\n{not json\n[1, 2]\n{"id": "no text"}\n'
    (tmp_path / "rows.jsonl").write_text(rows)
    (tmp_path / "bad.warc").write_bytes((warcs / "bad.arc").read_bytes())
    (tmp_path / "wrongly-gzipped.warc.gz").write_bytes((warcs / "example-bad.warc.gz.bad").read_bytes())
    (tmp_path / "zeros.warc.gz").write_bytes(b"\x1f\x8b" + bytes(500))
    docs, stats = read_all([tmp_path])
    assert [d.id for d in docs] == ["a"]
    assert stats.dropped["binary"] == 1
    assert stats.dropped["bad_encoding"] == 1
    assert stats.dropped["empty"] == 1
    assert stats.dropped["bad_json"] == 2 and stats.dropped["no_text_field"] == 1
    assert stats.dropped["truncated_archive"] >= 2


def test_decode_honours_declared_charsets_and_tolerates_a_stray_byte():
    page = "<html><head><meta charset='iso-8859-1'></head><body>Café crème</body></html>"
    assert "Café crème" in decode_bytes(page.encode("latin-1"))
    utf8 = ("<p>" + "naïve " * 500 + "</p>").encode() + b"\xff"
    assert "naïve" in decode_bytes(utf8)  # one bad byte in 4 KB: kept, replaced
    with pytest.raises(UnreadablePayload, match="bad_encoding"):
        decode_bytes(("<p>" + "é" * 100 + "</p>").encode("latin-1"))  # no charset: UTF-8 expected
    assert looks_binary(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert not looks_binary("日本語のテキスト".encode("utf-16"))


def test_discover_inputs_skips_unknown_suffixes_and_rejects_missing(python_docs, tmp_path):
    (tmp_path / "page.html").write_text("<p>x</p>")
    (tmp_path / "style.css").write_text("p {}")
    items = discover_inputs([tmp_path])
    assert [i.name for i in items] == [f"{tmp_path.name}/page.html"]
    with pytest.raises(DataInputError, match="does not exist"):
        discover_inputs([tmp_path / "nope"])
    with pytest.raises(DataInputError, match="no readable input"):
        discover_inputs([python_docs / "_images"])


def test_rst_sources_read_as_text(python_docs):
    source = (python_docs / "_sources" / "tutorial" / "appetite.rst.txt").read_text()
    text = rst_to_text(source)
    assert ":ref:`" not in text and "``" not in text
    assert "Whetting Your Appetite" in text
    assert "=====" not in text
    docs, _ = read_all([python_docs / "_sources" / "tutorial" / "appetite.rst.txt"])
    assert docs[0].metadata["markup"] == "rst" and docs[0].text == text


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_writer_round_trip_and_atomicity(tmp_path, fmt):
    docs = [Document(f"d{i}", f"text {i} ünïcode", url=f"https://example.org/{i}" if i % 2 else None,
                     metadata={"language": "en", "language_score": 0.9, "source": "x.warc", "date": "2024",
                               "extra": {"k": [1, 2]}}) for i in range(5)]
    path = tmp_path / f"out.{fmt}"
    with DocumentWriter(path, fmt) as out:
        for doc in docs:
            out.write(doc)
        assert not path.exists()  # only the temporary file exists while writing
    assert read_documents(path) == docs
    with pytest.raises(RuntimeError), DocumentWriter(tmp_path / f"failed.{fmt}", fmt) as out:
        out.write(docs[0])
        raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == [path]  # neither the output nor a temporary file is left


def test_parquet_has_fineweb_columns(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    with DocumentWriter(path) as out:
        out.write(Document("x", "hello", "https://a.b/", {"language": "en", "language_score": 0.97}))
    table = pq.read_table(path)
    assert table.column_names[:3] == ["text", "id", "url"]
    assert {"language", "language_score", "date", "file_path", "metadata"} <= set(table.column_names)
    assert json.loads(table.column("metadata")[0].as_py()) == {}


def test_gzipped_jsonl_and_foreign_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "one", "url": "https://x.y/", "lang": "en"}) + "\n")
    foreign = pa.table({"text": ["two"], "id": ["p0"], "dump": ["CC-MAIN-2024-10"]})
    pq.write_table(foreign, tmp_path / "b.parquet")
    docs, _ = read_all([tmp_path])
    assert [(d.id, d.text) for d in docs] == [(f"{tmp_path.name}/a.jsonl.gz#0", "one"), ("p0", "two")]
    assert docs[0].metadata["lang"] == "en" and docs[1].metadata["dump"] == "CC-MAIN-2024-10"
