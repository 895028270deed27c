"""Dreamer on CUDA: candidate speed-ups of the graphed update, and where an update's GPU time goes.

Not part of dreamer_latent.py (fused and cl were measured and did not pay off enough to keep; tri awaits a GPU;
docs/dreamer_latent.md has the figures):
  - fused:  the three Adams with fused=True (one kernel per step instead of foreach's several);
  - cl:     the encoder's and decoder's convolutions in channels-last memory layout;
  - tri:    the straight-through sampler's cumulative sum as a product with an upper-triangular matrix of ones
            (a tiny matmul instead of a scan kernel; the same uniform number per categorical, so the same
            samples up to rounding at the bin edges). Not yet measured on a GPU.
Each variant is timed like benchmarks/dreamer_speed.py (size S, batch 16 x 64, CUDA graph, TF32), in one process,
`base` first and last to show the drift. Then one eager update is profiled: the number of GPU kernels and the GPU
time spent in them, by kernel name (the graph replays the same kernels without the launch gaps).

  python benchmarks/dreamer_gpu_experiments.py --variants base fused cl fused+cl tri base --updates 30
"""

import argparse
import os
import sys
from collections import defaultdict
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamer_latent as dl  # noqa: E402
import dreamer_speed as ds  # noqa: E402

ORIGINAL_OPTIMIZERS, ORIGINAL_MAKE_UPDATE, ORIGINAL_SAMPLE = dl.make_optimizers, dl.make_update, dl.straight_through_sample
UPPER_ONES = {}


def triangular_sample(probs: torch.Tensor) -> torch.Tensor:
    """dl.straight_through_sample with probs.cumsum(-1) computed as probs @ triu(ones)."""
    classes = probs.shape[-1]
    key = (probs.device, probs.dtype, classes)
    if key not in UPPER_ONES:  # made before a graph capture (during the eager warm-up updates)
        UPPER_ONES[key] = torch.ones(classes, classes, device=probs.device, dtype=probs.dtype).triu()
    cdf = probs.detach() @ UPPER_ONES[key]
    index = (cdf < torch.rand_like(probs[..., :1])).sum(-1).clamp(max=classes - 1)
    one_hot = torch.zeros_like(probs).scatter_(-1, index[..., None], 1.0)
    return one_hot + probs - probs.detach()


def fused_optimizers(agent, args, capturable=False):
    return {name: torch.optim.Adam(opt.param_groups[0]["params"], **{**opt.defaults, "fused": True})
            for name, opt in ORIGINAL_OPTIMIZERS(agent, args, capturable).items()}


def channels_last_update(agent, optimizers, args, device):
    agent.wm.encoder.to(memory_format=torch.channels_last)  # before the first update, so the graph records it
    agent.wm.decoder.to(memory_format=torch.channels_last)
    return ORIGINAL_MAKE_UPDATE(agent, optimizers, args, device)


def kernel_profile(args: dl.Args, shape: tuple, device: torch.device, top: int) -> None:
    torch.manual_seed(0)
    _, update = ds.make_agent(args, 1, device)
    replay = dl.Replay(200, args.num_envs, shape, 1)
    for _ in range(200):
        replay.add({"image": torch.randint(0, 256, (args.num_envs, *shape), dtype=torch.uint8),
                    "prev_action": torch.rand(args.num_envs, 1) * 2 - 1, "reward": torch.rand(args.num_envs),
                    "is_first": torch.rand(args.num_envs) < 0.002,
                    "is_terminal": torch.zeros(args.num_envs, dtype=torch.bool)})
    for _ in range(2):
        update(replay.sample(args.batch_size, args.batch_length, device))
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        update(replay.sample(args.batch_size, args.batch_length, device))
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"one eager update: {len(kernels)} GPU kernels/copies, "
          f"{sum(e.device_time for e in kernels) / 1e3:.1f} ms of GPU time in them")
    by_name = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name[:90]][0] += 1
        by_name[e.name[:90]][1] += e.device_time
    for name, (count, time_us) in sorted(by_name.items(), key=lambda item: -item[1][1])[:top]:
        print(f"{time_us / 1e3:7.2f} ms {count:6d}x  {name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", default="S")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--variants", nargs="*", default=["base", "fused", "cl", "fused+cl", "base"])
    parser.add_argument("--top", type=int, default=30, help="kernel names listed in the profile")
    parser.add_argument("--device", default="cuda", help="cpu only checks that the variants run (no profile)")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    torch.set_float32_matmul_precision("high")
    base = dl.with_model_size(dl.Args(env_id="InvertedPendulum-v5", model_size=opts.model_size))
    shape = (3, base.image_size, base.image_size)
    for variant in opts.variants:
        dl.make_optimizers = fused_optimizers if "fused" in variant else ORIGINAL_OPTIMIZERS
        dl.make_update = channels_last_update if "cl" in variant else ORIGINAL_MAKE_UPDATE
        dl.straight_through_sample = triangular_sample if "tri" in variant else ORIGINAL_SAMPLE
        seconds = ds.time_updates(base, 1, shape, opts.updates, device)
        print(f"{variant}: {seconds:.4f} s/update, {8 / (2 * seconds):.1f} frames/s at train ratio 512", flush=True)
    dl.make_optimizers, dl.make_update, dl.straight_through_sample = (ORIGINAL_OPTIMIZERS, ORIGINAL_MAKE_UPDATE,
                                                                      ORIGINAL_SAMPLE)
    if device.type == "cuda":
        kernel_profile(replace(base, cuda_graph=False), shape, device, opts.top)


if __name__ == "__main__":
    main()
