"""MAML-TRPO speed at the paper's size: seconds per meta-iteration split into sampling and the meta-update,
and maml_rl.py's sampler against raw MuJoCo (the same vector env stepped with random actions, no policy).

  python benchmarks/maml_speed.py --task HalfCheetahVel --rounds 2 --iterations 2 --csv results.csv

One meta-iteration at the paper's size: 40 tasks x 20 trajectories x 200 steps, from theta and again from the
adapted theta'_i (320k env steps on MuJoCo), then the TRPO meta-update (meta-gradient, 10 conjugate-gradient
steps on Hessian-vector products of the KL through the adaptation, line search). The goal (issue 7):
sampling within 80 % of the raw env steps/s for the same number of envs.
"""

import argparse
import csv
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import maml_rl as maml  # noqa: E402


def raw_steps_per_s(tasks, horizon: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    tasks.set_tasks(tasks.sample_tasks(tasks.num_envs, rng))
    dim = tasks.action_space.shape[0]
    start = time.perf_counter()
    tasks.reset(seed=list(range(tasks.num_envs)))
    for _ in range(horizon):
        tasks.step(rng.uniform(-1, 1, (tasks.num_envs, dim)).astype(np.float32))
    return tasks.num_envs * horizon / (time.perf_counter() - start)


def sampler_steps_per_s(policy, tasks, args: maml.Args, seed: int) -> float:
    task_params = tasks.sample_tasks(args.meta_batch_size, np.random.default_rng(seed))
    params = maml.per_task({k: p.detach() for k, p in policy.named_parameters()}, args.meta_batch_size)
    start = time.perf_counter()
    maml.sample_trajectories(policy, params, tasks, task_params, args.fast_batch_size, args.horizon,
                             torch.device("cpu"), env_seeds=list(range(tasks.num_envs)))
    return tasks.num_envs * args.horizon / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="HalfCheetahVel")
    parser.add_argument("--rounds", type=int, default=2, help="alternating raw / sampler rounds")
    parser.add_argument("--iterations", type=int, default=2, help="whole meta-iterations timed")
    parser.add_argument("--csv", default=None)
    opts = parser.parse_args()
    args = maml.with_task_defaults(maml.Args(task=opts.task, device="cpu"))
    torch.manual_seed(0)
    tasks = maml.make_tasks(args, args.meta_batch_size * args.fast_batch_size)
    policy = maml.GaussianMLPPolicy(tasks.obs_dim, tasks.action_space.shape[0], args.hidden_sizes, args.init_std)
    rows = []
    for i in range(opts.rounds):
        raw, sampled = raw_steps_per_s(tasks, args.horizon, i), sampler_steps_per_s(policy, tasks, args, i)
        rows += [("raw_env_steps_per_s", i, raw), ("sampler_steps_per_s", i, sampled)]
        print(f"round {i}: raw env {raw:.0f} steps/s, MAML sampler {sampled:.0f} steps/s ({sampled / raw:.0%})")
    rng = np.random.default_rng(0)
    for i in range(opts.iterations):
        t0 = time.perf_counter()
        inner, outer = maml.sample_meta_batch(policy, tasks, tasks.sample_tasks(args.meta_batch_size, rng), args,
                                              torch.device("cpu"), rng)
        t1 = time.perf_counter()
        maml.trpo_meta_update(policy, inner, outer, args)
        t2 = time.perf_counter()
        rows += [("iteration_sampling_s", i, t1 - t0), ("iteration_meta_update_s", i, t2 - t1)]
        print(f"meta-iteration {i}: sampling {t1 - t0:.1f} s + meta-update {t2 - t1:.1f} s = {t2 - t0:.1f} s")

    def median(measure):
        return float(np.median([v for m, _, v in rows if m == measure]))

    raw, sampled = median("raw_env_steps_per_s"), median("sampler_steps_per_s")
    sampling, update = median("iteration_sampling_s"), median("iteration_meta_update_s")
    print(f"median: raw env {raw:.0f} steps/s, sampler {sampled:.0f} steps/s = {sampled / raw:.0%} of raw "
          f"({tasks.num_envs} envs); meta-iteration {sampling + update:.1f} s = sampling {sampling:.1f} s "
          f"({sampling / (sampling + update):.0%}) + meta-update {update:.1f} s; torch threads "
          f"{torch.get_num_threads()}")
    if opts.csv:
        with open(opts.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "num_envs", "measure", "round", "value"])
            writer.writerows([opts.task, tasks.num_envs, m, i, f"{v:.3f}"] for m, i, v in rows)


if __name__ == "__main__":
    main()
