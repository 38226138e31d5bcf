"""Parametric laws L(N, D) and their fit: Hoffmann et al. 2022 Approach 3, done right.

Two families, fitted the same way:
- `Law` (`chinchilla`, the default): L = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022).
- `InteractionLaw` (`interaction`): L = E + ((Nc / N)^(alpha_N / alpha_D) + Dc / D)^alpha_D, the form of Kaplan
  et al. 2020 (eq. 1.5) plus an irreducible E. The additive law gives every size the same gain from doubling D;
  here the data term bends with N, which is what small models trained far past 20 tokens per parameter show.

The fit is the one Besiroglu et al. 2024 redo of Hoffmann's: each law's log loss is written with log-sum-exp in
log-scale parameters theta; the objective is the SUM over runs of Huber(predicted - observed log loss) with delta
1e-3; L-BFGS starts from every point of a grid and the best end point is kept. Intervals come from refitting
bootstrap resamples of the runs. `select_law` picks a family by how well each, fitted without the largest budget,
predicts that budget's runs.
"""

from __future__ import annotations

import itertools
from dataclasses import astuple, dataclass, fields
from typing import ClassVar

import numpy as np

from ember.errors import UserError
from ember.pretrain.scaling.lbfgs import minimize_batch

HUBER_DELTA = 1e-3
E_RESTARTS = (0.5, 0.8)  # bootstrap starts with E at these fractions of the smallest loss (see `bootstrap`)


def grid_of(*axes: np.ndarray) -> np.ndarray:
    """(num_inits, P) starting points: every combination of the axes' values."""
    return np.array(list(itertools.product(*axes)), dtype=float)


def log_sum_exp(*terms: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """log(sum exp(terms)) and each term's share exp(term - lse), the gradient of the lse in that term."""
    top = np.maximum.reduce(terms)
    exps = [np.exp(t - top) for t in terms]
    total = sum(exps)
    return top + np.log(total), [e / total for e in exps]


@dataclass(frozen=True)
class _Family:
    """What the fitter needs of a law family; the subclasses are the laws, one value per field."""

    name: ClassVar[str]
    formula: ClassVar[str]
    grid: ClassVar[np.ndarray]  # (num_inits, P) starts in theta
    log_e_index: ClassVar[int]  # where log E sits in theta

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @staticmethod
    def log_loss(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted log loss (K, n) of K parameter rows theta (K, P) and its Jacobian (K, n, P)."""
        raise NotImplementedError

    @staticmethod
    def values_of(theta: np.ndarray) -> np.ndarray:
        """theta (K, P) -> the laws' own values (K, P), in field order."""
        raise NotImplementedError

    @staticmethod
    def loss_of(values: np.ndarray, params, tokens):
        """The loss of laws given as value rows (..., P) at (N, D), broadcast."""
        raise NotImplementedError

    @property
    def exponents(self) -> tuple[float, float]:
        """(how fast the loss falls with N, with D): alpha and beta of the compute-optimal trade-off."""
        raise NotImplementedError

    def loss(self, params, tokens):
        return self.loss_of(np.array(astuple(self)), params, tokens)

    @property
    def falls(self) -> bool:
        """Loss falls with both N and D: only then is there a compute-optimal (N*, D*)."""
        return min(self.exponents) > 0

    def check_falls(self) -> None:
        if not self.falls:
            a, b = self.exponents
            raise UserError(f"the fitted law has N and D exponents {a:.3g}, {b:.3g}: loss does not fall with both N and D, so "
                            "there is no compute-optimal size (runs of very few steps, or far from compute-optimal, do this)",
                            "the fit")

    @property
    def params_exponent(self) -> float:
        """N*(C) grows as C^(beta / (alpha + beta)) in both families; D*(C) as C^(alpha / (alpha + beta))."""
        a, b = self.exponents
        return b / (a + b)

    def as_dict(self) -> dict:
        return dict(zip(self.names(), astuple(self)))

    def title(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Law(_Family):
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    name: ClassVar[str] = "chinchilla"
    log_e_index: ClassVar[int] = 2
    formula: ClassVar[str] = "L(N, D) = E + A / N^alpha + B / D^beta"
    # theta = (a, b, e, alpha, beta) with a = log A, b = log B, e = log E; Hoffmann's grid.
    grid: ClassVar[np.ndarray] = grid_of(np.arange(0, 25.1, 5), np.arange(0, 25.1, 5), np.arange(-1, 1.01, 0.5),
                                         np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5))

    @staticmethod
    def log_loss(theta, log_n, log_d):
        a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))  # each (K, 1)
        pred, (s_n, s_d, s_e) = log_sum_exp(a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(theta), len(log_n))))
        return pred, np.stack([s_n, s_d, s_e, -s_n * log_n, -s_d * log_d], axis=2)

    @staticmethod
    def values_of(theta):
        with np.errstate(over="ignore"):  # a diverged refit's A or B becomes inf: see Fit.finite_samples
            return np.stack([np.exp(theta[:, 2]), np.exp(theta[:, 0]), np.exp(theta[:, 1]), theta[:, 3], theta[:, 4]], axis=1)

    @staticmethod
    def loss_of(values, params, tokens):
        v = np.asarray(values, dtype=float)
        with np.errstate(over="ignore"):  # a huge N^alpha makes its term 0, as it should
            return v[..., 0] + v[..., 1] / np.power(params, v[..., 3]) + v[..., 2] / np.power(tokens, v[..., 4])

    @property
    def exponents(self):
        return self.alpha, self.beta

    def optimal(self, flops):
        """Compute-optimal (N*, D*) for C = 6 N D: the minimum of the law along that constraint."""
        self.check_falls()
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        c6 = np.asarray(flops, dtype=float) / 6
        return g * c6 ** (b / (a + b)), c6 ** (a / (a + b)) / g

    def title(self) -> str:
        return f"L = {self.E:.3f} + {self.A:.3g}/N^{self.alpha:.3f} + {self.B:.3g}/D^{self.beta:.3f}"


