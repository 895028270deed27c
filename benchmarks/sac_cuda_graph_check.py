"""SAC updates on CUDA: eager vs one CUDA graph per env step (mbrl_ensemble.SAC.updates), same seed, same batches.

Prints ms per update for both, and how far their losses and critic weights drift apart (0 = identical).
  python benchmarks/sac_cuda_graph_check.py      (needs a CUDA device)
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mbrl_ensemble as m
dev = torch.device("cuda")
buf = m.TransitionBuffer(10000, 11, 3, dev); buf.add(torch.randn(10000, 27, device=dev))
out = {}
for graph in [False, True]:
    torch.manual_seed(0)
    args = m.with_env_defaults(m.Args(env_id="Hopper-v5", cuda_graph=graph))
    agent = m.SAC(11, 3, -np.ones(3, np.float32), np.ones(3, np.float32), args, dev)
    torch.manual_seed(1)
    batches = [m.sample_batches(buf, buf, 20, 256, 0.05) for _ in range(60)]
    losses = [agent.updates(b, buf.split) for b in batches[:10]]
    torch.cuda.synchronize(); t = time.perf_counter()
    for b in batches[10:]: losses.append(agent.updates(b, buf.split))
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / (50 * 20) * 1e3
    L = torch.cat(losses)
    out[graph] = (L, [p.detach().clone() for p in agent.critic.parameters()])
    print(f"cuda_graph={graph}: {dt:.3f} ms per SAC update; finite {bool(torch.isfinite(L).all())}; "
          f"last losses {L[-20:].mean(0).tolist()}")
a, b = out[False], out[True]
print("mean |loss difference| over the run:", (a[0] - b[0]).abs().mean(0).tolist(), "loss scale", a[0].abs().mean(0).tolist())
print("critic weight relative difference:", max(((x - y).norm() / x.norm()).item() for x, y in zip(a[1], b[1])))
