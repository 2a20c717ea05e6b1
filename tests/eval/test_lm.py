"""EvalModel: lm-eval's tokenization at the boundary, its rolling windows, perplexity within 0.1% of
lm-eval's HFLM, and generation through the Engine."""

import math

import pytest

from lmforge.eval.lm import EvalModel, rolling_windows
from lmforge.eval.perplexity_task import PerplexityTask
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tiny_hf):
    return EvalModel.load(tiny_hf, max_length=64)


@pytest.fixture(scope="module")
def text(mmlu_file):
    """~2,000 characters of real text (MMLU questions)."""
    return "\n".join(mmlu_file.read_text(encoding="utf-8").splitlines()[:6])


def test_trailing_space_moves_to_the_continuation(model):
    context, continuation = model.encode_pair("Answer: ", "B")
    assert (context, continuation) == model.encode_pair("Answer:", " B")
    assert model.tokenizer.decode(continuation) == " B"
    prefix, tokens = model.encode_pair("", "Hello")
    assert prefix == [model.prefix_token_id] and model.tokenizer.decode(tokens) == "Hello"


@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 200])
def test_rolling_windows_are_lm_evals(length):
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(100, 100 + length))
    theirs = [lm_eval_utils.make_disjoint_window(w)
              for w in lm_eval_utils.get_rolling_token_windows(tokens, 7, 64, context_len=1)]
    ours = list(rolling_windows(tokens, 7, 64))
    assert ours == theirs
    assert [t for _, cont in ours for t in cont] == tokens  # every token predicted once


def test_perplexity_within_a_tenth_of_a_percent_of_lm_eval(model, tiny_hf, text, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tiny_hf), device="cpu", batch_size=4, max_length=64)
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    theirs = hf.loglikelihood_rolling([request], disable_tqdm=True)[0]
    ours = model.loglikelihood_rolling([text])[0]
    assert ours == pytest.approx(theirs, rel=1e-3)
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    result = PerplexityTask([tmp_path / "doc.txt"]).run(model)
    tokens = len(model.tok_encode(text))
    assert result.metrics["tokens"] == tokens
    assert result.metrics["perplexity"] == pytest.approx(math.exp(-theirs / tokens), rel=1e-3)
    bits_per_byte = -theirs / math.log(2) / len(text.encode())
    assert result.metrics["bits_per_byte"] == pytest.approx(bits_per_byte, rel=1e-3)


def test_generate_until_is_the_engines_greedy_reply_cut_at_until(model):
    engine = Engine(model.model, model.tokenizer, stop_ids=model.stop_ids)
    prompt = "The capital of France is"
    free = engine.complete([model.tok_encode(prompt)], SamplingParams(temperature=0, max_tokens=12))[0].text
    assert model.generate_until([(prompt, {"until": [], "max_gen_toks": 12})]) == [free]
    stop = free[3:6]
    cut = model.generate_until([(prompt, {"until": [stop], "max_gen_toks": 12, "do_sample": False})])[0]
    assert cut == free[:free.index(stop)]
    with pytest.raises(ValueError, match="unknown generation arguments"):
        model.generate_until([(prompt, {"beams": 2})])
