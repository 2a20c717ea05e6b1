"""Distillation: the KL terms against torch's own `kl_div`, the objective's pieces, and `lmforge distill`
end to end at tiny size (a byte-level teacher trained here, a smaller student preset)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.align.conftest import GPT2_PATTERN, SPECIALS, byte_tokenizer
from tests.train.conftest import LICENSES, license_paragraphs

from lmforge.cli import main
from lmforge.compress.distill import (
    DistillationObjective,
    DistillError,
    DistillSettings,
    check_vocabulary,
    distillation_kl,
)
from lmforge.data.shards import TokenizeConfig, tokenize_documents
from lmforge.infer.loading import load_model
from lmforge.model.checkpoint import save_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.train.objectives import CausalLMObjective

TEACHER = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64, position="rope",
               norm="rmsnorm", mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False)
STUDENT_FLAGS = ["--student", "llama-tiny", "--student_config.d_model=32", "--student_config.n_layers=1",
                 "--student_config.n_heads=2", "--student_config.n_kv_heads=1", "--student_config.d_ff=64",
                 "--student_config.max_seq_len=64"]


def logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the KL terms
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_kl_is_teacher_weighted_log_ratio_and_kl_div(temperature):
    s, t = logits(7, 11, 0), logits(7, 11, 1)
    log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    direct = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    ours = distillation_kl(s, t, kind="forward", temperature=temperature)
    torch.testing.assert_close(ours, temperature**2 * direct)
    torch.testing.assert_close(ours, temperature**2 * F.kl_div(log_s, log_t, log_target=True,
                                                               reduction="batchmean"))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_reverse_kl_swaps_the_roles(temperature):
    s, t = logits(7, 11, 2), logits(7, 11, 3)
    log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    direct = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    ours = distillation_kl(s, t, kind="reverse", temperature=temperature)
    torch.testing.assert_close(ours, temperature**2 * direct)
    torch.testing.assert_close(ours, temperature**2 * F.kl_div(log_t, log_s, log_target=True,
                                                               reduction="batchmean"))
    assert not torch.isclose(ours, distillation_kl(s, t, kind="forward", temperature=temperature))


def test_t_squared_keeps_the_gradient_the_same_size_at_high_temperature():
    """At large T the T^2-scaled forward KL's gradient tends to the centred logit gap / (n V): without
    the T^2 it would shrink as 1 / T^2 (Hinton et al.'s reason for the factor)."""
    s, t = logits(5, 13, 4).requires_grad_(), logits(5, 13, 5)
    distillation_kl(s, t, temperature=1000.0).backward()
    gap = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))).detach() / s.numel()
    torch.testing.assert_close(s.grad, gap, rtol=0, atol=2e-2 * float(gap.abs().max()))
    s.grad = None
    (distillation_kl(s, t, temperature=1000.0) / 1000.0**2).backward()
    assert s.grad.abs().max() < 1e-5 * gap.abs().max()


def test_identical_distributions_give_zero_and_chunks_give_the_same_value_and_gradient():
    t = logits(9, 17, 6)
    assert float(distillation_kl(t.clone(), t, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    for kind in ("forward", "reverse"):
        whole = logits(9, 17, 7).requires_grad_()
        chunked = whole.detach().clone().requires_grad_()
        a = distillation_kl(whole, t, kind=kind, temperature=2.0)
        b = distillation_kl(chunked, t, kind=kind, temperature=2.0, chunk_elements=2 * 17)  # 5 chunks
        torch.testing.assert_close(a, b)
        a.backward()
        b.backward()
        torch.testing.assert_close(whole.grad, chunked.grad)


# ------------------------------------------------------------------------------ the objective
def tiny(seed: int, vocab: int = 50, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, **(TEACHER | overrides)))


@pytest.fixture
def batch() -> Batch:
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :4] = IGNORE_INDEX  # a prompt: no loss there
    return Batch(ids, labels)


