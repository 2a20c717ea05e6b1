"""A retrieval index on disk: chunks, their vectors in FAISS, BM25 over their words, a manifest.

**The folder** (every file written to a temp folder that then replaces the old one whole,
`lmforge.atomic.atomic_folder`, so a crash leaves the previous index intact):

- ``manifest.json``: the embedding model's name and dimension, the FAISS kind and its
  parameters, the chunking, BM25's settings, and each document's content hash;
- ``chunks.jsonl``: one chunk a line (its id, text, source, offsets, heading path);
- ``vectors.safetensors``: the chunks' unit vectors and ids, row for row: the source of
  truth the FAISS index is (re)built from without embedding anything again;
- ``dense.faiss``: the FAISS index (``faiss.write_index``'s own format; no pickle);
- ``bm25/``: bm25s's sparse score matrix (``.npy`` saved with ``allow_pickle=False``)
  and vocabulary (JSON).

**Dense kinds.** Vectors are L2-normalised, so inner product is cosine similarity.
``flat`` compares the query with every vector: exact, and fast enough up to tens of
thousands of chunks. ``hnsw`` walks a navigable small-world graph (Malkov & Yashunin):
about log(n) hops instead of n comparisons, for a little recall and M*8 bytes a vector
of graph. ``ivf`` clusters the vectors with k-means into `nlist` lists and scans only
the `nprobe` lists nearest the query: less memory than HNSW for corpora of millions.
``auto`` picks flat below 50,000 chunks, HNSW below 2,000,000, IVF above.

**Incremental updates.** A document whose text (and the chunking) hashes as before keeps
its chunks and vectors; new and changed ones are chunked and embedded; chunks of
documents no longer given are deleted. Flat and IVF indexes delete by id
(``IndexIDMap2.remove_ids``) and add the new vectors; an HNSW graph cannot delete a node,
so any deletion rebuilds it from the stored vectors (no re-embedding), and so does an IVF
index whose corpus has outgrown its clusters four times over. BM25 is rebuilt from the
chunk texts whenever anything changed: its IDF weights depend on the whole corpus, so
one added document changes every document's scores anyway (and it takes seconds).

**BM25** (bm25s, Lucene's variant, k1 = 1.5, b = 0.75): lowercased words of two or more
letters or digits, English stop words removed, no stemming; queries are tokenized alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.atomic import atomic_folder
from lmforge.rag.chunk import Chunk, ChunkConfig, CountTokens, TokenCounter, chunk_text
from lmforge.rag.sources import SourceDocument

if TYPE_CHECKING:
    from lmforge.rag.embed import Embedder

FORMAT = "lmforge-rag-index"
VERSION = 1
KINDS = ("auto", "flat", "hnsw", "ivf")
FLAT_BELOW = 50_000
HNSW_BELOW = 2_000_000
HNSW = {"M": 32, "ef_construction": 200, "ef_search": 64}  # recall@10 0.998 of flat on 10K MiniLM vectors
BM25_SETTINGS = {"method": "lucene", "k1": 1.5, "b": 0.75, "stopwords": "en", "lower": True,
                 "token_pattern": r"(?u)\b\w\w+\b"}
_WORDS = r"\w+|[^\w\s]"


class RagIndexError(ValueError):
    """An index folder that is missing, damaged, or built in a way this call cannot use."""


class EmbedderMismatch(RagIndexError):
    """The index's vectors come from another embedding model than the one in use."""


@dataclass
class IndexReport:
    """What one `update_index` call did."""

    path: str
    documents_added: int = 0
    documents_changed: int = 0
    documents_removed: int = 0
    documents_kept: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    chunks: int = 0
    kind: str = ""
    rebuilt: list[str] = field(default_factory=list)  # what was rebuilt from scratch, and why
    written: bool = False
    seconds: float = 0.0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # inputs that could not be read, by reason

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def choose_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise RagIndexError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n < FLAT_BELOW else "hnsw" if n < HNSW_BELOW else "ivf"


def ivf_lists(n: int) -> int:
    """FAISS's rule of thumb: about 4*sqrt(n) lists, and at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def document_hash(doc: SourceDocument, chunking: ChunkConfig) -> str:
    """What decides whether a document must be chunked and embedded again."""
    payload = json.dumps([doc.text, doc.markup, doc.title, asdict(chunking)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def embedder_tokens(embedder: Embedder) -> CountTokens:
    """The embedder's own token count of a text, without its [CLS] and [SEP]."""
    return lambda text: len(embedder.token_ids([text])[0]) - 2


