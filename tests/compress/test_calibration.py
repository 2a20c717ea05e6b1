"""Calibration windows from text files, folders and token shards; clear errors for what cannot work."""

import numpy as np
import pytest
from tests.align.conftest import byte_tokenizer

from lmforge.compress.calibration import (
    CalibrationError,
    calibration_windows,
    heldout_windows,
    token_stream,
)


def test_text_files_and_folders_become_one_stream_with_eos_between_documents(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.rst").write_text("abc")
    (tmp_path / "docs" / "skip.png").write_bytes(b"\x89PNG")
    (tmp_path / "b.txt").write_text("de")
    tokens = token_stream(byte_tokenizer(), [tmp_path / "docs", tmp_path / "b.txt"])
    assert tokens.tolist() == [97, 98, 99, 256, 100, 101, 256]


def test_windows_are_drawn_reproducibly_and_held_out_windows_are_consecutive():
    tokens = np.arange(1000)
    a, b = calibration_windows(tokens, 6, 50, seed=3), calibration_windows(tokens, 6, 50, seed=3)
    assert a.shape == (6, 50) and (a == b).all()
    assert not (calibration_windows(tokens, 6, 50, seed=4) == a).all()
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # each window is a contiguous run of the stream
    held = heldout_windows(tokens, 300, limit=2)
    assert held.tolist()[1][:2] == [300, 301] and held.shape == (2, 300)


def test_token_shard_folders_are_read_as_they_are(tmp_path):
    from lmforge.data.document import Document
    from lmforge.data.shards import TokenizeConfig, tokenize_documents

    docs = [Document(id=f"d{i}", text="hello world " * 20) for i in range(3)]
    tokenize_documents(docs, byte_tokenizer(), tmp_path / "shards", TokenizeConfig(val_fraction=0.0))
    tokens = token_stream(byte_tokenizer(), [tmp_path / "shards"])
    assert len(tokens) == 3 * (240 + 1) and tokens[:5].tolist() == list(b"hello")


def test_what_cannot_calibrate_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationError, match="no such file"):
        token_stream(byte_tokenizer(), [tmp_path / "missing"])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CalibrationError, match="not UTF-8"):
        token_stream(byte_tokenizer(), [tmp_path / "bin.txt"])
    with pytest.raises(CalibrationError, match="fewer than one window of 512"):
        calibration_windows(np.arange(100), 4, 512)
