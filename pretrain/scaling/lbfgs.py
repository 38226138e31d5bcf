"""L-BFGS on a batch of independent problems at once: K starting points (or K bootstrap resamples) move
together as one (K, P) array, so a grid of thousands of initialisations costs a few hundred vectorised
objective calls instead of thousands of separate optimiser runs.

Each row has its own history, step length and stopping state. The stopping rule is relative to the
row's own objective value (not to max(|f|, 1) as in L-BFGS-B's `ftol`), because a Huber objective with
delta 1e-3 is small everywhere and would otherwise be declared converged long before its minimum.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# fun(x (k, P), rows (k,)) -> f (k,), grad (k, P): `rows` says which of the K problems the k rows are
# (line searches evaluate only the rows still searching), so each problem can have its own data.
Objective = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def minimize_batch(fun: Objective, x0: np.ndarray, *, memory: int = 10, max_iter: int = 3000, rtol: float = 1e-13,
                   gtol: float = 1e-12, max_halvings: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise every row of `x0` (K, P); returns (x (K, P), f (K,), iterations (K,))."""
    x = np.array(x0, dtype=np.float64)
    num, dim = x.shape
    f, g = fun(x, np.arange(num))
    s_hist = np.zeros((memory, num, dim))
    y_hist = np.zeros((memory, num, dim))
    rho = np.zeros((memory, num))  # 0 marks an empty or skipped slot: it drops out of the two-loop recursion
    gamma = np.ones(num)
    active = np.isfinite(f)
    iterations = np.zeros(num, dtype=int)
    stalled = np.zeros(num, dtype=int)
    for it in range(max_iter):
        if not active.any():
            break
        # Two-loop recursion: d = -H g with the rows' own (s, y) pairs, newest first.
        q = g.copy()
        order = [(it - 1 - j) % memory for j in range(memory)]
        alphas = []
        for i in order:
            a = rho[i] * np.einsum("kp,kp->k", s_hist[i], q)
            q -= a[:, None] * y_hist[i]
            alphas.append(a)
        r = gamma[:, None] * q
        for i, a in zip(reversed(order), reversed(alphas)):
            b = rho[i] * np.einsum("kp,kp->k", y_hist[i], r)
            r += s_hist[i] * (a - b)[:, None]
        d = -r
        slope = np.einsum("kp,kp->k", g, d)
        uphill = ~(slope < 0)
        if uphill.any():  # a bad curvature history: restart that row along the gradient
            d[uphill] = -g[uphill]
            slope[uphill] = -np.einsum("kp,kp->k", g[uphill], g[uphill])
        # Backtracking (Armijo) line search, every row its own step; the first step is scaled to unit length.
        step = np.ones(num) if it else np.minimum(1.0, 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1e-300))
        accepted = ~active
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        for _ in range(max_halvings):
            trying = ~accepted
            xt = x[trying] + step[trying, None] * d[trying]
            idx = np.flatnonzero(trying)
            ft, gt = fun(xt, idx)
            ok = np.isfinite(ft) & (ft <= f[trying] + 1e-4 * step[trying] * slope[trying])
            x_new[idx[ok]], f_new[idx[ok]], g_new[idx[ok]] = xt[ok], ft[ok], gt[ok]
            accepted[idx[ok]] = True
            step[idx[~ok]] *= 0.5
            if accepted.all():
                break
        moved = active & accepted
        s, y = x_new - x, g_new - g
        sy, yy = np.einsum("kp,kp->k", s, y), np.einsum("kp,kp->k", y, y)
        keep = moved & (sy > 1e-300) & (yy > 0)
        slot = it % memory
        s_hist[slot], y_hist[slot] = np.where(keep[:, None], s, 0.0), np.where(keep[:, None], y, 0.0)
        rho[slot] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)
        gamma = np.where(keep, sy / np.where(keep, yy, 1.0), gamma)
        decrease = np.where(moved, f - f_new, 0.0)
        x, f, g = np.where(moved[:, None], x_new, x), np.where(moved, f_new, f), np.where(moved[:, None], g_new, g)
        iterations += active
        # A row stops after a few iterations in a row without relative progress, at a zero gradient, or when stuck.
        small = decrease <= rtol * np.maximum(np.abs(f), 1e-300)
        stalled = np.where(active & small, stalled + 1, 0)
        done = (stalled >= 5) | (np.abs(g).max(axis=1) <= gtol) | (active & ~accepted)
        active &= ~done
    return x, f, iterations
