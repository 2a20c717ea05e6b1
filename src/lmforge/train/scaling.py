"""Scaling laws: plan a compute budget, sweep small runs, fit L(N, D) = E + A/N^alpha + B/D^beta.

Training a transformer of N parameters on D tokens costs about C = 6ND FLOPs (2N per
token forward, 4N backward). Hoffmann et al. (2022, "Chinchilla") fitted the final loss
of 400 runs to the form above; minimising it under a fixed C gives the compute-optimal
split

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6) / N_opt,  G = (alpha A / (beta B))^(1/(alpha+beta)),

and their other two approaches gave the simpler rule of thumb of about 20 tokens per
parameter. Here:

- `plan`: N, D and the predicted loss for a budget, from the published law and from the rule;
- `sweep`: real `pretrain()` runs over a grid of model sizes x token budgets, each in its
  own folder, resumable, with every finished run's (N, D, validation loss) in results.jsonl/.csv;
- `fit_loss_law`: the Chinchilla fitting procedure (their approach 3): a Huber loss
  (delta 1e-3) on log L, parametrised as log L = LSE(a - alpha log N, b - beta log D, e),
  minimised by L-BFGS from the best starts of a grid of initialisations;
- `plot_fit`: loss against tokens per model size with the fitted curves, and the fitted
  iso-loss contours with the compute-optimal frontier.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.atomic import atomic_write

TOKENS_PER_PARAM = 20.0  # Hoffmann et al.'s rule of thumb (their approaches 1 and 2)
ParamsKind = Literal["non_embedding", "total"]
LrScale = Literal["width", "none"]


class ScalingError(ValueError):
    """Bad scaling input: an unusable budget, size list or results file, or too few runs to fit."""


# ------------------------------------------------------------------------------ the law
@dataclass(frozen=True)
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta: irreducible loss plus a model-size and a data term."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: Any, tokens: Any) -> Any:
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    @property
    def _g(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def params_exponent(self) -> float:
        """a in N_opt ∝ C^a (the data exponent is 1 - a)."""
        return self.beta / (self.alpha + self.beta)

    def optimal(self, compute: Any) -> tuple[Any, Any]:
        """(N, D) of least loss for `compute` FLOPs with C = 6ND."""
        n = self._g * np.power(np.asarray(compute, dtype=float) / 6.0, self.params_exponent)
        return n, np.asarray(compute, dtype=float) / 6.0 / n

    def optimal_tokens(self, params: float) -> float:
        """The D for which a model of `params` parameters is the compute-optimal one."""
        half_compute = (params / self._g) ** (1.0 / self.params_exponent)  # C / 6
        return half_compute / params

    def optimal_params(self, tokens: float) -> float:
        """The N that is compute-optimal when training on `tokens` tokens."""
        half_compute = (tokens * self._g) ** (1.0 / (1.0 - self.params_exponent))
        return half_compute / tokens


# Hoffmann et al. 2022, approach 3 (parametric fit), as published.
CHINCHILLA = LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


# ------------------------------------------------------------------------------ plan
@dataclass
class PlanRow:
    method: str
    params: float
    tokens: float
    compute: float
    loss: float

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tokens_per_param": self.tokens_per_param}


def plan(*, compute: float | None = None, params: float | None = None, tokens: float | None = None,
         law: LossLaw = CHINCHILLA, tokens_per_param: float = TOKENS_PER_PARAM) -> list[PlanRow]:
    """Compute-optimal N and D for a budget (or the partner of a given N or D), two ways.

    Given `compute`: the law's optimum and the tokens-per-parameter rule. Given `params`
    (or `tokens`): the D (or N) that makes it compute-optimal under each. Given both:
    that run as stated, then the two optima for its compute.
    """
    for name, value in (("compute", compute), ("params", params), ("tokens", tokens)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ScalingError(f"--{name} must be a positive number, got {value}")
    if tokens_per_param <= 0:
        raise ScalingError(f"tokens per parameter must be positive, got {tokens_per_param}")
    if compute is not None and (params is not None or tokens is not None):
        raise ScalingError("give --compute alone, or --params and/or --tokens (C = 6ND fixes the third)")

    def row(method: str, n: float, d: float) -> PlanRow:
        return PlanRow(method, float(n), float(d), 6.0 * n * d, float(law.loss(n, d)))

    rule = f"{tokens_per_param:g} tokens/parameter"
    rows: list[PlanRow] = []
    if params is not None and tokens is not None:
        rows.append(row("as given", params, tokens))
        compute = 6.0 * params * tokens
    if compute is not None:
        rows.append(row("Chinchilla law optimum", *law.optimal(compute)))
        n = math.sqrt(compute / (6.0 * tokens_per_param))
        rows.append(row(rule, n, tokens_per_param * n))
    elif params is not None:
        rows.append(row("Chinchilla law optimum", params, law.optimal_tokens(params)))
        rows.append(row(rule, params, tokens_per_param * params))
    elif tokens is not None:
        rows.append(row("Chinchilla law optimum", law.optimal_params(tokens), tokens))
        rows.append(row(rule, tokens / tokens_per_param, tokens))
    else:
        raise ScalingError("give a budget: --compute FLOPS, --params N or --tokens D")
    return rows


def format_plan(rows: Sequence[PlanRow], law: LossLaw = CHINCHILLA) -> str:
    lines = [f"{'':<24} {'params N':>10} {'tokens D':>10} {'compute 6ND':>12} {'tokens/param':>13} "
             f"{'predicted loss':>15}"]
    for r in rows:
        lines.append(f"{r.method:<24} {_si(r.params):>10} {_si(r.tokens):>10} {r.compute:>12.3e} "
                     f"{r.tokens_per_param:>13.1f} {r.loss:>15.3f}")
    lines.append(f"law: L = {law.E:g} + {law.A:g}/N^{law.alpha:g} + {law.B:g}/D^{law.beta:g} "
                 f"(Hoffmann et al. 2022, approach 3; nats/token on their data and tokenizer); "
                 f"N_opt ∝ C^{law.params_exponent:.2f}")
    return "\n".join(lines)


def _si(value: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


# ------------------------------------------------------------------------------ fit
@dataclass
class FitResult:
    law: LossLaw
    objective: float  # the summed Huber loss at the optimum
    rms_log_residual: float  # sqrt(mean((log L_fit - log L)^2)): typical relative error of the fit
    points: int
    starts: int  # grid initialisations evaluated
    refined: int  # of which refined by L-BFGS
    params_kind: str = "non_embedding"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["law"] = asdict(self.law)
        out["params_exponent"] = self.law.params_exponent
        return out


# Hoffmann et al.'s grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}
DEFAULT_GRID: dict[str, Sequence[float]] = {
    "a": (0, 5, 10, 15, 20, 25), "b": (0, 5, 10, 15, 20, 25), "e": (-1, -0.5, 0, 0.5, 1),
    "alpha": (0, 0.5, 1, 1.5, 2), "beta": (0, 0.5, 1, 1.5, 2),
}


def fit_loss_law(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], *,
                 delta: float = 1e-3, grid: dict[str, Sequence[float]] | None = None,
                 refine: int = 64, params_kind: str = "non_embedding") -> FitResult:
    """Fit E + A/N^alpha + B/D^beta to final losses, as Hoffmann et al. (approach 3) did.

    Working in log space with log L = logsumexp(a - alpha log N, b - beta log D, e)
    (A = e^a, B = e^b, E = e^e) keeps every constant positive and the problem well
    scaled; the Huber loss on log L keeps a few bad runs from pulling the fit. The
    objective is not convex, so every point of the grid is evaluated and the `refine`
    best are polished with L-BFGS; the best polished one wins.
    """
    import torch

    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (params, tokens, losses))
    if not (len(n) == len(d) == len(loss)):
        raise ScalingError("params, tokens and losses must have the same length")
    if not (np.all(n > 0) and np.all(d > 0) and np.all(loss > 0) and np.isfinite(loss).all()):
        raise ScalingError("every run needs positive params, tokens and a finite positive loss")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or len(n) < 5:
        raise ScalingError(f"fitting 5 constants needs at least 5 runs over at least 2 model sizes and 2 "
                           f"token budgets; got {len(n)} runs, {len(np.unique(n))} sizes, "
                           f"{len(np.unique(d))} budgets")
    log_n, log_d, log_l = (torch.from_numpy(np.log(v)) for v in (n, d, loss))
    grid = grid or DEFAULT_GRID
    starts = torch.tensor(list(itertools.product(*(grid[k] for k in ("a", "b", "e", "alpha", "beta")))),
                          dtype=torch.float64)

    def objective(theta: torch.Tensor) -> torch.Tensor:  # theta [..., 5] -> summed Huber loss [...]
        a, b, e, alpha, beta = theta.unbind(-1)
        terms = torch.stack([a[..., None] - alpha[..., None] * log_n, b[..., None] - beta[..., None] * log_d,
                             e[..., None].expand(*e.shape, len(log_n))])
        residual = torch.logsumexp(terms, dim=0) - log_l
        return torch.nn.functional.huber_loss(residual, torch.zeros_like(residual), delta=delta,
                                              reduction="none").sum(-1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few dozen points: extra threads only add overhead to every tiny op
    try:
        best_theta, best_value = _polish(objective, starts, refine)
    finally:
        torch.set_num_threads(threads)
    if best_theta is None:
        raise ScalingError("the fit did not converge from any start (are the losses sensible?)")
    a, b, e, alpha, beta = best_theta.tolist()
    law = LossLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)
    residual = np.log(law.loss(n, d)) - np.log(loss)
    return FitResult(law=law, objective=best_value, rms_log_residual=float(np.sqrt(np.mean(residual**2))),
                     points=len(n), starts=len(starts), refined=min(refine, len(starts)),
                     params_kind=params_kind)


def _polish(objective: Any, starts: Any, refine: int) -> tuple[Any, float]:
    """L-BFGS from the `refine` grid starts of lowest objective; (best parameters, objective)."""
    import torch

    with torch.no_grad():
        first = objective(starts)
    best_theta, best_value = None, math.inf
    for index in torch.argsort(first)[:refine].tolist():
        theta = starts[index].clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-12,
                                      tolerance_change=1e-15, history_size=20, line_search_fn="strong_wolfe")

        def closure(theta: torch.Tensor = theta, optimizer: Any = optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            value = objective(theta)
            value.backward()
            return value

        optimizer.step(closure)
        with torch.no_grad():
            value = float(objective(theta))
        if math.isfinite(value) and value < best_value:
            best_theta, best_value = theta.detach().clone(), value
    return best_theta, best_value


def format_fit(result: FitResult, records: Sequence[dict[str, Any]] | None = None) -> str:
    law, ref = result.law, CHINCHILLA
    lines = [f"fitted L(N, D) = E + A/N^alpha + B/D^beta to {result.points} runs (N = {result.params_kind} "
             f"parameters; Huber on log L, L-BFGS from the best {result.refined} of {result.starts} starts)",
             f"{'':<8} {'fitted':>12} {'Chinchilla':>12}"]
    for name in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"{name:<8} {getattr(law, name):>12.4g} {getattr(ref, name):>12.4g}")
    lines.append(f"{'a=β/(α+β)':<8} {law.params_exponent:>12.3f} {ref.params_exponent:>12.3f}"
                 "   (N_opt ∝ C^a, D_opt ∝ C^(1-a))")
    lines.append(f"rms log residual {result.rms_log_residual:.4f} (a typical relative error of "
                 f"{100 * (math.exp(result.rms_log_residual) - 1):.2f}% in the loss)")
    if records:
        computes = sorted({6.0 * r["n"] * r["tokens"] for r in records})
        lines.append("compute-optimal under the fit (C = 6ND):")
        for c in np.geomspace(computes[0], computes[-1], 3):
            n_opt, d_opt = law.optimal(c)
            lines.append(f"  C {c:.2e}: N {_si(float(n_opt))}, D {_si(float(d_opt))} "
                         f"({float(d_opt / n_opt):.1f} tokens/param), L {float(law.loss(n_opt, d_opt)):.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ results
RESULT_FIELDS = ("run", "d_model", "n_layers", "n_heads", "d_ff", "params", "non_embedding_params", "tokens",
                 "steps", "lr", "flops", "val_loss", "train_loss", "seconds")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Sweep results from results.jsonl, results.csv or the sweep folder holding them."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise ScalingError(f"{path} does not exist: give a sweep folder or its results.jsonl/.csv")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".csv":
            records: list[dict[str, Any]] = [
                {k: _number(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (ValueError, csv.Error) as err:
        raise ScalingError(f"{path} is not a results file ({err})") from err
    for i, record in enumerate(records, 1):
        missing = [k for k in ("params", "non_embedding_params", "tokens", "val_loss") if k not in record]
        if missing:
            raise ScalingError(f"{path}: record {i} lacks {', '.join(missing)}")
    return records


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def fit_results(records: Sequence[dict[str, Any]], *, params_kind: ParamsKind = "non_embedding",
                delta: float = 1e-3, refine: int = 64) -> tuple[FitResult, list[dict[str, Any]]]:
    """Fit the law to sweep records; returns the fit and the records with `n` (the N used) added."""
    key = "non_embedding_params" if params_kind == "non_embedding" else "params"
    points = [dict(r, n=float(r[key])) for r in records]
    n, d, loss = ([p[k] for p in points] for k in ("n", "tokens", "val_loss"))
    result = fit_loss_law(n, d, loss, delta=delta, refine=refine, params_kind=params_kind)
    return result, points


def write_results(folder: Path, records: Sequence[dict[str, Any]]) -> None:
    """Merge `records` into results.jsonl and results.csv (by run name), each replaced atomically.

    Merging lets a sweep be extended by another command into the same folder (more sizes,
    more budgets) without losing the runs recorded before.
    """
    merged = {r["run"]: r for r in (read_results(folder) if (folder / "results.jsonl").is_file() else [])}
    merged.update({r["run"]: r for r in records})
    ordered = sorted(merged.values(), key=lambda r: (r["params"], r["tokens"]))
    with atomic_write(folder / "results.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ordered))
    with atomic_write(folder / "results.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(ordered)


# ------------------------------------------------------------------------------ sweep
def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'64x2,128x4' -> [(d_model 64, 2 layers), (128, 4)]."""
    sizes = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        try:
            width, depth = (int(v) for v in item.lower().split("x"))
        except ValueError as err:
            raise ScalingError(f"--sizes: {item!r} is not D_MODELxN_LAYERS (e.g. 64x2)") from err
        if width <= 0 or depth <= 0:
            raise ScalingError(f"--sizes: {item!r} must have a positive width and depth")
        sizes.append((width, depth))
    if not sizes:
        raise ScalingError("--sizes is empty: give e.g. 64x2,128x3")
    return sizes


