"""A newcomer's first hour, at tiny size, through the CLI exactly as docs/README.md gives it:
train a tokenizer, tokenize, pretrain, generate from the run folder, inspect it, export it
to GGUF and to a Hugging Face folder, and check that llama.cpp runs the GGUF with the
same tokens and the same greedy continuation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main

LICENSES = Path("/usr/share/common-licenses")
PROMPT = "The license is free software"
STEPS = 30


@pytest.fixture(scope="module")
def first_hour(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("first-hour")
    texts = root / "text"
    texts.mkdir()
    for name in ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0", "Artistic", "GFDL-1.3"):
        shutil.copyfile(LICENSES / name, texts / f"{name}.txt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["tokenizer", "train", "-i", *map(str, sorted(texts.iterdir())), "--vocab-size", "512",
                     "-o", str(root / "tok"), "-q"]) == 0
        assert main(["tokenize", str(texts), "-t", str(root / "tok"), "-o", str(root / "shards"), "-q"]) == 0
        assert main(["pretrain", "-c", "configs/pretrain/tiny-cpu.yaml", "-q", "-o", str(root / "run"),
                     f"--data.folder={root / 'shards'}", f"--train.steps={STEPS}", "--model.vocab_size=512",
                     "--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.d_ff=128",
                     "--train.batch_tokens=1024", "--train.micro_batch=4", "--train.eval_interval=0",
                     "--train.checkpoint_interval=10", "--train.peak_flops=null"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def _json_out(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_the_run_folder_is_a_model(first_hour, capsys):
    info = _json_out(capsys, ["info", "--model", str(first_hour / "run"), "--json"])
    assert info["path"].endswith(f"checkpoints/step-{STEPS:06d}")  # the newest checkpoint
    assert info["architecture"] == "llama-style" and info["tokenizer"].startswith("byte-level BPE, 512")
    out = _json_out(capsys, ["generate", "--model", str(first_hour / "run"), "--prompt", PROMPT,
                             "--max-new-tokens", "8", "--json"])
    assert out["completion_tokens"] == 8 and out["prompt_tokens"] > 0
    # more new tokens than the model's 256 positions hold: the reply is cut to fit, and the user told why
    capsys.readouterr()
    assert main(["generate", "--model", str(first_hour / "run"), "--prompt", PROMPT,
                 "--max-new-tokens", "1000", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["completion_tokens"] <= 256 - out["prompt_tokens"]
    assert f"limited to {256 - out['prompt_tokens']} tokens" in captured.err


def test_the_run_exports_and_llama_cpp_agrees(first_hour, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf = first_hour / "run.gguf"
    _json_out(capsys, ["export", "--model", str(first_hour / "run"), "--to", "gguf", "--dtype", "f32",
                       "-o", str(gguf), "--json"])
    ours = _json_out(capsys, ["generate", "--model", str(first_hour / "run"), "--prompt", PROMPT,
                              "--max-new-tokens", "16", "--json", "--logprobs", "1"])
    from lmforge.infer.loading import load_model

    model = load_model(first_hour / "run")
    ids = model.tokenizer.encode(PROMPT)
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False, logits_all=True,
                          **cache)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids  # the tokenizer travelled
    llm.eval(ids)
    with torch.no_grad():
        want = model.model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.array(llm.scores[:len(ids)]), want, atol=1e-3, rtol=1e-3)
    theirs = []
    for _ in range(16):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(theirs[-1:])
    assert [t["token"] for t in ours["logprobs"]] == theirs


def test_the_run_exports_to_transformers(first_hour, capsys):
    transformers = pytest.importorskip("transformers")
    folder = first_hour / "hf"
    _json_out(capsys, ["export", "--model", str(first_hour / "run"), "--to", "hf", "-o", str(folder),
                       "--json"])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    from lmforge.infer.loading import load_model

    ours = load_model(first_hour / "run")
    ids = ours.tokenizer.encode(PROMPT)
    assert tokenizer(PROMPT)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, ours.model(torch.tensor([ids])).logits,
                                   atol=1e-4, rtol=1e-4)


def test_bad_exports_are_one_line_errors(first_hour, capsys):
    assert main(["export", "--model", str(first_hour / "run"), "--to", "hf", "--dtype", "q8_0",
                 "-o", str(first_hour / "x")]) == 2
    assert "q8_0 is a GGUF block format" in capsys.readouterr().err
    assert main(["export", "--model", str(first_hour / "run"), "--to", "gguf",
                 "-o", str(first_hour / "x")]) == 2
    assert "ending in .gguf" in capsys.readouterr().err
