"""`lmforge.rag.embed` against sentence-transformers on ~50 real, varied texts (HotpotQA paragraphs,
some past the 256-token limit, handbook paragraphs in several languages, short queries): the same
vectors, whatever the batching; and clear errors for what it cannot encode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.hub import SampleError
from lmforge.rag.embed import MINILM_NAME, Embedder, EmbedError, load_embedder

sentence_transformers = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def embedder(minilm) -> Embedder:
    return load_embedder("minilm")


@pytest.fixture(scope="module")
def texts(handbook) -> list[str]:
    from lmforge.eval.qa import qa_path
    from lmforge.eval.translation import page_paragraphs

    try:
        data = json.loads(qa_path("hotpotqa", quiet=True).read_text(encoding="utf-8"))
    except SampleError as err:
        pytest.skip(f"HotpotQA sample unavailable: {err}")
    paragraphs = list(dict.fromkeys("".join(s) for item in data for _, s in item["context"]))
    long = [p for p in paragraphs[:3000] if len(p) > 1800][:4]  # past 256 tokens: cut
    questions = [item["question"] for item in data[:8]]
    foreign = [para for language in ("de-DE", "fr-FR", "ja-JP", "zh-CN", "ru-RU", "ar-MA")
               for para in page_paragraphs(sorted((handbook / language).glob("*.html"))[3])[2:5]]
    return paragraphs[:20] + long + questions + foreign + ["", "[CLS]", "🙂"]


@pytest.fixture(scope="module")
def reference(minilm, texts) -> np.ndarray:
    model = sentence_transformers.SentenceTransformer(str(minilm), device="cpu")
    return model.encode(texts, batch_size=16)


@pytest.fixture(scope="module")
def vectors(embedder, texts) -> np.ndarray:
    return embedder.encode(texts, batch_size=64)


def test_vectors_equal_sentence_transformers(embedder, texts, vectors, reference):
    assert len(texts) >= 50
    assert sum(len(ids) == embedder.max_tokens for ids in embedder.token_ids(texts)) >= 4  # cut at 256
    assert vectors.shape == (len(texts), 384) and vectors.dtype == np.float32
    cosine = (vectors * reference).sum(axis=1)
    assert cosine.min() >= 0.9999, f"text {cosine.argmin()}: cosine {cosine.min():.6f}"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batching_changes_nothing(embedder, texts, vectors):
    picked = [0, 1, 2, 20, 21, 30, 40, 47, len(texts) - 3, len(texts) - 1]  # short, long, foreign, empty
    subset = [texts[i] for i in picked]
    one_at_a_time = np.concatenate([embedder.encode([t]) for t in subset])
    np.testing.assert_allclose(one_at_a_time, vectors[picked], atol=2e-6)
    np.testing.assert_allclose(embedder.encode(subset, batch_size=3), vectors[picked], atol=2e-6)


def test_long_text_is_cut_at_max_tokens(embedder, texts):
    long = max(texts, key=len)
    ids = embedder.token_ids([long])[0]
    head = embedder.tokenizer.decode(ids)  # the words the model saw
    assert len(ids) == embedder.max_tokens == 256
    cut, longer, decoded = embedder.encode([long, long + " and more words at the end", head])
    assert float(cut @ longer) > 0.99999 and float(cut @ decoded) > 0.999


def test_names_and_properties(embedder, minilm):
    assert (embedder.name, embedder.dim, embedder.max_tokens) == (MINILM_NAME, 384, 256)
    assert load_embedder(MINILM_NAME).name == MINILM_NAME  # the name an index records loads again
    assert load_embedder(minilm).name == str(minilm.resolve())  # a local sentence-transformers folder
    assert embedder.encode([]).shape == (0, 384)


def test_progress_on_stderr(embedder, texts, capsys):
    embedder.encode(texts[24:29], batch_size=2, progress=True)  # five questions
    err = capsys.readouterr().err
    assert "embedding 5 texts: 5/5" in err


def test_bad_input_is_one_clear_error(embedder, tmp_path):
    with pytest.raises(EmbedError, match="not one string"):
        embedder.encode("a text")
    with pytest.raises(EmbedError, match="text 1 is a int"):
        embedder.encode(["fine", 3])
    with pytest.raises(EmbedError, match="batch_size"):
        embedder.encode(["fine"], batch_size=0)
    with pytest.raises(EmbedError, match="not a sentence-transformers folder"):
        load_embedder(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a known sample"):
        load_embedder(tmp_path / "missing")
