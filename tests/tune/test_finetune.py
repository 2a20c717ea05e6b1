"""`lmforge finetune` end to end at tiny size: each method learns the replies (held-out loss falls),
writes its outputs, and resumes exactly after kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.model.checkpoint import load_checkpoint, save_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.train import train_bpe

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "grey"]
ANIMALS = ["cat", "dog", "owl", "fox", "bee", "cow", "elk", "ant", "bat", "eel"]
NAMES = ["Ann", "Bob", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]


def _conversations(n: int, shift: int, seed: int) -> list[dict]:
    """"Which colour goes with Ann's owl?" -> "The blue one.": the colour follows the animal
    (shifted by `shift`), the name only makes each conversation its own."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k, name = rng.randrange(len(ANIMALS)), rng.choice(NAMES)
        question = f"Which colour goes with {name}'s {ANIMALS[k]}?"
        answer = f"The {COLOURS[(k + shift) % 10]} one."
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny llama that knows the chat format and one colour rule, conversations with another rule).

    Starting from a random model, a low-rank update has little to work with; fine-tuning
    is about changing what a trained model does, so the base is first fully trained on rule A.
    """
    root = tmp_path_factory.mktemp("finetune")
    rule_a, rule_b = _conversations(400, 0, seed=0), _conversations(400, 3, seed=1)
    text = [m["content"] for row in rule_a + rule_b for m in row["messages"]]
    bpe = train_bpe(text, 300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], workers=1)
    torch.manual_seed(0)
    tokenizer = bpe.to_tokenizer()
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                    n_kv_heads=2, d_ff=128, max_seq_len=128, position="rope", norm="rmsnorm",
                                    mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False))
    save_checkpoint(root / "random", model, tokenizer=tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args((root / "random", _write(root / "rule-a.jsonl", rule_a)), root / "base", "full",
                          "--train.steps=300", "--optim.lr=5e-3", "--train.eval_interval=100")) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "base" / "model", _write(root / "rule-b.jsonl", rule_b)


def _args(base: tuple[Path, Path], output: Path, method: str, *extra: str) -> list[str]:
    model, data = base
    lr = {"full": "3e-3", "ia3": "6e-2", "prefix": "3e-2"}.get(method, "1e-2")
    if method == "prefix":  # a prefix sits in front of one conversation: no packing
        extra = ("--data.pack=false", "--prefix.num_virtual_tokens=8", *extra)
    return ["finetune", "--model", str(model), "--data", str(data), "--method", method, "-o", str(output),
            "-q", "--train.seq_len=64", "--train.batch_tokens=512", "--train.micro_batch=8",
            "--train.steps=40", "--train.eval_interval=20", "--train.eval_batches=2",
            "--train.checkpoint_interval=20", "--data.val_fraction=0.1", f"--optim.lr={lr}", "--lora.r=8",
            "--lora.alpha=16", "--lora.dropout=0", "--schedule.warmup_steps=2", "--train.device=cpu", *extra]


# how far each method's held-out loss falls in 40 steps, as a share of the first step's loss: prefix
# tuning, with 8 trained positions per layer and no packing, is the slowest learner
LEARNS = {"full": 0.1, "lora": 0.1, "qlora": 0.1, "adapter": 0.2, "ia3": 0.3, "prefix": 0.85}


@pytest.mark.parametrize("method", list(LEARNS))
def test_each_method_learns_the_replies(base, tmp_path, capsys, method):
    torch.set_num_threads(1)
    assert main([*_args(base, tmp_path / "run", method), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    # rule A's colours are confidently wrong at first; rule B's are learnt, judged on held-out rows
    assert records[0]["loss"] > 1.0 and len(val) == 2 and val[-1] < LEARNS[method] * records[0]["loss"]
    total = summary["parameters"]
    if method == "full":
        assert summary["trainable_parameters"] == total
        model, _ = load_checkpoint(tmp_path / "run" / "model")
    else:
        assert summary["trainable_parameters"] < 0.2 * total
        config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
        peft_type = {"lora": "LORA", "qlora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING",
                     "adapter": "LMFORGE_BOTTLENECK"}[method]
        assert config["peft_type"] == peft_type
        assert (tmp_path / "run" / "adapter" / "tokenizer.json").is_file()
    if method == "qlora":
        assert summary["nf4_base_bytes"] < 0.3 * summary["fp32_base_bytes"]


def test_merge_writes_a_model_generate_can_use(base, tmp_path, capsys):
    torch.set_num_threads(1)
    assert main([*_args(base, tmp_path / "run", "lora", "--train.steps=80"), "--merge"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "run" / "merged"), "--chat", "--prompt",
                 "Which colour goes with Gus's owl?", "--max-new-tokens", "6", "--json", "-q"]) == 0
    completion = json.loads(capsys.readouterr().out)["completion"]
    assert "orange" in completion  # rule B (rule A said blue), answered through the engine
    # the merged model computes what base + adapter compute
    from lmforge.infer.loading import load_model
    from lmforge.tune.peft_io import load_lora

    adapted = load_model(base[0])
    load_lora(adapted.model, tmp_path / "run" / "adapter")
    merged = load_model(tmp_path / "run" / "merged")
    ids = torch.tensor([adapted.tokenizer.encode_chat_prompt([{"role": "user", "content": "Which colour?"}])])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, adapted.model(ids).logits, atol=1e-4, rtol=1e-4)


def test_kill_9_then_resume_gives_the_same_run(base, tmp_path):
    """One process runs straight through; another is killed after its step-20 checkpoint and rerun."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "lmforge"]
    straight = subprocess.run([*command, *_args(base, tmp_path / "straight", "lora")], env=env,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*command, *_args(base, killed, "lora")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (killed / "checkpoints" / "step-000020").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([*command, *_args(base, killed, "lora")], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def losses(run: Path) -> list[tuple[int, float]]:
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in records]

    assert losses(killed) == losses(tmp_path / "straight")


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("lora-run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(base, output, "lora", "--train.steps=80")) == 0
    finally:
        torch.set_num_threads(threads)
    return output


def _generate(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["generate", "--chat", "--prompt", "Which colour goes with Kai's cow?",
                 "--max-new-tokens", "6", "--json", "-q", *args]) == 0
    return json.loads(capsys.readouterr().out)["completion"]


def test_generate_runs_a_base_with_an_adapter(base, lora_run, capsys):
    with_adapter = _generate(capsys, "--model", str(base[0]), "--adapter", str(lora_run / "adapter"))
    assert "brown" in with_adapter  # rule B for the cow (rule A said yellow)
    assert "brown" not in _generate(capsys, "--model", str(base[0]))


def test_serve_offers_each_adapter_as_a_model(base, lora_run, capsys):
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", f"base={base[0]}",
                               "--adapter", f"rule-b={lora_run / 'adapter'}", "--port", str(port),
                               "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        models = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert models == {"base", "rule-b"}
        replies = {}
        for model in models:
            response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": model, "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "user", "content": "Which colour goes with Kai's cow?"}]})
            replies[model] = response.json()["choices"][0]["message"]["content"]
        assert replies["rule-b"] == _generate(capsys, "--model", str(base[0]), "--adapter",
                                              str(lora_run / "adapter"))
        assert replies["base"] != replies["rule-b"]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
