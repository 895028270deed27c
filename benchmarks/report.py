"""Turn sweeps made by benchmarks/run.py into a tidy CSV, learning-curve PNGs and a table next to published numbers.

  python benchmarks/report.py runs/sweeps/mbrl_ensemble-cpu
  python benchmarks/report.py runs/sweeps/mbrl_mpc-cpu runs/sweeps/mbrl_mpc-cpu_horizon --out benchmarks/results/x
  python benchmarks/report.py runs/sweeps/maml_rl-cpu_navigation --metric meta/return_step_0 meta/return_step_1

Writes to --out (default benchmarks/results/<sweep name>):
  curves.csv    one row per logged value: sweep, script, env, variant, seed, step, metric, value, wall_time
                (s since the run's first event; a resumed run includes its pauses), hardware, status
  <env>.png     one figure per env: mean +- std (population std, ddof 0) over seeds per (sweep, script,
                variant), each seed thin, published numbers as crosses (<env>__<metric>.png for several metrics)
  adaptation.*  runs that wrote adaptation.json (context_ars_bo.py: best-so-far return of the test-time
                adaptation against episodes used, at the run's last evaluation): adaptation.csv, one figure
                adaptation__<env>.png (mean +- std over seeds per group) and a table in table.md
  table.md      the metric at the table steps (per env where the sweep sets env_table_steps): mean +- std
                over the seeds that reached the step (values linearly interpolated between logged points),
                per seed, and the published number at that step from --published (script, env, step,
                metric, value, source) where there is one; one table per metric
Runs still going or interrupted are included up to where they got (their status says so).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass
from typing import Optional

import matplotlib
import numpy as np
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    sweeps: tyro.conf.Positional[list[str]]
    """sweep folders written by benchmarks/run.py (runs/sweeps/<name>)"""
    metric: Optional[list[str]] = None
    """TensorBoard key(s) to report (default: the first sweep's metric)"""
    steps: Optional[list[int]] = None
    """env steps of the table (default: the sweeps' table steps)"""
    final: bool = False
    """table each run's last logged value instead (runs budgeted in iterations end at different env steps)"""
    published: str = os.path.join(ROOT, "benchmarks", "published.csv")
    """published numbers: CSV with columns script, env, step, metric, value, source"""
    out: Optional[str] = None
    """output folder (default benchmarks/results/<sweep name>, names joined by '+')"""


@dataclass
class Run:
    sweep: str
    script: str
    env: str
    variant: str
    seed: int
    status: str
    hardware: str
    steps: np.ndarray
    values: np.ndarray
    wall: np.ndarray

    @property
    def group(self) -> tuple[str, str, str, str]:
        return self.sweep, self.script, self.env, self.variant


def read_sweep(sweep_dir: str) -> tuple[dict, list[dict]]:
    """The sweep's settings and its jobs' records (job.json plus the folder the script wrote)."""
    try:
        with open(os.path.join(sweep_dir, "sweep.json")) as f:
            sweep = json.load(f)
    except OSError:
        raise SystemExit(f"error: {sweep_dir} is not a sweep folder of benchmarks/run.py (no sweep.json)")
    jobs = []
    for path in sorted(glob.glob(os.path.join(sweep_dir, "*", "job.json"))):
        with open(path) as f:
            job = json.load(f)
        if not (job.get("run_dir") and os.path.isdir(job["run_dir"])):  # a run still going: the newest folder
            run_dirs = glob.glob(os.path.join(os.path.dirname(path), "runs", "*", "args.json"))
            job["run_dir"] = os.path.dirname(max(run_dirs, key=os.path.getmtime)) if run_dirs else None
        jobs.append(job)
    return sweep, jobs


def read_scalars(run_dir: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, set[str]]:
    """(steps, values, seconds since the first event) of one metric, and every key the run logged."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    scalars = events.Scalars(metric) if metric in tags else []
    steps = np.array([s.step for s in scalars], dtype=np.int64)
    values = np.array([s.value for s in scalars], dtype=np.float64)
    wall = np.array([s.wall_time for s in scalars]) - (scalars[0].wall_time if scalars else 0.0)
    return steps, values, wall, tags


def value_at(run: Run, step: int) -> Optional[float]:
    """The run's metric at an env step, interpolated between logged points; None outside what it logged."""
    if len(run.steps) == 0 or not run.steps[0] <= step <= run.steps[-1]:
        return None
    return float(np.interp(step, run.steps, run.values))


def read_published(path: str) -> dict[tuple[str, str, int, str], tuple[float, str]]:
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {(row["script"], row["env"], int(row["step"]), row["metric"]): (float(row["value"]), row["source"])
                for row in csv.DictReader(line for line in f if not line.startswith("#"))}


def label(group: tuple[str, str, str, str], many_sweeps: bool) -> str:
    sweep, script, _, variant = group
    return " ".join(part for part in [sweep if many_sweeps else script, variant] if part)


def plot_env(env: str, runs: list[Run], published: dict, metric: str, many_sweeps: bool, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    groups = sorted({run.group for run in runs})
    for color, group in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, groups):
        members = [run for run in runs if run.group == group and len(run.steps)]
        if not members:
            continue
        # seeds log at different steps (episode ends): average on a common grid up to the shortest seed
        first, last = max(r.steps[0] for r in members), min(r.steps[-1] for r in members)
        for run in members:  # a run that logged once or twice (an evaluation at the end) shows as points
            named = first >= last and run is members[0]  # no mean curve to carry the legend
            ax.plot(run.steps, run.values, color=color, lw=0.6, alpha=0.35, marker="o" if len(run.steps) < 3 else None,
                    label=f"{label(group, many_sweeps)} ({len(members)} seeds)" if named else None)
        if first >= last:  # the seeds share no stretch of steps (e.g. one barely started): no mean curve
            continue
        grid = np.linspace(first, last, 200)
        curves = np.stack([np.interp(grid, r.steps, r.values) for r in members])
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(grid, mean, color=color, lw=2, label=f"{label(group, many_sweeps)} ({len(members)} seeds)")
        ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2)
    scripts, reached = {run.script for run in runs}, max((run.steps[-1] for run in runs if len(run.steps)), default=0)
    points = [(step, value, source) for (script, penv, step, pmetric), (value, source) in published.items()
              if penv == env and pmetric == metric and script in scripts and step <= reached]  # within the x range
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker="x", color="k", zorder=5,
                   label="published (see table)")
    finish_figure(fig, ax, "env steps", metric, f"{env} ({', '.join(sorted({run.sweep for run in runs}))})", path)


def fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"  # bandit rewards and MuJoCo returns alike


def mean_std(values) -> str:
    return f"{fmt(np.mean(values))} ± {fmt(np.std(values))}"  # population std (ddof 0), as in the figures


def finish_figure(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(runs: list[Run], steps: dict[str, list[int]], published: dict, metric: str, many_sweeps: bool) -> list[str]:
    lines = [f"| run | env | env steps | `{metric}` mean ± std (seeds) | per seed | published | source |",
             "|---|---|---|---|---|---|---|"]
    for group in sorted({run.group for run in runs}):
        members = sorted((run for run in runs if run.group == group), key=lambda run: run.seed)
        for step in steps[group[2]]:
            values = [(run.seed, value_at(run, step)) for run in members]
            reached = [v for _, v in values if v is not None]
            ours = f"{mean_std(reached)} ({len(reached)})" if reached else "not reached"
            per_seed = ", ".join(fmt(v) if v is not None else "-" for _, v in values)
            value, source = published.get((group[1], group[2], step, metric), (None, ""))
            lines.append(f"| {label(group, many_sweeps)} | {group[2]} | {step} | {ours} | {per_seed} | "
                         f"{'' if value is None else f'{value:g}'} | {source} |")
    return lines


def adaptation_curves(sweeps: list[tuple[dict, list[dict]]], out: str, many_sweeps: bool) -> tuple[list[str], int]:
    """Collect the adaptation.json of every run that wrote one: a CSV, a figure per env, table lines (and the
    number of figures)."""
    curves = []
    for sweep, jobs in sweeps:
        for job in jobs:
            path = os.path.join(job["run_dir"] or "", "adaptation.json")
            if job["run_dir"] and os.path.isfile(path):
                with open(path) as f:
                    data = json.load(f)
                group = (sweep["name"], job["script"], job["env"], job.get("variant", ""))
                curves.append((group, job["seed"], data["step"], data["episodes"], data["best_return"]))
    groups = sorted({group for group, *_ in curves})
    for group in groups:
        if len({tuple(c[3]) for c in curves if c[0] == group}) > 1:
            raise SystemExit(f"error: the runs of {label(group, many_sweeps)} adapted with different episode "
                             "counts; report them separately")
    if not curves:
        return [], 0
    with open(os.path.join(out, "adaptation.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sweep", "script", "env", "variant", "seed", "step", "episodes", "best_return"])
        for group, seed, step, episodes, best in curves:
            writer.writerows([*group, seed, step, e, f"{b:.4f}"] for e, b in zip(episodes, best))
    lines = ["| adapting run | env | seeds (env steps) | best return so far after k episodes: mean ± std |",
             "|---|---|---|---|"]
    envs = sorted({group[2] for group in groups})
    for env in envs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for group in [group for group in groups if group[2] == env]:
            members = [c for c in curves if c[0] == group]
            episodes, best = members[0][3], np.array([c[4] for c in members])
            mean, std = best.mean(0), best.std(0)
            ax.plot(episodes, mean, marker=".", label=f"{label(group, many_sweeps)} ({len(members)} seeds)")
            ax.fill_between(episodes, mean - std, mean + std, alpha=0.2)
            shown = sorted({0, len(episodes) // 4, len(episodes) // 2, len(episodes) - 1})
            lines.append(f"| {label(group, many_sweeps)} | {env} | "
                         f"{', '.join(f'{c[1]} ({c[2]})' for c in members)} | "
                         + ", ".join(f"{episodes[i]}: {mean_std(best[:, i])}" for i in shown) + " |")
        finish_figure(fig, ax, "episodes used by the adaptation", "best mean return so far",
                      f"{env}: test-time adaptation", os.path.join(out, f"adaptation__{env.replace(':', '-')}.png"))
    return lines, len(envs)


def final_table(runs: list[Run], metric: str, many_sweeps: bool) -> list[str]:
    lines = [f"| run | env | last logged env step per seed | `{metric}` mean ± std (seeds) | per seed |",
             "|---|---|---|---|---|"]
    for group in sorted({run.group for run in runs}):
        members = sorted((run for run in runs if run.group == group and len(run.steps)), key=lambda run: run.seed)
        if not members:
            continue
        last = [float(run.values[-1]) for run in members]
        lines.append(f"| {label(group, many_sweeps)} | {group[2]} | {', '.join(str(run.steps[-1]) for run in members)}"
                     f" | {mean_std(last)} ({len(last)}) | {', '.join(map(fmt, last))} |")
    return lines


def read_runs(sweeps: list[tuple[dict, list[dict]]], metric: str) -> tuple[list[Run], list[str]]:
    """Every job's curve of one metric, and the jobs without a run folder."""
    runs, missing, tags = [], [], set()
    for sweep, jobs in sweeps:
        for job in jobs:
            if job["run_dir"] is None:
                missing.append(f"{sweep['name']}/{job['key']} ({job.get('status')}, no run folder)")
                continue
            steps, values, wall, run_tags = read_scalars(job["run_dir"], metric)
            tags |= run_tags
            runs.append(Run(sweep["name"], job["script"], job["env"], job.get("variant", ""), job["seed"],
                            job.get("status", "?"), job.get("hardware", ""), steps, values, wall))
    if runs and not any(len(run.steps) for run in runs):
        raise SystemExit(f"error: no run logged {metric}; logged keys: {', '.join(sorted(tags))}")
    return runs, missing


def main(args: Args) -> dict:
    sweeps = [read_sweep(sweep_dir) for sweep_dir in args.sweeps]
    settings = [sweep for sweep, _ in sweeps]
    metrics = args.metric or [settings[0]["metric"]]

    def table_steps(env: str) -> list[int]:  # --steps, else the sweeps' steps for this env, else their steps
        per_env = {s for sweep in settings for s in sweep.get("env_table_steps", {}).get(env, [])}
        return args.steps or sorted(per_env or {s for sweep in settings for s in sweep.get("table_steps", [])})
    many_sweeps = len(settings) > 1
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "+".join(s["name"] for s in settings))
    os.makedirs(out, exist_ok=True)
    published = read_published(args.published)

    lines, figures = [], 0
    with open(os.path.join(out, "curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sweep", "script", "env", "variant", "seed", "step", "metric", "value", "wall_time",
                         "hardware", "status"])
        for metric in metrics:
            runs, missing = read_runs(sweeps, metric)
            for run in runs:
                for step, value, wall in zip(run.steps, run.values, run.wall):
                    writer.writerow([run.sweep, run.script, run.env, run.variant, run.seed, int(step), metric,
                                     f"{value:.4f}", f"{wall:.1f}", run.hardware, run.status])
            envs = sorted({run.env for run in runs})
            for env in envs:
                name = env.replace(":", "-") + ("" if len(metrics) == 1 else "__" + metric.replace("/", "-"))
                plot_env(env, [run for run in runs if run.env == env], published, metric, many_sweeps,
                         os.path.join(out, f"{name}.png"))
            figures += len(envs)
            lines += [*(final_table(runs, metric, many_sweeps) if args.final else
                        table(runs, {env: table_steps(env) for env in envs}, published, metric, many_sweeps)), ""]
    table_rows = sum(1 for line in lines if line.startswith("| ") and not line.startswith("| run |"))
    adaptation, adaptation_figures = adaptation_curves(sweeps, out, many_sweeps)
    lines += [*adaptation, ""] if adaptation else []
    figures += adaptation_figures
    unfinished = [f"{run.sweep}/{run.script} {run.env} {run.variant} seed {run.seed} ({run.status})"
                  for run in runs if run.status != "finished"]
    notes = [f"- not finished, included up to its last logged step: {u}" for u in unfinished]
    notes += [f"- no data: {m}" for m in missing]
    hardware = sorted({run.hardware for run in runs if run.hardware})
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join([f"Sweeps: {', '.join(s['name'] for s in settings)}; hardware: {'; '.join(hardware)}",
                           "", *lines, *notes]) + "\n")
    print("\n".join(lines + notes))
    print(f"wrote {out}/curves.csv, {'adaptation.csv, ' if adaptation else ''}table.md and {figures} figure(s)")
    return {"out": out, "runs": len(runs), "table_rows": table_rows, "figures": figures}


if __name__ == "__main__":
    main(tyro.cli(Args))
