"""The MT-Bench pairwise judge: FastChat's prompts and verdict markers, the two orders combined, and
the whole loop against a real `lmforge serve` of a tiny model (its verdicts are noise: the plumbing
is what is tested)."""

from __future__ import annotations

import json

import httpx
import pytest
from tests.align.conftest import byte_tokenizer, tiny_llama
from tests.serve.conftest import live_server, make_engine

from lmforge.eval.judge import (
    ChatEndpoint,
    JudgeError,
    MTBench,
    combine,
    judge_messages,
    judge_pairs,
    load_judge_prompts,
    load_questions,
    parse_verdict,
    read_answers,
    verdict_metrics,
)
from lmforge.eval.lm import EvalModel
from lmforge.hub import SampleError
from lmforge.serve.app import create_app
from lmforge.tokenizer.train import train_bpe


@pytest.fixture(scope="module")
def questions():
    try:
        return load_questions()
    except SampleError as err:
        pytest.skip(f"MT-Bench sample unavailable: {err}")


def test_the_questions_and_prompts(questions):
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    assert sum(q.reference is not None for q in questions) == 30
    assert {q.category for q in questions if q.reference} == {"math", "reasoning", "coding"}
    prompts = load_judge_prompts()
    maths = next(q for q in questions if q.category == "math")
    writing = next(q for q in questions if q.category == "writing")
    mine, theirs = ("MINE-1", "MINE-2"), ("THEIRS-1", "THEIRS-2")
    system, user = judge_messages(prompts, maths, 2, mine, theirs)
    assert system["content"] == prompts["pair-math-v1-multi-turn"]["system_prompt"]
    assert maths.reference[1] in user["content"] and "MINE-2" in user["content"]
    assert user["content"].index("MINE-2") < user["content"].index("THEIRS-2")  # A first
    system, user = judge_messages(prompts, writing, 1, theirs, mine)
    assert system["content"] == prompts["pair-v2"]["system_prompt"]
    assert user["content"].index("THEIRS-1") < user["content"].index("MINE-1")
    assert "MINE-2" not in user["content"] and "{answer" not in user["content"]


@pytest.mark.parametrize("judgment, verdict", [
    ("A is more detailed. [[A]]", "A"),
    ("Final verdict: [[B]]", "B"),
    ("They are equally good. [[C]]", "tie"),
    ("At first [[A]] seemed better, but on reflection [[B]]", "B"),  # the last marker counts
    ("Assistant A is better.", "error"),
    ("[A]", "error"),
])
def test_verdicts(judgment, verdict):
    assert parse_verdict(judgment) == verdict


def test_the_two_orders_combine_as_fastchat_counts():
    # (verdict with the model as A, verdict with the model as B) -> the model's outcome
    table = {("A", "B"): "win", ("B", "A"): "loss", ("tie", "tie"): "tie",
             ("A", "A"): "tie",  # the judge always picks the first answer: position bias, not preference
             ("B", "B"): "tie", ("A", "tie"): "tie", ("tie", "B"): "tie", ("error", "B"): "error"}
    for (first, second), outcome in table.items():
        assert combine(first, second) == outcome
    records = [{"model_as_a": a, "model_as_b": b, "outcome": combine(a, b)} for a, b in table]
    metrics = verdict_metrics(records)
    assert (metrics["wins"], metrics["ties"], metrics["losses"], metrics["errors"]) == (1, 5, 1, 1)
    assert metrics["win_rate"] == pytest.approx(1 / 7)
    assert metrics["win_rate_adjusted"] == pytest.approx(3.5 / 7)
    assert metrics["consistency"] == pytest.approx(3 / 7)  # (A,B), (B,A), (tie,tie) agree


def test_answers_files_and_missing_judges_are_clear_errors(tmp_path):
    good = tmp_path / "answers.jsonl"
    good.write_text(json.dumps({"question_id": 81, "choices": [{"turns": ["one", "two"]}]}) + "\n")
    assert read_answers(good) == {81: ("one", "two")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"question_id": 82, "choices": [{"turns": ["one"]}]}) + "\n")
    with pytest.raises(JudgeError, match=r"bad.jsonl:2: .*two answer turns"):
        read_answers(bad)
    with pytest.raises(JudgeError, match="LMFORGE_JUDGE_URL"):
        MTBench(environ={}).judge()
    with pytest.raises(JudgeError, match="cannot be reached"):
        ChatEndpoint("http://127.0.0.1:9/v1", "judge", timeout=2, retries=0).chat([{"role": "user",
                                                                                 "content": "hi"}])