@dataclass(frozen=True)
class InteractionLaw(_Family):
    E: float
    Nc: float
    Dc: float
    alpha_N: float
    alpha_D: float

    name: ClassVar[str] = "interaction"
    log_e_index: ClassVar[int] = 0
    formula: ClassVar[str] = "L(N, D) = E + ((Nc / N)^(alpha_N / alpha_D) + Dc / D)^alpha_D"
    # theta = (e, nc, dc, r, ad): e = log E, nc = log Nc, dc = log Dc, r = alpha_N / alpha_D, ad = alpha_D.
    grid: ClassVar[np.ndarray] = grid_of(np.arange(-1, 1.01, 0.5), np.arange(0, 30.1, 5), np.arange(0, 30.1, 5),
                                         np.array([0.25, 0.5, 1, 2, 4]), np.array([0.1, 0.25, 0.5, 1, 2]))

    @staticmethod
    def log_loss(theta, log_n, log_d):
        e, nc, dc, r, ad = (theta[:, i:i + 1] for i in range(5))
        gap_n = nc - log_n  # (K, n): log(Nc / N)
        inner, (s_n, s_d) = log_sum_exp(r * gap_n, dc - log_d)  # log((Nc/N)^r + Dc/D)
        pred, (s_e, s_q) = log_sum_exp(np.broadcast_to(e, inner.shape), ad * inner)
        q_n, q_d = s_q * ad * s_n, s_q * ad * s_d  # d pred / d (r * gap_n), d pred / d dc
        return pred, np.stack([s_e, q_n * r, q_d, q_n * gap_n, s_q * inner], axis=2)

    @staticmethod
    def values_of(theta):
        with np.errstate(over="ignore"):
            return np.stack([np.exp(theta[:, 0]), np.exp(theta[:, 1]), np.exp(theta[:, 2]), theta[:, 3] * theta[:, 4],
                             theta[:, 4]], axis=1)

    @staticmethod
    def loss_of(values, params, tokens):
        v = np.asarray(values, dtype=float)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            log_nc, log_dc, ratio = np.log(v[..., 1]), np.log(v[..., 2]), v[..., 3] / v[..., 4]
            inner = np.logaddexp(ratio * (log_nc - np.log(params)), log_dc - np.log(tokens))
            return v[..., 0] + np.exp(v[..., 4] * inner)

    @property
    def exponents(self):
        return self.alpha_N, self.alpha_D

    def optimal(self, flops):
        """Along C = 6 N D the data term is minimised where Dc / D = r (Nc / N)^r (r = alpha_N / alpha_D), so
        N*^(1 + r) = r Nc^r C / (6 Dc)."""
        self.check_falls()
        r = self.alpha_N / self.alpha_D
        c6 = np.asarray(flops, dtype=float) / 6
        n = np.exp((np.log(r) + r * np.log(self.Nc) + np.log(c6) - np.log(self.Dc)) / (1 + r))
        return n, c6 / n

    def title(self) -> str:
        return (f"L = {self.E:.3f} + (({self.Nc:.3g}/N)^{self.alpha_N / self.alpha_D:.3f} + {self.Dc:.3g}/D)"
                f"^{self.alpha_D:.3f}")


