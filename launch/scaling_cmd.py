"""`ember scaling plan|sweep|fit|predict|check|report`: from an IsoFLOP plan to a checked prediction.

plan writes a sweep directory (sweep.json + one run config per run); sweep trains its runs (resumable);
fit fits L(N, D) to them (or to runs or a CSV); predict reads a fit; check trains a held-out larger run
and compares it with the prediction; report draws the plots and the HTML page.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ember.errors import UserError

FIT_FILE, CHECK_FILE = "fit.json", "check.json"


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} expects numbers separated by commas, got '{text}'", flag) from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise UserError(f"{flag} expects positive numbers, got '{text}'", flag)
    return values


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------- plan / sweep


def run_plan(args: argparse.Namespace) -> int:
    from ember.config import load_config
    from ember.pretrain.scaling.plan import SweepConfig, plan, write_sweep

    overrides = list(args.overrides)
    if args.budgets:
        overrides.append(f"budgets=[{','.join(repr(v) for v in parse_floats(args.budgets, '--budgets'))}]")
    if args.ladder:
        overrides.append(f"ladder=[{args.ladder}]")
    cfg = load_config(args.config, SweepConfig, overrides, kind="scaling")
    out = Path(args.out)
    sweep = plan(cfg, out, str(args.config))
    path = write_sweep(sweep, out)
    print(f"{'run':<24} {'params':>10} {'tokens':>12} {'tok/param':>9} {'steps':>6} {'batch':>6} {'lr':>9}")
    for r in sweep["runs"]:
        s = r["sets"]
        print(f"{r['name']:<24} {r['params']:>10,} {r['tokens']:>12,} {r['tokens'] / r['params']:>9.1f} {r['steps']:>6} "
              f"{s['train.global_batch_size']:>6} {s['train.lr']:>9.3g}")
    if sweep["skipped"]:
        rule = cfg.rule
        window = [f"fewer than rule.min_steps={rule.min_steps} steps"]
        window += [f"fewer than rule.min_tokens_per_param={rule.min_tokens_per_param:g}"] if rule.min_tokens_per_param else []
        window += [f"more than rule.max_tokens_per_param={rule.max_tokens_per_param:g}"] if rule.max_tokens_per_param else []
        tail = " tokens per parameter" if len(window) > 1 else ""
        print(f"left out ({' or '.join(window)}{tail}): {', '.join(sweep['skipped'])}")
    print(f"planned {len(sweep['runs'])} runs over {len(cfg.budgets)} budget(s): {path}; train them with `ember scaling sweep {out}`")
    return 0


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from ember.launch.sweep import run_sweep
    from ember.pretrain.scaling.plan import read_sweep

    sweep = read_sweep(Path(args.sweep))
    if args.jobs < 1:
        raise UserError(f"--jobs needs at least 1, got {args.jobs}", "--jobs")
    results = run_sweep(sweep, via=args.via, jobs=args.jobs)
    print(f"sweep {sweep['name']}: {len(results)} run(s) finished; fit them with `ember scaling fit --sweep {args.sweep}`")
    return 0


# ---------------------------------------------------------------- fit / predict


def gather_rows(args: argparse.Namespace) -> tuple[list[dict], str]:
    from ember.pretrain.scaling.plan import read_sweep
    from ember.pretrain.scaling.runs import results_of_csv, results_of_runs, results_of_sweep

    sources = sum(bool(s) for s in (args.runs, args.sweep, args.csv))
    if sources != 1:
        raise UserError("give run directories, --sweep SWEEP or --csv FILE (one of them)", "ember scaling fit")
    if args.csv:
        return results_of_csv(Path(args.csv)), args.csv
    if args.sweep:
        rows, missing = results_of_sweep(read_sweep(Path(args.sweep)))
        if missing:
            print(f"not finished, left out of the fit: {', '.join(missing)}")
        return rows, args.sweep
    return results_of_runs([Path(r) for r in args.runs]), "run directories"


def describe_fit(fit, rows: list[dict]) -> list[str]:
    from ember.pretrain.scaling.isoflop import approach2

    law, se, ci = fit.law, fit.standard_errors(), fit.intervals()
    lines = []
    if fit.selection:
        s = fit.selection
        scores = ", ".join(f"{k} {100 * v['rms']:.2f}% (mean {100 * v['mean']:+.2f}%)" for k, v in s["errors"].items())
        lines.append(f"--law auto: fitted on the {s['train_runs']} runs below C = {s['held_out_flops']:.3g}, the {s['held_out_runs']} "
                     f"runs there were predicted with RMS relative error {scores}: {s['chosen']} chosen")
    lines += [f"Approach 3 ({law.name} law) on {len(rows)} runs: sum of Huber losses (delta 1e-3) of log loss, L-BFGS from "
              f"{fit.num_inits} starts, {len(fit.samples)} bootstrap resamples", f"  {law.formula}"]
    for k in law.names():
        lines.append(f"  {k:<7} {getattr(law, k):>12.5g}  SE {se[k]:<10.3g} 95% [{ci[k][0]:.5g}, {ci[k][1]:.5g}]")
    diverged = len(fit.samples) - len(fit.finite_samples)
    if diverged:
        lines.append(f"  WARNING: {diverged} of {len(fit.samples)} bootstrap refits ran off to an infinite term: these runs do not "
                     "pin the law down, and the intervals (from the other refits) understate its uncertainty")
    if not law.falls:
        a, b = law.exponents
        lines.append(f"  WARNING: N and D exponents {a:.3g}, {b:.3g}: the loss of these runs does not fall with both N and D, "
                     "so the law gives no compute-optimal size (runs of very few steps, or far from compute-optimal, do this)")
    else:
        lines.append(f"  N*(C) ~ C^{law.params_exponent:.3f}, D*(C) ~ C^{1 - law.params_exponent:.3f} (C = 6ND)")
        top = max(r["flops"] for r in rows)
        for c in (top, 10 * top):
            n, d = law.optimal(c)
            lines.append(f"  at C = {c:.3g}: N* = {n:.4g}, D* = {d:.4g}, {d / n:.1f} tokens per parameter, loss {law.loss(n, d):.4f}")
    params, tokens, loss = ([r[k] for r in rows] for k in ("params", "tokens", "loss"))
    a2 = approach2(params, tokens, loss)
    if a2 is None:
        lines.append("Approach 2: fewer than 2 budgets with 3+ model sizes and a minimum inside; not fitted")
    else:
        p, t = a2["params"], a2["tokens"]
        se_text = lambda v: f" ± {v:.3f}" if v is not None else ""  # noqa: E731
        lines.append(f"Approach 2 on {len(a2['minima'])} IsoFLOP minima: N* ~ C^{p['exponent']:.3f}{se_text(p['exponent_se'])}, "
                     f"D* ~ C^{t['exponent']:.3f}{se_text(t['exponent_se'])}")
    return lines


def describe_prediction(p: dict) -> str:
    return (f"predicted loss ({p['law']} law) at N = {p['params']:.4g}, D = {p['tokens']:.4g} (C = {p['flops']:.3g}): {p['loss']:.4f}; "
            f"95% interval of the law [{p['interval'][0]:.4f}, {p['interval'][1]:.4f}], "
            f"of one run [{p['run_interval'][0]:.4f}, {p['run_interval'][1]:.4f}]")


def target_of(args: argparse.Namespace, law) -> tuple[float, float] | None:
    """(N, D) from --params/--tokens, or the compute-optimal point of --budget."""
    if args.budget is not None:
        if args.params is not None or args.tokens is not None:
            raise UserError("give --budget, or --params with --tokens, not both", "ember scaling")
        n, d = law.optimal(parse_floats(str(args.budget), "--budget")[0])
        return float(n), float(d)
    if (args.params is None) != (args.tokens is None):
        raise UserError("--params and --tokens go together", "ember scaling")
    if args.params is None:
        return None
    return parse_floats(str(args.params), "--params")[0], parse_floats(str(args.tokens), "--tokens")[0]


def run_fit(args: argparse.Namespace) -> int:
    from ember.pretrain.scaling.law import fit_law, select_law

    rows, where = gather_rows(args)
    if args.bootstrap < 2:
        raise UserError(f"--bootstrap needs at least 2 resamples, got {args.bootstrap}", "--bootstrap")
    runs = [[r[k] for r in rows] for k in ("params", "tokens", "loss")]
    selection = select_law(*runs, where=where) if args.law == "auto" else None
    fit = fit_law(*runs, law=selection["chosen"] if selection else args.law, num_bootstrap=args.bootstrap, seed=args.seed,
                  where=where)
    fit.selection = selection
    out = Path(args.out) if args.out else (Path(args.sweep) / FIT_FILE if args.sweep else None)
    if out is not None:
        write_json(out, {**fit.to_json(), "runs": rows})
    target = target_of(args, fit.law)
    prediction = fit.predict(*target) if target else None
    if args.json:
        print(json.dumps({**fit.summary(), **({"prediction": prediction} if prediction else {})}))
        return 0
    print("\n".join(describe_fit(fit, rows)))
    if prediction:
        print(describe_prediction(prediction))
    if out is not None:
        print(f"fit written to {out}")
    return 0


def read_fit(path: Path):
    from ember.pretrain.scaling.law import Fit

    path = path / FIT_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError("fit file not found (write one with `ember scaling fit ... --out FILE`)", str(path))
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"unreadable fit file: {e}", str(path)) from None
    return Fit.from_json(data, str(path)), data


def run_predict(args: argparse.Namespace) -> int:
    fit, _ = read_fit(Path(args.fit))
    target = target_of(args, fit.law)
    if target is None:
        raise UserError("give --params N --tokens D, or --budget C", "ember scaling predict")
    prediction = fit.predict(*target, level=args.level)
    print(json.dumps(prediction) if args.json else describe_prediction(prediction))
    return 0


# ---------------------------------------------------------------- check / report


def heldout_run(sweep: dict, fit, factor: float, size: str | None) -> dict:
    """The held-out run: factor x the sweep's largest budget, on the ladder size nearest the law's N*(C) among those
    the sweep's rule admits at that budget (a run too short, or with fewer tokens per parameter than the sweep's
    runs, would test the law where the sweep never measured it)."""
    from ember.config import load_config
    from ember.pretrain.scaling.plan import BatchRule, num_params, plan_run
    from ember.run_config import RunConfig

    budget = factor * max(r["budget"] for r in sweep["runs"])
    ladder = {entry["name"]: {k: v for k, v in entry.items() if k != "name"} for entry in sweep["ladder"]}
    base = load_config(Path(sweep["base"]), RunConfig, sweep["sets"])
    # The sweep's rule, less its cap on tokens per parameter: that shapes the grid, it does not forbid a target.
    rule = BatchRule(**{**sweep["rule"], "max_tokens_per_param": None})
    runs = {s: plan_run(f"{s}@{budget:.3g}-heldout", m, budget, base, rule, sweep["val_tokens"]) for s, m in ladder.items()}
    if size is not None and size not in ladder:
        raise UserError(f"--size '{size}' is not in the sweep's ladder ({', '.join(ladder)})", "--size")
    if size is None:
        n_star = float(fit.law.optimal(budget)[0])
        admitted = [s for s, run in runs.items() if run is not None] or list(ladder)
        size = min(admitted, key=lambda s: abs(math.log(num_params(ladder[s]) / n_star)))
    if runs[size] is None:
        raise UserError(f"the held-out run of {size} at C = {budget:.3g} would be shorter than rule.min_steps or have fewer "
                        "than rule.min_tokens_per_param tokens per parameter", "--factor")
    return runs[size]


def run_check(args: argparse.Namespace) -> int:
    from ember.launch.sweep import train_run
    from ember.pretrain.scaling.plan import read_sweep, write_sweep

    sweep_dir = Path(args.sweep)
    sweep = read_sweep(sweep_dir)
    fit, _ = read_fit(sweep_dir / FIT_FILE)
    run = heldout_run(sweep, fit, args.factor, args.size)
    prediction = fit.predict(run["params"], run["tokens"])
    print(f"held-out run {run['name']} at {args.factor:g}x the largest budget of the sweep: " + describe_prediction(prediction))
    held = {**sweep, "runs": [run]}
    write_sweep(held, sweep_dir / "heldout")
    result = train_run(held["runs"][0], args.via, "[held-out]")
    measured = result["loss"]
    lo, hi = prediction["run_interval"]
    rel = measured / prediction["loss"] - 1
    check = {"name": run["name"], "params": run["params"], "tokens": result["tokens"], "flops": 6.0 * run["params"] * result["tokens"],
             "factor": args.factor, "prediction": prediction, "measured": measured, "relative_error": rel,
             "inside": lo <= measured <= hi, "tolerance": args.tolerance, "run_dir": run["run_dir"]}
    write_json(sweep_dir / CHECK_FILE, check)
    ok = check["inside"] and abs(rel) <= args.tolerance
    print(f"measured val loss {measured:.4f}, predicted {prediction['loss']:.4f} ({100 * rel:+.2f}%), 95% interval of a run "
          f"[{lo:.4f}, {hi:.4f}]: {'inside' if check['inside'] else 'OUTSIDE'}; "
          f"{'within' if abs(rel) <= args.tolerance else 'BEYOND'} {100 * args.tolerance:g}% -> {'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


def run_report(args: argparse.Namespace) -> int:
    from ember.pretrain.scaling.plan import read_sweep
    from ember.pretrain.scaling.report import write_report
    from ember.pretrain.scaling.runs import results_of_sweep
    from ember.pretrain.tracking import log_scaling_report

    sweep_dir = Path(args.sweep)
    sweep = read_sweep(sweep_dir)
    rows, _ = results_of_sweep(sweep)
    fit, _ = read_fit(sweep_dir / FIT_FILE)
    check_path = sweep_dir / CHECK_FILE
    check = json.loads(check_path.read_text()) if check_path.is_file() else None
    out = Path(args.out) if args.out else sweep_dir / "report"
    paths = write_report(rows, fit, check, out)
    log_scaling_report(sweep, rows, fit.summary(), paths, mode=args.wandb, run_dir=sweep_dir)
    print(f"report: {paths[-1]} ({len(paths) - 1} PNG figures, {len(rows)} runs)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ember.launch.options import add_set_option

    p = sub.add_parser("scaling", help="plan, run, fit and check scaling laws (IsoFLOP sweeps, Chinchilla Approach 3 and 2)",
                       description="Scaling laws L(N, D) = E + A/N^alpha + B/D^beta (or Kaplan et al.'s interaction form): plan an "
                                   "IsoFLOP sweep, train it, fit it "
                                   "with bootstrap intervals, predict a larger run, train it and compare, report.")
    cmds = p.add_subparsers(dest="scaling_command", metavar="STEP", required=True)

    q = cmds.add_parser("plan", help="write a sweep: for each budget and ladder size, the tokens D = C / (6N), lr and batch")
    q.add_argument("config", help="sweep config YAML, or a preset name from configs/scaling/ (e.g. cpu-demo)")
    q.add_argument("--out", required=True, help="sweep directory to write (sweep.json, configs/, later runs/)")
    q.add_argument("--budgets", help="compute budgets in FLOPs, comma-separated (replaces the config's)")
    q.add_argument("--ladder", help="model sizes, comma-separated configs/models/ preset names (replaces the config's)")
    add_set_option(q)
    q.set_defaults(func=run_plan)

    via_help = "start each run with `ember pretrain` (one process) or `ember launch` (the config's launch section)"
    q = cmds.add_parser("sweep", help="train every run of a sweep; finished runs are skipped, an interrupted one resumes")
    q.add_argument("sweep", help="sweep directory written by `ember scaling plan`")
    q.add_argument("--via", choices=["pretrain", "launch"], default="pretrain", help=via_help)
    q.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (one process each; their losses do not "
                   "change); after a failure no queued run starts")
    q.set_defaults(func=run_sweep_cmd)

    def add_target(q: argparse.ArgumentParser) -> None:
        q.add_argument("--params", type=float, help="target model size N (with --tokens)")
        q.add_argument("--tokens", type=float, help="target training tokens D (with --params)")
        q.add_argument("--budget", type=float, help="target compute C: predict its compute-optimal N*, D*")
        q.add_argument("--json", action="store_true", help="print one JSON object")

    q = cmds.add_parser("fit", help="fit the law to runs, a sweep or a CSV (params,tokens,loss[,flops])")
    q.add_argument("runs", nargs="*", help="finished run directories")
    q.add_argument("--sweep", help="a sweep directory (its finished runs; the fit is written to SWEEP/fit.json)")
    q.add_argument("--csv", help="CSV file with columns params,tokens,loss (optionally flops)")
    q.add_argument("--out", help="write the fit (bootstrap laws included) to this JSON file, for `predict --fit`")
    q.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for standard errors and intervals")
    q.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    q.add_argument("--law", choices=["chinchilla", "interaction", "auto"], default="chinchilla",
                   help="chinchilla: E + A/N^alpha + B/D^beta (Hoffmann et al.); interaction: E + ((Nc/N)^(alpha_N/alpha_D) + "
                        "Dc/D)^alpha_D (Kaplan et al.'s form, the data term bending with N); auto: the one that, fitted without "
                        "the largest budget, predicts that budget's runs better")
    add_target(q)
    q.set_defaults(func=run_fit)

    q = cmds.add_parser("predict", help="the loss of a run of N parameters on D tokens (or of budget C), with intervals")
    q.add_argument("--fit", required=True, help="fit file (or a sweep directory holding fit.json)")
    q.add_argument("--level", type=float, default=0.95, help="interval level")
    add_target(q)
    q.set_defaults(func=run_predict)

    q = cmds.add_parser("check", help="train a held-out run beyond the sweep's budgets and compare it with the prediction")
    q.add_argument("sweep", help="a fitted sweep directory")
    q.add_argument("--factor", type=float, default=3.0, help="held-out budget as a multiple of the sweep's largest")
    q.add_argument("--size", help="ladder size of the held-out run (default: the one nearest the law's N*)")
    q.add_argument("--tolerance", type=float, default=0.03, help="largest relative error that passes")
    q.add_argument("--via", choices=["pretrain", "launch"], default="pretrain", help=via_help)
    q.set_defaults(func=run_check)

    q = cmds.add_parser("report", help="PNG plots and an HTML page of a fitted sweep (logged to W&B when tracking is on)")
    q.add_argument("sweep", help="a fitted sweep directory")
    q.add_argument("--out", help="output directory (default: SWEEP/report)")
    q.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default="auto",
                   help="log the table of runs and the figures to W&B (auto: as the runs' tracking would)")
    q.set_defaults(func=run_report)
