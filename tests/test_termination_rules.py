"""The termination rules that model rollouts and planners apply to predicted observations must agree with
the gymnasium v5 environments' own `terminated`, for every script that carries a copy of them."""
import numpy as np
import pytest
import torch

import mbrl_ensemble
import mbrl_mpc

SCRIPTS = [mbrl_mpc, mbrl_ensemble]
ENVS = ["Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5", "InvertedPendulum-v5", "InvertedDoublePendulum-v5"]


def policies(env, rng):
    """Random actions, and scripted ones that drive the body to the limits: full +1, full -1, a slow swing."""
    low, high = env.action_space.low, env.action_space.high
    yield "random", lambda t: rng.uniform(low, high)
    yield "max", lambda t: high
    yield "min", lambda t: low
    yield "swing", lambda t: low + (high - low) * (0.5 + 0.5 * np.sin(t / 5))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("env_id", ENVS)
def test_termination_rules_match_the_environment(script, env_id):
    env = script.make_env(env_id)  # each script's own observation layout (mbrl_ensemble truncates Ant/Humanoid)
    rule = script.TERMINATION_RULES[env_id]
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    disagree, terminations, steps = [], 0, 0
    for name, policy in policies(env, rng):
        episodes = 0
        while episodes < 15:
            env.reset()
            if env_id == "Ant-v5":  # actions rarely tip the ant over: start from random heights as well
                unwrapped = env.unwrapped
                qpos, qvel = unwrapped.data.qpos.copy(), unwrapped.data.qvel.copy()
                qpos[2] = rng.uniform(0.0, 1.3)
                unwrapped.set_state(qpos, qvel)
            for t in range(100):
                next_obs, _, terminated, truncated, _ = env.step(policy(t))
                if bool(rule(torch.as_tensor(next_obs, dtype=torch.float32))) != terminated:
                    disagree.append((name, t, terminated))
                terminations += terminated
                steps += 1
                if terminated or truncated:
                    break
            episodes += 1
    env.close()
    assert not disagree, f"{len(disagree)} of {steps} steps disagree, e.g. {disagree[:3]}"
    assert terminations >= 10  # the test saw both outcomes


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_half_cheetah_never_terminates(script):
    assert script.TERMINATION_RULES["HalfCheetah-v5"] is None
