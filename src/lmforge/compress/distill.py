"""Knowledge distillation: a small student learns from a large teacher's whole next-token distribution.

Trained on text alone, a student sees one correct token per position: "Paris" after "The
capital of France is", and nothing about how plausible "Lyon" was. A teacher's softmax
says that too, so each position carries a whole distribution of signal instead of one
label (Hinton, Vinyals & Dean, 2015). With p = softmax(z / T) for logits z at
temperature T:

- forward KL, KL(p_teacher || p_student) = sum_i p_t,i (log p_t,i - log p_s,i): the
  student must put mass wherever the teacher does (mass-covering; the classic recipe);
- reverse KL, KL(p_student || p_teacher) = sum_i p_s,i (log p_s,i - log p_t,i): the
  student may ignore some of the teacher's modes but is punished for mass where the
  teacher has none (mode-seeking; MiniLLM, Gu et al., 2023, for generative students).

Why T^2: the forward KL's gradient with respect to a student logit is
(p_s,i - p_t,i) / T, and for large T, p_i ~ (1 + z_i / T) / V, so the gradient is about
(z_s,i - z_t,i) / (V T^2). Multiplying the loss by T^2 keeps its gradients the same
size whatever T is, so the mix with the hard-label loss,

    loss = alpha * T^2 * KL + (1 - alpha) * CE(student, next token),

means the same thing at T = 1 and at T = 4. The same factor scales the reverse KL, so
the two directions are comparable at one temperature. alpha = 0 is plain training.

Everything is computed at the labelled positions only, in fp32 (a bf16 softmax over
49,152 tokens loses the small probabilities that are the point), and in chunks of
positions when [positions x vocab] would be large: each chunk's KL is recomputed in the
backward pass (activation checkpointing), so memory holds one chunk's softmaxes at a
time instead of all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.tokenizer.errors import TokenizerError
from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.train.objectives import next_token_loss

Direction = Literal["forward", "reverse"]


class DistillError(ValueError):
    """A teacher and student (or data) that cannot be distilled together, or settings that make no sense."""


@dataclass
class DistillSettings:
    kind: Direction = "forward"  # forward: KL(teacher || student); reverse: KL(student || teacher)
    temperature: float = 2.0  # both softmaxes at z / T; the KL is scaled by T^2
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha on the hard-label cross-entropy
    chunk_elements: int = 1 << 24  # positions x vocab per chunk of the KL (16M floats: 64 MB)

    def validate(self) -> None:
        if self.kind not in ("forward", "reverse"):
            raise DistillError(f"distill.kind must be forward or reverse, got {self.kind!r}")
        if not self.temperature > 0:
            raise DistillError(f"distill.temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise DistillError(f"distill.alpha must be in [0, 1] (the weight of the teacher's term), got "
                               f"{self.alpha}")
        if self.chunk_elements < 1:
            raise DistillError(f"distill.chunk_elements must be at least 1, got {self.chunk_elements}")


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, kind: Direction,
            temperature: float) -> torch.Tensor:
    """Sum over rows of KL between the tempered softmaxes of [n, V] logits, in fp32."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "forward":
        return (log_t.exp() * (log_t - log_s)).sum()
    return (log_s.exp() * (log_s - log_t)).sum()


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                    kind: Direction = "forward", temperature: float = 1.0,
                    chunk_elements: int = 1 << 24) -> torch.Tensor:
    """T^2 x the mean KL per position between [n, V] student and teacher logits (0 for no positions).

    Chunks of `chunk_elements // V` positions; with gradients on, each chunk is checkpointed
    (its softmaxes recomputed in backward), so the extra memory is one chunk's."""
    if student_logits.shape != teacher_logits.shape:
        raise DistillError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                           f"{tuple(teacher_logits.shape)} differ: the vocabularies must be the same")
    vocab = student_logits.shape[-1]
    student_logits = student_logits.reshape(-1, vocab)
    teacher_logits = teacher_logits.reshape(-1, vocab).detach()
    n = student_logits.shape[0]
    rows = max(1, chunk_elements // vocab)
    if n <= rows:
        total = _kl_sum(student_logits, teacher_logits, kind, temperature)
    else:
        recompute = torch.is_grad_enabled() and student_logits.requires_grad
        total = student_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, n, rows):
            s, t = student_logits[start:start + rows], teacher_logits[start:start + rows]
            total = total + (checkpoint(_kl_sum, s, t, kind, temperature, use_reentrant=False) if recompute
                             else _kl_sum(s, t, kind, temperature))
    return temperature**2 * total / max(n, 1)


class DistillationObjective:
    """alpha * T^2 * KL(teacher, student) + (1 - alpha) * CE at the labelled positions (see the module).

    The teacher is frozen (eval mode, no gradients) and runs under `torch.no_grad`; only
    the student's parameters receive gradients. Two shortcuts that change no number: with
    alpha = 0 the teacher is not run at all (plain training), and when no gradient is
    being recorded (the trainer's validation) the loss is the student's cross-entropy
    alone: the held-out number to compare with a student trained without a teacher.
    """

    def __init__(self, teacher: nn.Module, settings: DistillSettings) -> None:
        settings.validate()
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = settings

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        labelled = batch.labels != IGNORE_INDEX
        labels = batch.labels[labelled]
        out = model(batch.input_ids, batch.positions, logits_at=labelled)
        ce = next_token_loss(out.logits, labels)
        metrics = {"ce": ce.detach()}
        loss = ce
        if s.alpha > 0 and torch.is_grad_enabled():
            with torch.no_grad():
                teacher_logits = self.teacher(batch.input_ids, batch.positions, logits_at=labelled).logits
            kd = distillation_kl(out.logits, teacher_logits, kind=s.kind, temperature=s.temperature,
                                 chunk_elements=s.chunk_elements)
            loss = s.alpha * kd + (1 - s.alpha) * ce
            metrics |= {"kd": kd.detach(), "teacher_ce": next_token_loss(teacher_logits, labels)}
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + out.aux_loss
            metrics["aux"] = out.aux_loss.detach()
        return loss, metrics


def vocabulary_difference(a, b) -> str | None:
    """Where tokenizers `a` and `b` disagree on what an id means (the first such id), or None.

    Distillation compares probabilities id by id, so "the same vocabulary" means every id
    stands for the same bytes in both; the size alone would let two unrelated 49K
    vocabularies through."""
    if a.vocab_size != b.vocab_size:
        return f"{a.vocab_size:,} vs {b.vocab_size:,} tokens"
    for token_id in range(a.vocab_size):
        if _token(a, token_id) != _token(b, token_id):
            return (f"token {token_id} is {_token(a, token_id)!r} in one and {_token(b, token_id)!r} in the "
                    f"other")
    return None


def _token(tokenizer, token_id: int) -> bytes | None:
    try:
        return tokenizer.token_bytes(token_id)
    except TokenizerError:
        return None


def check_vocabulary(teacher_tokenizer, other, what: str) -> None:
    """Refuse a student (or data) whose token ids mean something else than the teacher's."""
    difference = vocabulary_difference(teacher_tokenizer, other)
    if difference is not None:
        raise DistillError(f"the teacher and {what} do not share a vocabulary ({difference}): a student "
                           f"learns the teacher's probabilities id by id, so both must use one tokenizer "
                           f"(tokenize the data with the teacher's: lmforge tokenize -t TEACHER)")
