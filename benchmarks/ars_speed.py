"""ARS training speed of context_ars_bo.py against raw MuJoCo, with 1 and 2 rollout workers.

  python benchmarks/ars_speed.py --env-id Hopper-v5 --rounds 3 --csv results.csv

Raw: the same env copies (one per episode of an ARS iteration) stepped in one process with random actions,
no policy, each episode to its natural end; and the same copies split over 2 processes stepping at once
(all their steps over the time from the first start to the last end: what the cores give when both are
busy, the yardstick for 2 workers). ARS: whole ARS iterations at the official size (32 directions x +- x 8
tasks = 512 episodes, each with its own perturbed weights and dynamics), env steps taken / wall-clock, with
`--num-workers` 1 and 2. Every episode is capped
at --max-episode-steps; the policy is the script's initial one (its episodes are as short as the raw ones,
so both sides time similar episode lengths). Random actions and the policy's actions put the robot in
different contact regimes, which changes the cost of a MuJoCo step; so the one-worker run also times its own
env.step calls: the share of its wall-clock spent inside them is its speed relative to raw MuJoCo on exactly
the steps it took. The goal (issue 8): ARS at >= 80 % of raw per worker.
"""

import argparse
import csv
import multiprocessing
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import context_ars_bo as mso  # noqa: E402


def raw_steps(worker: mso.RolloutWorker, dynamics: np.ndarray, seed: int) -> int:
    """Step the worker's env copies with random actions: reset each with its dynamics, step until every
    episode ended (the same loop shape as the rollouts, without the policy). Returns the steps taken."""
    rng = np.random.default_rng(seed)
    steps = 0
    for j in range(len(dynamics)):
        worker.variations[j].set(dynamics[j])
        worker.envs[j].reset(seed=seed + j)
    live = list(range(len(dynamics)))
    for _ in range(worker.max_episode_steps):
        actions = rng.uniform(worker.low, worker.high, (len(live), len(worker.low)))
        live = [j for j, action in zip(live, actions) if not worker.envs[j].step(action)[2]]
        steps += len(actions)
        if not live:
            break
    return steps


def raw_steps_per_s(worker: mso.RolloutWorker, dynamics: np.ndarray, seed: int) -> float:
    worker._grow(len(dynamics))  # env copies are built before the clock starts
    start = time.perf_counter()
    return raw_steps(worker, dynamics, seed) / (time.perf_counter() - start)


def _raw_in_process(worker_kwargs: dict, dynamics: np.ndarray, seed: int, barrier, results) -> None:
    try:
        torch.set_num_threads(1)
        worker = mso.RolloutWorker(**worker_kwargs)
        worker._grow(len(dynamics))
        barrier.wait()
        start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the processes of one machine
        steps = raw_steps(worker, dynamics, seed)
        results.put((steps, start, time.perf_counter()))
    except Exception as err:  # noqa: BLE001 - the parent reports it instead of waiting forever
        barrier.abort()
        results.put(f"{type(err).__name__}: {err}")


def raw_steps_per_s_two_processes(worker_kwargs: dict, dynamics: np.ndarray, seed: int) -> float:
    """Env steps/s of 2 processes, each stepping half of the env copies, started together: all their steps
    over the time from the first start to the last end."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2, timeout=600), context.Queue()
    halves = np.array_split(dynamics, 2)
    processes = [context.Process(target=_raw_in_process,
                                 args=(worker_kwargs, half, seed + k * len(halves[0]), barrier, results))
                 for k, half in enumerate(halves)]  # the same reset seeds as the one-process measurement
    for process in processes:
        process.start()
    parts = [results.get(timeout=1200) for _ in processes]
    for process in processes:
        process.join()
    failed = [part for part in parts if isinstance(part, str)]
    if failed:
        raise RuntimeError(f"raw measurement process failed: {failed[0]}")
    return sum(p[0] for p in parts) / (max(p[2] for p in parts) - min(p[1] for p in parts))


def timed(step, clock: list[float]):
    """env.step that adds its wall-clock time to clock[0] (two clock reads, ~0.1 us, per ~250 us step)."""
    def step_and_time(action):
        start = time.perf_counter()
        result = step(action)
        clock[0] += time.perf_counter() - start
        return result
    return step_and_time


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
    # the one-worker pool runs here: time its env.step calls, the raw cost of exactly the steps ARS takes
    in_env_step = [0.0]
    for env in pools[1].local.envs:
        env.step = timed(env.step, in_env_step)
    rows = []
    for i in range(opts.rounds):
        rng = np.random.default_rng(i)
        dynamics = mso.sample_dynamics(params, args.train_tasks, rng)
        latents = rng.uniform(-1, 1, (args.train_tasks, args.latent_dim)).astype(np.float32)
        per_episode = np.tile(dynamics, (episodes // args.train_tasks, 1))
        raw = raw_steps_per_s(raw_worker, per_episode, i)
        raw2 = raw_steps_per_s_two_processes(kwargs, per_episode, i)
        rows += [("raw_env_steps_per_s", 1, i, raw), ("raw_env_steps_per_s", 2, i, raw2)]
        line = f"round {i}: raw env {raw:.0f} steps/s in 1 process, {raw2:.0f} in 2"
        for workers, pool in pools.items():
            normaliser = mso.RunningMeanStd(obs_dim + args.latent_dim)
            in_env_step[0] = 0.0
            start = time.perf_counter()
            _, stats = mso.ars_iteration(pool, theta, dynamics, latents, normaliser, args, np.random.default_rng(i))
            seconds = time.perf_counter() - start
            sps = stats["env_steps"] / seconds
            rows += [("ars_steps_per_s", workers, i, sps), ("ars_iteration_s", workers, i, seconds)]
            line += (f", ARS {workers} worker(s) {sps:.0f} steps/s ({sps / raw / workers:.0%} of 1-process raw per "
                     f"worker, {sps / (raw if workers == 1 else raw2):.0%} of {workers}-process raw, "
                     f"{seconds:.2f} s per iteration of {stats['env_steps']} steps)")
            if workers == 1:
                rows.append(("share_in_env_step", 1, i, in_env_step[0] / seconds))
                line += f" [1 worker: {in_env_step[0] / seconds:.0%} of its time inside env.step]"
        print(line)
    for pool in pools.values():
        pool.close()

    def median(measure, workers):
        return float(np.median([v for m, w, _, v in rows if m == measure and w == workers]))

    raw = {w: median("raw_env_steps_per_s", w) for w in (1, 2)}
    print(f"median: raw {raw[1]:.0f} steps/s in 1 process, {raw[2]:.0f} in 2; " + "; ".join(
        f"{w} worker(s): {median('ars_steps_per_s', w):.0f} steps/s = {median('ars_steps_per_s', w) / raw[1] / w:.0%} "
        f"of 1-process raw per worker, {median('ars_steps_per_s', w) / raw[w]:.0%} of {w}-process raw, "
        f"{median('ars_iteration_s', w):.2f} s per iteration" for w in (1, 2))
        + f"; 1 worker spends {median('share_in_env_step', 1):.0%} of its time inside env.step")
    if opts.csv:
        with open(opts.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["env_id", "measure", "workers", "round", "value"])
            writer.writerows([opts.env_id, m, w, i, f"{v:.3f}"] for m, w, i, v in rows)


if __name__ == "__main__":
    main()
