"""Env steps/s of mbrl_ensemble.py (MBPO) beside mbrl-lib's MBPO, in one run on one machine.

Both are timed the way ../shared/peers/mbrl_lib_mbpo_timing.py times mbrl-lib: a run of warm-up + N1 training
steps and one of warm-up + N2, in alternating rounds (ours, peer, ours, ...); the cost of a training step is
(T(N2) - T(N1)) / (N2 - N1), which leaves out the random warm-up and start-up. Ours also reports where its time
went (model training, model rollouts, SAC updates) over the longer run.

  python benchmarks/mbpo_throughput.py --env-id Hopper-v5 --peer-python ~/venv-mbrl/bin/python --rounds 2
  python benchmarks/mbpo_throughput.py --env-id Walker2d-v5 --device cuda          # ours alone, on a GPU
"""

import argparse
import csv
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mbrl_ensemble as mbpo  # noqa: E402

PEER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "peers",
                    "mbrl_lib_mbpo_timing.py")


def time_ours(env_id: str, steps: int, updates: int, hidden: int, device: str, seed: int,
              model_max_epochs: Optional[int] = None, model_patience: int = 5) -> tuple[float, dict]:
    args = mbpo.with_env_defaults(mbpo.Args(env_id=env_id, device=device, seed=seed, updates_per_step=updates,
                                            sac_hidden_size=hidden, save_model=False, eval_episodes=0,
                                            model_max_epochs=model_max_epochs, model_patience=model_patience))
    args = mbpo.Args(**{**args.__dict__, "total_timesteps": args.init_exploration_steps + steps})
    start = time.perf_counter()
    result = mbpo.main(args)
    return time.perf_counter() - start, result["time_s"]


def time_peer(python: str, steps: int, updates: int, hidden: int) -> float:
    """mbrl-lib's run through peer_compat.py, which also makes it keep all its data (see there)."""
    compat = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_compat.py")
    out = subprocess.run([python, compat, "cpu", PEER, "--steps", str(steps), "--sac-updates", str(updates),
                          "--sac-hidden", str(hidden)], capture_output=True, text=True, check=True, cwd="/tmp").stdout
    return float(re.search(r"training steps in (\d+) s", out).group(1))


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    return f"{name}, {torch.get_num_threads()} threads"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env-id", default="Hopper-v5")
    parser.add_argument("--steps", type=int, nargs=2, default=[250, 750], help="N1 N2 training steps")
    parser.add_argument("--updates-per-step", type=int, default=20, help="G (MBPO paper Hopper: 20)")
    parser.add_argument("--sac-hidden", type=int, default=256, help="SAC width (MBPO paper: 256)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peer-python", default=None, help="python of the venv with mbrl-lib (Hopper, CPU only)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model-max-epochs", type=int, default=None,
                        help="cap ours' model training at this many epochs (default: train to early stop, the "
                             "official rule: more than 5 epochs without a 1 %% held-out improvement; mbrl-lib stops "
                             "after 5)")
    parser.add_argument("--model-patience", type=int, default=5,
                        help="ours' model training stops after more than this many epochs without a 1 %% held-out "
                             "improvement (official MBPO: 5, i.e. after 6 such epochs); 4 stops after 5, mbrl-lib's "
                             "rule (its patience 5 stops at epochs_since_update >= 5), so both do the same model work")
    parser.add_argument("--csv", default=None, help="append the results to this CSV file")
    opts = parser.parse_args()
    n1, n2 = opts.steps
    ours, peer, breakdown = [], [], {}
    for round_ in range(opts.rounds):
        t1, _ = time_ours(opts.env_id, n1, opts.updates_per_step, opts.sac_hidden, opts.device, round_,
                          opts.model_max_epochs, opts.model_patience)
        t2, breakdown = time_ours(opts.env_id, n2, opts.updates_per_step, opts.sac_hidden, opts.device, round_,
                                  opts.model_max_epochs, opts.model_patience)
        ours.append((t2 - t1) / (n2 - n1))
        print(f"round {round_}: ours {t1:.0f} s / {t2:.0f} s -> {ours[-1]:.3f} s per step; breakdown of the "
              f"{n2}-step run: " + ", ".join(f"{k} {v:.0f} s" for k, v in breakdown.items()), flush=True)
        if opts.peer_python:
            p1 = time_peer(opts.peer_python, n1, opts.updates_per_step, opts.sac_hidden)
            p2 = time_peer(opts.peer_python, n2, opts.updates_per_step, opts.sac_hidden)
            peer.append((p2 - p1) / (n2 - n1))
            print(f"round {round_}: mbrl-lib {p1:.0f} s / {p2:.0f} s -> {peer[-1]:.3f} s per step", flush=True)
    rows = [("mbrl_ensemble", statistics.median(ours))] + ([("mbrl-lib", statistics.median(peer))] if peer else [])
    where = hardware(opts.device)
    cap = f", ours' model training capped at {opts.model_max_epochs} epochs" if opts.model_max_epochs else ""
    cap += f", ours' model patience {opts.model_patience}" if opts.model_patience != 5 else ""
    print(f"\n{opts.env_id}, G={opts.updates_per_step}, SAC width {opts.sac_hidden}{cap}, {where}")
    for name, seconds in rows:
        print(f"  {name:14s} {seconds:.3f} s per env step = {1 / seconds:.1f} env steps/s")
    if peer:
        print(f"  ratio (mbrl-lib time / ours): {rows[1][1] / rows[0][1]:.2f}x")
    if opts.csv:
        new = not os.path.exists(opts.csv)
        with open(opts.csv, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["impl", "env", "updates_per_step", "sac_hidden", "s_per_step", "steps_per_s",
                                 "rounds", "hardware", "ours_model_max_epochs", "ours_model_patience"])
            for name, seconds in rows:
                writer.writerow([name, opts.env_id, opts.updates_per_step, opts.sac_hidden, f"{seconds:.4f}",
                                 f"{1 / seconds:.2f}", opts.rounds, where, opts.model_max_epochs or "", opts.model_patience])


if __name__ == "__main__":
    main()
