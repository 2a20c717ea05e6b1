"""`encode_chat` (SFT's ids and assistant mask): the served ids, and a cost linear in the turns."""

from __future__ import annotations

from lmforge.tokenizer.chat import ChatTemplate


def _conversation(turns: int) -> list[dict]:
    messages = []
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}: say <|im_end|> twice"},
                     {"role": "assistant", "content": f"answer {i}"}]
    return messages


def test_training_ids_are_the_served_ids(smollm2):
    tok = smollm2.tokenizer
    messages = _conversation(3)
    ids, mask = tok.encode_chat(messages)
    assert ids == tok.encode_chat_prompt(messages, add_generation_prompt=False)
    labelled = tok.decode([i for i, m in zip(ids, mask) if m])
    assert labelled == "".join(f"answer {i}<|im_end|>" for i in range(3))
    end = tok.special_tokens["<|im_end|>"]
    assert sum(i == end for i in ids) == 1 + 2 * 3  # the system turn's and each turn's own, no injected one


def test_masks_take_a_few_renders_whatever_the_length(smollm2, monkeypatch):
    renders = 0
    original = ChatTemplate._render

    def counting(self, *args, **kwargs):
        nonlocal renders
        renders += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChatTemplate, "_render", counting)
    for turns in (5, 50):
        renders = 0
        smollm2.tokenizer.encode_chat(_conversation(turns))
        assert renders <= 5, (turns, renders)  # not one render per prefix