def parse_tokens(text: str) -> list[int]:
    """'2e5,5e5,1M' -> [200000, 500000, 1000000]."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}
    budgets = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        try:
            value = float(item[:-1]) * scale[item[-1].lower()] if item[-1].lower() in scale else float(item)
        except ValueError as err:
            raise ScalingError(f"--tokens: {item!r} is not a number of tokens (e.g. 2e5 or 500K)") from err
        if not value >= 1:
            raise ScalingError(f"--tokens: {item!r} must be at least one token")
        budgets.append(int(value))
    if not budgets:
        raise ScalingError("--tokens is empty: give e.g. 2e5,5e5")
    return budgets


def sized_model(base: dict[str, Any], d_model: int, n_layers: int) -> dict[str, Any]:
    """The base `model:` section at another width and depth; head size, GQA and MLP ratios kept."""
    from lmforge.train.pretrain import model_config

    config = model_config(base)
    head_dim = config.dim_per_head
    if d_model % head_dim:
        raise ScalingError(f"d_model {d_model} is not a multiple of the base model's head size {head_dim}")
    n_heads = d_model // head_dim
    group = config.n_heads // config.kv_heads
    n_kv_heads = n_heads // group if n_heads % group == 0 else n_heads
    d_ff = max(8, int(round(config.d_ff / config.d_model * d_model / 8)) * 8)
    return dict(base) | {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                         "n_kv_heads": n_kv_heads, "d_ff": d_ff, "head_dim": None}


@dataclass
class SweepRun:
    name: str
    d_model: int
    n_layers: int
    tokens: int  # the budget asked for
    config: Any  # PretrainConfig

    @property
    def steps(self) -> int:
        return self.config.train.steps


def plan_sweep(base: Any, sizes: Sequence[tuple[int, int]], budgets: Sequence[int], output: str | Path, *,
               max_flops: float | None = None, lr_scale: LrScale = "width") -> list[SweepRun]:
    """One `PretrainConfig` per (size, token budget): its own output folder, steps, warmup and lr.

    `max_flops` leaves out the grid points that would cost more (a triangular design:
    the largest models only at the smaller budgets). With `lr_scale="width"` the
    recipe's `optim.lr` is the rate at the recipe's own d_model and each size gets
    lr × d_model(recipe) / d_model, the muP rule for Adam's hidden weights: one rate for
    all sizes would be too large for the wide models or too small for the narrow ones,
    and the sweep would measure the learning rate instead of the model size.
    """
    from lmforge.train.pretrain import model_config

    if lr_scale not in ("width", "none"):
        raise ScalingError(f"lr scaling must be width or none, got {lr_scale!r}")
    runs = []
    batch = base.train.batch_tokens
    base_width = model_config(base.model).d_model
    for (width, depth), budget in itertools.product(sizes, sorted(budgets)):
        config = copy.deepcopy(base)
        config.model = sized_model(base.model, width, depth)
        mconfig = model_config(config.model)  # a size that cannot be built fails here, before any training
        steps = max(1, round(budget / batch))
        if max_flops and mconfig.flops_per_token(base.train.seq_len) * steps * batch > max_flops:
            continue
        config.train.steps = steps
        config.train.eval_interval = 0  # one validation at the end is all the fit needs
        config.train.keep_checkpoints = 1
        config.schedule.warmup_steps = min(base.schedule.warmup_steps, max(1, steps // 4))
        if lr_scale == "width":
            config.optim.lr = base.optim.lr * base_width / width
        config.resume = "auto"
        name = f"d{width}-l{depth}-t{_si(budget)}"
        config.output = str(Path(output) / "runs" / name)
        runs.append(SweepRun(name, width, depth, budget, config))
    return runs


def _with_final_val_loss(run: SweepRun, summary: dict[str, Any]) -> dict[str, Any]:
    """A run that died after its last checkpoint but before summary.json resumes at its last
    step and trains nothing; its final validation loss is then in metrics.jsonl's last record."""
    if "val_loss" in summary:
        return summary
    metrics = Path(run.config.output) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()] \
        if metrics.is_file() else []
    final = [r for r in records if r.get("step") == run.steps and "val_loss" in r]
    if not final:
        raise ScalingError(f"{run.config.output}: the run has no validation loss (does the data have a "
                           "validation split?)")
    return summary | {"val_loss": final[-1]["val_loss"], "final_loss": final[-1]["loss"]}


