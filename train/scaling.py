"""Scaling laws ``L(N, D) = E + A / N**alpha + B / D**beta``: the fit, bootstrap intervals, the
compute-optimal split of a FLOP budget, and a loss-vs-compute plot.

    python -m train.sweep --grid cpu --out runs/sweep             # trains a grid, then fits with this module
    python -m train.sweep --out runs/sweep --fit-only --budget 1e15   # refits OUT/sweep.jsonl

The fit is Hoffmann et al. (2022, "Chinchilla") approach 3, which "Scaling Laws for Native
Multimodal Models" (Shukor et al., 2025) follows: with ``A = exp(a)``, ``B = exp(b)``,
``E = exp(e)``, minimise over ``(a, b, e, alpha, beta)``

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3

with L-BFGS (``torch.optim.LBFGS``, float64) from a grid of initial values, keeping the best
optimum. Chinchilla's grid is alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in
{0, 5, ..., 25} (4,500 points). Here the objective is evaluated at every grid point (one vectorised
pass) and L-BFGS is started from the ``starts`` best of them (``starts=None``: from all of them, as
Chinchilla did): 4,500 L-BFGS runs take about a minute on one core, and the bootstrap repeats the
fit hundreds of times. On synthetic data whose coefficients the points determine, L-BFGS from
the few best-scored starts reaches the optimum of all starts (tests/test_scaling.py, on a small grid). Where the points do not determine
a coefficient (a term below the noise), starts end at very different values of it with nearly the
same objective; the bootstrap intervals are then wide, which is the honest answer.

N is whatever the caller counts as model size (``train.sweep`` uses non-embedding parameters,
``count_parameters`` below), D the training tokens, C = 6 N D the training FLOPs. With C fixed,
``L(N, C / 6N)`` is minimised in closed form (as in Chinchilla):

    N_opt(C) = G (C/6)^(beta/(alpha+beta)),   D_opt(C) = (C/6) / N_opt(C),
    G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

# Chinchilla's grid of initial values (Hoffmann et al. 2022, approach 3).
CHINCHILLA_GRID: dict[str, tuple[float, ...]] = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
PARAMS = ("E", "A", "B", "alpha", "beta")
# Modules whose parameters are vocabulary lookups / read-outs (text tokens, VQ codes): left out of
# the non-embedding count, as Kaplan et al. (2020) count N. Their size is set by the vocabulary,
# not by the width and depth the sweep varies, and at toy widths they are a large share of it
# (29% of the CPU sweep's width-32 model).
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "gen_embed")


@dataclass(frozen=True)
class ScalingFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = math.nan  # the Huber objective (sum over points) at this optimum
    n_points: int = 0

    def predict(self, N: Any, D: Any) -> np.ndarray:
        """``L(N, D)``, broadcast over arrays."""
        N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(total, non_embedding)`` parameter counts of a ``HybridModel``; a tied weight counts once
    (``named_parameters`` yields it once). Non-embedding leaves out ``EMBEDDING_MODULES``."""
    total = non_embedding = 0
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", p.numel())  # under ZeRO-3 a parameter is a placeholder
        total += n
        if name.split(".")[0] not in EMBEDDING_MODULES:
            non_embedding += n
    return total, non_embedding


def _objective(theta: torch.Tensor, logN: torch.Tensor, logD: torch.Tensor, logL: torch.Tensor,
               delta: float) -> torch.Tensor:
    """Huber objective for parameter rows ``theta`` (..., 5) = (a, b, e, alpha, beta): (...,)."""
    a, b, e, alpha, beta = theta.unbind(-1)
    terms = torch.stack([a[..., None] - alpha[..., None] * logN, b[..., None] - beta[..., None] * logD,
                         e[..., None].expand(*e.shape, logN.shape[0])], -1)  # (..., n, 3)
    r = torch.logsumexp(terms, -1) - logL
    return torch.nn.functional.huber_loss(r, torch.zeros_like(r), reduction="none", delta=delta).sum(-1)


def _grid(init_grid: dict[str, Sequence[float]]) -> torch.Tensor:
    names = ("a", "b", "e", "alpha", "beta")
    missing = [k for k in names if k not in init_grid]
    if missing:
        raise ValueError(f"init_grid needs values for {names}; missing {missing}")
    return torch.tensor(list(itertools.product(*(init_grid[k] for k in names))), dtype=torch.float64)


def _check_points(N: Any, D: Any, L: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N, D, L = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (N, D, L))
    if not len(N) == len(D) == len(L):
        raise ValueError(f"N, D and L must have the same length, got {len(N)}, {len(D)}, {len(L)}")
    if not (np.isfinite(N).all() and np.isfinite(D).all() and np.isfinite(L).all()):
        raise ValueError("N, D and L must be finite")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise ValueError("N, D and L must be positive (the fit is in log space)")
    # five parameters: at least five points, and at least two sizes and two budgets, or A / alpha
    # (B / beta) are not identified at all
    distinct = len(set(zip(N.tolist(), D.tolist())))
    if distinct < 5 or len(set(N.tolist())) < 2 or len(set(D.tolist())) < 2:
        raise ValueError(f"fitting L(N, D) = E + A/N^alpha + B/D^beta (5 parameters) needs at least 5 distinct "
                         f"(N, D) points with 2 or more values of each; got {distinct} distinct points, "
                         f"{len(set(N.tolist()))} values of N, {len(set(D.tolist()))} of D")
    return N, D, L


