"""The parametric law L(N, D) = E + A / N^alpha + B / D^beta and its fit (Hoffmann et al. 2022, Approach 3).

Fitted as Besiroglu et al. 2024 redo Hoffmann's procedure: in terms of a = log A, b = log B, e = log E,
the predicted log loss is LSE(a - alpha log N, b - beta log D, e) (log-sum-exp); the objective is the
SUM over runs of Huber(predicted - observed log loss) with delta 1e-3; L-BFGS starts from every point
of a grid (alpha, beta in 0..2 by 0.5, e in -1..1 by 0.5, a, b in 0..25 by 5) and the best end point
is kept. Intervals come from refitting bootstrap resamples of the runs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from ember.errors import UserError
from ember.pretrain.scaling.lbfgs import minimize_batch

PARAMS = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3
GRID = {"alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5), "e": np.arange(-1, 1.01, 0.5),
        "a": np.arange(0, 25.1, 5), "b": np.arange(0, 25.1, 5)}


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params, tokens):
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    @property
    def falls(self) -> bool:
        """Loss falls with both N and D (alpha, beta > 0): only then is there a compute-optimal (N*, D*)."""
        return self.alpha > 0 and self.beta > 0

    def optimal(self, flops):
        """Compute-optimal (N*, D*) for C = 6 N D: the minimum of the law along that constraint."""
        a, b = self.alpha, self.beta
        if not self.falls:
            raise UserError(f"the fitted law has alpha {a:.3g}, beta {b:.3g}: loss does not fall with both N and D, so there is "
                            "no compute-optimal size (runs of very few steps, or far from compute-optimal, do this)", "the fit")
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        c6 = np.asarray(flops, dtype=float) / 6
        return g * c6 ** (b / (a + b)), c6 ** (a / (a + b)) / g

    @property
    def params_exponent(self) -> float:
        """N*(C) grows as C^(beta / (alpha + beta)); D*(C) as C^(alpha / (alpha + beta))."""
        return self.beta / (self.alpha + self.beta)

    def as_dict(self) -> dict:
        return asdict(self)


def theta_to_law(theta: np.ndarray) -> Law:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                    weights: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber loss of the log-loss residuals and its gradient, for K parameter rows at once.

    theta (K, 5) = (a, b, e, alpha, beta); log_n, log_d, log_loss (n,); weights (K, n) or (n,): how many
    times each run counts (1 for the data, bootstrap counts for a resample). Returns f (K,), grad (K, 5).
    """
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))  # each (K, 1)
    t_n, t_d = a - alpha * log_n, b - beta * log_d  # (K, n): log A/N^alpha, log B/D^beta
    top = np.maximum(np.maximum(t_n, t_d), e)
    exp_n, exp_d, exp_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = exp_n + exp_d + exp_e
    residual = top + np.log(total) - log_loss  # (K, n): predicted - observed log loss
    inside = np.abs(residual) <= delta
    huber = np.where(inside, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))
    dres = weights * np.where(inside, residual, delta * np.sign(residual)) / total  # d objective / d exp-term
    g_n, g_d = dres * exp_n, dres * exp_d  # (K, n): shares of the LSE gradient
    grad = np.stack([g_n.sum(1), g_d.sum(1), (dres * exp_e).sum(1), -(g_n @ log_n), -(g_d @ log_d)], axis=1)
    return (weights * huber).sum(axis=1), grad


def initial_grid() -> np.ndarray:
    """(num_inits, 5) starting points (a, b, e, alpha, beta)."""
    rows = itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])
    return np.array(list(rows), dtype=float)