def test_alpha_zero_is_plain_cross_entropy_and_never_runs_the_teacher(batch):
    class Untouchable(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the teacher ran")

    student = tiny(1, d_model=32)
    loss, metrics = DistillationObjective(Untouchable(), DistillSettings(alpha=0.0)).loss(student, batch)
    plain, _ = CausalLMObjective(only_labelled=True).loss(student, batch)
    torch.testing.assert_close(loss, plain)
    assert set(metrics) == {"ce"}


def test_the_mix_and_where_gradients_go(batch):
    teacher, student = tiny(0), tiny(1, d_model=32)
    student.train()
    objective = DistillationObjective(teacher, DistillSettings(kind="forward", temperature=2.0, alpha=0.3))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    loss, metrics = objective.loss(student, batch)
    labelled = batch.labels != IGNORE_INDEX
    s = student(batch.input_ids, logits_at=labelled).logits
    t = teacher(batch.input_ids, logits_at=labelled).logits
    ce = F.cross_entropy(s, batch.labels[labelled])
    kd = 4.0 * F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True,
                        reduction="batchmean")
    torch.testing.assert_close(loss, 0.3 * kd + 0.7 * ce)
    torch.testing.assert_close(metrics["kd"], kd.detach())
    torch.testing.assert_close(metrics["teacher_ce"], F.cross_entropy(t, batch.labels[labelled]).detach())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    with torch.no_grad():  # the trainer's validation: the student's cross-entropy alone
        val, val_metrics = objective.loss(student, batch)
    torch.testing.assert_close(val, ce.detach())
    assert set(val_metrics) == {"ce"}


@pytest.mark.parametrize("settings, message", [
    (DistillSettings(temperature=0.0), "temperature must be positive"),
    (DistillSettings(alpha=1.5), "alpha must be in [0, 1]"),
    (DistillSettings(kind="sideways"), "forward or reverse"),  # type: ignore[arg-type]
])
def test_settings_that_make_no_sense_are_refused(settings, message):
    with pytest.raises(DistillError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DistillationObjective(tiny(0), settings)


def swapped_tokenizer() -> Tokenizer:
    """The byte tokenizer's size and specials, with the ids of "a" and "b" exchanged."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"a"], ranks[b"b"] = ranks[b"b"], ranks[b"a"]
    return Tokenizer.from_tiktoken(ranks, GPT2_PATTERN, SPECIALS, eos_token="<|endoftext|>")


def test_vocabularies_are_compared_token_by_token():
    check_vocabulary(byte_tokenizer(), byte_tokenizer(), "the student")
    assert swapped_tokenizer().vocab_size == byte_tokenizer().vocab_size
    with pytest.raises(DistillError, match="token 97 is b'a' in one and b'b' in the other"):
        check_vocabulary(byte_tokenizer(), swapped_tokenizer(), "the student")


# ------------------------------------------------------------------------------ lmforge distill
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Byte-level shards of the system's license texts, a teacher pretrained on them, held-out text."""
    if not LICENSES.is_dir():
        pytest.skip("no /usr/share/common-licenses on this machine")
    root = tmp_path_factory.mktemp("distill")
    tokenizer = byte_tokenizer()
    docs = license_paragraphs()
    tokenize_documents(docs[:600], tokenizer, root / "shards", TokenizeConfig(val_fraction=0.1))
    (root / "heldout.txt").write_text("\n\n".join(d.text for d in docs[-60:]))
    torch.manual_seed(0)
    save_checkpoint(root / "random", Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **TEACHER)),
                    tokenizer=tokenizer)
    assert main(["distill", "--teacher", str(root / "random"), "--student", str(root / "random"),
                 "--data", str(root / "shards"), "-o", str(root / "pretrained"), "--alpha", "0", "-q",
                 "--train.steps=150", "--optim.lr=1e-2", "--train.seq_len=64", "--train.micro_batch=8",
                 "--train.batch_tokens=512", "--train.eval_interval=0", "--train.checkpoint_interval=0",
                 "--measure=[]"]) == 0
    return root


def _distill(ws: Path, output: str, *extra: str, student: list[str] = STUDENT_FLAGS) -> list[str]:
    return ["distill", "--teacher", str(ws / "pretrained" / "model"), *student, "--data",
            str(ws / "shards"), "-o", str(ws / output), "--heldout", f"[{ws / 'heldout.txt'}]",
            "--heldout_windows=8", "--train.seq_len=64", "--train.micro_batch=8", "--train.batch_tokens=512",
            "--optim.lr=1e-2", "--schedule.warmup_steps=5", "--train.eval_interval=0", "--json", "-q", *extra]