LAWS: dict[str, type[_Family]] = {law.name: law for law in (Law, InteractionLaw)}


def huber_objective(family: type[_Family], theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                    weights: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber loss of the log-loss residuals and its gradient, for K parameter rows at once.

    theta (K, P) in the family's log-scale parameters; log_n, log_d, log_loss (n,); weights (K, n) or (n,): how many
    times each run counts (1 for the data, bootstrap counts for a resample). Returns f (K,), grad (K, P).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # degenerate grid corners: a non-finite f, which L-BFGS drops
        pred, jac = family.log_loss(theta, log_n, log_d)
        residual = pred - log_loss
        inside = np.abs(residual) <= delta
        huber = np.where(inside, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))
        dres = weights * np.where(inside, residual, delta * np.sign(residual))
        return (weights * huber).sum(axis=1), np.einsum("kn,knp->kp", dres, jac)


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


def law_family(name: str) -> type[_Family]:
    if name not in LAWS:
        raise UserError(f"unknown law '{name}' (known: {', '.join(LAWS)})", "--law")
    return LAWS[name]


@dataclass
class Fit:
    law: _Family
    objective: float
    num_inits: int
    samples: np.ndarray  # (num_bootstrap, P) laws of the resamples, in the law's field order
    residuals: np.ndarray  # (n,) observed - predicted log loss of the runs
    selection: dict | None = None  # how `select_law` chose the family, when it did

    @property
    def finite_samples(self) -> np.ndarray:
        """The resamples whose refit stayed finite. Runs that do not pin the law down let some refits run off to an
        infinite term; they carry no interval, and `summary` says how many there were."""
        return self.samples[np.isfinite(self.samples).all(axis=1)]

    def standard_errors(self) -> dict[str, float]:
        with np.errstate(over="ignore"):
            return {k: float(v) for k, v in zip(self.law.names(), self.finite_samples.std(axis=0, ddof=1))}

    def intervals(self, level: float = 0.95) -> dict[str, list[float]]:
        lo, hi = np.percentile(self.finite_samples, [50 * (1 - level), 50 * (1 + level)], axis=0)
        return {k: [float(a), float(b)] for k, a, b in zip(self.law.names(), lo, hi)}

    def summary(self) -> dict:
        """The fitted law, standard errors, 95% intervals and the exponents of N*(C), D*(C)."""
        finite = self.finite_samples
        exps = finite[:, 4] / (finite[:, 3] + finite[:, 4])  # both families end in (N exponent, D exponent)
        return {"law": self.law.name, "formula": self.law.formula, **self.law.as_dict(), "se": self.standard_errors(),
                "interval": self.intervals(), "params_exponent": self.law.params_exponent,
                "tokens_exponent": 1 - self.law.params_exponent,
                "params_exponent_interval": [float(v) for v in np.percentile(exps, [2.5, 97.5])],
                "objective": self.objective, "huber_delta": HUBER_DELTA, "num_inits": self.num_inits,
                "num_bootstrap": len(self.samples), "num_bootstrap_diverged": len(self.samples) - len(finite),
                "num_runs": len(self.residuals), **({"selection": self.selection} if self.selection else {})}

    def to_json(self) -> dict:
        """All of it, the bootstrap laws and residuals included: what `predict --fit` reads back."""
        return {**self.summary(), "samples": self.samples.tolist(), "residuals": self.residuals.tolist()}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "Fit":
        try:
            family = LAWS[data.get("law", Law.name)]
            law = family(*(float(data[k]) for k in family.names()))
            samples = np.asarray(data["samples"], dtype=float).reshape(-1, len(family.names()))
            return cls(law=law, objective=float(data["objective"]), num_inits=int(data["num_inits"]), samples=samples,
                       residuals=np.asarray(data["residuals"], dtype=float), selection=data.get("selection"))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not a fit file written by `ember scaling fit --out` ({type(e).__name__}: {e})", where) from None

    def predict(self, params: float, tokens: float, level: float = 0.95, seed: int = 0) -> dict:
        """Point prediction with the law's interval (bootstrap laws) and the interval of one new run (bootstrap
        laws times a residual drawn from the fit's own: run-to-run scatter the law does not explain)."""
        point = float(self.law.loss(params, tokens))
        means = self.law.loss_of(self.finite_samples, params, tokens)
        rng = np.random.default_rng(seed)
        runs = means * np.exp(rng.choice(self.residuals, size=len(means)))
        q = [50 * (1 - level), 50 * (1 + level)]
        return {"params": float(params), "tokens": float(tokens), "flops": 6.0 * params * tokens, "loss": point,
                "law": self.law.name, "interval": [float(v) for v in np.percentile(means, q)],
                "run_interval": [float(v) for v in np.percentile(runs, q)], "level": level}


