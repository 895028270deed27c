"""Does an RL^2 policy use what it remembers across episodes? Meta-test returns per episode with the hidden
state carried through the trial (RL^2) and reset at every episode (the ablation), on the run's own held-out
tasks (the ones `meta/episode_k_return` is logged on), for each checkpoint given.

  python benchmarks/rl2_memory_ablation.py runs/RUN_A/rl2_recurrent.pt runs/RUN_B/rl2_recurrent.pt

Episode 1 is the same in both; a policy that uses its memory scores higher in episode 2+ when it is carried.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rl2_recurrent as rl2  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="rl2_recurrent.pt files")
    opts = parser.parse_args()
    device = torch.device("cpu")
    rows = []
    for path in opts.checkpoints:
        if not os.path.isfile(path):
            parser.error(f"{path}: no such file")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - any unreadable file gets the same one line
            ckpt = None
        if not isinstance(ckpt, dict) or ckpt.get("script") != rl2.SCRIPT:
            parser.error(f"{path} is not a checkpoint of {rl2.SCRIPT}.py")
        args = rl2.Args(**ckpt["args"])  # the run's own flags
        if args.eval_tasks < 1 or args.episodes_per_trial < 2:
            parser.error(f"{path}: the run needs held-out tasks (--eval-tasks {args.eval_tasks}) and 2+ episodes "
                         f"per trial (--episodes-per-trial {args.episodes_per_trial}) for this comparison")
        if rows and args.episodes_per_trial != len(rows[0][2]):
            parser.error(f"{path}: {args.episodes_per_trial} episodes per trial, {rows[0][0]} has "
                         f"{len(rows[0][2])}; compare runs of one trial length per call")
        tasks = rl2.make_tasks(args, 1)
        policy = rl2.RecurrentPolicy(tasks.obs_dim, tasks.action_space, args.hidden_size, args.normalize_obs)
        policy.load_state_dict(ckpt["policy"])
        # the same held-out tasks as the run's own meta-test (rl2_recurrent.main)
        params = tasks.sample_tasks(args.eval_tasks, np.random.default_rng(args.seed + 10_000))
        carried = rl2.meta_test(policy, args, params, device).mean(0)
        reset = rl2.meta_test(policy, args, params, device, reset_hidden_each_episode=True).mean(0)
        rows.append((path, ckpt["global_step"], carried, reset))
    episodes = len(rows[0][2])
    header = " | ".join(f"episode {k + 1}: carried / reset" for k in range(episodes))
    print(f"| checkpoint | env steps | {header} |")
    print("|---|---|" + "---|" * episodes)
    for path, step, carried, reset in rows:
        cells = " | ".join(f"{c:.1f} / {r:.1f}" for c, r in zip(carried, reset))
        print(f"| {path} | {step} | {cells} |")


if __name__ == "__main__":
    main()