def check_runs(params, tokens, losses, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs as float arrays, or a UserError naming what makes them unfit for a law."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (params, tokens, losses))
    if len(n) < 5:
        raise UserError(f"a scaling law needs at least 5 runs, got {len(n)}", where)
    for name, values in (("params", n), ("tokens", d), ("loss", loss)):
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
        if bad.size:
            raise UserError(f"{name} must be finite and positive: row {bad[0] + 1} has {values[bad[0]]!r}", where)
    if len(np.unique(n)) < 2:
        raise UserError("a scaling law needs runs of at least 2 model sizes, all runs have the same params", where)
    if len(np.unique(d)) < 2:
        raise UserError("a scaling law needs runs of at least 2 token counts, all runs have the same tokens", where)
    return n, d, loss


def best_rows(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    return x[np.nanargmin(np.where(np.isfinite(f), f, np.inf))]


@dataclass
class Fit:
    law: Law
    objective: float
    num_inits: int
    samples: np.ndarray  # (num_bootstrap, 5) laws of the resamples: E, A, B, alpha, beta
    residuals: np.ndarray  # (n,) observed - predicted log loss of the runs

    @property
    def finite_samples(self) -> np.ndarray:
        """The resamples whose refit stayed finite. Runs that do not pin the law down let some refits run off to an
        infinite A or B; they carry no interval, and `summary` says how many there were."""
        return self.samples[np.isfinite(self.samples).all(axis=1)]

    def standard_errors(self) -> dict[str, float]:
        with np.errstate(over="ignore"):
            return {k: float(v) for k, v in zip(PARAMS, self.finite_samples.std(axis=0, ddof=1))}

    def intervals(self, level: float = 0.95) -> dict[str, list[float]]:
        lo, hi = np.percentile(self.finite_samples, [50 * (1 - level), 50 * (1 + level)], axis=0)
        return {k: [float(a), float(b)] for k, a, b in zip(PARAMS, lo, hi)}

    def summary(self) -> dict:
        """The fitted law, standard errors, 95% intervals and the exponents of N*(C), D*(C)."""
        finite = self.finite_samples
        exps = finite[:, 4] / (finite[:, 3] + finite[:, 4])
        return {**self.law.as_dict(), "se": self.standard_errors(), "interval": self.intervals(),
                "params_exponent": self.law.params_exponent, "tokens_exponent": 1 - self.law.params_exponent,
                "params_exponent_interval": [float(v) for v in np.percentile(exps, [2.5, 97.5])],
                "objective": self.objective, "huber_delta": HUBER_DELTA, "num_inits": self.num_inits,
                "num_bootstrap": len(self.samples), "num_bootstrap_diverged": len(self.samples) - len(finite),
                "num_runs": len(self.residuals)}

    def to_json(self) -> dict:
        """All of it, the bootstrap laws and residuals included: what `predict --fit` reads back."""
        return {**self.summary(), "samples": self.samples.tolist(), "residuals": self.residuals.tolist()}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Fit":
        try:
            law = Law(*(float(data[k]) for k in PARAMS))
            samples = np.asarray(data["samples"], dtype=float).reshape(-1, 5)
            return cls(law=law, objective=float(data["objective"]), num_inits=int(data["num_inits"]), samples=samples,
                       residuals=np.asarray(data["residuals"], dtype=float))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not a fit file written by `ember scaling fit --out` ({type(e).__name__}: {e})", where) from None

    def predict(self, params: float, tokens: float, level: float = 0.95, seed: int = 0) -> dict:
        """Point prediction with the law's interval (bootstrap laws) and the interval of one new run (bootstrap
        laws times a residual drawn from the fit's own: run-to-run scatter the law does not explain)."""
        point = float(self.law.loss(params, tokens))
        s = self.finite_samples
        with np.errstate(over="ignore"):  # a huge N^alpha makes its term 0, as it should
            means = s[:, 0] + s[:, 1] / params ** s[:, 3] + s[:, 2] / tokens ** s[:, 4]
        rng = np.random.default_rng(seed)
        runs = means * np.exp(rng.choice(self.residuals, size=len(means)))
        q = [50 * (1 - level), 50 * (1 + level)]
        return {"params": float(params), "tokens": float(tokens), "flops": 6.0 * params * tokens, "loss": point,
                "interval": [float(v) for v in np.percentile(means, q)],
                "run_interval": [float(v) for v in np.percentile(runs, q)], "level": level}


def fit_law(params, tokens, losses, *, num_bootstrap: int = 1000, seed: int = 0, where: str = "runs") -> Fit:
    """Approach 3 on the runs (N, D, final loss); `num_bootstrap` resamples give standard errors and intervals."""
    n, d, loss = check_runs(params, tokens, losses, where)
    log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)
    starts = initial_grid()
    ones = np.ones_like(log_n)
    objective = lambda th, rows: huber_objective(th, log_n, log_d, log_loss, ones)  # noqa: E731
    # Every start for a few iterations, the best tenth of them a few hundred more, and those then within 1% of
    # the best to convergence: the others sit in flat, degenerate corners of the grid (alpha or beta near 0,
    # a term swamping the others) and never catch up, while costing most of the time.
    x, f, _ = minimize_batch(objective, starts, max_iter=30)
    for max_iter, keep in ((300, f <= np.nanquantile(f, 0.1)), (3000, None)):
        rows = np.flatnonzero(keep if keep is not None else f <= np.nanmin(f) * 1.01)
        x[rows], f[rows], _ = minimize_batch(objective, x[rows], max_iter=max_iter)
    best = best_rows(x, f)
    law = theta_to_law(best)
    residuals = log_loss - np.log(law.loss(n, d))
    samples = bootstrap(log_n, log_d, log_loss, best, num_bootstrap, seed)
    return Fit(law=law, objective=float(f[np.nanargmin(f)]), num_inits=len(starts), samples=samples, residuals=residuals)


def bootstrap(log_n, log_d, log_loss, best: np.ndarray, num: int, seed: int) -> np.ndarray:
    """(num, 5) laws (E, A, B, alpha, beta) refitted on resamples of the runs (drawn with replacement), all
    resamples optimised as one batch, each starting from the full fit's optimum."""
    if num <= 0:
        return np.empty((0, 5))
    rng = np.random.default_rng(seed)
    count = len(log_n)
    weights = np.stack([np.bincount(rng.integers(0, count, count), minlength=count) for _ in range(num)]).astype(float)
    x, _, _ = minimize_batch(lambda th, rows: huber_objective(th, log_n, log_d, log_loss, weights[rows]),
                             np.repeat(best[None], num, axis=0))
    with np.errstate(over="ignore"):  # a diverged refit's A or B becomes inf: see Fit.finite_samples
        return np.stack([np.exp(x[:, 2]), np.exp(x[:, 0]), np.exp(x[:, 1]), x[:, 3], x[:, 4]], axis=1)
