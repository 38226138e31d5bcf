"""Plots of a fitted sweep (PNG) and one static HTML page with the table of runs.

Figures: loss against compute with the fitted law per size and its compute-optimal frontier; IsoFLOP
curves (loss against N per budget, with Approach 2's parabolas and minima); residuals of the law;
and, after `ember scaling check`, the predicted loss and interval against the measured one.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ember.pretrain.scaling.isoflop import approach2
from ember.pretrain.scaling.law import Fit


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Write a figure under a temporary name, then rename: a reader never sees half a PNG."""
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    pyplot().close(fig)
    return path


def size_colors(rows: list[dict]) -> dict[float, tuple]:
    plt = pyplot()
    sizes = sorted({r["params"] for r in rows})
    return {n: plt.cm.viridis(i / max(1, len(sizes) - 1)) for i, n in enumerate(sizes)}


def plot_loss_vs_compute(rows: list[dict], fit: Fit, check: dict | None, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = size_colors(rows)
    flops = np.array([r["flops"] for r in rows])
    top = max(flops.max(), check["flops"] if check else 0) * 1.5
    grid = np.geomspace(flops.min() / 1.5, top, 200)
    for n, color in colors.items():
        ax.plot(grid, fit.law.loss(n, grid / (6 * n)), color=color, lw=1, alpha=0.6)
        pts = [r for r in rows if r["params"] == n]
        ax.scatter([r["flops"] for r in pts], [r["loss"] for r in pts], color=color, label=f"N={n / 1e6:.3g}M", zorder=3)
    if fit.law.falls:  # otherwise the law has no compute-optimal frontier
        n_opt, d_opt = fit.law.optimal(grid)
        ax.plot(grid, fit.law.loss(n_opt, d_opt), "k--", lw=1.5, label="compute-optimal frontier")
    if check:
        lo, hi = check["prediction"]["run_interval"]
        ax.errorbar([check["flops"]], [check["prediction"]["loss"]], yerr=[[check["prediction"]["loss"] - lo], [hi - check["prediction"]["loss"]]],
                    fmt="s", color="tab:red", capsize=4, label="predicted (95%)")
        ax.scatter([check["flops"]], [check["measured"]], marker="*", s=150, color="tab:orange", zorder=4, label="measured")
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="validation loss (nats)",
           title=fit.law.title())
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return save(fig, path)


