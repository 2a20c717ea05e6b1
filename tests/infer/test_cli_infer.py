"""`lmforge generate` on the engine: beams, quantization, speculative decoding, stops, errors."""

import json

import pytest

from lmforge.cli import main


@pytest.fixture(autouse=True)
def _reuse_loaded_smollm2(smollm2, monkeypatch):
    """Each command would parse the 98 MB GGUF again; hand it copies of the session's model."""
    import copy
    import dataclasses

    import lmforge.infer.loading

    def load_model(spec, **kwargs):
        assert str(spec) == "smollm2" or str(spec).endswith(".gguf")
        return dataclasses.replace(smollm2, model=copy.deepcopy(smollm2.model))

    monkeypatch.setattr(lmforge.infer.loading, "load_model", load_model)


def _run(capsys, *args: str) -> dict:
    argv = ["generate", "--model", "smollm2", "--prompt", "The capital of France is", "--json", *args]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_quantized_and_speculative(capsys):
    plain = _run(capsys, "--max-new-tokens", "8")
    assert "Paris" in plain["completion"]
    assert "Paris" in _run(capsys, "--max-new-tokens", "8", "--quantize", "int8")["completion"]
    spec = _run(capsys, "--max-new-tokens", "8", "--draft-model", "smollm2", "--draft-quantize", "int4")
    assert spec["completion"] == plain["completion"] and 0 < spec["acceptance_rate"] <= 1


def test_generate_beam_stop_and_logprobs(capsys):
    beams = _run(capsys, "--max-new-tokens", "6", "--beam", "3")
    assert len(beams["beams"]) == 3 and beams["completion"] == beams["beams"][0]["text"]
    stopped = _run(capsys, "--max-new-tokens", "8", "--stop", ".")
    assert stopped["completion"] == " Paris" and stopped["finish_reason"] == "stop"
    scored = _run(capsys, "--max-new-tokens", "3", "--logprobs", "2")
    assert len(scored["logprobs"]) == 3 and all(len(t["top"]) == 2 for t in scored["logprobs"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-p", "2"], "--min-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--beam", "-1", "--max-new-tokens", "2"], "beam width"),
    ],
)
def test_bad_generation_requests_are_one_clear_line(args, message, capsys, smollm2_gguf):
    assert main(["generate", "--model", str(smollm2_gguf), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_with_int8_activations(capsys):
    reply = _run(capsys, "--max-new-tokens", "8", "--quantize", "int8", "--int8-activations")
    assert "Paris" in reply["completion"]
    reply = _run(capsys, "--max-new-tokens", "8", "--quantize", "int4", "--int8-activations", "token")
    assert "Paris" in reply["completion"]
    assert main(["generate", "--model", "smollm2", "--prompt", "x", "--int8-activations"]) == 2
    err = capsys.readouterr().err
    assert "int8 activations need int8 or int4 weights" in err and "Traceback" not in err
