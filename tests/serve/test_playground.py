"""The playground page in a real headless Chromium, against a real server over two tiny models.

Playwright drives Debian's /usr/bin/chromium (never a browser downloaded by `playwright
install`). Without the browser or the package the tests skip, saying which is missing;
with the environment variable CI set they fail instead, because CI installs both.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import httpx
import pytest

from lmforge.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SYSTEM = "You are terse."
TIMEOUT_MS = 15_000


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the browser test must run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own localStorage); any script error on it fails the test."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


@pytest.fixture
def two_models(engine_factory):
    return {"tiny-a": engine_factory(seed=0), "tiny-b": engine_factory(seed=1)}


# ---------------------------------------------------------------------- helpers
def open_playground(page, url: str, *, models: int = 2) -> None:
    page.goto(url + "/")
    page.wait_for_function("n => document.querySelectorAll('#model-a option').length === n", arg=models)


def set_sampling(page, *, temperature: float = 0, max_tokens: int = 12, system: str = SYSTEM) -> None:
    page.fill("#temperature-value", str(temperature))
    page.fill("#max-tokens-value", str(max_tokens))
    page.fill("#system-prompt", system)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_until_idle(page) -> None:
    page.wait_for_selector("#send:not([disabled])")
    page.wait_for_function("() => !document.querySelector('.msg.streaming')")


def replies(page, pane: str = "a") -> list[str]:
    return page.locator(f".pane-{pane} .msg.assistant .msg-body").all_inner_texts()


def reply_tokens(page, pane: str = "a") -> list[dict]:
    """The logprob entries behind the token chips of the inspected reply, as the page holds them."""
    return page.eval_on_selector_all(
        f".inspect.pane-{pane} .reply-tok",
        "chips => chips.map(c => ({token: c.tokenEntry.token, p: Number(c.dataset.p)}))")


def api_chat(url: str, model: str, messages: list[dict], max_tokens: int = 12, **extra) -> httpx.Response:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens,
            "logprobs": True, "top_logprobs": 5, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


# ---------------------------------------------------------------------- tests
def test_a_reply_streams_in_with_its_tokens_probabilities_and_timings(page, serve, two_models, tmp_path):
    with serve(create_app(two_models)) as (url, _server):
        open_playground(page, url)
        assert page.inner_text("#server-status") == "2 models · connected"
        set_sampling(page)
        page.fill("#prompt", "Where is Paris?")  # the draft's token count comes from /tokenize
        draft = httpx.post(f"{url}/tokenize", json={"model": "tiny-a", "prompt": "Where is Paris?"}).json()
        page.wait_for_function("n => document.querySelector('#draft-count').textContent === n + ' tokens'",
                               arg=draft["count"])
        page.press("#prompt", "Enter")
        wait_until_idle(page)

        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is Paris?"}]
        expected = api_chat(url, "tiny-a", messages).json()
        [text] = replies(page)
        assert text == expected["choices"][0]["message"]["content"]
        pieces = page.eval_on_selector(".pane-a .msg.assistant .msg-body", "b => b.childNodes.length")
        assert pieces > 1, "the reply arrived in one piece, not streamed"

        # The reply's tokens: the server's logprobs, one chip each, coloured by probability.
        want = expected["choices"][0]["logprobs"]["content"]
        got = reply_tokens(page)
        assert [t["token"] for t in got] == [w["token"] for w in want]
        assert all(math.isclose(t["p"], math.exp(w["logprob"]), abs_tol=1e-4) for t, w in zip(got, want))
        usage = expected["usage"]
        assert page.inner_text(".inspect.pane-a .stat-completion dd") == str(usage["completion_tokens"])
        assert page.inner_text(".inspect.pane-a .stat-finish dd") == expected["choices"][0]["finish_reason"]
        assert page.inner_text(".inspect.pane-a .stat-ttft dd").endswith(("ms", " s"))
        rate = page.inner_text(".inspect.pane-a .stat-rate dd")  # "–" if every token came in one read
        assert rate == "–" or float(rate) > 0

        # The prompt's tokens and ids: exactly what /tokenize says the model reads.
        tokenized = httpx.post(f"{url}/tokenize", json={"model": "tiny-a", "messages": messages}).json()
        ids = page.locator(".inspect.pane-a .prompt-tok .tok-id").all_inner_texts()
        assert [int(i) for i in ids] == tokenized["tokens"]
        assert f"Prompt: {tokenized['count']} tokens" in page.inner_text(".inspect.pane-a .prompt-heading")
        assert page.inner_text(".inspect.pane-a .reply-heading") == f"Reply: {len(want)} tokens"

        # Hovering a token shows its probability and the top alternatives; a click pins it, Escape closes.
        first = page.locator(".inspect.pane-a .reply-tok").first
        first.hover()
        popover = page.locator("#token-popover")
        popover.wait_for(state="visible")
        rows = popover.locator("table.alternatives tr")
        assert rows.count() == len(want[0]["top_logprobs"]) == 5
        assert "chosen" in rows.first.get_attribute("class")  # greedy: the chosen token is the likeliest
        first.click()
        page.mouse.move(5, 5)
        assert popover.is_visible() and "pinned" in first.get_attribute("class")
        page.screenshot(path=str(tmp_path / "playground.png"))
        page.keyboard.press("Escape")
        popover.wait_for(state="hidden")
        assert (tmp_path / "playground.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # Switch the model: the next turn goes to tiny-b, with the conversation so far.
        page.select_option("#model-a", "tiny-b")
        send(page, "And Berlin?")
        wait_until_idle(page)
        history = [*messages, {"role": "assistant", "content": text},
                   {"role": "user", "content": "And Berlin?"}]
        second = api_chat(url, "tiny-b", history).json()["choices"][0]["message"]["content"]
        assert replies(page) == [text, second]
        assert page.locator(".pane-a .msg.assistant .msg-role").all_inner_texts() == ["tiny-a", "tiny-b"]
        assert page.inner_text(".inspect.pane-a .inspect-model") == "tiny-b"

        page.click("#reset")
        assert page.locator(".pane-a .msg").count() == 0


def test_compare_mode_streams_two_models_at_once(page, serve, two_models, tmp_path):
    with serve(create_app(two_models)) as (url, _server):
        open_playground(page, url)
        set_sampling(page)
        page.click("#mode-compare")
        assert page.locator(".pane.pane-b").is_visible() and page.input_value("#model-b") == "tiny-b"
        # Each chat request is held at the browser until both are out: a page that waited for
        # one reply before asking for the other would never send the second (timing-free).
        held = []
        page.route("**/v1/chat/completions", lambda route: held.append(route))
        send(page, "Hello both")
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while len(held) < 2 and time.monotonic() < deadline:
            page.wait_for_timeout(50)
        assert len(held) == 2, f"not two streams at once: {len(held)} chat request(s) sent"
        for route in held:
            route.continue_()
        wait_until_idle(page)

        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello both"}]
        for pane, model in (("a", "tiny-a"), ("b", "tiny-b")):
            expected = api_chat(url, model, messages).json()["choices"][0]
            assert replies(page, pane) == [expected["message"]["content"]]
            assert [t["token"] for t in reply_tokens(page, pane)] == [e["token"] for e in
                                                                       expected["logprobs"]["content"]]
            assert page.inner_text(f".inspect.pane-{pane} .inspect-model") == model
        assert replies(page, "a") != replies(page, "b")  # two different models really answered
        page.screenshot(path=str(tmp_path / "compare.png"))


def test_stop_aborts_the_stream_and_the_server_cancels_the_generation(page, serve, engine_factory):
    engine = engine_factory(seed=0, max_seq_len=256)
    step = engine.step
    steps = []

    def paced_step():  # a step as slow as a larger model's: time to press Stop mid-reply
        time.sleep(0.03)
        steps.append(1)
        return step()

    engine.step = paced_step
    with serve(create_app({"tiny": engine})) as (url, _server):
        open_playground(page, url, models=1)
        set_sampling(page, temperature=0, max_tokens=200)  # greedy: this model does not end its turn early
        send(page, "Tell me a long story")
        page.wait_for_function("() => document.querySelectorAll('.inspect.pane-a .reply-tok').length >= 10")
        assert page.is_enabled("#stop") and page.is_disabled("#send")
        page.click("#stop")
        wait_until_idle(page)

        assert "stopped" in page.get_attribute(".pane-a .msg.assistant", "class")
        assert page.inner_text(".inspect.pane-a .stat-finish dd") == "stopped"
        shown = len(reply_tokens(page))
        assert 10 <= shown < 200
        rate = float(page.inner_text(".inspect.pane-a .stat-rate dd"))
        assert 0 < rate < 1.5 / 0.03  # about one token per 30 ms step, never many more
        deadline = time.monotonic() + 5
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.has_unfinished(), "the server kept generating after Stop"
        assert len(steps) < 150  # it stopped long before max_tokens

        # The partial reply stays in the conversation, and the next turn works.
        set_sampling(page, temperature=0, max_tokens=4)
        send(page, "Go on")
        wait_until_idle(page)
        assert len(replies(page)) == 2
        assert "stopped" not in page.get_attribute(".pane-a .msg.assistant >> nth=1", "class")


def test_server_errors_are_shown_in_its_own_words(page, serve, two_models):
    with serve(create_app(two_models)) as (url, _server):
        open_playground(page, url)
        set_sampling(page, max_tokens=8)
        too_long = "The dog sleeps in the sun. " * 30  # more than the 128-token context on its own
        send(page, too_long)
        wait_until_idle(page)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": too_long.strip()}]
        answer = api_chat(url, "tiny-a", messages, max_tokens=8)
        assert answer.status_code == 400 and "maximum context length is 128" in answer.text
        error = page.locator(".pane-a .msg.assistant .msg-error")
        assert error.is_visible() and error.inner_text() == answer.json()["error"]["message"]

        # The failed turn is left out of the next one's history.
        send(page, "Hi")
        wait_until_idle(page)
        messages[1]["content"] = "Hi"
        expected = api_chat(url, "tiny-a", messages, max_tokens=8).json()["choices"][0]["message"]["content"]
        assert replies(page)[-1] == expected


def test_model_text_is_never_markup(page, serve, two_models):
    with serve(create_app(two_models)) as (url, _server):
        open_playground(page, url)
        set_sampling(page, max_tokens=4, system="<b>bold</b>")
        payload = '<img src=x onerror="window.__pwned = 1">'
        send(page, payload)
        wait_until_idle(page)
        assert page.inner_text(".pane-a .msg.user .msg-body") == payload
        assert page.locator(".pane-a img, .inspector img, .inspector b").count() == 0
        assert page.evaluate("() => window.__pwned === undefined")


def test_api_key_is_asked_for_and_kept(page, serve, two_models):
    with serve(create_app(two_models, api_key="sesame")) as (url, _server):
        page.goto(url + "/")
        page.wait_for_selector("#server-status.bad")
        assert page.inner_text("#server-status") == "API key needed"
        assert "missing API key" in page.inner_text("#banner")
        page.fill("#api-key", "sesame")
        page.wait_for_function("() => document.querySelectorAll('#model-a option').length === 2")
        assert page.is_hidden("#banner")
        assert page.evaluate("() => localStorage.getItem('lmforge.playground.apiKey')") == "sesame"
        set_sampling(page, max_tokens=4)
        send(page, "Hi")
        wait_until_idle(page)
        assert len(replies(page)) == 1 and page.locator(".msg-error:visible").count() == 0


STREAM_READER = """async () => {
    const { serverSentEvents } = await import("/web/api.js");
    const bytes = new TextEncoder().encode('data: {"a":"caf\\u00e9 \\ud83d\\ude42"}\\r\\n\\r\\n'
        + ': a comment\\n\\ndata: line 1\\ndata: line 2\\n\\ndata: [DONE]\\n\\n');
    // Cut inside "é" (bytes 15-16), inside the emoji (18-21), between a CR and its LF (24, 25).
    const cuts = [3, 16, 19, 21, 25, 26, 40, bytes.length];
    let start = 0;
    const stream = new ReadableStream({
        pull(controller) {
            const end = cuts.shift();
            if (end === undefined) return controller.close();
            controller.enqueue(bytes.slice(start, end));
            start = end;
        },
    });
    const events = [];
    for await (const data of serverSentEvents(stream)) events.push(data);
    return events;
}"""

TOKEN_LABELS = """async () => {
    const { visibleText, percent } = await import("/web/tokens.js");
    return [visibleText(" the\\n"), visibleText("\\ufffd", [32, 67, 97, 102, 195]), visibleText("", []),
            percent(0.8314), percent(0.00031), percent(1e-9)];
}"""


def test_the_stream_reader_and_token_labels_handle_awkward_input(page, serve, two_models):
    """Events split anywhere (inside a UTF-8 character, between CR and LF), comments,
    multi-line data; and how token text and probabilities are labelled."""
    with serve(create_app(two_models)) as (url, _server):
        open_playground(page, url)
        assert page.evaluate(STREAM_READER) == ['{"a":"café 🙂"}', "line 1\nline 2", "[DONE]"]
        assert page.evaluate(TOKEN_LABELS) == ["·the↵", "·Caf<0xC3>", "∅", "83.1%", "0.031%", "<0.001%"]


def test_max_tokens_is_cut_to_the_room_the_prompt_leaves(page, serve, engine_factory):
    """Issue 12, item 3: the playground asked for 256 new tokens from a model whose context is
    256 tokens, and the server refused. The page now shows the context, keeps its control
    below it, and asks each turn for at most what the prompt leaves."""
    with serve(create_app({"tiny": engine_factory(seed=0, max_seq_len=128)})) as (url, _server):
        open_playground(page, url, models=1)
        assert "context is 128 tokens" in page.inner_text("#context-limit")
        assert page.get_attribute("#max-tokens-value", "max") == "127"
        set_sampling(page, temperature=0, max_tokens=500)
        page.dispatch_event("#max-tokens-value", "change")
        assert page.input_value("#max-tokens-value") == "127"  # typed past the limit: back to it
        send(page, "Hello")
        wait_until_idle(page)
        assert not page.locator(".pane-a .msg.assistant .msg-error").is_visible()
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
        prompt_tokens = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["count"]
        room = 128 - prompt_tokens
        status = page.inner_text(".pane-a .msg.assistant .msg-status")
        assert f"at most {room}" in status, status
        reply = api_chat(url, "tiny", messages, max_tokens=room, ignore_eos=False)
        assert reply.status_code == 200
        assert replies(page)[-1] == reply.json()["choices"][0]["message"]["content"]
        # An API client that insists on more than fits is told so (as by OpenAI and vLLM).
        refused = api_chat(url, "tiny", messages, max_tokens=room + 1)
        assert refused.status_code == 400 and "maximum context length is 128" in refused.text


def test_answering_from_documents_shows_the_retrieved_passages_under_the_reply(
        page, serve, engine_factory, minilm_embedder, rag_retriever):
    app = create_app({"tiny": engine_factory(seed=0, max_seq_len=1024)},
                     embedders={"minilm": minilm_embedder},
                     retrievers={"handbook": rag_retriever})
    with serve(app) as (url, _server):
        open_playground(page, url, models=1)  # the embedding model is not offered for chat
        assert page.locator("#retrieval-section").is_visible()
        page.select_option("#rag-index", "handbook")
        set_sampling(page, max_tokens=6)
        send(page, "How do I install a Debian package?")
        wait_until_idle(page)
        expected = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": "How do I install a Debian package?"}],
            "retrieval": {"index": "handbook"}, "max_tokens": 6, "temperature": 0}).json()
        shown = page.locator(".pane-a .msg.assistant .source-where").all_inner_texts()
        assert shown and shown[0].startswith("[1] ") and "apt.md" in shown[0]
        assert len(shown) == len(expected["sources"])
        assert replies(page) == [expected["choices"][0]["message"]["content"]]

        send(page, "Who painted the Mona Lisa?")  # nothing relevant: said so, and the model was not asked
        wait_until_idle(page)
        assert replies(page)[-1] == "I don't know."
        summaries = page.locator(".pane-a .msg.assistant .msg-sources summary")
        assert "nothing relevant" in summaries.last.inner_text()
