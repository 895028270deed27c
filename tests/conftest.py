"""The scripts live at the repository root; tests import them as modules and run in a scratch directory."""
import os
import subprocess
import sys

import numpy as np
import pytest
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
