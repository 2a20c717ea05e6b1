"""The index folder: FAISS kinds against brute force, BM25, fusion, incremental updates, atomic writes.

These test the index, not an encoder: `SeededVectors` gives each text a random unit vector
drawn from a seed made of its bytes (two equal texts, equal vectors) and counts what it
was asked to embed. The real MiniLM meets the index in test_cli.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from lmforge.rag.chunk import ChunkConfig
from lmforge.rag.index import EmbedderMismatch, RagIndex, RagIndexError, build_dense, update_index
from lmforge.rag.retrieve import Retriever, reciprocal_rank_fusion
from lmforge.rag.sources import SourceDocument

WORDS = [chr(ord("a") + i) * 3 + "x" for i in range(26)]  # aaax, bbbx, ... (words BM25 keeps)


class SeededVectors:
    """Random unit vectors keyed by text (a test double for the vectors, not an encoder)."""

    def __init__(self, name: str = "seeded-16", dim: int = 16) -> None:
        self.name, self.dim, self.max_tokens = name, dim, 512
        self.encoded: list[str] = []

    def token_ids(self, texts):
        return [[0] + [1] * len(t.split()) + [0] for t in texts]

    def encode(self, texts, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        self.encoded += list(texts)
        rows = [np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little"))
                .standard_normal(self.dim) for t in texts]
        vectors = np.array(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def corpus(n: int = 30, *, changed: int | None = None) -> list[SourceDocument]:
    docs = []
    for i in range(n):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(6))
        text = f"Document {i} tells of {words} and the unique token uniq{i}."
        if i == changed:
            text += " Now with an edit."
        docs.append(SourceDocument(f"doc{i}.txt", f"doc{i}.txt", text, "text"))
    return docs


ONE_CHUNK = ChunkConfig("structure", max_tokens=64, overlap=8)


def test_flat_index_finds_what_brute_force_finds(tmp_path):
    vectors = SeededVectors()
    report = update_index(tmp_path / "idx", corpus(), vectors, kind="flat", chunking=ONE_CHUNK)
    assert (report.documents_added, report.chunks, report.kind, report.written) == (30, 30, "flat", True)
    index = RagIndex.open(tmp_path / "idx", load_vectors=True)
    queries = SeededVectors().encode(["q1", "q2", "q3"])
    found = index.dense_search(queries, 5)
    brute = np.argsort(-(queries @ index.vectors.T), axis=1)[:, :5]
    assert [[row for row, _ in hits] for hits in found] == brute.tolist()
    # a chunk's own text comes back first, with cosine 1
    hits = Retriever(index, vectors).search(index.chunks[7].indexed_text, k=3, mode="dense")
    assert hits[0].chunk == index.chunks[7] and hits[0].score == pytest.approx(1.0) and hits[0].rank == 1


def test_bm25_and_hybrid(tmp_path):
    update_index(tmp_path / "idx", corpus(), SeededVectors(), kind="flat", chunking=ONE_CHUNK)
    retriever = Retriever(RagIndex.open(tmp_path / "idx"), SeededVectors())
    hits = retriever.search("which one has uniq17?", k=3, mode="bm25")
    assert hits[0].chunk.doc_id == "doc17.txt"
    assert retriever.search("zzzz qqqq", k=3, mode="bm25") == []  # no shared word: nothing, not noise
    hybrid = retriever.search("uniq17", k=5, mode="hybrid")
    assert hybrid[0].chunk.doc_id == "doc17.txt"  # first in BM25 outweighs a random dense rank
    assert [h.rank for h in hybrid] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(hybrid, hybrid[1:]))


def test_reciprocal_rank_fusion_by_hand():
    fused = dict(reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=60))
    assert fused == pytest.approx({1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61})
    assert [item for item, _ in reciprocal_rank_fusion([[1, 2, 3], [3, 1]])] == [1, 3, 2]


def test_search_within_some_documents(tmp_path):
    update_index(tmp_path / "idx", corpus(), SeededVectors(), kind="flat", chunking=ONE_CHUNK)
    retriever = Retriever(RagIndex.open(tmp_path / "idx"), SeededVectors())
    for mode in ("dense", "bm25", "hybrid"):
        hits = retriever.search("uniq17 eeex fffx", k=10, mode=mode, within=["doc3.txt", "doc4.txt"])
        assert {h.chunk.doc_id for h in hits} <= {"doc3.txt", "doc4.txt"} and hits, mode


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_incremental_update_embeds_only_what_changed(tmp_path, kind):
    path = tmp_path / "idx"
    update_index(path, corpus(60), SeededVectors(), kind=kind, chunking=ONE_CHUNK)
    before = RagIndex.open(path)
    ids_before = {c.doc_id: int(i) for c, i in zip(before.chunks, before.ids)}

    vectors = SeededVectors()
    docs = corpus(61, changed=5)  # doc5 edited, doc60 new
    del docs[9]  # doc9 removed
    report = update_index(path, docs, vectors, kind=kind, chunking=ONE_CHUNK)
    assert (report.documents_added, report.documents_changed, report.documents_removed,
            report.documents_kept) == (1, 1, 1, 58)
    assert sorted(vectors.encoded) == sorted(d.text for d in docs if d.key in ("doc5.txt", "doc60.txt"))
    assert (report.chunks_added, report.chunks_removed, report.chunks) == (2, 2, 60)
    assert bool(report.rebuilt) == (kind == "hnsw")  # HNSW cannot delete: rebuilt from stored vectors

    after = RagIndex.open(path, load_vectors=True)
    assert after.dense.ntotal == 60 and "doc9.txt" not in {c.doc_id for c in after.chunks}
    kept = {c.doc_id: int(i) for c, i in zip(after.chunks, after.ids)}
    assert all(kept[d] == ids_before[d] for d in kept if d not in ("doc5.txt", "doc60.txt"))  # ids stable
    assert kept["doc5.txt"] != ids_before["doc5.txt"]
    hits = Retriever(after, vectors, nprobe=64).search(docs[5].text, k=1, mode="dense")
    assert hits[0].chunk.text.endswith("Now with an edit.") and hits[0].score == pytest.approx(1.0, abs=1e-5)

    again = update_index(path, docs, SeededVectors(), kind=kind, chunking=ONE_CHUNK)
    assert not again.written and again.documents_kept == 60  # nothing changed: nothing rewritten


def test_changed_chunking_rechunks_everything(tmp_path):
    path = tmp_path / "idx"
    update_index(path, corpus(10), SeededVectors(), chunking=ONE_CHUNK)
    report = update_index(path, corpus(10), SeededVectors(), chunking=ChunkConfig("tokens", 8, 2))
    assert report.documents_changed == 10 and report.chunks > 10


def test_kind_change_rebuilds_without_embedding(tmp_path):
    path = tmp_path / "idx"
    update_index(path, corpus(), SeededVectors(), kind="flat", chunking=ONE_CHUNK)
    vectors = SeededVectors()
    report = update_index(path, corpus(), vectors, kind="hnsw", chunking=ONE_CHUNK)
    assert report.written and report.kind == "hnsw" and vectors.encoded == []
    assert any("kind changed" in reason for reason in report.rebuilt)


def test_hnsw_recall_against_flat():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(3000, dtype=np.int64)
    queries = vectors[:100] + 0.3 * rng.standard_normal((100, 32)).astype(np.float32)
    flat = build_dense("flat", vectors, ids, {})
    hnsw = build_dense("hnsw", vectors, ids, {"M": 32, "ef_construction": 200, "ef_search": 128})
    _, exact = flat.search(queries, 10)
    _, approx = hnsw.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.95


def test_another_embedder_is_refused(tmp_path):
    path = tmp_path / "idx"
    update_index(path, corpus(5), SeededVectors("model-a"), chunking=ONE_CHUNK)
    with pytest.raises(EmbedderMismatch, match="model-a"):
        update_index(path, corpus(5), SeededVectors("model-b"), chunking=ONE_CHUNK)
    with pytest.raises(EmbedderMismatch, match="model-a"):
        Retriever(RagIndex.open(path), SeededVectors("model-b"))
    with pytest.raises(EmbedderMismatch, match="none"):
        update_index(path, corpus(5), None, chunking=ONE_CHUNK)


def test_bm25_only_index(tmp_path):
    path = tmp_path / "idx"
    report = update_index(path, corpus(), None, chunking=ONE_CHUNK)
    assert report.written and not (path / "dense.faiss").exists()
    retriever = Retriever(RagIndex.open(path))
    assert retriever.search("uniq4", k=1, mode="bm25")[0].chunk.doc_id == "doc4.txt"
    with pytest.raises(RagIndexError, match="--mode bm25"):
        retriever.search("uniq4", mode="dense")


def test_a_crash_while_writing_leaves_the_old_index(tmp_path, monkeypatch):
    import lmforge.rag.index as index_module

    path = tmp_path / "idx"
    update_index(path, corpus(10), SeededVectors(), chunking=ONE_CHUNK)
    before = {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "_write_bm25", crash)
    with pytest.raises(OSError, match="disk full"):
        update_index(path, corpus(12), SeededVectors(), chunking=ONE_CHUNK)
    assert {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp folder left behind


def test_folder_format_has_no_pickle(tmp_path):
    path = tmp_path / "idx"
    update_index(path, corpus(10), SeededVectors(), chunking=ONE_CHUNK)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["embedder"] == {"name": "seeded-16", "dim": 16}
    assert manifest["chunking"] == {"mode": "structure", "max_tokens": 64, "overlap": 8}
    assert len(manifest["documents"]) == 10 and manifest["kind"] == "flat"
    for npy in (path / "bm25").glob("*.npy"):
        np.load(npy, allow_pickle=False)
    from safetensors.numpy import load_file

    assert load_file(str(path / "vectors.safetensors"))["vectors"].shape == (10, 16)
    assert len((path / "chunks.jsonl").read_text().splitlines()) == 10


def test_damaged_or_missing_index_is_named(tmp_path):
    with pytest.raises(RagIndexError, match="not a RAG index"):
        RagIndex.open(tmp_path)
    path = tmp_path / "idx"
    update_index(path, corpus(5), SeededVectors(), chunking=ONE_CHUNK)
    (path / "dense.faiss").write_bytes(b"garbage")
    with pytest.raises(RagIndexError, match="damaged"):
        RagIndex.open(path)


def test_no_documents_is_an_error(tmp_path):
    with pytest.raises(RagIndexError, match="no documents"):
        update_index(tmp_path / "idx", [], SeededVectors())
    with pytest.raises(RagIndexError, match="named 'a'"):
        update_index(tmp_path / "idx", [SourceDocument("a", "a", "x y", "text")] * 2, SeededVectors())