def test_distill_writes_a_loadable_student_smaller_than_its_teacher(workspace, capsys):
    assert main(_distill(workspace, "run", "--train.steps=6", "--train.checkpoint_interval=3")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["kind"] == "forward" and summary["alpha"] == 0.5
    assert summary["student_parameters"] < summary["teacher_parameters"] / 4
    assert summary["bytes_after"] < summary["bytes_before"] / 4
    heldout = summary["heldout"]
    assert heldout["teacher"]["tokens"] == heldout["student"]["tokens"] == 8 * 63
    assert heldout["teacher"]["perplexity"] < heldout["student"]["perplexity"]  # 150 steps vs 6
    student = load_model(summary["model"])
    assert student.model.config.d_model == 32 and student.tokenizer.vocab_size == 259
    records = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7)) and all("kd" in r for r in records)
    assert (workspace / "run" / "summary.json").is_file() and (workspace / "run" / "metrics.png").is_file()


def test_a_run_cut_after_its_checkpoint_resumes_to_the_same_losses(workspace, capsys):
    """As after kill -9 following the step-3 checkpoint: the later checkpoint and model are gone, the
    log holds steps past the checkpoint; the rerun continues from step 3 and logs what the straight
    run logged."""
    args = ("--train.steps=6", "--train.checkpoint_interval=3", "--measure=[]", "--distill.kind=reverse",
            "--schedule.kind=constant")
    assert main(_distill(workspace, "straight", *args)) == 0
    assert main(_distill(workspace, "cut", *args)) == 0
    shutil.rmtree(workspace / "cut" / "checkpoints" / "step-000006")
    shutil.rmtree(workspace / "cut" / "model")
    assert main(_distill(workspace, "cut", *args)) == 0
    capsys.readouterr()

    def losses(run: str) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in map(json.loads, (workspace / run / "metrics.jsonl").open())]

    assert losses("cut") == losses("straight") and len(losses("cut")) == 6


def test_distilling_pulls_the_student_towards_its_teacher(workspace, capsys):
    """Same student initialisation, same windows in the same order, same steps (alpha 0 is training
    from scratch): the distilled student ends closer to the teacher's distributions on held-out
    text. (Whether that also beats scratch on held-out loss needs a teacher worth copying and a larger
    vocabulary: benchmarks/bench_distill.py measures it on SmolLM2.)"""
    teacher = load_model(workspace / "pretrained" / "model").model
    ids = torch.tensor(list((workspace / "heldout.txt").read_bytes()[:8 * 64])).view(8, 64)
    kl = {}
    for name, alpha in (("scratch", "0"), ("distilled", "1")):
        assert main(_distill(workspace, name, "--train.steps=30", "--alpha", alpha, "--temperature", "1",
                             "--train.checkpoint_interval=0", "--measure=[]")) == 0
        capsys.readouterr()
        student = load_model(workspace / name / "model").model
        with torch.no_grad():
            kl[name] = float(distillation_kl(student(ids).logits, teacher(ids).logits))
    assert kl["distilled"] < 0.9 * kl["scratch"], kl  # 0.19 vs 0.22 here


@pytest.mark.parametrize("extra, message", [
    (["--student_config.vocab_size=300"], "is not the teacher's"),
    (["--temperature", "-1"], "temperature must be positive"),
    (["--data", "/nonexistent"], "no finished token shards"),
])
def test_bad_students_and_settings_are_one_line_errors(workspace, capsys, extra, message):
    assert main([*_distill(workspace, "bad", "--train.steps=1"), *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("student, message", [
    (["--student", "no-such-model"], "neither a preset"),
    (["--student", "no-such-model", "--student_config.d_model=32"], "is not a preset"),
])
def test_a_student_that_is_no_preset_nor_model_is_refused(workspace, capsys, student, message):
    assert main(_distill(workspace, "bad", "--train.steps=1", student=student)) == 2
    assert message in capsys.readouterr().err


def test_shards_of_another_tokenizer_are_refused(workspace, tmp_path, capsys):
    tokenize_documents(license_paragraphs()[:50], swapped_tokenizer(), tmp_path / "shards",
                       TokenizeConfig(val_fraction=0.1))
    argv = _distill(workspace, "bad", "--train.steps=1")
    argv[argv.index("--data") + 1] = str(tmp_path / "shards")
    assert main(argv) == 2
    assert "do not share a vocabulary" in capsys.readouterr().err


RECIPES = sorted((Path(__file__).parents[2] / "configs" / "distill").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_parse_and_their_students_build(recipe):
    from lmforge.compress.distill_run import DistillConfig
    from lmforge.config import load_config
    from lmforge.train.pretrain import model_config

    config = load_config(DistillConfig, recipe)
    config.distill.validate()
    assert config.train.accumulation() >= 1 and config.teacher and config.data.folder
    student = model_config({"preset": config.student, "vocab_size": 49152} | config.student_config)
    assert student.max_seq_len >= config.train.seq_len
