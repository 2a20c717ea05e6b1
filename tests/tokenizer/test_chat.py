"""Chat templates render as in transformers; `encode_chat` masks exactly the assistant replies."""

from __future__ import annotations

import pytest

from lmforge.tokenizer import TokenizerError
from lmforge.tokenizer.chat import CHATML_TEMPLATE, ChatTemplate

CONVERSATIONS = {
    "one-question": [{"role": "user", "content": "What is 2+2?"}],
    "with-system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, in words, with a digit: 11?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi there! Can you count to 3?"},
        {"role": "assistant", "content": "Sure: 1, 2, 3."},
        {"role": "user", "content": "Thanks. Now in French, s'il te plaît."},
        {"role": "assistant", "content": "Un, deux, trois. Ça va? 🙂\n\nAnything else?"},
    ],
}


@pytest.fixture(scope="module")
def hf_chat(smollm2_hf_folder):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_folder))


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_renders_like_transformers(smollm2_tok, hf_chat, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_chat.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert smollm2_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    ids = hf_chat.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert smollm2_tok.encode(expected) == list(ids)


@pytest.mark.parametrize("name", ["with-system", "multi-turn"])
def test_mask_covers_exactly_the_assistant_replies(smollm2_tok, name):
    messages = CONVERSATIONS[name]
    ids, mask = smollm2_tok.encode_chat(messages)
    assert ids == smollm2_tok.encode(
        smollm2_tok.apply_chat_template(messages, add_generation_prompt=False), add_bos=False
    )
    assert len(mask) == len(ids)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    # The masked tokens, run by run, are each reply followed by its end-of-turn token.
    runs, current = [], []
    for token_id, masked in zip(ids, mask):
        if masked:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [smollm2_tok.decode(run) for run in runs] == [reply + "<|im_end|>" for reply in replies]
    assert sum(mask) == sum(len(smollm2_tok.encode(r)) + 1 for r in replies)


def test_generation_prompt_is_not_masked(smollm2_tok):
    ids, mask = smollm2_tok.encode_chat(CONVERSATIONS["with-system"], add_generation_prompt=True)
    assert smollm2_tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert not any(mask[-3:])


def test_chatml_is_the_default(gpt2):
    assert gpt2.chat_template is None
    messages = CONVERSATIONS["multi-turn"]
    text = gpt2.apply_chat_template(messages)
    assert text == ChatTemplate(CHATML_TEMPLATE).render(messages)
    assert text.startswith("<|im_start|>user\nHi there!") and text.endswith("<|im_start|>assistant\n")
    ids, mask = gpt2.encode_chat(messages)
    # GPT-2 has no <|im_end|> token, so nothing marks the end of a turn: the whole turn is masked.
    masked = gpt2.decode([i for i, m in zip(ids, mask) if m])
    assert masked == "Sure: 1, 2, 3.<|im_end|>\n" + messages[3]["content"] + "<|im_end|>\n"


def test_generation_tag_marks_replies_like_transformers(smollm2_tok):
    from transformers.utils import chat_template_utils as chat_utils

    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
        "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    )
    messages = CONVERSATIONS["multi-turn"]
    rendered, indices = chat_utils.render_jinja_template(
        conversations=[messages], chat_template=template, return_assistant_tokens_mask=True
    )
    text, spans = ChatTemplate(template).assistant_spans(messages)
    assert text == rendered[0]
    assert spans == [tuple(span) for span in indices[0]]
    tok = smollm2_tok.with_chat_template(template)
    ids, mask = tok.encode_chat(messages)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(
        m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"
    )


def test_templates_that_rewrite_history_fall_back_to_finding_the_reply(smollm2_tok):
    # Earlier assistant turns are shortened, as reasoning models' templates do with their thoughts.
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('.')[0] }}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = smollm2_tok.with_chat_template(template)
    messages = CONVERSATIONS["multi-turn"]
    ids, mask = tok.encode_chat(messages)
    assert (
        tok.decode([i for i, m in zip(ids, mask) if m])
        == "Sure: 1, 2, 3<|im_end|>" + messages[3]["content"] + "<|im_end|>"
    )


