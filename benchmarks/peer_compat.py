"""Run one of ../shared/peers' mbrl-lib timing scripts unchanged in its work, on a chosen device and on newer Pythons.

  python benchmarks/peer_compat.py DEVICE PEER_SCRIPT [its arguments]

The peer scripts build mbrl-lib's objects with `"device": "cpu"`; this puts DEVICE there (and in the random
generator), so that mbrl-lib's planner runs on a GPU beside ours. Where mbrl-lib's own pins cannot be installed
(hydra 1.0 does not import on Python >= 3.11, gymnasium 0.26 needs numpy's removed `np.bool8`), the PETS timing
script runs with hydra >= 1.1, which instantiates nested configs itself unless told not to: mbrl-lib 0.2.0
instantiates them on its own, as under hydra 1.0, so its two inline configs get `_recursive_: False`. (The MBPO
timing script loads mbrl-lib's YAML configs, which this does not patch: run it under hydra 1.0, as in the venv of
../shared/peers/README.md.) Nothing in the timed work changes, except for one fix:

mbrl_lib_mbpo_timing.py sets mbrl-lib's `num_steps` to the N steps it times, and mbrl-lib sizes its replay buffer
by `num_steps` when `dataset_size` is not given: mbrl-lib's model then trains on the last N transitions only (250
or 750; seen by counting its model updates: 200 training rows), not on the 5000 + N a real run (num_steps 125000)
holds. Here `dataset_size` is set to 5000 + N, so that mbrl-lib's model trains on the same data as in a real run.
"""

import os
import sys

import numpy as np

if not hasattr(np, "bool8"):
    np.bool8 = np.bool_


def main():
    device, script, peer_args = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(script) as f:
        source = f.read()
    source = source.replace('"device": "cpu"', f'"device": "{device}"')
    source = source.replace('torch.Generator(device="cpu")', f'torch.Generator(device="{device}")')
    if os.path.basename(script) == "mbrl_lib_mbpo_timing.py":
        buffer_bug = "cfg.overrides.num_steps = a.steps"
        if buffer_bug not in source:
            sys.exit(f"{script} changed: '{buffer_bug}' not found; check how it sizes mbrl-lib's replay buffer")
        source = source.replace(buffer_bug, buffer_bug + "; cfg.algorithm.dataset_size = explore + a.steps")
    import hydra

    if tuple(int(part) for part in hydra.__version__.split(".")[:2]) >= (1, 1):
        for target in ('"mbrl.models.GaussianMLP"', '"mbrl.planning.TrajectoryOptimizerAgent"'):
            source = source.replace(f'"_target_": {target},', f'"_target_": {target}, "_recursive_": False,')
    sys.argv = [script, *peer_args]
    exec(compile(source, script, "exec"), {"__name__": "__main__", "__file__": script})


if __name__ == "__main__":
    main()
