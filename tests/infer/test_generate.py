"""Single-request generation through `Engine.generate`, on the real SmolLM2 and against transformers."""

from dataclasses import replace

import pytest
import torch

from lmforge.infer.engine import Engine, GenerationError, GenerationStats
from lmforge.infer.sampling import SamplingError, SamplingParams

GREEDY = SamplingParams(temperature=0)


def _engine(loaded) -> Engine:
    return Engine(loaded.model, loaded.tokenizer, stop_ids=loaded.stop_ids(), max_batch_size=1)


def _complete(loaded, prompt: str, n: int, params=GREEDY) -> tuple[list[int], str]:
    params = replace(params, max_tokens=n)
    events = list(_engine(loaded).generate(prompt, params))
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
    params = SamplingParams(temperature=0, max_tokens=64)
    events = list(_engine(smollm2).generate(tok.encode(prompt), params, stats=stats))
    assert events[-1].finish_reason == "stop" and stats.finish_reason == "stop"
    assert stats.completion_tokens == len(events)
    assert "<|im_end|>" not in "".join(e.text for e in events)


def test_seeded_sampling_is_reproducible(smollm2):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    first = _complete(smollm2, "Once upon a time", 10, params)
    assert first == _complete(smollm2, "Once upon a time", 10, params)


def test_streaming_text_is_valid_utf8_split_across_tokens(smollm2):
    """The engine's own streaming path: characters split across tokens come out whole, once."""
    tok = smollm2.tokenizer
    text = "naïve café 東京 🙂"
    ids = tok.encode(text)
    assert any(len(tok.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)  # a split char
    engine = _engine(smollm2)
    seq = engine.sequences[engine.add_request([1], SamplingParams(temperature=0, max_tokens=len(ids)))]
    seq.admitted = seq.first_token_at = 0.0
    pieces = [engine._emit(seq, token, None).text for token in ids]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # an incomplete character is held back, not printed as a replacement


def test_bad_requests_are_clear_errors(smollm2):
    engine = _engine(smollm2)
    with pytest.raises(GenerationError, match="empty"):
        list(engine.generate([], GREEDY))
    with pytest.raises(GenerationError, match="context is 8192"):
        list(engine.generate([1] * 8192, SamplingParams(temperature=0, max_tokens=1)))
    with pytest.raises(GenerationError, match="context is 8192"):  # prompt + max_tokens past the context
        list(engine.generate([1] * 8000, SamplingParams(temperature=0, max_tokens=256)))
    with pytest.raises(SamplingError, match="max_tokens"):
        SamplingParams(temperature=0, max_tokens=0)


def test_truncate_keeps_the_end_of_a_long_prompt(tiny):
    model = tiny()  # a context of 64 tokens
    engine = Engine(model, max_batch_size=1)
    stats = GenerationStats()
    events = list(engine.generate(list(range(1, 61)), SamplingParams(temperature=0, max_tokens=8),
                                  truncate=True, stats=stats))
    assert stats.prompt_tokens == 56 and len(events) == 8 and events[-1].finish_reason == "length"
