"""Optimizers: AdamW and SGD from torch, LAMB and Muon written here, and weight-decay groups.

Weight decay pulls weights towards zero, which regularises the matrices that mix
features. It is wrong for the others: a norm's gain should sit near 1, a bias has no
scale to shrink, and an embedding row is only updated when its token occurs, so decay
would keep shrinking rare tokens between their rare updates. `param_groups` therefore
puts 1-D tensors (norms, biases) and embedding tables in a group without decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

EMBEDDING_PREFIXES = ("embed.", "pos_embed.", "lm_head.")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd", "lamb", "muon"] = "adamw"
    lr: float = 3e-4  # peak learning rate (Muon: for the hidden matrices)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # SGD's momentum; Muon uses muon_momentum
    muon_momentum: float = 0.95
    muon_adam_lr: float = 3e-3  # Muon: AdamW's peak lr for embeddings, head, norms and biases
    ns_steps: int = 5  # Muon: Newton-Schulz iterations


def _is_embedding(name: str) -> bool:
    return name.startswith(EMBEDDING_PREFIXES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[decayed matrices, undecayed norms/biases/embeddings], each with a `name` for logs."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or _is_embedding(name) else decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def can_fuse(groups: list[dict[str, Any]]) -> bool:
    """Can torch's fused AdamW (one kernel over all tensors) take these parameters?

    On CPU, torch otherwise updates tensor by tensor with about ten kernels each, which
    took 4x longer for a 14M-parameter model. Fused needs plain floating-point tensors on
    CPU or CUDA; sharded (DTensor) parameters keep torch's default.
    """
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(type(p.data) is torch.Tensor and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `config.name` over `model`'s trainable parameters, with decay groups.

    Every group carries `base_lr` (its peak); the trainer sets `lr = base_lr * factor`
    each step, so one schedule drives groups with different peaks (Muon's two halves).
    """
    groups = muon_groups(model, config) if config.name == "muon" else param_groups(model, config.weight_decay)
    for group in groups:
        group.setdefault("lr", config.lr)
        group["base_lr"] = group["lr"]
    betas = (config.beta1, config.beta2)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=config.eps, fused=can_fuse(groups))
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    if config.name == "lamb":
        return Lamb(groups, lr=config.lr, betas=betas, eps=config.eps)
    if config.name == "muon":
        return Muon(groups, lr=config.lr, momentum=config.muon_momentum, ns_steps=config.ns_steps,
                    betas=betas, eps=config.eps)
    raise ValueError(f"unknown optimizer {config.name!r} (adamw, sgd, lamb or muon)")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019): Adam's direction, rescaled per tensor by a trust ratio.

    The step for tensor W is r = m_hat / (sqrt(v_hat) + eps) + wd * W, and W moves by
    lr * (||W|| / ||r||) * r. Every layer thus changes by the same *relative* amount,
    which is what lets very large batches (and large learning rates) train stably.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                # the trust ratio stays a device tensor: no host sync per parameter per step
                weight_norm, update_norm = p.norm(), update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
                p.add_(update * trust, alpha=-group["lr"])
        return loss


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximation of U V^T for G = U S V^T: every singular value pushed towards 1.

    Each iteration applies the odd polynomial p(x) = a x + b x^3 + c x^5 to the singular
    values (X <- a X + b (X X^T) X + c (X X^T)^2 X). The coefficients (from Keller
    Jordan's Muon) make p steep near 0 so small singular values grow fast; the result
    is only roughly orthogonal (values land in about [0.7, 1.2]), which is enough.
    Each sum is folded into a matmul (`addmm`: beta * C + alpha * A @ B), which saves
    four elementwise passes per iteration (a fifth of the time for a 192 x 512 matrix).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the smaller Gram matrix
        x = x.t()
    x = x / (x.norm() + 1e-7)  # the spectral norm is <= the Frobenius norm, so now <= 1
    for _ in range(steps):
        gram = x @ x.t()
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.addmm(x, polynomial, x, beta=a)  # a X + (b G + c G^2) X
    return (x.t() if transposed else x).to(g.dtype)


def muon_groups(model: nn.Module, config: OptimConfig) -> list[dict[str, Any]]:
    """Hidden 2-D matrices go to Muon; embeddings, the head, norms and biases to AdamW."""
    hidden, adam_decay, adam_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and not _is_embedding(name):
            hidden.append(p)
        elif p.dim() >= 2 and not _is_embedding(name):
            adam_decay.append(p)
        else:
            adam_no_decay.append(p)
    groups = [{"name": "muon", "params": hidden, "use_muon": True, "lr": config.lr,
               "weight_decay": config.weight_decay}]
    groups.append({"name": "adam_decay", "params": adam_decay, "use_muon": False,
                   "lr": config.muon_adam_lr, "weight_decay": config.weight_decay})
    groups.append({"name": "adam_no_decay", "params": adam_no_decay, "use_muon": False,
                   "lr": config.muon_adam_lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): SGD-momentum whose update matrix is orthogonalised.

    For a weight matrix the raw momentum is dominated by a few directions; replacing it
    with the nearest orthogonal matrix (Newton-Schulz) gives every direction the same
    step size. The update is scaled by sqrt(max(1, rows / cols)) so that tall and wide
    matrices move by a similar RMS. Groups with `use_muon=False` get plain AdamW.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, use_muon=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon_update(p, group)
                else:
                    self._adamw_update(p, group)
        return loss

    def _muon_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        nesterov = p.grad.add(buf, alpha=group["momentum"])
        update = newton_schulz(nesterov, group["ns_steps"])
        scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"] * scale)

    def _adamw_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(p.grad, 1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
