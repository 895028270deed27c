"""Planner speed of mbrl_mpc.py side by side with mbrl-lib's PETS planner, in one run on one machine.

For each configuration it measures, in alternating rounds (ours, floor, peer, ours, ...) so that a noisy
machine affects all of them alike:
  - ours:  ms per action of mbrl_mpc.MPCController.act (CEM + TS-inf through a 5-member 4x200 SiLU ensemble);
  - floor: a bare batched forward of the same ensemble over the same candidates (baddbmm + SiLU per layer,
           horizon x iterations times), i.e. the matmuls a planner cannot avoid;
  - matmul: GFLOP/s of one plain torch.matmul of similar size, the machine's fp32 rate;
  - peer:  mbrl-lib's planner via ../shared/peers/mbrl_lib_pets_timing.py in its own venv (--peer-python), on the
           same device (benchmarks/peer_compat.py moves it there).
The planner's GFLOP/s counts the ensemble's matmul FLOPs per action (2 x rows x sum(in x out) x H x iters).

  python benchmarks/planner_speed.py --peer-python ~/venv-mbrl/bin/python --rounds 3
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

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mbrl_mpc as mpc  # noqa: E402

HALF_CHEETAH = dict(obs_dim=17, act_dim=6)
CONFIGS = {  # name: planner settings (population, elites, particles, horizon, CEM iterations)
    "PETS paper": dict(population_size=500, num_elites=50, num_particles=20, horizon=30, cem_iterations=5),
    "CPU config": dict(population_size=100, num_elites=10, num_particles=5, horizon=15, cem_iterations=3),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def time_ours(cfg: dict, actions: int, device: torch.device, cuda_graph: bool) -> float:
    torch.manual_seed(0)
    args = mpc.Args(**cfg, cuda_graph=cuda_graph)
    model = mpc.DynamicsEnsemble(HALF_CHEETAH["obs_dim"], HALF_CHEETAH["act_dim"], args.ensemble_size,
                                 args.hidden_size, args.num_hidden_layers, args.probabilistic).to(device).eval()
    bound = torch.ones(HALF_CHEETAH["act_dim"], device=device)
    controller = mpc.MPCController(model, args, -bound, bound, None)
    obs = np.random.default_rng(0).standard_normal(HALF_CHEETAH["obs_dim"]).astype(np.float32)
    controller.act(obs)  # warm-up (and the recording of the CUDA graph)
    sync(device)
    start = time.perf_counter()
    for _ in range(actions):
        controller.act(obs)
    sync(device)
    return (time.perf_counter() - start) / actions * 1e3


def time_floor(cfg: dict, actions: int, device: torch.device) -> float:
    args = mpc.Args(**cfg)
    model = mpc.DynamicsEnsemble(HALF_CHEETAH["obs_dim"], HALF_CHEETAH["act_dim"], args.ensemble_size,
                                 args.hidden_size, args.num_hidden_layers, args.probabilistic).to(device)
    rows = args.population_size * args.num_particles // args.ensemble_size
    x = torch.randn(args.ensemble_size, rows, HALF_CHEETAH["obs_dim"] + HALF_CHEETAH["act_dim"], device=device)
    layers = list(zip(model.weights, model.biases))

    def forward():
        h = x
        for i, (w, b) in enumerate(layers):
            h = torch.baddbmm(b, h, w)
            if i < len(layers) - 1:
                h = F.silu(h, inplace=True)

    with torch.no_grad():
        forward()
        sync(device)
        start = time.perf_counter()
        for _ in range(actions * args.horizon * args.cem_iterations):
            forward()
        sync(device)
    return (time.perf_counter() - start) / actions * 1e3


def flops_per_action(cfg: dict) -> float:
    args = mpc.Args(**cfg)
    sizes = ([HALF_CHEETAH["obs_dim"] + HALF_CHEETAH["act_dim"]] + [args.hidden_size] * args.num_hidden_layers
             + [2 * (HALF_CHEETAH["obs_dim"] + 1)])
    macs_per_row = sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    return 2.0 * macs_per_row * args.population_size * args.num_particles * args.horizon * args.cem_iterations


def matmul_gflops(device: torch.device, rows: int = 10_000, width: int = 200, repeats: int = 50) -> float:
    a, b = torch.randn(rows, width, device=device), torch.randn(width, width, device=device)
    torch.matmul(a, b)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    sync(device)
    return 2.0 * rows * width * width * repeats / (time.perf_counter() - start) / 1e9


def time_peer(python: str, script: str, cfg: dict, actions: int, device: torch.device) -> float:
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [python, os.path.join(here, "peer_compat.py"), str(device), os.path.abspath(script),
           "--pop", str(cfg["population_size"]), "--particles", str(cfg["num_particles"]), "--horizon",
           str(cfg["horizon"]), "--iters", str(cfg["cem_iterations"]), "--actions", str(actions)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd="/tmp").stdout
    return float(re.search(r"([\d.]+) ms/action", out).group(1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=None, help="python of the venv with mbrl-lib (skipped if absent)")
    parser.add_argument("--peer-script", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                                 "shared", "peers", "mbrl_lib_pets_timing.py"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--actions", type=int, default=3, help="actions timed per round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, ours replays each planning step as a CUDA graph (mbrl_mpc.py's default)")
    parser.add_argument("--csv", default=None, help="append the medians to this CSV file")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"# {hardware}; torch {torch.__version__}; {opts.rounds} rounds x {opts.actions} actions")
    print("| config | ours ms/action | floor ms/action | mbrl-lib ms/action | speed-up vs mbrl-lib | "
          "ours GFLOP/s | matmul GFLOP/s | ours / matmul |")
    print("|---|---|---|---|---|---|---|---|")
    eager_on_gpu = device.type == "cuda" and not opts.cuda_graph
    for name in opts.configs:
        cfg = CONFIGS[name]
        ours, floor, peer, matmul = [], [], [], []
        for _ in range(opts.rounds):
            ours.append(time_ours(cfg, opts.actions, device, opts.cuda_graph))
            floor.append(time_floor(cfg, opts.actions, device))
            matmul.append(matmul_gflops(device))
            if opts.peer_python:
                peer.append(time_peer(opts.peer_python, opts.peer_script, cfg, opts.actions, device))
        ours_ms, floor_ms, matmul_rate = statistics.median(ours), statistics.median(floor), statistics.median(matmul)
        peer_ms = statistics.median(peer) if peer else float("nan")
        gflops = flops_per_action(cfg) / ours_ms / 1e6
        if eager_on_gpu:
            name = f"{name} (no CUDA graph)"
        print(f"| {name} | {ours_ms:.0f} | {floor_ms:.0f} | {peer_ms:.0f} | {peer_ms / ours_ms:.2f}x | {gflops:.0f} | "
              f"{matmul_rate:.0f} | {gflops / matmul_rate:.0%} |", flush=True)
        if opts.csv:
            new = not os.path.exists(opts.csv)
            with open(opts.csv, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["config", "ours_ms", "floor_ms", "peer_ms", "ours_gflops", "matmul_gflops",
                                     "hardware", "date", "rounds_ours", "rounds_peer"])
                writer.writerow([name, f"{ours_ms:.1f}", f"{floor_ms:.1f}", f"{peer_ms:.1f}", f"{gflops:.1f}",
                                 f"{matmul_rate:.1f}", hardware, time.strftime("%Y-%m-%d"),
                                 " ".join(f"{v:.0f}" for v in ours), " ".join(f"{v:.0f}" for v in peer)])


if __name__ == "__main__":
    main()