def fit_law(params, tokens, losses, *, law: str = Law.name, num_bootstrap: int = 1000, seed: int = 0,
            where: str = "runs") -> Fit:
    """Approach 3 on the runs (N, D, final loss) with the named family; `num_bootstrap` resamples give standard
    errors and intervals."""
    family = law_family(law)
    n, d, loss = check_runs(params, tokens, losses, where)
    log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)
    ones = np.ones_like(log_n)
    objective = lambda th, rows: huber_objective(family, th, log_n, log_d, log_loss, ones)  # noqa: E731
    # Every start for a few iterations, the best tenth of them a few hundred more, and those then within 1% of
    # the best to convergence: the others sit in flat, degenerate corners of the grid (an exponent near 0,
    # a term swamping the others) and never catch up, while costing most of the time.
    x, f, _ = minimize_batch(objective, family.grid, max_iter=30)
    for max_iter, keep in ((300, f <= np.nanquantile(f, 0.1)), (3000, None)):
        rows = np.flatnonzero(keep if keep is not None else f <= np.nanmin(f) * 1.01)
        x[rows], f[rows], _ = minimize_batch(objective, x[rows], max_iter=max_iter)
    best_row = np.nanargmin(np.where(np.isfinite(f), f, np.inf))
    best = x[best_row]
    fitted = family(*family.values_of(best[None])[0])
    residuals = log_loss - np.log(fitted.loss(n, d))
    samples = bootstrap(family, log_n, log_d, log_loss, best, num_bootstrap, seed)
    return Fit(law=fitted, objective=float(f[best_row]), num_inits=len(family.grid), samples=samples, residuals=residuals)


def bootstrap(family: type[_Family], log_n, log_d, log_loss, best: np.ndarray, num: int, seed: int) -> np.ndarray:
    """(num, P) laws refitted on resamples of the runs (drawn with replacement), all resamples optimised as one
    batch, the best of a few starts kept for each: the full fit's optimum, and that optimum with E moved to
    fractions of the smallest loss. E is the least determined value; where the full fit drives it to 0 its gradient
    vanishes there, and a refit started only from that point could never find a resample's E > 0."""
    if num <= 0:
        return np.empty((0, len(best)))
    rng = np.random.default_rng(seed)
    count = len(log_n)
    weights = np.stack([np.bincount(rng.integers(0, count, count), minlength=count) for _ in range(num)]).astype(float)
    starts = np.repeat(best[None], len(E_RESTARTS) + 1, axis=0)
    starts[1:, family.log_e_index] = np.log(E_RESTARTS) + log_loss.min()
    x0 = np.repeat(starts, num, axis=0)  # start-major: rows [j * num, (j + 1) * num) are start j
    x, f, _ = minimize_batch(lambda th, rows: huber_objective(family, th, log_n, log_d, log_loss, weights[rows % num]), x0)
    f = np.where(np.isfinite(f), f, np.inf).reshape(len(starts), num)
    return family.values_of(x.reshape(len(starts), num, -1)[f.argmin(axis=0), np.arange(num)])


def select_law(params, tokens, losses, *, where: str = "runs") -> dict:
    """Which family extrapolates these runs better: each is fitted to the runs below the largest compute budget
    and predicts the runs of that budget, out of sample, as the check will predict a larger one. Returns the
    held-out budget, each family's RMS and mean relative error there, and the chosen family (the lower RMS)."""
    from ember.pretrain.scaling.isoflop import budget_groups

    n, d, loss = check_runs(params, tokens, losses, where)
    groups = budget_groups(6 * n * d)
    if len(groups) < 2:
        raise UserError("--law auto needs runs of at least 2 compute budgets (it fits without the largest and predicts it)",
                        where)
    test = groups[-1]
    train = np.setdiff1d(np.arange(len(n)), test)
    errors = {}
    for name in LAWS:
        fit = fit_law(n[train], d[train], loss[train], law=name, num_bootstrap=0,
                      where=f"{where} (without the largest budget, for --law auto)")
        rel = loss[test] / fit.law.loss(n[test], d[test]) - 1
        errors[name] = {"rms": float(np.sqrt(np.mean(rel**2))), "mean": float(np.mean(rel))}
    chosen = min(errors, key=lambda k: errors[k]["rms"])
    return {"held_out_flops": float(np.median(6 * n[test] * d[test])), "held_out_runs": len(test), "train_runs": len(train),
            "errors": errors, "chosen": chosen}
