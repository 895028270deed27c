"""Run one of ../shared/peers' mbrl-lib timing scripts unchanged in its work, on a chosen device and on newer Pythons.

  python benchmarks/peer_compat.py DEVICE PEER_SCRIPT [its arguments]

The peer scripts build mbrl-lib's objects with `"device": "cpu"`; this puts DEVICE there (and in the random
generator), so that mbrl-lib's planner runs on a GPU beside ours. Where mbrl-lib's own pins cannot be installed
(hydra 1.0 does not import on Python >= 3.11, gymnasium 0.26 needs numpy's removed `np.bool8`), it runs with
hydra >= 1.1, which instantiates nested configs itself unless told not to: mbrl-lib 0.2.0 instantiates them on its
own, as under hydra 1.0, so they get `_recursive_: False`. Nothing in the timed work changes.
"""

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
    import hydra

    if tuple(int(part) for part in hydra.__version__.split(".")[:2]) >= (1, 1):
        for target in ('"mbrl.models.GaussianMLP"', '"mbrl.planning.TrajectoryOptimizerAgent"'):
            source = source.replace(f'"_target_": {target},', f'"_target_": {target}, "_recursive_": False,')
    sys.argv = [script, *peer_args]
    exec(compile(source, script, "exec"), {"__name__": "__main__", "__file__": script})


if __name__ == "__main__":
    main()
