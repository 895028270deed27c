"""The scripts live at the repository root; tests import them as modules and run in a scratch directory."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside a temporary directory, so runs/ of a test never touches the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def heteroscedastic_data(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Transitions of a known system for ensemble tests: s' - s = sin(3 s) a + noise, r = cos(2 s) + a^2,
    with noise std 0.3 where s > 0 and 0.01 where s < 0."""
    obs = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    noise_std = np.where(obs > 0, 0.3, 0.01)
    delta = np.sin(3 * obs) * act + noise_std * rng.standard_normal((n, 1))
    rew = np.cos(2 * obs[:, 0]) + act[:, 0] ** 2
    return {"obs": obs, "act": act, "next_obs": (obs + delta).astype(np.float32), "rew": rew.astype(np.float32)}


def run_events(run_dir: str, script: str) -> EventAccumulator:
    """Assert that a run folder holds what the conventions promise (TensorBoard events, args.json, the
    script's checkpoint) and return its loaded events."""
    files = os.listdir(run_dir)
    assert any(f.startswith("events.out.tfevents") for f in files) and "args.json" in files
    assert f"{script}.pt" in files, files
    events = EventAccumulator(run_dir)
    events.Reload()
    return events


def assert_command_line_error(script: str, flags: list[str], message: str) -> None:
    """`python <script> <flags>` exits with a non-zero status and one line on stderr, `error: <message>...`,
    before anything is written to runs/ (run it inside `in_tmp`)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr
    assert not os.path.exists("runs")


def assert_refused_before_writing(script, args, message: str) -> None:
    """script.main(args) stops with one ConfigError matching `message` before it writes anything (in `in_tmp`)."""
    with pytest.raises(script.ConfigError, match=message):
        script.main(args)
    assert not os.path.exists("runs")


def assert_foreign_checkpoints_are_refused(script, tiny, short_run: dict, elsewhere: dict, elsewhere_message: str,
                                           lacks: str) -> None:
    """`--resume` refuses, with one ConfigError each and before anything is written, a file that is not a
    checkpoint, a checkpoint of another script, and one of another version of this script (`lacks`: the start
    of the list of what it misses); then a real checkpoint of a short run (`short_run`: its flags for `tiny`)
    resumed with other `elsewhere` flags (another env or task) is refused with `elsewhere_message` and left as
    it was. Run it inside `in_tmp`."""
    name = script.SCRIPT
    other = "maml_rl" if name != "maml_rl" else "rl2_recurrent"
    with open("garbage.pt", "w") as f:
        f.write("not a checkpoint")
    torch.save({"script": other, "args": {}}, "other.pt")
    torch.save({"script": name, "args": {}}, "old.pt")
    for path, message in [("garbage.pt", "garbage.pt is not a readable checkpoint"),
                          ("other.pt", f"written by {other}, not {name}.py"), ("old.pt", f"old.pt lacks {lacks}")]:
        assert_refused_before_writing(script, tiny(resume=path), message)
    checkpoint = os.path.join(script.main(tiny(**short_run))["run_dir"], f"{name}.pt")
    before = os.path.getmtime(checkpoint)
    with pytest.raises(script.ConfigError, match=elsewhere_message):
        script.main(tiny(**elsewhere, resume=checkpoint))
    assert os.path.getmtime(checkpoint) == before
