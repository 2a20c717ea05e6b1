"""Optimizers on a toy problem, Muon's orthogonalisation, decay groups, and schedule values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.train.optim import OptimConfig, build_optimizer, can_fuse, newton_schulz, param_groups
from lmforge.train.schedule import ScheduleConfig, lr_at

LRS = {"adamw": 1e-2, "sgd": 5e-2, "lamb": 1e-2, "muon": 2e-2}


class _ToyNet(nn.Module):
    """Embedding -> hidden matrix -> head: every kind of parameter the groups distinguish."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 16)
        self.hidden = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.relu(self.hidden(self.embed(x)))))


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb", "muon"])
def test_each_optimizer_reduces_loss(name):
    torch.manual_seed(0)
    model = _ToyNet()
    x = torch.arange(16)
    target = torch.randperm(16, generator=torch.Generator().manual_seed(1))  # learn a permutation
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=LRS[name], weight_decay=0.01))
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_newton_schulz_is_roughly_orthogonal():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 100  # a badly conditioned matrix: one dominant direction
    singular = torch.linalg.svdvals(newton_schulz(g, steps=5))
    assert singular.min() > 0.5 and singular.max() < 1.3
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 50


def test_newton_schulz_folded_into_addmm_is_the_polynomial():
    """The addmm form computes a X + (b G + c G^2) X, G = X X^T, written out here plainly."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for shape in ((24, 40), (40, 24)):
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        x = g.t() if shape[0] > shape[1] else g
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.t()
            x = a * x + (b * gram + c * gram @ gram) @ x
        expected = x.t() if shape[0] > shape[1] else x
        torch.testing.assert_close(newton_schulz(g, steps=5), expected, rtol=1e-4, atol=1e-5)


def test_adamw_is_fused_on_plain_cpu_tensors_and_steps_like_the_loop():
    torch.manual_seed(0)
    fused_model, loop_model = _ToyNet(), _ToyNet()
    loop_model.load_state_dict(fused_model.state_dict())
    config = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(fused_model, config)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(param_groups(loop_model, 0.1), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    x, target = torch.arange(16), torch.randperm(16, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
    for (name, p), q in zip(fused_model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not can_fuse([{"params": [torch.zeros(2, dtype=torch.int64)]}])


def test_muon_update_on_a_matrix_is_orthogonal_ish():
    torch.manual_seed(0)
    model = _ToyNet()
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=0.01, weight_decay=0.0))
    names = {g["name"]: g for g in optimizer.param_groups}
    assert model.hidden.weight in names["muon"]["params"]
    assert model.embed.weight in names["adam_no_decay"]["params"]
    before = model.hidden.weight.detach().clone()
    model(torch.arange(16)).square().mean().backward()
    optimizer.step()
    update = (before - model.hidden.weight.detach()) / 0.01
    singular = torch.linalg.svdvals(update / (32 / 16) ** 0.5)
    assert singular.min() > 0.5 and singular.max() < 1.3


def test_no_weight_decay_on_norms_biases_embeddings():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16)
    model = Transformer(config)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(".weight" in names[id(p)] and p.dim() == 2 for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"embed.weight", "pos_embed.weight"} <= no_decay_names
    assert any(n.endswith("bias") for n in no_decay_names) and any("norm" in n for n in no_decay_names)


def test_cosine_schedule_key_steps():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, 1.0, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, cfg) == pytest.approx(1.0)
    middle = 10 + (100 - 1 - 10) / 2
    assert lr_at(int(middle), 100, 1.0, cfg) == pytest.approx(0.55, abs=0.02)
    assert lr_at(99, 100, 1.0, cfg) == pytest.approx(0.1)
    values = [lr_at(s, 100, 1.0, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_schedule_key_steps():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_at(4, 100, 2.0, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, 2.0, cfg) == lr_at(79, 100, 2.0, cfg) == 2.0  # the stable stretch
    assert lr_at(80, 100, 2.0, cfg) == pytest.approx(2.0)  # decay starts at 80% ...
    assert lr_at(99, 100, 2.0, cfg) == pytest.approx(0.0)  # ... and reaches the floor at the end
    assert lr_at(90, 100, 2.0, cfg) == pytest.approx(2.0 * (1 - 10 / 19))