def _check_same_recipe(run: SweepRun) -> None:
    """Refuse to reuse or resume a run folder that was trained with another recipe.

    Without this a changed recipe (another lr, other data) would silently mix old and
    new runs in one fit. Keys the saved recipe does not have (added to lmforge since)
    are not counted; nor are `output` and `resume`.
    """
    from lmforge.train.pretrain import _jsonable

    saved_path = Path(run.config.output) / "recipe.json"
    if not saved_path.is_file():
        return
    try:
        saved = _flatten(json.loads(saved_path.read_text(encoding="utf-8")))
    except ValueError:
        return
    planned = _flatten(_jsonable(asdict(run.config)))
    differ = sorted(k for k in saved.keys() & planned.keys()
                    if saved[k] != planned[k] and k not in ("output", "resume"))
    if differ:
        shown = "; ".join(f"{k}: {saved[k]!r} there, {planned[k]!r} now" for k in differ[:4])
        raise ScalingError(f"{run.config.output} was trained with another recipe ({shown}): give the sweep "
                           "another --output, or delete that run folder to retrain it")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _finished(run: SweepRun) -> dict[str, Any] | None:
    _check_same_recipe(run)
    path = Path(run.config.output) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return summary if summary.get("steps") == run.steps and "val_loss" in summary else None


