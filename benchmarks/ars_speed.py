"""ARS training speed of context_ars_bo.py against raw MuJoCo, with 1 and 2 rollout workers.

  python benchmarks/ars_speed.py --env-id Hopper-v5 --rounds 3 --csv results.csv

Raw: the same env copies (one per episode of an ARS iteration) stepped in one process with random actions,
no policy, each episode to its natural end. ARS: whole ARS iterations at the official size (32 directions x
+- x 8 tasks = 512 episodes, each with its own perturbed weights and dynamics), env steps taken / wall-clock,
with `--num-workers` 1 and 2. Every episode is capped at --max-episode-steps; the policy is the script's
initial one (its episodes are as short as the raw ones, so both sides time similar episode lengths). The
goal (issue 8): ARS at >= 80 % of raw per worker.
"""

import argparse
import csv
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import context_ars_bo as mso  # noqa: E402


def raw_steps_per_s(worker: mso.RolloutWorker, dynamics: np.ndarray, seed: int) -> float:
    """Env steps/s of the worker's env copies with random actions: reset each with its dynamics, step until
    every episode ended (the same loop shape as the rollouts, without the policy)."""
    rng = np.random.default_rng(seed)
    n = len(dynamics)
    worker._grow(n)
    start, steps = time.perf_counter(), 0
    for j in range(n):
        worker.variations[j].set(dynamics[j])
        worker.envs[j].reset(seed=seed + j)
    live = list(range(n))
    for _ in range(worker.max_episode_steps):
        actions = rng.uniform(worker.low, worker.high, (len(live), len(worker.low)))
        live = [j for j, action in zip(live, actions) if not worker.envs[j].step(action)[2]]
        steps += len(actions)
        if not live:
            break
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="Hopper-v5")
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw / ARS rounds")
    parser.add_argument("--max-episode-steps", type=int, default=1000)
    parser.add_argument("--csv", default=None)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    args = mso.Args(env_id=opts.env_id, params=mso.DYNAMICS_DEFAULTS[opts.env_id], iterations=1,
                    max_episode_steps=opts.max_episode_steps)
    probe = mso.make_env(args.env_id)
    params = mso.parse_params(args.params, probe.unwrapped.model)
    obs_dim, action_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    torch.manual_seed(0)
    policy = mso.LatentConditionedPolicy(obs_dim, args.latent_dim, action_dim, args.hidden_sizes)
    theta = torch.nn.utils.parameters_to_vector(policy.parameters()).detach().numpy().copy()
    kwargs = dict(env_id=args.env_id, param_specs=args.params, shapes=mso.layer_shapes(policy),
                  max_episode_steps=args.max_episode_steps)
    pools = {workers: mso.Rollouts(workers, **kwargs) for workers in (1, 2)}
    raw_worker = mso.RolloutWorker(**kwargs)
    episodes = 2 * args.num_directions * args.train_tasks
    warm = mso.sample_dynamics(params, args.train_tasks, np.random.default_rng(12345))
    for pool in pools.values():  # untimed: each worker copies its envs once (a compile per copy)
        mso.ars_iteration(pool, theta, warm, np.zeros((args.train_tasks, args.latent_dim), np.float32),
                          mso.RunningMeanStd(obs_dim + args.latent_dim), args, np.random.default_rng(0))
    raw_worker._grow(episodes)
    rows = []
    for i in range(opts.rounds):
        rng = np.random.default_rng(i)
        dynamics = mso.sample_dynamics(params, args.train_tasks, rng)
        latents = rng.uniform(-1, 1, (args.train_tasks, args.latent_dim)).astype(np.float32)
        raw = raw_steps_per_s(raw_worker, np.tile(dynamics, (episodes // args.train_tasks, 1)), i)
        rows.append(("raw_env_steps_per_s", 1, i, raw))
        line = f"round {i}: raw env {raw:.0f} steps/s"
        for workers, pool in pools.items():
            normaliser = mso.RunningMeanStd(obs_dim + args.latent_dim)
            start = time.perf_counter()
            _, stats = mso.ars_iteration(pool, theta, dynamics, latents, normaliser, args, np.random.default_rng(i))
            seconds = time.perf_counter() - start
            rows += [("ars_steps_per_s", workers, i, stats["env_steps"] / seconds),
                     ("ars_iteration_s", workers, i, seconds)]
            line += (f", ARS {workers} worker(s) {stats['env_steps'] / seconds:.0f} steps/s "
                     f"({stats['env_steps'] / seconds / raw / workers:.0%} of raw per worker, {seconds:.2f} s per "
                     f"iteration of {stats['env_steps']} steps)")
        print(line)
    for pool in pools.values():
        pool.close()

    def median(measure, workers):
        return float(np.median([v for m, w, _, v in rows if m == measure and w == workers]))

    raw = median("raw_env_steps_per_s", 1)
    print(f"median: raw {raw:.0f} steps/s; " + "; ".join(
        f"{w} worker(s): {median('ars_steps_per_s', w):.0f} steps/s = {median('ars_steps_per_s', w) / raw / w:.0%} "
        f"of raw per worker, {median('ars_iteration_s', w):.2f} s per iteration" for w in (1, 2)))
    if opts.csv:
        with open(opts.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["env_id", "measure", "workers", "round", "value"])
            writer.writerows([opts.env_id, m, w, i, f"{v:.3f}"] for m, w, i, v in rows)


if __name__ == "__main__":
    main()
