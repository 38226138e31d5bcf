"""Hoffmann et al. 2022, Approach 2: the minimum of each IsoFLOP curve, then power laws of N* and D* in C.

Runs are grouped by compute budget (runs within 10% of a group's smallest budget share it). Each group of
at least 3 model sizes gets a parabola of loss against log N; its vertex is that budget's N*, and
D* = C / (6 N*). Least squares of log N* and log D* on log C give N* ~ C^a and D* ~ C^b.
"""

from __future__ import annotations

import numpy as np


def budget_groups(flops: np.ndarray, tolerance: float = 0.10) -> list[np.ndarray]:
    """Indices of runs per compute budget, smallest budget first."""
    order = np.argsort(flops)
    groups, start = [], None
    for i in order:
        if start is None or flops[i] > flops[start] * (1 + tolerance):
            groups.append([])
            start = i
        groups[-1].append(i)
    return [np.array(g) for g in groups]


def isoflop_minima(params, tokens, losses) -> list[dict]:
    """Per budget with >= 3 sizes and an upward parabola: budget C, N*, D*, the loss at the vertex, the curve."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (params, tokens, losses))
    flops = 6 * n * d
    minima = []
    for rows in budget_groups(flops):
        if len(np.unique(n[rows])) < 3:
            continue
        x = np.log(n[rows])
        curve = np.polyfit(x, loss[rows], 2)  # loss = c2 x^2 + c1 x + c0
        if curve[0] <= 0:
            continue  # no minimum inside: the sizes of this budget miss the optimum
        c = float(np.exp(np.mean(np.log(flops[rows]))))
        x_star = -curve[1] / (2 * curve[0])
        n_star = float(np.exp(x_star))
        minima.append({"flops": c, "params": n_star, "tokens": c / (6 * n_star), "loss": float(np.polyval(curve, x_star)),
                       "curve": [float(v) for v in curve], "runs": [int(i) for i in rows]})
    return minima


def power_law(x: np.ndarray, y: np.ndarray) -> dict:
    """y = k x^exponent by least squares in log-log, with the exponent's standard error."""
    lx, ly = np.log(x), np.log(y)
    design = np.stack([lx, np.ones_like(lx)], axis=1)
    coef, res, *_ = np.linalg.lstsq(design, ly, rcond=None)
    dof = len(lx) - 2
    se = None
    if dof > 0:
        sigma2 = float(np.sum((ly - design @ coef) ** 2)) / dof
        se = float(np.sqrt(sigma2 * np.linalg.inv(design.T @ design)[0, 0]))
    return {"exponent": float(coef[0]), "coefficient": float(np.exp(coef[1])), "exponent_se": se}


def approach2(params, tokens, losses) -> dict | None:
    """N*(C) and D*(C) from the IsoFLOP minima; None with fewer than 2 usable budgets."""
    minima = isoflop_minima(params, tokens, losses)
    if len(minima) < 2:
        return None
    c = np.array([m["flops"] for m in minima])
    return {"minima": minima, "params": power_law(c, np.array([m["params"] for m in minima])),
            "tokens": power_law(c, np.array([m["tokens"] for m in minima]))}
