"""Dreamer speed: gradient updates/s and env frames/s of dreamer_latent.py at its default configuration.

Measures, for each variant (eager fp32, --amp, --compile, --compile --amp, the CUDA graph of the update with and
without --amp or --compile; a variant without "graph" runs with --no-cuda-graph):
  - update: seconds per gradient update (world model + actor + critic) on a replayed batch of 16 x 64 steps,
            batches sampled from a filled replay buffer as in the training loop (sampling included);
  - acting: env frames/s of the vector env stepped by the batched policy (encoder + RSSM filter + actor);
  - raw env: env frames/s of the same vector env stepped with random actions and no policy (rendering included);
  - frames/s at the train ratio: what the training loop reaches after the prefill, from the two times above:
        per vector step, num_envs x action_repeat frames and num_envs x train_ratio / (16 x 64) updates.
The loop's own figure is `charts/SPS` in a training run's TensorBoard log.

  python benchmarks/dreamer_speed.py --env-id dmc:walker-walk --device cuda --variants eager amp compile graph graph+amp
"""

import argparse
import csv
import os
import re
import sys
import time
from dataclasses import replace

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_latent as dl  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        cpu = "unknown CPU"
    return f"{cpu}, {torch.get_num_threads()} threads"


def make_agent(args: dl.Args, act_dim: int, device: torch.device):
    """Agent and its update function, as dreamer_latent.main makes them."""
    agent = dl.Dreamer(args, act_dim, False).to(device)
    if args.compile:
        dl.compile_rssm_steps(agent.wm.rssm)
    optimizers = dl.make_optimizers(agent, args, capturable=args.cuda_graph and device.type == "cuda")
    return agent, dl.make_update(agent, optimizers, args, device)


def time_updates(args: dl.Args, act_dim: int, image_shape: tuple, updates: int, device: torch.device) -> float:
    torch.manual_seed(0)
    _, update = make_agent(args, act_dim, device)
    replay = dl.Replay(1000, args.num_envs, image_shape, act_dim)
    for _ in range(1000):  # random images: the cost of an update does not depend on their content
        replay.add({"image": torch.randint(0, 256, (args.num_envs, *image_shape), dtype=torch.uint8),
                    "prev_action": torch.rand(args.num_envs, act_dim) * 2 - 1, "reward": torch.rand(args.num_envs),
                    "is_first": torch.rand(args.num_envs) < 0.002,
                    "is_terminal": torch.zeros(args.num_envs, dtype=torch.bool)})
    for _ in range(3):  # warm-up (compilation, graph capture)
        update(replay.sample(args.batch_size, args.batch_length, device))
    sync(device)
    start = time.perf_counter()
    for _ in range(updates):
        update(replay.sample(args.batch_size, args.batch_length, device))
    sync(device)
    return (time.perf_counter() - start) / updates


def make_envs(args: dl.Args) -> gym.vector.SyncVectorEnv:
    return gym.vector.SyncVectorEnv([lambda i=i: dl.make_env(args.env_id, args.image_size, args.action_repeat, i)
                                     for i in range(args.num_envs)])


def time_acting(args: dl.Args, act_dim: int, steps: int, device: torch.device, policy: bool) -> float:
    """Env frames/s of the vector env, stepped by the batched policy or (policy=False) by random actions."""
    envs = make_envs(args)
    images, _ = envs.reset(seed=0)
    act = None
    if policy:
        agent, _ = make_agent(args, act_dim, device)
        act = dl.Policy(agent, args.num_envs, device)
    prev_action, is_first = torch.zeros(args.num_envs, act_dim), np.ones(args.num_envs, bool)

    def step(images, prev_action):
        action = act(images, prev_action, is_first, mode=False) if act else torch.rand(args.num_envs, act_dim) * 2 - 1
        images, *_ = envs.step(dl.env_action(action, False))
        return images, action

    for _ in range(5):  # warm-up (and compilation)
        images, prev_action = step(images, prev_action)
        is_first[:] = False
    start = time.perf_counter()
    for _ in range(steps):
        images, prev_action = step(images, prev_action)
    seconds = time.perf_counter() - start
    envs.close()
    return steps * args.num_envs * args.action_repeat / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="dmc:walker-walk")
    parser.add_argument("--model-size", default="S")
    parser.add_argument("--train-ratio", type=float, default=512)
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--updates", type=int, default=20, help="timed updates per variant")
    parser.add_argument("--act-steps", type=int, default=200, help="timed vector-env steps")
    parser.add_argument("--variants", nargs="*", default=["eager"],
                        choices=["eager", "amp", "compile", "compile+amp", "graph", "graph+amp", "compile+graph",
                                 "compile+graph+amp"])
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, TensorFloat-32 matmuls (dreamer_latent.py's default)")
    parser.add_argument("--csv", default=None, help="append the results to this CSV file")
    parser.add_argument("--label", default="", help="first column of the CSV rows (e.g. which call measured them)")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if opts.tf32 else "highest")
    hardware = hardware_name(device)
    base = dl.with_model_size(dl.Args(env_id=opts.env_id, model_size=opts.model_size, train_ratio=opts.train_ratio,
                                      num_envs=opts.num_envs))
    probe = dl.make_env(base.env_id, base.image_size, base.action_repeat, 0)
    act_dim, image_shape = int(np.prod(probe.action_space.shape)), probe.observation_space.shape
    probe.close()
    raw = time_acting(base, act_dim, opts.act_steps, device, policy=False)
    updates_per_vector_step = base.num_envs * base.train_ratio / (base.batch_size * base.batch_length)
    frames_per_vector_step = base.num_envs * base.action_repeat
    print(f"# {hardware}; torch {torch.__version__}; tf32 {opts.tf32 and device.type == 'cuda'}; {opts.env_id}, "
          f"model {opts.model_size}, {base.num_envs} envs, "
          f"batch {base.batch_size}x{base.batch_length}, train ratio {base.train_ratio:g}; raw env {raw:.0f} frames/s")
    print("| variant | s/update | updates/s | acting frames/s | frames/s at the train ratio |")
    print("|---|---|---|---|---|")
    for variant in opts.variants:
        args = replace(base, amp="amp" in variant, compile="compile" in variant, cuda_graph="graph" in variant)
        try:
            update_s = time_updates(args, act_dim, image_shape, opts.updates, device)
            acting = time_acting(args, act_dim, opts.act_steps, device, policy=True)
        except Exception as err:  # e.g. a compiler failure: report it and go on with the next variant
            print(f"| {variant} | failed: {type(err).__name__}: {str(err).splitlines()[0][:150]} | | | |", flush=True)
            continue
        loop = frames_per_vector_step / (frames_per_vector_step / acting + updates_per_vector_step * update_s)
        print(f"| {variant} | {update_s:.4f} | {1 / update_s:.1f} | {acting:.0f} | {loop:.1f} |", flush=True)
        if opts.csv:
            new = not os.path.exists(opts.csv)
            with open(opts.csv, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["label", "env_id", "model_size", "variant", "tf32", "s_per_update",
                                     "acting_fps", "raw_env_fps", "loop_fps", "train_ratio", "num_envs", "hardware",
                                     "torch", "date"])
                writer.writerow([opts.label, opts.env_id, opts.model_size, variant,
                                 opts.tf32 and device.type == "cuda", f"{update_s:.4f}", f"{acting:.0f}",
                                 f"{raw:.0f}", f"{loop:.2f}", f"{base.train_ratio:g}", base.num_envs, hardware,
                                 torch.__version__, time.strftime("%Y-%m-%d")])


if __name__ == "__main__":
    main()
