"""RL^2 sampling speed against raw MuJoCo: env steps/s of rl2_recurrent.py's trial sampler (one batched GRU
step per env step) and of the same vector env stepped with random actions and no policy, in alternating rounds.

  python benchmarks/rl2_sampling_speed.py --task HalfCheetahVel --num-trials 20 --csv results.csv

The goal (issue 6): sampling within 80 % of the raw env steps/s. Also reports the whole training loop's
env steps/s (sampling + PPO update) from one short run.
"""

import argparse
import csv
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rl2_recurrent as rl2  # noqa: E402


def raw_steps_per_s(tasks, episodes: int, length: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    tasks.set_tasks(tasks.sample_tasks(tasks.num_envs, rng))
    low, high = tasks.action_space.low, tasks.action_space.high
    start = time.perf_counter()
    for episode in range(episodes):
        tasks.reset(seed=list(range(tasks.num_envs)) if episode == 0 else None)
        for _ in range(length):
            tasks.step(rng.uniform(low, high, (tasks.num_envs, len(low))).astype(np.float32))
    return tasks.num_envs * episodes * length / (time.perf_counter() - start)


def policy_steps_per_s(policy, tasks, episodes: int, length: int, seed: int) -> float:
    params = tasks.sample_tasks(tasks.num_envs, np.random.default_rng(seed))
    start = time.perf_counter()
    rl2.run_trials(policy, tasks, params, episodes, length, torch.device("cpu"),
                   env_seeds=list(range(tasks.num_envs)))
    return tasks.num_envs * episodes * length / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="HalfCheetahVel")
    parser.add_argument("--num-trials", type=int, default=20)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30, help="alternating pairs (raw trial, sampled trial)")
    parser.add_argument("--loop-updates", type=int, default=3, help="policy updates of the whole-loop run (0: none)")
    parser.add_argument("--csv", default=None)
    opts = parser.parse_args()
    args = rl2.with_task_defaults(rl2.Args(task=opts.task, num_trials=opts.num_trials, hidden_size=opts.hidden_size,
                                           device="cpu"))
    tasks = rl2.make_tasks(args, args.num_trials)
    policy = rl2.RecurrentPolicy(tasks.obs_dim, tasks.action_space, args.hidden_size, args.normalize_obs)  # as main
    rows = []
    for i in range(opts.rounds):
        raw = raw_steps_per_s(tasks, args.episodes_per_trial, args.episode_length, i)
        sampled = policy_steps_per_s(policy, tasks, args.episodes_per_trial, args.episode_length, i)
        rows.append((i, raw, sampled))
        print(f"round {i}: raw env {raw:.0f} steps/s, RL^2 sampler {sampled:.0f} steps/s ({sampled / raw:.0%})")
    raw, sampled = np.median([r[1] for r in rows]), np.median([r[2] for r in rows])
    # the machine's speed drifts by 2x within seconds (shared host): the ratio of each pair of neighbouring
    # trials is more stable than the ratio of the medians, so the goal is judged by the median pair ratio
    ratios = np.array([r[2] / r[1] for r in rows])
    loop_sps = float("nan")
    if opts.loop_updates:
        steps = args.num_trials * args.episodes_per_trial * args.episode_length * opts.loop_updates
        loop = rl2.main(rl2.replace(args, total_timesteps=steps, eval_tasks=0, save_model=False, exp_name="speed"))
        loop_sps = loop["global_step"] / loop["elapsed_s"]
    print(f"medians: raw env {raw:.0f} steps/s, sampler {sampled:.0f} steps/s; sampler / raw per pair: median "
          f"{np.median(ratios):.0%} (quartiles {np.percentile(ratios, 25):.0%}-{np.percentile(ratios, 75):.0%}); "
          f"whole loop (sampling + PPO) {loop_sps:.0f} steps/s; {args.num_trials} envs, GRU {args.hidden_size}, "
          f"torch threads {torch.get_num_threads()}")
    if opts.csv:  # appended, so that one file collects several configurations
        new_file = not os.path.exists(opts.csv)
        with open(opts.csv, "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(["task", "num_envs", "hidden_size", "threads", "round", "raw_env_sps", "sampler_sps",
                                 "loop_sps"])
            for i, raw_i, sampled_i in rows:
                writer.writerow([opts.task, args.num_trials, args.hidden_size, torch.get_num_threads(), i,
                                 f"{raw_i:.1f}", f"{sampled_i:.1f}", f"{loop_sps:.1f}"])


if __name__ == "__main__":
    main()
