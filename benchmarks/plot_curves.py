"""Collect the TensorBoard scalars of finished runs into a CSV and a learning-curve PNG (mean +- std over seeds).

  python benchmarks/plot_curves.py --runs "runs/InvertedPendulum-v5__cpu__*" --title "..." \
      --csv benchmarks/results/mbrl_mpc_InvertedPendulum-v5.csv --png docs/img/mbrl_mpc_InvertedPendulum-v5.png

Each run directory holds args.json (script, env, seed) and its event files; the CSV has one row per logged
value: script, env, seed, step, metric, value, wall_time (s since the run's first event), hardware.
"""

import argparse
import csv
import glob
import json
import os
import platform
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def hardware() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        name = platform.processor()
    return f"{name}, {os.cpu_count()} cores"


def read_run(run_dir: str, metric: str) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars(metric) if metric in events.Tags()["scalars"] else []
    steps = np.array([s.step for s in scalars])
    values = np.array([s.value for s in scalars])
    wall = np.array([s.wall_time for s in scalars]) - (scalars[0].wall_time if scalars else 0.0)
    return args, steps, values, wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="glob of run directories (one per seed)")
    parser.add_argument("--metric", default="charts/episodic_return")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--png", required=True)
    parser.add_argument("--title", default="")
    parser.add_argument("--reference", nargs="*", default=[], help="step:value pairs of a published curve")
    parser.add_argument("--reference-label", default="published")
    parser.add_argument("--table-steps", nargs="*", type=int, default=[],
                        help="print a markdown table of the metric at these env steps (linear interpolation)")
    opts = parser.parse_args()
    runs = sorted(d for d in glob.glob(opts.runs) if os.path.isfile(os.path.join(d, "args.json")))
    if not runs:
        raise SystemExit(f"no run directories match {opts.runs}")
    os.makedirs(os.path.dirname(opts.csv) or ".", exist_ok=True)
    os.makedirs(os.path.dirname(opts.png) or ".", exist_ok=True)
    curves, hw = [], hardware()
    with open(opts.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["script", "env", "seed", "step", "metric", "value", "wall_time", "hardware"])
        for run in runs:
            args, steps, values, wall = read_run(run, opts.metric)
            script = args.get("exp_name", "")
            for s, v, w in zip(steps, values, wall):
                writer.writerow([script, args["env_id"], args["seed"], int(s), opts.metric, f"{v:.4f}", f"{w:.1f}", hw])
            curves.append((args["seed"], steps, values))
    # episodes end at different steps in different seeds: interpolate on a common grid of env steps
    grid = np.linspace(0, min(c[1][-1] for c in curves), 100)
    stacked = np.stack([np.interp(grid, steps, values) for _, steps, values in curves])
    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, steps, values in curves:
        ax.plot(steps, values, lw=0.6, alpha=0.4)
    mean, std = stacked.mean(0), stacked.std(0)
    ax.plot(grid, mean, color="C0", lw=2, label=f"mean ± std of {len(curves)} seeds (thin: each seed)")
    ax.fill_between(grid, mean - std, mean + std, color="C0", alpha=0.2)
    if opts.reference:
        ref = np.array([[float(x) for x in pair.split(":")] for pair in opts.reference])
        ax.plot(ref[:, 0], ref[:, 1], "k--", marker="o", label=opts.reference_label)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(opts.metric)
    ax.set_title(opts.title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(opts.png, dpi=120)
    if opts.table_steps:
        print(f"| env steps | {opts.metric}, mean ± std over {len(curves)} seeds | per seed |")
        print("|---|---|---|")
        for step in opts.table_steps:
            at = [float(np.interp(step, steps, values)) for _, steps, values in curves]
            print(f"| {step} | {np.mean(at):.1f} ± {np.std(at):.1f} | {', '.join(f'{v:.1f}' for v in at)} |")
    finals = [values[-1] for _, _, values in curves]
    print(f"{len(curves)} runs; final {opts.metric}: {np.mean(finals):.1f} +- {np.std(finals):.1f}; wrote {opts.csv}, {opts.png}")


if __name__ == "__main__":
    main()