def word_count(text: str) -> int:
    """Tokens when no embedder counts them: words and punctuation marks (WordPiece's pre-tokens)."""
    import regex

    return len(regex.findall(_WORDS, text))


# ============================================================================ the index on disk
class RagIndex:
    """An index folder loaded for searching (and for updating by `update_index`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], chunks: list[Chunk], ids: np.ndarray,
                 vectors: np.ndarray | None, dense: Any, bm25: Any) -> None:
        self.path, self.manifest, self.chunks, self.ids = path, manifest, chunks, ids
        self.vectors, self.dense, self.bm25 = vectors, dense, bm25
        self.row_of = {int(i): row for row, i in enumerate(ids)}

    @property
    def embedder_name(self) -> str | None:
        embedder = self.manifest.get("embedder")
        return embedder["name"] if embedder else None

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def check_embedder(self, name: str | None) -> None:
        """Refuse to mix vectors of two models: their spaces are unrelated."""
        if name is not None and self.embedder_name is not None and name != self.embedder_name:
            raise EmbedderMismatch(f"{self.path} was built with embedder {self.embedder_name!r}, not "
                                   f"{name!r}: its vectors cannot be compared with {name!r}'s "
                                   f"(use --embedder {self.embedder_name}, or index into a new folder)")

    @classmethod
    def open(cls, path: str | Path, *, load_vectors: bool = False) -> RagIndex:
        import faiss

        path = Path(path)
        manifest = read_manifest(path)
        try:
            chunks, ids = _read_chunks(path / "chunks.jsonl")
            vectors = _read_vectors(path, ids) if manifest.get("embedder") and load_vectors else None
            dense = faiss.read_index(str(path / "dense.faiss")) if manifest.get("embedder") else None
            bm25 = _load_bm25(path / "bm25") if chunks else None
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            if isinstance(err, RagIndexError):
                raise
            raise RagIndexError(f"{path}: damaged index ({type(err).__name__}: {err}); rebuild it with "
                                f"`lmforge rag index`") from err
        if dense is not None and dense.ntotal != len(chunks):
            raise RagIndexError(f"{path}: dense.faiss holds {dense.ntotal} vectors for {len(chunks)} chunks "
                                f"(damaged index)")
        return cls(path, manifest, chunks, ids, vectors, dense, bm25)

    def stored_vectors(self, rows: Sequence[int]) -> np.ndarray:
        """The embedder's vectors of these rows as they were indexed (read on first use), so that a
        retrieved chunk's similarity to the query costs a dot product, not another encoder pass."""
        if self.manifest.get("embedder") is None:
            raise RagIndexError(f"{self.path} has no dense vectors (built with --embedder none)")
        if self.vectors is None:
            try:
                self.vectors = _read_vectors(self.path, self.ids)
            except (OSError, KeyError, ValueError) as err:
                if isinstance(err, RagIndexError):
                    raise
                raise RagIndexError(f"{self.path}: damaged index ({type(err).__name__}: {err}); rebuild it "
                                    f"with `lmforge rag index`") from err
        return self.vectors[np.asarray(rows, dtype=np.int64)]

    def rows_of_documents(self, keys: Iterable[str]) -> np.ndarray:
        wanted = set(keys)
        rows = [row for row, chunk in enumerate(self.chunks) if chunk.doc_id in wanted]
        return np.array(rows, dtype=np.int64)

    # ------------------------------------------------------------------ raw searches
    def dense_search(self, queries: np.ndarray, k: int, *, rows: np.ndarray | None = None,
                     ef_search: int | None = None,
                     nprobe: int | None = None) -> list[list[tuple[int, float]]]:
        """Top-k (row, inner product) per query vector, optionally among `rows` only."""
        import faiss

        if self.dense is None:
            raise RagIndexError(f"{self.path} has no dense vectors (built with --embedder none): "
                                f"search it with --mode bm25")
        k = min(k, len(self.chunks))
        if k <= 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        selector = faiss.IDSelectorBatch(self.ids[rows]) if rows is not None else None
        params = self._search_params(selector, ef_search, nprobe)
        scores, found = self.dense.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return [[(self.row_of[int(i)], float(s)) for i, s in zip(ids, row) if i >= 0]
                for ids, row in zip(found, scores)]

    def _search_params(self, selector: Any, ef_search: int | None, nprobe: int | None) -> Any:
        import faiss

        settings = self.manifest.get("faiss", {})
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef_search or settings["ef_search"])
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe or settings["nprobe"])
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def bm25_search(self, queries: Sequence[str], k: int, *,
                    rows: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
        """Top-k (row, BM25 score) per query; documents sharing no word with the query are not returned."""
        import bm25s

        if self.bm25 is None or not queries:
            return [[] for _ in queries]
        k = min(k, len(self.chunks))
        tokens = bm25s.tokenize(list(queries), lower=BM25_SETTINGS["lower"],
                                token_pattern=BM25_SETTINGS["token_pattern"],
                                stopwords=BM25_SETTINGS["stopwords"], return_ids=False, show_progress=False)
        mask = None
        if rows is not None:
            mask = np.zeros(len(self.chunks), dtype=np.float32)
            mask[rows] = 1.0
        results = []
        for query in tokens:  # one at a time: bm25s fails a whole batch on a query with no known word
            if not query:
                results.append([])
                continue
            found, scores = self.bm25.retrieve([query], k=k, show_progress=False, weight_mask=mask)
            results.append([(int(r), float(s)) for r, s in zip(found[0], scores[0]) if s > 0])
        return results


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / "manifest.json"
    if not file.is_file():
        raise RagIndexError(f"{path} is not a RAG index (no manifest.json); build one with "
                            f"`lmforge rag index DOCS... -o {path}`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RagIndexError(f"{file}: not JSON ({err}); the index is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RagIndexError(f"{file} is not an lmforge RAG index manifest")
    if manifest.get("version") != VERSION:
        raise RagIndexError(f"{path}: index format version {manifest.get('version')}, this lmforge reads "
                            f"{VERSION}; rebuild it with `lmforge rag index`")
    return manifest


def _read_vectors(path: Path, ids: np.ndarray) -> np.ndarray:
    from safetensors.numpy import load_file

    stored = load_file(str(path / "vectors.safetensors"))
    if not np.array_equal(stored["ids"], ids):
        raise RagIndexError(f"{path}: vectors.safetensors and chunks.jsonl disagree (damaged index)")
    return stored["vectors"]


def _read_chunks(file: Path) -> tuple[list[Chunk], np.ndarray]:
    chunks, ids = [], []
    with open(file, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            ids.append(row.pop("id"))
            row["headings"] = tuple(row["headings"])
            chunks.append(Chunk(**row))
    return chunks, np.array(ids, dtype=np.int64)


def _load_bm25(folder: Path) -> Any:
    import bm25s

    return bm25s.BM25.load(str(folder), load_corpus=False, show_progress=False, allow_pickle=False)


# ============================================================================ building and updating
def update_index(path: str | Path, documents: Iterable[SourceDocument], embedder: Embedder | None, *,
                 kind: str = "auto", chunking: ChunkConfig | None = None,
                 count_tokens: CountTokens | None = None, progress: bool = False,
                 skipped: dict[str, int] | None = None) -> IndexReport:
    """Make the index at `path` hold exactly `documents`, embedding only what is new or changed.

    `embedder` None builds a BM25-only index. Raises `EmbedderMismatch` when the folder
    holds an index of another embedding model.
    """
    started = time.perf_counter()
    path = Path(path)
    chunking = chunking or ChunkConfig()
    old = RagIndex.open(path, load_vectors=True) if (path / "manifest.json").exists() else None
    name = embedder.name if embedder is not None else None
    if old is not None:
        if (old.embedder_name is None) != (name is None):
            raise EmbedderMismatch(f"{path} was built with embedder {old.embedder_name or 'none'!r}, not "
                                   f"{name or 'none'!r}: index into a new folder")
        old.check_embedder(name)
    if count_tokens is None:
        count_tokens = embedder_tokens(embedder) if embedder is not None else word_count
    counter = TokenCounter(count_tokens)
    report = IndexReport(str(path), skipped=dict(skipped or {}))

    plan = _plan(old, documents, chunking, counter, report)
    new_chunks = [c for chunks in plan.new.values() for c in chunks]
    new_vectors = None
    if embedder is not None and new_chunks:
        new_vectors = np.asarray(embedder.encode([c.indexed_text for c in new_chunks], progress=progress),
                                 dtype=np.float32)
    report.chunks_added = len(new_chunks)
    report.chunks_removed = len(plan.dropped_rows)
    changed = bool(old is None or report.documents_added or report.documents_changed or plan.removed_keys)
    kind_now = choose_kind(kind, len(plan.kept_rows) + len(new_chunks)) if embedder is not None else "none"
    if old is not None and kind == "auto" and old.kind != kind_now and not changed:
        kind_now = old.kind
    report.kind = kind_now
    if not changed and old is not None and kind_now == old.kind:
        report.chunks = len(old.chunks)
        report.bytes = _folder_bytes(path)
        report.seconds = time.perf_counter() - started
        return report

    chunks, ids, vectors = _assemble(old, plan, new_chunks, new_vectors)
    if not chunks:
        raise RagIndexError("the documents hold no text to index")
    manifest = _manifest(old, embedder, kind_now, chunking, plan.hashes, ids, vectors)
    with atomic_folder(path) as tmp:
        _write_chunks(tmp / "chunks.jsonl", chunks, ids)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False),
                                           encoding="utf-8")
        if vectors is not None:
            from safetensors.numpy import save_file

            save_file({"ids": ids, "vectors": vectors}, str(tmp / "vectors.safetensors"))
            _write_dense(tmp / "dense.faiss", old, plan, manifest, ids, vectors, new_chunks, report)
        if chunks:
            if old is not None and old.bm25 is not None and not new_chunks and not plan.dropped_rows:
                shutil.copytree(path / "bm25", tmp / "bm25")
            else:
                _write_bm25(tmp / "bm25", [c.indexed_text for c in chunks])
    report.written = True
    report.chunks = len(chunks)
    report.bytes = _folder_bytes(path)
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _Plan:
    hashes: dict[str, str] = field(default_factory=dict)  # every document's hash, in input order
    new: dict[str, list[Chunk]] = field(default_factory=dict)  # chunks to embed, per document
    kept_rows: list[int] = field(default_factory=list)  # rows of the old index that stay
    dropped_rows: list[int] = field(default_factory=list)
    removed_keys: list[str] = field(default_factory=list)


def _plan(old: RagIndex | None, documents: Iterable[SourceDocument], chunking: ChunkConfig,
          counter: TokenCounter, report: IndexReport) -> _Plan:
    """Which documents are new, changed, kept or gone, and the chunks of the new and changed ones."""
    plan = _Plan()
    old_hashes: dict[str, str] = old.manifest["documents"] if old is not None else {}
    for doc in documents:
        if doc.key in plan.hashes:
            raise RagIndexError(f"two documents are both named {doc.key!r} (duplicate ids in the input?)")
        digest = plan.hashes[doc.key] = document_hash(doc, chunking)
        if old_hashes.get(doc.key) == digest:
            report.documents_kept += 1
            continue
        if doc.key in old_hashes:
            report.documents_changed += 1
        else:
            report.documents_added += 1
        plan.new[doc.key] = chunk_text(doc.text, counter, chunking, source=doc.source, doc_id=doc.key,
                                       markup=doc.markup, title=doc.title)
    if not plan.hashes:
        raise RagIndexError("no documents to index (every input was empty or unreadable)")
    plan.removed_keys = [key for key in old_hashes if key not in plan.hashes]
    report.documents_removed = len(plan.removed_keys)
    if old is not None:
        for row, chunk in enumerate(old.chunks):
            (plan.kept_rows if plan.hashes.get(chunk.doc_id) == old_hashes.get(chunk.doc_id)
             else plan.dropped_rows).append(row)
    return plan


def _assemble(old: RagIndex | None, plan: _Plan, new_chunks: list[Chunk],
              new_vectors: np.ndarray | None) -> tuple[list[Chunk], np.ndarray, np.ndarray | None]:
    """The new index's rows: the kept old chunks (ids and vectors unchanged), then the new ones."""
    next_id = old.manifest["next_id"] if old is not None else 0
    kept = plan.kept_rows
    chunks = ([old.chunks[r] for r in kept] if old is not None else []) + new_chunks
    ids = np.concatenate([old.ids[kept] if old is not None else np.zeros(0, np.int64),
                          np.arange(next_id, next_id + len(new_chunks), dtype=np.int64)])
    vectors = None
    if new_vectors is not None or (old is not None and old.vectors is not None):
        parts = [old.vectors[kept]] if old is not None and old.vectors is not None else []
        if new_vectors is not None:
            parts.append(new_vectors)
        vectors = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    return chunks, ids, vectors


def _manifest(old: RagIndex | None, embedder: Embedder | None, kind: str, chunking: ChunkConfig,
              hashes: dict[str, str], ids: np.ndarray, vectors: np.ndarray | None) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    settings: dict[str, Any] = {}
    if kind == "hnsw":
        settings = dict(HNSW)
    elif kind == "ivf":
        reuse = old is not None and old.kind == "ivf" and len(ids) <= 4 * old.manifest["faiss"]["trained_on"]
        settings = dict(old.manifest["faiss"]) if reuse else \
            {"nlist": ivf_lists(len(ids)), "trained_on": len(ids)}
        settings["nprobe"] = min(settings["nlist"], max(8, settings["nlist"] // 16))
    next_id = int(ids.max()) + 1 if len(ids) else (old.manifest["next_id"] if old is not None else 0)
    return {"format": FORMAT, "version": VERSION,
            "embedder": {"name": embedder.name, "dim": int(vectors.shape[1]) if vectors is not None
                         else embedder.dim} if embedder is not None else None,
            "kind": kind, "faiss": settings, "chunking": asdict(chunking), "bm25": BM25_SETTINGS,
            "chunks": len(ids), "next_id": next_id,
            "created": old.manifest["created"] if old is not None else now, "updated": now,
            "documents": hashes}


def _write_chunks(file: Path, chunks: list[Chunk], ids: np.ndarray) -> None:
    with open(file, "w", encoding="utf-8") as out:
        for i, chunk in zip(ids, chunks):
            out.write(json.dumps({"id": int(i), **asdict(chunk)}, ensure_ascii=False) + "\n")


def _write_dense(file: Path, old: RagIndex | None, plan: _Plan, manifest: dict[str, Any], ids: np.ndarray,
                 vectors: np.ndarray, new_chunks: list[Chunk], report: IndexReport) -> None:
    """Update the old FAISS index in place where the kind allows it; else build it from the vectors."""
    import faiss

    kind, settings = manifest["kind"], manifest["faiss"]
    reason = None
    if old is None or old.dense is None:
        reason = "new index"
    elif old.kind != kind:
        reason = f"kind changed from {old.kind} to {kind}"
    elif kind == "hnsw" and plan.dropped_rows:
        reason = "an HNSW graph cannot delete vectors: rebuilt from the stored vectors"
    elif kind == "ivf" and settings["trained_on"] != old.manifest["faiss"].get("trained_on"):
        reason = "the corpus outgrew the IVF clusters (4x their training set): retrained"
    if reason is None:
        index = old.dense
        if plan.dropped_rows:
            index.remove_ids(old.ids[plan.dropped_rows])
        if new_chunks:
            index.add_with_ids(vectors[-len(new_chunks):], ids[-len(new_chunks):])
    else:
        if old is not None:
            report.rebuilt.append(f"dense ({reason})")
        index = build_dense(kind, vectors, ids, settings)
    faiss.write_index(index, str(file))


def build_dense(kind: str, vectors: np.ndarray, ids: np.ndarray, settings: dict[str, Any]) -> Any:
    """A FAISS index of `kind` over unit `vectors` (inner product = cosine), addressed by `ids`."""
    import faiss

    dim = vectors.shape[1]
    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, settings["M"], faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = settings["ef_construction"]
        base.hnsw.efSearch = settings.get("ef_search", base.hnsw.efSearch)
    elif kind == "ivf":
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, settings["nlist"], faiss.METRIC_INNER_PRODUCT)
        base.train(vectors)
    else:
        raise RagIndexError(f"unknown index kind {kind!r}")
    index = faiss.IndexIDMap2(base)
    if len(ids):
        index.add_with_ids(vectors, ids)
    return index


def _write_bm25(folder: Path, texts: list[str]) -> None:
    import bm25s

    tokens = bm25s.tokenize(texts, lower=BM25_SETTINGS["lower"], token_pattern=BM25_SETTINGS["token_pattern"],
                            stopwords=BM25_SETTINGS["stopwords"], show_progress=False)
    retriever = bm25s.BM25(method=BM25_SETTINGS["method"], k1=BM25_SETTINGS["k1"], b=BM25_SETTINGS["b"])
    retriever.index(tokens, show_progress=False)
    retriever.save(str(folder), allow_pickle=False, show_progress=False)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

