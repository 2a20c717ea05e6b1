"""The first generation path, on the real SmolLM2 and against transformers' generate."""

import pytest
import torch

from lmforge.infer.generate import GenerationError, GenerationStats, generate
from lmforge.infer.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


def _complete(loaded, prompt: str, n: int, params=GREEDY) -> tuple[list[int], str]:
    events = list(generate(loaded.model, loaded.tokenizer.encode(prompt), max_new_tokens=n, params=params,
                           stop_ids=loaded.stop_ids(), token_bytes=loaded.tokenizer.token_bytes))
    return [e.token_id for e in events], "".join(e.text for e in events)


def test_smollm2_knows_the_capital_of_france(smollm2):
    _, text = _complete(smollm2, "The capital of France is", 8)
    assert "Paris" in text


def test_greedy_tokens_equal_transformers_generate(smollm2, hf_smollm2):
    reference = hf_smollm2
    prompt = "Machine learning is"
    ids = smollm2.tokenizer.encode(prompt)
    expected = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ours, _ = _complete(smollm2, prompt, 24)
    assert ours == expected[: len(ours)] and len(ours) > 0


def test_chat_template_reply_stops_at_end_of_turn(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True)
    stats = GenerationStats()
    events = list(generate(smollm2.model, tok.encode(prompt), max_new_tokens=64, params=GREEDY,
                           stop_ids=smollm2.stop_ids(), token_bytes=tok.token_bytes, stats=stats))
    assert events[-1].finish_reason == "stop"
    assert stats.completion_tokens == len(events)
    assert "<|im_end|>" not in "".join(e.text for e in events)


def test_seeded_sampling_is_reproducible(smollm2):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    first = _complete(smollm2, "Once upon a time", 10, params)
    assert first == _complete(smollm2, "Once upon a time", 10, params)


def test_streaming_text_is_valid_utf8_split_across_tokens(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("naïve café 東京 🙂")
    events_text = []
    from codecs import getincrementaldecoder

    decoder = getincrementaldecoder("utf-8")(errors="replace")
    for i in ids:
        events_text.append(decoder.decode(tok.token_bytes(i)))
    assert "".join(events_text) == "naïve café 東京 🙂"


def test_bad_requests_are_clear_errors(smollm2):
    model = smollm2.model
    with pytest.raises(GenerationError, match="empty"):
        list(generate(model, [], max_new_tokens=1, params=GREEDY))
    with pytest.raises(GenerationError, match="context is 8192"):
        list(generate(model, [1] * 8192, max_new_tokens=1, params=GREEDY))
    with pytest.raises(GenerationError, match="max_new_tokens"):
        list(generate(model, [1, 2], max_new_tokens=0, params=GREEDY))
