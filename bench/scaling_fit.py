"""Fit time of Approach 3 on Chinchilla's 240 points: ember's batched L-BFGS from the 4,500-point grid against
the usual way, scipy.optimize.minimize (L-BFGS-B) started once per grid point.

The scipy baseline runs on every STRIDE-th grid point and its time is scaled to the whole grid (printed as
such); both use the same objective and analytic gradient. Also printed: what each found, against Epoch AI's
published refit (E 1.8172, A 477.8, B 2143, alpha 0.3473, beta 0.3672).

    .venv/bin/python bench/scaling_fit.py [--stride 15] [--csv PATH]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from ember.pretrain.cpu_matmul import cpu_model
from ember.pretrain.scaling.law import Law, fit_law, huber_objective

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "shared/data/chinchilla/chinchilla_fig4_240_params_tokens_loss.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--stride", type=int, default=15, help="scipy runs on every STRIDE-th grid point")
    args = parser.parse_args()
    rows = list(csv.DictReader(args.csv.open()))
    n, d, loss = (np.array([float(r[k]) for r in rows]) for k in ("params", "tokens", "loss"))
    log_n, log_d, log_loss, ones = np.log(n), np.log(d), np.log(loss), np.ones(len(n))

    started = time.perf_counter()
    fit = fit_law(n, d, loss, num_bootstrap=0)
    ember_s = time.perf_counter() - started

    def objective(theta):
        f, g = huber_objective(Law, theta[None], log_n, log_d, log_loss, ones)
        return f[0], g[0]

    grid = Law.grid
    sample = grid[:: args.stride]
    started = time.perf_counter()
    ends = [minimize(objective, x0, jac=True, method="L-BFGS-B") for x0 in sample]
    scipy_s = (time.perf_counter() - started) * len(grid) / len(sample)
    best = min(ends, key=lambda r: r.fun)
    scipy_law = Law(*Law.values_of(best.x[None])[0])

    print(f"CPU: {cpu_model()}; {len(n)} points, {len(grid)} initialisations")
    print(f"{'method':<58} {'seconds':>8}  {'E':>7} {'A':>8} {'B':>8} {'alpha':>7} {'beta':>7}")
    for name, seconds, law in (
        ("ember: batched L-BFGS from the whole grid", ember_s, fit.law),
        (f"scipy L-BFGS-B per start (1/{args.stride} of the grid, scaled)", scipy_s, scipy_law),
    ):
        print(f"{name:<58} {seconds:>8.1f}  {law.E:>7.4f} {law.A:>8.1f} {law.B:>8.0f} {law.alpha:>7.4f} {law.beta:>7.4f}")
    print(f"{'Epoch AI (published)':<58} {'':>8}  {1.8172:>7.4f} {477.8:>8.1f} {2143:>8.0f} {0.3473:>7.4f} {0.3672:>7.4f}")
    print(f"ratio (scipy time / ember time): {scipy_s / ember_s:.1f}x")


if __name__ == "__main__":
    main()
