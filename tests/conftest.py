"""The scripts live at the repository root; tests import them as modules and run in a scratch directory."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside a temporary directory, so runs/ of a test never touches the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