def run_record(run: SweepRun, summary: dict[str, Any]) -> dict[str, Any]:
    from lmforge.train.pretrain import model_config

    mconfig = model_config(run.config.model)
    cfg = run.config.train
    tokens = run.steps * cfg.batch_tokens
    return {
        "run": run.name, "d_model": mconfig.d_model, "n_layers": mconfig.n_layers, "n_heads": mconfig.n_heads,
        "d_ff": mconfig.d_ff, "params": mconfig.num_parameters(),
        "non_embedding_params": mconfig.num_parameters(include_embeddings=False),
        "tokens": tokens, "steps": run.steps, "lr": run.config.optim.lr,
        "flops": mconfig.flops_per_token(cfg.seq_len) * tokens,
        "val_loss": summary["val_loss"], "train_loss": summary.get("final_loss"),
        "seconds": summary.get("seconds"),
    }


def sweep(base: Any, sizes: Sequence[tuple[int, int]], budgets: Sequence[int], output: str | Path, *,
          max_flops: float | None = None, lr_scale: LrScale = "width", threads: int | None = None,
          quiet: bool = False) -> list[dict[str, Any]]:
    """Train every (size, budget) run not finished yet; results.jsonl/.csv in `output` after each run.

    A finished run (its summary.json at the planned step, with a validation loss) is
    read back, not retrained; an interrupted one resumes from its newest checkpoint.
    `threads` sets torch's CPU threads for the sweep (tiny models often run fastest on one).
    """
    import torch

    from lmforge.data.shards import load_shard_set
    from lmforge.train.pretrain import pretrain

    if not base.data.folder:
        raise ScalingError("data.folder is required: a folder of token shards (`lmforge tokenize` output)")
    meta, _ = load_shard_set(base.data.folder, "train")
    if not meta["splits"].get("val", {}).get("tokens"):
        raise ScalingError(f"{base.data.folder} has no validation split: the fit needs each run's validation "
                           "loss (tokenize with --val-fraction > 0)")
    runs = plan_sweep(base, sizes, budgets, output, max_flops=max_flops, lr_scale=lr_scale)
    if not runs:
        raise ScalingError("no run fits under --max-flops: raise it, or give smaller sizes or budgets")
    folder = Path(output)
    records: list[dict[str, Any]] = []
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for i, run in enumerate(runs, 1):
            summary = _finished(run)
            started = time.perf_counter()
            if summary is None:
                summary = _with_final_val_loss(run, pretrain(run.config, quiet=True))
                note = f"trained in {time.perf_counter() - started:.1f}s"
            else:
                note = "already done"
            record = run_record(run, summary)
            records.append(record)
            write_results(folder, records)
            if not quiet:
                print(f"scaling sweep [{i}/{len(runs)}] {run.name}: N {_si(record['non_embedding_params'])} "
                      f"non-embedding ({_si(record['params'])} total), D {_si(record['tokens'])}, val loss "
                      f"{record['val_loss']:.4f} ({note})", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(default_threads)
    return records


def format_sweep_plan(runs: Sequence[SweepRun]) -> str:
    from lmforge.train.pretrain import model_config

    lines = [f"{'run':<18} {'params':>8} {'non-emb':>8} {'tokens':>8} {'steps':>6} {'lr':>9} {'FLOPs':>10}"]
    for run in runs:
        m = model_config(run.config.model)
        tokens = run.steps * run.config.train.batch_tokens
        lines.append(f"{run.name:<18} {_si(m.num_parameters()):>8} "
                     f"{_si(m.num_parameters(include_embeddings=False)):>8} {_si(tokens):>8} {run.steps:>6} "
                     f"{run.config.optim.lr:>9.2e} "
                     f"{m.flops_per_token(run.config.train.seq_len) * tokens:>10.2e}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plot
def plot_fit(result: FitResult, points: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Three panels, all from the fit and the runs:

    1. validation loss against tokens D, one colour per model size, with the fitted curves;
    2. loss against compute C = 6ND per size, with the compute-optimal frontier (the
       lower envelope: the best loss any N reaches at each C);
    3. the fitted iso-loss contours over (D, N) with iso-FLOP lines, the frontier and the
       20 tokens/parameter line, so the fit's and the rule's allocations can be compared.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return None
    law = result.law
    sizes = sorted({p["n"] for p in points})
    n_all = np.array(sizes)
    d_all = np.array([p["tokens"] for p in points], dtype=float)
    d_grid = np.geomspace(d_all.min() / 1.5, d_all.max() * 1.5, 100)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5.4))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    for n, colour in zip(sizes, colours):
        mine = sorted((p for p in points if p["n"] == n), key=lambda p: p["tokens"])
        d_mine = np.array([p["tokens"] for p in mine], dtype=float)
        loss_mine = [p["val_loss"] for p in mine]
        left.plot(d_mine, loss_mine, "o", color=colour, label=f"N = {_si(n)}")
        left.plot(d_grid, law.loss(n, d_grid), "-", color=colour, alpha=0.8)
        middle.plot(6 * n * d_mine, loss_mine, "o", color=colour, label=f"N = {_si(n)}")
        middle.plot(6 * n * d_grid, law.loss(n, d_grid), "-", color=colour, alpha=0.6)
    left.set_xlabel("training tokens D")
    left.set_ylabel("validation loss (nats/token)")
    left.set_title(f"fit: L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}")
    left.legend(fontsize=8)

    c_grid = np.geomspace(6 * n_all.min() * d_grid[0], 6 * n_all.max() * d_grid[-1], 200)
    n_opt, d_opt = law.optimal(c_grid)
    middle.plot(c_grid, law.loss(n_opt, d_opt), "-", color="tab:red", linewidth=2,
                label="compute-optimal frontier")
    middle.set_ylim(*left.get_ylim())
    middle.set_xlabel("training compute C = 6ND (FLOPs)")
    middle.set_ylabel("validation loss (nats/token)")
    middle.set_title(f"loss against compute; N_opt ∝ C^{law.params_exponent:.2f} "
                     f"(Chinchilla {CHINCHILLA.params_exponent:.2f})")
    middle.legend(fontsize=8)

    # the (D, N) window: the runs, and where the frontier and the 20 tokens/param line cross the D range
    anchors = [n_all.min() / 2, n_all.max() * 2, d_grid[0] / TOKENS_PER_PARAM, d_grid[-1] / TOKENS_PER_PARAM,
               law.optimal_params(d_grid[0]), law.optimal_params(d_grid[-1])]
    anchors = [a for a in anchors if math.isfinite(a) and a > 0]
    n_lo = max(min(anchors), n_all.min() / 100)
    n_hi = min(max(anchors), n_all.max() * 100)
    n_grid = np.geomspace(n_lo, n_hi, 150)
    dd, nn = np.meshgrid(d_grid, n_grid)
    surface = right.contour(dd, nn, law.loss(nn, dd), levels=10, cmap="viridis", linewidths=0.8)
    right.clabel(surface, fontsize=7, fmt="%.2f")
    for c in np.geomspace(6 * n_lo * d_grid[0], 6 * n_hi * d_grid[-1], 10)[1:-1]:
        right.plot(d_grid, c / (6 * d_grid), ":", color="grey", linewidth=0.7)
    right.plot(d_grid, [law.optimal_params(d) for d in d_grid], "-", color="tab:red", linewidth=2,
               label="compute-optimal frontier (fit)")
    right.plot(d_grid, d_grid / TOKENS_PER_PARAM, "--", color="black", linewidth=1,
               label="20 tokens/parameter")
    right.scatter(d_all, [p["n"] for p in points], c="tab:red", s=14, zorder=3, label="runs")
    right.set_xlim(d_grid[0], d_grid[-1])
    right.set_ylim(n_lo, n_hi)
    right.set_xlabel("training tokens D")
    right.set_ylabel(f"parameters N ({result.params_kind.replace('_', '-')})")
    right.set_title("fitted iso-loss contours; dotted: iso-FLOP lines")
    right.legend(fontsize=8, loc="best", framealpha=0.9)
    si = FuncFormatter(lambda value, _: _si(value))
    for axis in (left, middle, right):
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        axis.xaxis.set_major_formatter(si)
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    right.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 3)))
    right.yaxis.set_major_formatter(si)
    right.yaxis.set_minor_formatter(NullFormatter())
    middle.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0e}"))
    fig.tight_layout()
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
    return path