def _endpoint(answer, **options) -> ChatEndpoint:
    client = httpx.Client(base_url="http://judge/v1", transport=httpx.MockTransport(answer))
    return ChatEndpoint("http://judge/v1", "judge", client=client, **options)


def test_busy_or_timed_out_requests_are_asked_again_before_the_run_is_given_up(monkeypatch):
    monkeypatch.setattr("lmforge.eval.judge.time.sleep", lambda seconds: None)
    replies = iter([httpx.ReadTimeout("slow"), httpx.Response(503), httpx.Response(429),
                    httpx.Response(200, json={"choices": [{"message": {"content": "[[A]]"}}]})])
    calls = []

    def answer(request):
        calls.append(request)
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    hello = [{"role": "user", "content": "hi"}]
    assert _endpoint(answer).chat(hello) == "[[A]]" and len(calls) == 4
    with pytest.raises(JudgeError, match="answered 503"):
        _endpoint(lambda r: httpx.Response(503), retries=1).chat(hello)
    with pytest.raises(JudgeError, match="answered 400"):  # a bad request is not asked again
        _endpoint(lambda r: httpx.Response(400)).chat(hello)
    with pytest.raises(JudgeError, match="judge_timeout"):
        MTBench(judge_timeout=0)


@pytest.fixture(scope="module")
def served():
    """A tiny random model behind a real `lmforge serve` app; yields (base URL, model id)."""
    corpus = [f"[[A]] [[B]] [[C]] Assistant A Assistant B better worse tie answer {i}" for i in range(30)]
    tokenizer = train_bpe(corpus, 256 + 60, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                          min_frequency=2, workers=1).to_tokenizer()
    app = create_app({"tiny-judge": make_engine(tokenizer, max_seq_len=8192)}, web_dir=None)
    with live_server(app) as (url, _server):
        yield f"{url}/v1", "tiny-judge"


def test_judging_through_a_served_model(served, questions):
    url, name = served
    sent = []
    client = httpx.Client(base_url=url, timeout=120, event_hooks={"request": [sent.append]})
    judge = ChatEndpoint(url, client=client)
    assert judge.model == name  # the first model the endpoint lists
    chosen = questions[:2]
    mine = {q.id: (f"mine {q.id} one", f"mine {q.id} two") for q in chosen}
    theirs = {q.id: (f"theirs {q.id} one", f"theirs {q.id} two") for q in chosen}
    records = judge_pairs(judge, chosen, mine, theirs, turns=(1, 2), max_tokens=12, parallel=2)
    assert [(r["question_id"], r["turn"]) for r in records] == [(q.id, t) for q in chosen for t in (1, 2)]
    bodies = [json.loads(r.content) for r in sent if r.url.path.endswith("/chat/completions")]
    assert len(bodies) == 8  # two orders per (question, turn)
    for body in bodies:
        assert body["model"] == name and body["temperature"] == 0.0 and body["max_tokens"] == 12
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    for record in records:
        assert record["model_as_a"] == parse_verdict(record["judgment_model_as_a"])
        assert record["model_as_b"] == parse_verdict(record["judgment_model_as_b"])
        assert record["outcome"] == combine(record["model_as_a"], record["model_as_b"])
    # each pair of requests shows the model's answer first, then second
    by_prompt = {}
    for body in bodies:
        user = body["messages"][1]["content"]
        by_prompt[user] = user.index("mine") < user.index("theirs")
    assert sorted(by_prompt.values()) == [False] * 4 + [True] * 4


def test_the_task_with_the_served_model_as_judge_and_baseline(served):
    url, name = served
    model = EvalModel(tiny_llama(seed=6), byte_tokenizer(), stop_ids=[258])
    task = MTBench(environ={"LMFORGE_JUDGE_URL": url}, max_gen_toks=6, judge_max_tokens=6)
    result = task.run(model, limit=1, seed=0)
    assert result.info["judge"] == name and result.info["baseline"] == name
    assert len(result.records) == 2 and result.metrics["comparisons"] + result.metrics["errors"] == 2
    assert set(result.records[0]["answer"]) and len(result.records[0]["baseline_answer"]) == 2