def plot_isoflops(rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    params, tokens, loss = (np.array([r[k] for r in rows]) for k in ("params", "tokens", "loss"))
    result = approach2(params, tokens, loss)
    budgets = sorted({r.get("budget", r["flops"]) for r in rows})
    for i, c in enumerate(budgets):
        pts = [r for r in rows if r.get("budget", r["flops"]) == c]
        color = plt.cm.plasma(i / max(1, len(budgets) - 1))
        ax.plot([r["params"] for r in sorted(pts, key=lambda r: r["params"])],
                [r["loss"] for r in sorted(pts, key=lambda r: r["params"])], "o-", color=color, label=f"C={c:.2g}")
    for m in (result or {}).get("minima", []):
        x = np.linspace(*np.log([min(params[m["runs"]]), max(params[m["runs"]])]), 50)
        ax.plot(np.exp(x), np.polyval(m["curve"], x), ":", color="gray")
        ax.scatter([m["params"]], [m["loss"]], marker="x", color="k", zorder=4)
    ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss (nats)", title="IsoFLOP curves (x: Approach 2 minima)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return save(fig, path)


def plot_residuals(rows: list[dict], fit: Fit, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = size_colors(rows)
    for r in rows:
        predicted = fit.law.loss(r["params"], r["tokens"])
        ax.scatter(r["flops"], 100 * (r["loss"] / predicted - 1), color=colors[r["params"]])
    ax.axhline(0, color="k", lw=1)
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="measured / law - 1 (%)", title="residuals of the fitted law")
    ax.grid(alpha=0.3, which="both")
    return save(fig, path)


def plot_check(check: dict, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    p = check["prediction"]
    ax.errorbar([0], [p["loss"]], yerr=[[p["loss"] - p["run_interval"][0]], [p["run_interval"][1] - p["loss"]]], fmt="s",
                capsize=6, color="tab:red", label="predicted, 95% interval of a run")
    ax.errorbar([0.1], [p["loss"]], yerr=[[p["loss"] - p["interval"][0]], [p["interval"][1] - p["loss"]]], fmt="none",
                capsize=6, color="tab:blue", label="95% interval of the law")
    ax.scatter([0.2], [check["measured"]], marker="*", s=200, color="tab:orange", label="measured", zorder=3)
    ax.set(xlim=(-0.5, 0.7), xticks=[], ylabel="validation loss (nats)",
           title=f"{check['name']}: {100 * check['relative_error']:+.2f}% vs prediction")
    ax.legend(fontsize=7)
    return save(fig, path)


def write_html(rows: list[dict], fit: Fit, check: dict | None, images: list[Path], path: Path) -> Path:
    law, se = fit.law, fit.standard_errors()
    head = "".join(f"<th>{h}</th>" for h in ("run", "params", "tokens", "tokens/param", "FLOPs", "val loss", "law", "residual"))
    body = []
    for r in sorted(rows, key=lambda r: (r["flops"], r["params"])):
        predicted = float(law.loss(r["params"], r["tokens"]))
        cells = (html.escape(r["name"]), f"{r['params']:,}", f"{r['tokens']:,.0f}", f"{r['tokens'] / r['params']:.1f}",
                 f"{r['flops']:.3g}", f"{r['loss']:.4f}", f"{predicted:.4f}", f"{100 * (r['loss'] / predicted - 1):+.2f}%")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    params = ", ".join(f"{k} = {getattr(law, k):.4g} ± {se[k]:.2g}" for k in law.names())
    choice_html = ""
    if fit.selection:
        sel = fit.selection
        scores = "; ".join(f"{html.escape(k)} {100 * v['rms']:.2f}%" for k, v in sel["errors"].items())
        choice_html = (f"<p>Law chosen by its out-of-sample error: fitted on the {sel['train_runs']} runs below "
                       f"C = {sel['held_out_flops']:.3g}, the {sel['held_out_runs']} runs there were predicted with RMS relative "
                       f"error {scores}.</p>")
    check_html = ""
    if check:
        p = check["prediction"]
        check_html = (f"<h2>Prediction check</h2><p>{html.escape(check['name'])}: N = {check['params']:,}, D = {check['tokens']:,}, "
                      f"C = {check['flops']:.3g}. Predicted {p['loss']:.4f} (95% interval of a run {p['run_interval'][0]:.4f}"
                      f"–{p['run_interval'][1]:.4f}), measured {check['measured']:.4f} ({100 * check['relative_error']:+.2f}%): "
                      f"{'inside' if check['inside'] else 'OUTSIDE'} the interval.</p>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>scaling report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 8px;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>Scaling law ({law.name}): {html.escape(law.formula)}</h1>
<p>{params} (bootstrap standard errors, {len(fit.samples)} resamples; Huber delta 1e-3 on log loss, L-BFGS from
{fit.num_inits} starts). N*(C) &prop; C<sup>{law.params_exponent:.3f}</sup>, D*(C) &prop; C<sup>{1 - law.params_exponent:.3f}</sup>.</p>
{choice_html}{check_html}<h2>Runs ({len(rows)})</h2><table><tr>{head}</tr>{''.join(body)}</table>
{''.join(f'<p><img src="{html.escape(i.name)}" alt="{html.escape(i.stem)}"></p>' for i in images)}
</body></html>"""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def write_report(rows: list[dict], fit: Fit, check: dict | None, out_dir: Path) -> list[Path]:
    """All figures and index.html in out_dir; returns their paths (HTML last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = [plot_loss_vs_compute(rows, fit, check, out_dir / "loss_vs_compute.png"),
              plot_isoflops(rows, out_dir / "isoflops.png"), plot_residuals(rows, fit, out_dir / "residuals.png")]
    if check:
        images.append(plot_check(check, out_dir / "prediction_check.png"))
    return [*images, write_html(rows, fit, check, images, out_dir / "index.html")]
