"""The `lmforge` command as a user runs it: output contracts and clear errors."""

import json

import pytest

from lmforge.cli import main


def test_generate_prints_only_the_completion(smollm2_gguf, capsys):
    code = main(["generate", "--model", str(smollm2_gguf), "--prompt", "The capital of France is",
                 "--max-new-tokens", "6", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Paris" in out and "capital of France" not in out


def test_generate_json(smollm2_gguf, capsys):
    main(["generate", "--model", str(smollm2_gguf), "--prompt", "Hello", "--max-new-tokens", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["completion_tokens"] <= 3 and result["prompt_tokens"] >= 1


def test_chat_reads_turns_from_stdin(smollm2_gguf, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/reset\n/exit\n"))
    assert main(["chat", "--model", str(smollm2_gguf), "--temperature", "0", "--max-new-tokens", "24"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "conversation cleared" in captured.err


def test_info_on_gguf_and_preset(smollm2_gguf, capsys):
    assert main(["info", str(smollm2_gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 30 and info["context_length"] == 8192
    assert "134,515,008" in info["parameters"]
    assert main(["info", "--preset", "gpt2"]) == 0
    assert "124,439,808" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--model", "/no/such/model", "--prompt", "x"], "neither an existing path"),
        (["generate", "--model", "smollm2", "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["generate", "--model", "smollm2", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["info", "--preset", "gpt5"], "unknown model preset"),
    ],
)
def test_user_errors_are_one_clear_line(argv, message, capsys, smollm2_gguf):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_data_samples_lists_documents_conversations_and_models(handbook, python_docs, warcs, smollm2_gguf,
                                                               capsys):
    assert main(["data", "samples", "--json", "-q"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    kinds = {name: row["kind"] for name, row in rows.items()}
    documents = {"debian-handbook", "python-docs", "pywb-warcs", "web"}
    assert {n for n, k in kinds.items() if k == "documents"} == documents
    assert {n for n, k in kinds.items() if k == "conversations"} == {"chitchat", "squad", "hotpotqa",
                                                                     "identity", "mtbench"}
    assert kinds["smollm2-135m-instruct"] == "model"
    assert rows["debian-handbook"]["files"] > 3000 and 2 < rows["web"]["mb"] < 15
    assert rows["identity"]["files"] == 500 and rows["mtbench"]["files"] == 30
    assert main(["data", "samples", "-q"]) == 0
    assert "pywb-warcs" in capsys.readouterr().out