def test_template_helpers_and_sandbox():
    template = ChatTemplate(
        "{{ messages[0].content | tojson }} {{ bos_token }} {{ strftime_now('%Y') | length }}",
        {"bos_token": "<s>"},
    )
    assert template.render([{"role": "user", "content": "café"}]) == '"café" <s> 4'
    with pytest.raises(TokenizerError, match="no system role"):
        ChatTemplate("{{ raise_exception('no system role') }}").render([])
    with pytest.raises(TokenizerError):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(TokenizerError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(TokenizerError):
        ChatTemplate("{% for m in messages %}{{ messages.append(m) }}{% endfor %}").render([{"role": "u"}])


# A template from a model file is untrusted code. Each of these once ran until memory or patience
# ran out, or printed a traceback: each is now one line saying which limit it hit or what is refused.
HOSTILE = [
    # (id, template, a fragment of the error)
    ("repeat-ten-billion", "{{ 'a' * 10000000000 }}", "10,000,000,000 characters, over the limit"),
    ("repeat-just-over", "{{ 'ab' * 5000000 }}", "10,000,000 characters, over the limit of 8,388,608"),
    ("repeat-list", "{{ [[1, 2]] * 3000 * 3000 }}", "over the limit"),
    ("nested-loops", "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
     "the time limit"),
    ("exponential-macro", "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
     "{{ f(60) }}", "the time limit"),
    ("long-output", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "the rendered text"),
    ("doubling-concat", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", "a ~ b"),
    ("doubling-plus", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}", "a + b"),
    ("doubling-replace", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
     "{% set ns.s = ns.s.replace('a', 'aa') %}{% endfor %}", "str.replace()"),
    ("doubling-list", "{% set ns = namespace(l=[0]) %}{% for i in range(80) %}{% set ns.l = [ns.l, ns.l] %}"
     "{% endfor %}{{ ns.l == ns.l }}", "a literal"),
    ("captured-text", "{% set b = 'x' * 1000000 %}{% set t %}{% for i in range(100000) %}{{ b }}{% endfor %}"
     "{% endset %}", "wrote more than"),
    ("huge-power", "{{ 2 ** 100000000 }}", "bits, over the limit"),
    ("ljust", "{{ 'a'.ljust(10000000000) }}", "str.ljust()"),
    ("format-width", "{{ '{:>9999999999}'.format(1) }}", "str.format()"),
    ("percent-width", "{{ '%9999999999d' % 1 }}", "% formatting"),
    ("center-filter", "{{ 'a' | center(10000000000) }}", "center filter"),
    ("join-filter", "{{ range(100000) | join('x' * 1000000) }}", "join would be"),
    ("indent-filter", "{{ ('\n' * 1000000) | indent('x' * 1000) }}", "indent would be"),
    ("tojson-indent", "{% set l = [[[[[[[[[[1]]]]]]]]]] * 100 %}{{ l | tojson(indent=100000) }}", "tojson"),
    ("sum-of-lists", "{{ ([[1]] * 100000) | sum(start=[]) }}", "sum() of anything but numbers"),
    ("expandtabs", "{{ ('\t' * 1000000).expandtabs(1000000) }}", "str.expandtabs()"),
    ("range-huge", "{{ range(10 ** 20) }}", "range() of more than 100,000 numbers is not allowed"),
    ("range-big", "{{ range(1000000) | list | length }}", "range() of more than 100,000"),
    ("include", "{% include 'other.jinja' %}", "{% include %} is not allowed"),
    ("import", "{% import 'macros.jinja' as m %}", "{% import %} is not allowed"),
    ("from-import", "{% from 'macros.jinja' import m %}", "{% from ... import %} is not allowed"),
    ("extends", "{% extends 'base.jinja' %}", "{% extends %} is not allowed"),
    ("mutation", "{{ [].append(1) }}", "'append' of 'list' object is unsafe: not allowed in the sandbox"),
    ("recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("float-overflow", "{{ 2.0 ** 10000 }}", "OverflowError"),
    ("lipsum", "{{ lipsum(1000000000) }}", "'lipsum' is undefined"),
]


@pytest.mark.parametrize(("source", "fragment"), [case[1:] for case in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_templates_stop_with_one_line(source, fragment):
    import time

    started = time.monotonic()
    with pytest.raises(TokenizerError) as caught:  # loading other templates is refused as it compiles
        ChatTemplate(source, timeout=0.5).render([{"role": "user", "content": "hi"}])
    message = str(caught.value)
    assert fragment in message and message.startswith("chat template") and "\n" not in message, message
    assert time.monotonic() - started < 5  # the time limit is 0.5 s; everything else is refused up front


def test_limits_leave_ordinary_templates_alone(smollm2_tok):
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 200}
            for i in range(300)]
    rendered = smollm2_tok.apply_chat_template(long)
    assert len(rendered) > 500_000 and rendered.count("<|im_start|>") == 302
    template = ChatTemplate("{{ messages | tojson(indent=2) }}{{ 'ab' * 4000000 }}", max_chars=8_500_000)
    assert len(template.render(long[:2])) > 8_000_000  # just under the limits: fine
    with pytest.raises(TokenizerError, match="over the limit of 1,000"):
        ChatTemplate("{{ messages[0].content }}", max_chars=1000).render(long[:1])
