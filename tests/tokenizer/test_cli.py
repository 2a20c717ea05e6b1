"""`lmforge tokenizer ...` as a user runs it: train on real text, then encode, decode, show
and compare through the command line, and one clear line for each kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.tokenizer import load_tokenizer

LICENSES = Path("/usr/share/common-licenses")
TRAIN_FILES = [LICENSES / "GPL-3", LICENSES / "Apache-2.0"]
HELD_OUT = LICENSES / "GPL-2"  # not trained on: compression and round trips on unseen text
MIXED = "Héllo wörld, naïve café 🙂 — 東京\n\tindented <|im_start|>user\nhi<|im_end|>\n"

pytestmark = pytest.mark.skipif(
    not all(p.is_file() for p in [*TRAIN_FILES, HELD_OUT]), reason="needs Debian's /usr/share/common-licenses"
)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["tokenizer", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A 400-id tokenizer trained through the CLI on two licences, and its JSON summary."""
    folder = tmp_path_factory.mktemp("tok") / "licenses-400"
    out = io.StringIO()  # module-scoped fixtures cannot use capsys
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["tokenizer", "train", "--input", *map(str, TRAIN_FILES), "--vocab-size", "400",
                     "--output", str(folder), "--json"])
    assert code == 0
    return folder, json.loads(out.getvalue())


def test_train_writes_a_loadable_tokenizer(trained):
    folder, summary = trained
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    assert summary["vocab_size"] == 400 and summary["merges"] == 400 - 256 - 3
    assert summary["special_tokens"] == {"<|endoftext|>": 397, "<|im_start|>": 398, "<|im_end|>": 399}
    assert 1.5 < summary["bytes_per_token"] < 4
    tok = load_tokenizer(folder)
    assert tok.vocab_size == 400 and tok.backend.startswith("tiktoken")
    # ChatML is saved with it, so a chat turn's markers are single special tokens.
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    assert ids[0] == 398 and ids.count(399) == 1


def test_train_summary_table(tmp_path, capsys):
    code, out, _ = run(capsys, "train", "--input", str(TRAIN_FILES[1]),
                       "--vocab-size", "300", "--output", str(tmp_path / "t"), "--quiet")
    assert code == 0
    assert "300 ids = 256 bytes + 41 merges + 3 special" in out and "bytes/token" in out


def test_trained_tokenizer_matches_hf_tokenizers(trained):
    import tokenizers

    folder, _ = trained
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = HELD_OUT.read_text()[:20_000] + MIXED
    assert hf.encode(text).ids == load_tokenizer(folder).encode(text)


def test_encode_decode_round_trip(trained, capsys, monkeypatch):
    folder = str(trained[0])
    code, out, _ = run(capsys, "encode", "--tokenizer", folder, "--text", MIXED)
    ids = json.loads(out)
    assert code == 0 and ids == load_tokenizer(folder).encode(MIXED)
    assert 398 in ids and 399 in ids  # special tokens matched in the text
    code, out, _ = run(capsys, "decode", "--tokenizer", folder, "--ids", json.dumps(ids))
    assert code == 0 and out == MIXED  # exact: no newline added off a terminal

    # A whole unseen file, the ids piped into `decode` on stdin.
    code, out, _ = run(capsys, "encode", "-t", folder, "--file", str(HELD_OUT))
    monkeypatch.setattr("sys.stdin", io.StringIO(out))
    code, text, _ = run(capsys, "decode", "-t", folder)
    assert code == 0 and text == HELD_OUT.read_text()


def test_encode_no_special_treats_markers_as_text(trained, capsys):
    code, out, _ = run(capsys, "encode", "-t", str(trained[0]), "--text", "<|im_end|>", "--no-special")
    assert code == 0 and 399 not in json.loads(out) and len(json.loads(out)) > 1


def test_show_pieces_reassemble_the_text(trained, capsys):
    folder = str(trained[0])
    code, out, _ = run(capsys, "show", "--tokenizer", folder, "--text", MIXED, "--no-color")
    assert code == 0
    body, summary = out.rstrip("\n").rsplit("\n", 1)
    pieces = re.findall(r"\[(.*?)\|(\d+(?:,\d+)*)\]", body, flags=re.DOTALL)
    assert "".join(text for text, _ in pieces) == MIXED
    ids = [int(i) for _, group in pieces for i in group.split(",")]
    assert ids == load_tokenizer(folder).encode(MIXED)
    assert "[🙂|" in body  # the emoji's byte tokens are shown together, as one character
    assert f"{len(ids)} tokens, {len(MIXED)} characters" in summary and "bytes/token" in summary


