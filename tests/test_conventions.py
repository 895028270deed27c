"""Conventions shared by several scripts (each script has its own copy of the code, so each is checked)."""
import importlib

import pytest
import torch

from conftest import assert_command_line_error


@pytest.mark.parametrize("script", ["mbrl_mpc", "mbrl_ensemble", "dreamer_latent"])
def test_pick_device_gives_cuda_devices_an_index_and_refuses_a_missing_one(script, monkeypatch):
    """torch.cuda.set_device (these scripts call it for their CUDA graphs) refuses a device without an index, so
    --device auto / cuda must resolve to cuda:N; faked here with one CUDA device, as CI has none."""
    module = importlib.import_module(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert module.pick_device("auto") == torch.device("cuda", 0)
    assert module.pick_device("cuda") == torch.device("cuda", 0)
    assert module.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(module.ConfigError, match="1 CUDA device"):
        module.pick_device("cuda:1")


@pytest.mark.parametrize("script", ["rl2_recurrent", "maml_rl"])
def test_env_copies_do_not_repeat_mujocos_compiler_warnings(script, capfd):
    """The task families build one MuJoCo env per slot; its compiler warning is shown once, not once a slot."""
    module = importlib.import_module(script)
    module.HalfCheetahVel(4, 10)
    assert capfd.readouterr().err.count("settotalmass") == 1  # the first env's, not one per slot
    module.HalfCheetahVel(1, 10)  # MuJoCo's own warning handler is back afterwards
    assert capfd.readouterr().err.count("settotalmass") == 1


@pytest.mark.parametrize("script, flags, message", [
    ("mbrl_mpc.py", ["--env-id", "CartPole-v1"], "CartPole-v1 has Discrete actions"),
    ("mbrl_ensemble.py", ["--real-ratio", "2"], "--real-ratio must be in [0, 1]"),
    ("dreamer_latent.py", ["--image-size", "48"], "--image-size must be a power of two"),
    ("rl2_recurrent.py", ["--task", "CartPole-v1"], "unknown --task CartPole-v1"),
    ("maml_rl.py", ["--task", "CartPole-v1"], "--task CartPole-v1 has discrete actions"),
    ("context_ars_bo.py", ["--env-id", "CartPole-v1"], "--env-id CartPole-v1 has Discrete actions"),
])
def test_command_line_error_is_one_line_and_nonzero_exit(in_tmp, script, flags, message):
    assert_command_line_error(script, flags, message)