def _value_and_grad(theta: torch.Tensor, logN: torch.Tensor, logD: torch.Tensor, logL: torch.Tensor,
                    delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective of one parameter row, divided by ``delta``, and its gradient, in closed form:
    each L-BFGS step evaluates it a few times, and autograd's bookkeeping would cost more than the
    arithmetic on a few dozen points."""
    a, b, e, alpha, beta = theta.tolist()
    terms = torch.stack([a - alpha * logN, b - beta * logD, torch.full_like(logN, e)], -1)  # (n, 3)
    lse = torch.logsumexp(terms, -1)
    weights = torch.softmax(terms, -1)  # d LSE / d term
    r = lse - logL
    value = torch.where(r.abs() < delta, 0.5 * r * r / delta, r.abs() - 0.5 * delta).sum()  # Huber / delta
    dr = (r.clamp(-delta, delta) / delta)[:, None] * weights  # d value / d term, (n, 3)
    grad = torch.stack([dr[:, 0].sum(), dr[:, 1].sum(), dr[:, 2].sum(), -(dr[:, 0] * logN).sum(),
                        -(dr[:, 1] * logD).sum()])
    return value, grad


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread: on vectors of a few dozen values, the OpenMP hand-offs of a
    multi-threaded op cost more than the op, and on a busy machine each one waits milliseconds for
    a core (measured: 0.9 s vs 0.04 s per L-BFGS run with another job on the 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _lbfgs(theta0: torch.Tensor, logN: torch.Tensor, logD: torch.Tensor, logL: torch.Tensor, delta: float,
           max_iter: int) -> tuple[torch.Tensor, float]:
    theta = theta0.clone().requires_grad_(True)
    # The objective is divided by delta (the same minimiser): residuals below delta would otherwise
    # give values of order delta^2 / 2, which L-BFGS's change tolerance reads as converged.
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-12)

    def closure() -> float:
        value, grad = _value_and_grad(theta.detach(), logN, logD, logL, delta)
        theta.grad = grad
        return float(value)

    opt.step(closure)
    with torch.no_grad():
        value = float(_objective(theta, logN, logD, logL, delta))
    return theta.detach(), value


def fit_scaling_law(N: Any, D: Any, L: Any, delta: float = 1e-3,
                    init_grid: dict[str, Sequence[float]] | None = None, starts: int | None = 16,
                    extra_inits: Sequence[ScalingFit] = (), max_iter: int = 500) -> ScalingFit:
    """Fit ``L(N, D) = E + A/N^alpha + B/D^beta`` to points ``(N_i, D_i, L_i)`` (module docstring).

    ``init_grid`` maps a, b, e, alpha, beta to their initial values (default ``CHINCHILLA_GRID``);
    L-BFGS starts from the ``starts`` grid points with the lowest objective (``None``: all), and
    from ``extra_inits`` (e.g. the fit to all points, when fitting a bootstrap resample). The
    optimum with the lowest objective is returned."""
    with _one_thread():
        return _fit(*_check_points(N, D, L), delta, init_grid, starts, extra_inits, max_iter)


def _fit(N: np.ndarray, D: np.ndarray, L: np.ndarray, delta: float, init_grid: dict[str, Sequence[float]] | None,
         starts: int | None, extra_inits: Sequence[ScalingFit], max_iter: int) -> ScalingFit:
    logN, logD, logL = (torch.as_tensor(np.log(x), dtype=torch.float64) for x in (N, D, L))
    grid = _grid(init_grid or CHINCHILLA_GRID)
    if starts is not None and starts < len(grid):
        with torch.no_grad():
            grid = grid[_objective(grid, logN, logD, logL, delta).argsort()[:starts]]
    tiny = np.finfo(np.float64).tiny  # a fit whose E (or A, B) underflowed to 0 starts from exp(-708)
    extra = [[math.log(max(f.A, tiny)), math.log(max(f.B, tiny)), math.log(max(f.E, tiny)), f.alpha, f.beta]
             for f in extra_inits]
    if extra:
        grid = torch.cat([grid, torch.tensor(extra, dtype=torch.float64)])
    best, best_value = None, math.inf
    for theta0 in grid:
        theta, value = _lbfgs(theta0, logN, logD, logL, delta, max_iter)
        # (a run that drifted to a, b or e beyond exp's range is a divergence, not an optimum)
        if math.isfinite(value) and value < best_value and bool(torch.isfinite(theta).all()) and \
                float(theta[:3].max()) < 700:
            best, best_value = theta, value
    if best is None:
        raise RuntimeError("no L-BFGS run reached a finite optimum")
    a, b, e, alpha, beta = best.tolist()
    return ScalingFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, objective=best_value,
                      n_points=len(L))


@dataclass
class Bootstrap:
    fits: list[ScalingFit]  # one per resample that could be fitted
    intervals: dict[str, tuple[float, float]]  # parameter -> (low, high) percentile interval
    level: float
    skipped: int  # resamples with too few distinct points to fit


def bootstrap(N: Any, D: Any, L: Any, n_boot: int = 200, level: float = 0.9, seed: int = 0,
              fit: ScalingFit | None = None, delta: float = 1e-3, starts: int = 1,
              init_grid: dict[str, Sequence[float]] | None = None) -> Bootstrap:
    """Percentile intervals by resampling the points with replacement ``n_boot`` times and
    refitting each resample (L-BFGS from the full fit ``fit`` and the ``starts`` best grid
    points). A resample with fewer than 5 distinct points (or a single N or D) cannot be fitted
    and is skipped (counted), as is one where every L-BFGS run diverged."""
    N, D, L = _check_points(N, D, L)
    fit = fit or fit_scaling_law(N, D, L, delta, init_grid)
    rng = np.random.default_rng(seed)
    fits, skipped = [], 0
    for _ in range(n_boot):
        i = rng.integers(0, len(L), len(L))
        try:
            fits.append(fit_scaling_law(N[i], D[i], L[i], delta, init_grid, starts, extra_inits=[fit]))
        except (ValueError, RuntimeError):  # too few distinct points, or every start diverged
            skipped += 1
    if not fits:
        raise ValueError(f"none of {n_boot} resamples of {len(L)} points could be fitted")
    q = 100 * (1 - level) / 2
    intervals = {}
    for k in PARAMS:
        values = np.array([getattr(f, k) for f in fits])
        intervals[k] = (float(np.percentile(values, q)), float(np.percentile(values, 100 - q)))
    return Bootstrap(fits, intervals, level, skipped)


def compute_optimal(fit: ScalingFit, C: float) -> tuple[float, float]:
    """``(N_opt, D_opt)`` minimising ``L(N, D)`` subject to ``6 N D = C`` (the closed form in the
    module docstring)."""
    if fit.alpha <= 0 or fit.beta <= 0:
        raise ValueError(f"no compute-optimal size: the fit has alpha={fit.alpha:.3g}, beta={fit.beta:.3g} "
                         f"(both must be > 0 for the loss to fall with N and with D)")
    s = fit.alpha + fit.beta
    # in logs: A and B can be huge (exp(25)) and alpha, beta small
    log_G = (math.log(fit.alpha) + math.log(fit.A) - math.log(fit.beta) - math.log(fit.B)) / s
    log_N = log_G + fit.beta / s * math.log(C / 6)
    N_opt = math.exp(log_N)
    return N_opt, C / 6 / N_opt


def plot_loss_vs_compute(points: Sequence[dict], fits: dict[str, ScalingFit], path: str | Path,
                         budget: float | None = None, title: str = "") -> Path:
    """One panel per fitted modality (``fits`` keys are the loss names in ``points``: "text_loss",
    ...): every run as a dot at C = 6 N D (coloured by N), the fitted L(N, D) of each N along its
    budgets, and the compute-optimal frontier L(N_opt(C), D_opt(C)). ``points`` are
    ``train.sweep`` records (``N``, ``D`` and the losses)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    path = Path(path)
    names = list(fits)
    fig, axes = plt.subplots(1, len(names), figsize=(5.0 * len(names), 3.8), squeeze=False)
    sizes = sorted({p["N"] for p in points})
    cmap = plt.get_cmap("viridis")
    C_all = np.array([6 * p["N"] * p["D"] for p in points], dtype=np.float64)
    C_lo, C_hi = C_all.min() / 3, max(C_all.max() * 3, budget or 0)
    for ax, name in zip(axes[0], names):
        fit = fits[name]
        for k, N in enumerate(sizes):
            colour = cmap(k / max(1, len(sizes) - 1))
            mine = [p for p in points if p["N"] == N]
            ax.scatter([6 * N * p["D"] for p in mine], [p[name] for p in mine], color=colour, s=22, zorder=3,
                       label=f"N={N / 1e6:.3g}M" if N >= 1e5 else f"N={N / 1e3:.3g}k")
            D = np.geomspace(min(p["D"] for p in mine) / 2, max(p["D"] for p in mine) * 2, 50)
            ax.plot(6 * N * D, fit.predict(N, D), color=colour, lw=1, alpha=0.7)
        if fit.alpha > 0 and fit.beta > 0:
            C = np.geomspace(C_lo, C_hi, 80)
            opt = [compute_optimal(fit, c) for c in C]
            ax.plot(C, [float(fit.predict(n, d)) for n, d in opt], "k--", lw=1.2, label="compute-optimal")
        if budget:
            ax.axvline(budget, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C = 6 N D (FLOPs)")
        ax.set_ylabel(name.replace("_", " "))
        ax.set_title(f"E={fit.E:.3g} A={fit.A:.3g} B={fit.B:.3g}\nalpha={fit.alpha:.3g} beta={fit.beta:.3g}",
                     fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    from eval.report import save_figure

    return save_figure(fig, path)