def test_show_colours_when_asked(trained, capsys):
    code, out, _ = run(capsys, "show", "-t", str(trained[0]), "--text", "colour me", "--color")
    assert code == 0 and "\x1b[48;5;" in out and "\x1b[0m" in out
    code, out, _ = run(capsys, "show", "-t", str(trained[0]), "--text", "colour me")  # not a TTY
    assert "\x1b[" not in out


def test_compare_prints_both(trained, capsys):
    folder = str(trained[0])
    code, out, _ = run(capsys, "compare", folder, folder, "--file", str(HELD_OUT))
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(folder)]
    assert len(rows) == 2 and rows[0].endswith("1.00x")
    code, out, _ = run(capsys, "compare", folder, "--file", str(HELD_OUT), "--json")
    (row,) = json.loads(out)
    assert row["vocab_size"] == 400 and row["bytes"] == len(HELD_OUT.read_bytes())
    assert row["bytes_per_token"] == pytest.approx(row["bytes"] / row["tokens"])


def test_gguf_and_sample_name(smollm2_gguf, trained, capsys):
    text = "The capital of France is Paris. 12345 tokens!"
    expected = load_tokenizer(smollm2_gguf).encode(text)
    for spec in (str(smollm2_gguf), "smollm2"):
        code, out, _ = run(capsys, "encode", "--tokenizer", spec, "--text", text)
        assert code == 0 and json.loads(out) == expected
    code, out, _ = run(capsys, "compare", "smollm2", str(trained[0]), "--text", HELD_OUT.read_text())
    smollm2_row = next(line for line in out.splitlines() if line.startswith("smollm2"))
    assert "49,152" in smollm2_row


@pytest.fixture
def bad_files(tmp_path) -> dict[str, str]:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    return {"empty": str(tmp_path / "empty.txt"), "binary": str(tmp_path / "binary.bin"),
            "dir": str(tmp_path)}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--input", "{empty}", "--vocab-size", "300"], "empty corpus"),
        (["train", "--input", str(TRAIN_FILES[0]), "--vocab-size", "100"], "at least 256 byte tokens + 3"),
        (["train", "--input", "{binary}", "--vocab-size", "300"], "not valid UTF-8 at byte offset 128"),
        (["train", "--input", "{dir}/missing.txt", "--vocab-size", "300"], "no such file"),
        (["encode", "-t", "{dir}/no-such-tokenizer", "--text", "x"], "neither an existing path nor"),
        (["encode", "-t", str(TRAIN_FILES[0]), "--text", "x"], "unknown tokenizer format"),
        (["encode", "-t", "{dir}", "--text", "x"], "no tokenizer.json"),
        (["encode", "-t", "TRAINED", "--file", "{binary}"], "not valid UTF-8"),
        (["decode", "-t", "TRAINED", "--ids", "[1, 'a']"], "JSON list of integers"),
        (["decode", "-t", "TRAINED", "--ids", "[1, 400]"], "not in the vocabulary"),
        (["compare", "TRAINED", "--file", "{empty}"], "empty"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, bad_files, trained, capsys):
    argv = [a.format(**bad_files) if "{" in a else a.replace("TRAINED", str(trained[0])) for a in argv]
    if argv[0] == "train":
        argv += ["--output", bad_files["dir"] + "/out", "--quiet"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lmforge tokenizer: error: ")


def test_train_reads_prepare_output_and_document_folders(tmp_path, capsys):
    """`tokenizer train` takes what `tokenize` takes: a folder of documents (JSONL, as prepare writes)."""
    import json as _json

    folder = tmp_path / "documents"
    folder.mkdir()
    rows = [{"id": str(i), "text": f"Document {i} talks about pelicans, harbours and the sea. " * 20}
            for i in range(30)]
    (folder / "part-00000.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    code, out, err = run(capsys, "train", "--input", str(folder), "--vocab-size", "300", "--output",
                         str(tmp_path / "tok"), "--json", "--quiet")
    assert code == 0, err
    summary = _json.loads(out)
    assert summary["vocab_size"] == 300 and summary["bytes_per_token"] > 1.5
