"""Tests of mbrl_mpc.py: planners on a problem with a known optimum, the ensemble on known functions,
termination rules against the environments, smoke/resume/determinism, bad input, and learning."""
import importlib.util
import os

import numpy as np
import pytest
import torch


import mbrl_mpc as mpc
from conftest import (assert_foreign_checkpoints_are_refused, assert_refused_before_writing,
                      heteroscedastic_data, run_events)

# ----------------------------------------------------------------------------------------------------
# Planners on a linear system with quadratic cost: x' = A x + B u, r = -(|x'|^2 + 0.1 u^2)
# The return is a concave quadratic of the action sequence U, so U* = argmax is a linear solve.
# ----------------------------------------------------------------------------------------------------
A = torch.tensor([[1.0, 0.2], [0.0, 1.0]])
B = torch.tensor([[0.0], [0.5]])
X0 = torch.tensor([0.6, -0.3])
H = 3


def lq_returns(actions: torch.Tensor) -> torch.Tensor:  # actions [N, H, 1] -> returns [N]
    x = X0.expand(actions.shape[0], 2)
    total = torch.zeros(actions.shape[0])
    for t in range(actions.shape[1]):
        x = x @ A.T + actions[:, t] @ B.T
        total -= x.pow(2).sum(-1) + 0.1 * actions[:, t, 0].pow(2)
    return total


def lq_optimum() -> torch.Tensor:
    # x_t = A^t x0 + sum_k A^(t-1-k) B u_k  ->  stacked states = G U + h;  J = -(|G U + h|^2 + 0.1 |U|^2)
    G = torch.zeros(2 * H, H)
    h = torch.zeros(2 * H)
    for t in range(1, H + 1):
        h[2 * (t - 1):2 * t] = torch.linalg.matrix_power(A, t) @ X0
        for k in range(t):
            G[2 * (t - 1):2 * t, k] = (torch.linalg.matrix_power(A, t - 1 - k) @ B)[:, 0]
    return torch.linalg.solve(G.T @ G + 0.1 * torch.eye(H), -G.T @ h)


def test_planners_recover_the_lq_optimum_and_cem_beats_random_shooting():
    u_star = lq_optimum()
    assert u_star.abs().max() < 0.8  # the optimum is inside the bounds, so bounded planners can reach it
    best = lq_returns(u_star.view(1, H, 1)).item()
    low, high = -torch.ones(1), torch.ones(1)
    torch.manual_seed(0)
    cem = mpc.cem_plan(lq_returns, torch.zeros(H, 1), low, high, population_size=100, num_elites=10,
                       iterations=5, alpha=0.1)
    rs = mpc.random_shooting_plan(lq_returns, H, low, high, population_size=500)  # same 500 evaluations
    assert torch.allclose(cem[:, 0], u_star, atol=0.05), (cem[:, 0], u_star)
    assert abs(rs[0, 0] - u_star[0]) < 0.3, (rs[:, 0], u_star)
    regret_cem = best - lq_returns(cem[None]).item()
    regret_rs = best - lq_returns(rs[None]).item()
    regret_random = best - lq_returns(torch.rand(1000, H, 1) * 2 - 1).mean().item()
    assert regret_cem < regret_rs < 0.1 * regret_random, (regret_cem, regret_rs, regret_random)


def test_cem_samples_stay_within_action_bounds():
    low, high = torch.tensor([-0.5, 0.0]), torch.tensor([0.5, 2.0])
    seen = []

    def record(samples):
        seen.append(samples)
        return -samples.sum(dim=(1, 2))

    mpc.cem_plan(record, torch.tensor([[0.4, 1.9]]).repeat(4, 1), low, high, 64, 8, 3, 0.1)
    samples = torch.cat(seen)
    assert (samples >= low).all() and (samples <= high).all()


def constant_model(delta: list[float], reward: float) -> mpc.DynamicsEnsemble:
    """A deterministic 2-member ensemble that predicts s' = s + delta, r = reward whatever (s, a)."""
    model = mpc.DynamicsEnsemble(len(delta), 1, 2, 8, 1, probabilistic=False)
    with torch.no_grad():
        for p in list(model.weights) + list(model.biases):
            p.zero_()
        model.target_mean.copy_(torch.tensor(delta + [reward]))
    return model


def test_trajectory_sampling_stops_reward_at_termination():
    # the pole angle grows by 0.1 per step: alive at 0.1 and 0.2, terminated at 0.3 (|angle| > 0.2),
    # so the return counts the terminating step's reward and nothing after it
    model = constant_model([0.0, 0.1, 0.0, 0.0], reward=1.0)
    actions = torch.zeros(7, 10, 1)
    returns = mpc.trajectory_sampling_returns(model, torch.zeros(4), actions, 4, mpc.inverted_pendulum_terminated)
    assert torch.allclose(returns, torch.full((7,), 3.0))
    no_termination = mpc.trajectory_sampling_returns(model, torch.zeros(4), actions, 4, None)
    assert torch.allclose(no_termination, torch.full((7,), 10.0))


class MemberwiseToy:
    """Member e moves the state by c_e per step; r = s'^2 + sum(a). A particle that kept its member for the
    whole horizon earns c_e^2 (1 + 4 + ... + H^2) + sum_t a_t; switching members or mixing candidates would not."""

    probabilistic = True

    def __init__(self, c: torch.Tensor):
        self.c, self.ensemble_size = c, len(c)

    def raw_unit_layers(self):
        return None

    def predict(self, obs, act, sample, layers=None):
        next_obs = obs + self.c[:, None, None]
        return next_obs, next_obs.pow(2).sum(-1) + act.sum(-1)


def test_trajectory_sampling_keeps_each_particle_on_one_member_and_candidates_apart():
    toy = MemberwiseToy(torch.tensor([0.0, 1.0, 2.0]))
    actions = torch.randn(4, 5, 2)
    returns = mpc.trajectory_sampling_returns(toy, torch.zeros(1), actions, num_particles=6)
    expected = toy.c.pow(2).mean() * sum(t * t for t in range(1, 6)) + actions.sum(dim=(1, 2))
    assert torch.allclose(returns, expected)


def test_mpc_executes_the_first_action_and_warm_starts_from_the_shifted_plan():
    toy = MemberwiseToy(torch.zeros(2))  # return = const + sum of actions: best plan = upper bound everywhere
    args = mpc.Args(horizon=4, population_size=200, num_elites=20, cem_iterations=5, num_particles=2)
    low, high = torch.tensor([-1.0]), torch.tensor([3.0])
    controller = mpc.MPCController(toy, args, low, high, None)
    torch.manual_seed(0)
    action = controller.act(np.zeros(1, np.float32))
    assert action.shape == (1,) and action[0] > 2.5
    assert (controller.plan[:-1] > 2.5).all() and controller.plan[-1].item() == 1.0  # shifted, then the mid-point


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("planner", ["cem", "rs"])
def test_cuda_graph_plans_equal_eager_plans_also_after_training_and_reset(planner):
    device = torch.device("cuda")
    planner_args = dict(planner=planner, horizon=5, population_size=64, num_elites=8, cem_iterations=3,
                        num_particles=10)
    torch.manual_seed(0)
    model = mpc.DynamicsEnsemble(4, 2, 5, 32, 2, True).to(device).eval()
    bound = torch.ones(2, device=device)
    observations = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    runs = []
    for graph in (False, True):
        controller = mpc.MPCController(model, mpc.Args(**planner_args, cuda_graph=graph), -bound, bound,
                                       mpc.TERMINATION_RULES["InvertedPendulum-v5"])
        torch.manual_seed(1)
        actions = [controller.act(obs) for obs in observations[:3]]
        first_layer = model.weights[0].detach().clone()
        with torch.no_grad():  # the model changes in place, as training between episodes changes it
            model.weights[0].mul_(1.5)
        controller.reset()
        actions += [controller.act(obs) for obs in observations[3:]]
        with torch.no_grad():  # exactly back, for the other run
            model.weights[0].copy_(first_layer)
        runs.append((np.stack(actions), controller.plan.clone()))
    assert controller.graph is not None
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1])


# ----------------------------------------------------------------------------------------------------
# Ensemble fits a known nonlinear system; probabilistic members learn the noise level
# ----------------------------------------------------------------------------------------------------
def test_ensemble_fits_a_nonlinear_system_and_learns_where_it_is_noisy():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = heteroscedastic_data(3000, rng)
    data["holdout"] = rng.random(3000) < 0.1
    args = mpc.Args(ensemble_size=5, hidden_size=64, num_hidden_layers=3, model_epochs=30, model_batch_size=64)
    model = mpc.DynamicsEnsemble(1, 1, 5, 64, 3, probabilistic=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.model_lr)
    untrained = mpc.train_model(model, optimizer, data, mpc.Args(**{**args.__dict__, "model_epochs": 0}), "cpu")
    trained = mpc.train_model(model, optimizer, data, args, "cpu")
    # held-out MSE in normalised units (1.0 = predicting the mean); noise alone accounts for ~0.15 here
    assert untrained["model/holdout_mse"] > 0.5
    assert trained["model/holdout_mse"] < 0.3

    grid = torch.linspace(-0.95, 0.95, 200)[:, None]
    act = torch.full_like(grid, 0.7)
    with torch.no_grad():
        next_obs, reward = model.predict(grid.expand(5, -1, -1), act.expand(5, -1, -1), sample=False)
        true_delta, true_reward = torch.sin(3 * grid) * act, torch.cos(2 * grid[:, 0]) + 0.49
        # error against the noise-free functions, relative to their variance (an untrained model: >= 1)
        assert (next_obs.mean(0) - grid - true_delta).pow(2).mean() < 0.05 * true_delta.var()
        assert (reward.mean(0) - true_reward).pow(2).mean() < 0.05 * true_reward.var()
        x = (torch.cat([grid, act], -1) - model.input_mean) / model.input_std
        _, logvar = model(x.expand(5, -1, -1))
    std = torch.exp(0.5 * logvar[..., 0]).mean(0) * model.target_std[0]  # predicted std of s' - s
    noisy, quiet = std[grid[:, 0] > 0.1].mean(), std[grid[:, 0] < -0.1].mean()
    assert 0.15 < noisy < 0.5 and quiet < 0.1 and noisy > 4 * quiet, (noisy, quiet)


def test_each_member_trains_on_its_own_bootstrap_of_the_training_split(monkeypatch):
    n, n_holdout, E, batch = 40, 8, 3, 7
    obs = np.arange(n, dtype=np.float32)[:, None]  # row i is recognisable by its observation, i
    data = {"obs": obs, "act": np.zeros((n, 1), np.float32), "next_obs": obs + 1, "rew": np.zeros(n, np.float32),
            "holdout": np.arange(n) < n_holdout}
    model = mpc.DynamicsEnsemble(1, 1, E, 8, 2, probabilistic=True)
    minibatch_rows, loss = [], mpc.model_loss  # the rows each member saw, [E, B] per minibatch

    def recording_loss(model_, x, y, decays):
        minibatch_rows.append(torch.round(x[..., 0] * model_.input_std[0] + model_.input_mean[0]).long())
        return loss(model_, x, y, decays)

    monkeypatch.setattr(mpc, "model_loss", recording_loss)
    torch.manual_seed(0)
    args = mpc.Args(ensemble_size=E, num_hidden_layers=2, model_epochs=2, model_batch_size=batch)
    mpc.train_model(model, torch.optim.Adam(model.parameters()), data, args, "cpu")
    per_epoch = -(-(n - n_holdout) // batch)
    assert len(minibatch_rows) == 2 * per_epoch
    epochs = [torch.cat(minibatch_rows[i * per_epoch:(i + 1) * per_epoch], dim=1) for i in range(2)]
    for rows in epochs:  # each member sees n_train rows per epoch, none of them held out
        assert rows.shape == (E, n - n_holdout) and (rows >= n_holdout).all()
    first, second = (rows.sort(dim=1).values for rows in epochs)
    assert torch.equal(first, second)  # one bootstrap per training call, reshuffled every epoch
    assert not torch.equal(epochs[0], epochs[1])
    for e in range(E):  # drawn with replacement: repeats, so some training rows are left out
        assert len(first[e].unique()) < n - n_holdout
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])  # a bootstrap each


def test_default_weight_decays_are_the_pets_per_layer_values():
    # handful-of-trials' HalfCheetah model: 2.5e-5, 5e-5, 7.5e-5, 7.5e-5 on the hidden layers, 1e-4 on the output
    assert mpc.layer_weight_decays(mpc.Args()) == (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
    for layers in (1, 2, 6):  # one decay per weight matrix at any depth, the output's last
        decays = mpc.layer_weight_decays(mpc.Args(num_hidden_layers=layers))
        assert len(decays) == len(mpc.DynamicsEnsemble(2, 1, 2, 8, layers, True).weights) and decays[-1] == 1e-4
    assert mpc.layer_weight_decays(mpc.Args(num_hidden_layers=1, weight_decays=(1e-3, 2e-3))) == (1e-3, 2e-3)


@pytest.mark.parametrize("probabilistic", [True, False])
def test_model_loss_is_the_papers_objective(probabilistic):
    torch.manual_seed(0)
    model = mpc.DynamicsEnsemble(2, 1, 3, 16, 2, probabilistic=probabilistic)
    x, y = torch.randn(3, 10, 3), torch.randn(3, 10, 3)
    decays = (1e-3, 2e-3, 3e-3)
    mean, logvar = model(x)
    l2 = sum(wd * 0.5 * w.pow(2).sum() for wd, w in zip(decays, model.weights))
    if probabilistic:  # PETS: Gaussian NLL per member (mean over batch and dims) + bound penalty
        assert (logvar < model.max_logvar).all() and (logvar > model.min_logvar).all()
        expected = sum(((mean[e] - y[e]) ** 2 * torch.exp(-logvar[e]) + logvar[e]).mean() for e in range(3))
        expected = expected + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
    else:  # Nagabandi / the lecture: squared error
        assert logvar is None
        expected = sum(((mean[e] - y[e]) ** 2).mean() for e in range(3))
    assert torch.allclose(mpc.model_loss(model, x, y, decays), expected + l2)


def test_blocked_cpu_forward_equals_the_plain_forward():
    model = mpc.DynamicsEnsemble(17, 6, 5, 200, 4, probabilistic=True)
    x = torch.randn(5, 1200, 23)
    assert model.cpu_block_rows < 1200  # the blocked path is the one taken
    with torch.no_grad():
        blocked, plain = model(x), model.mlp(x)
    for a, b in zip(blocked, plain):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("probabilistic", [True, False])
def test_planning_with_folded_normalisers_equals_the_normalised_model(probabilistic):
    # predict folds the normalisers into the first and last layers; the same numbers as normalising the
    # input, running the model in normalised units and un-normalising its mean, and the same noise scale
    torch.manual_seed(0)
    model = mpc.DynamicsEnsemble(3, 2, 4, 16, 2, probabilistic=probabilistic)
    with torch.no_grad():
        for name in ("input_mean", "target_mean"):
            getattr(model, name).normal_()
        for name in ("input_std", "target_std"):
            getattr(model, name).uniform_(0.2, 3.0)
        obs, act = torch.randn(4, 50, 3), torch.randn(4, 50, 2)
        mean, logvar = model((torch.cat([obs, act], -1) - model.input_mean) / model.input_std)
        expected = mean * model.target_std + model.target_mean
        next_obs, reward = model.predict(obs, act, sample=False)
        torch.testing.assert_close(next_obs, obs + expected[..., :-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reward, expected[..., -1], rtol=1e-5, atol=1e-5)
        if probabilistic:  # a sample = mean + eps * exp(logvar / 2) * target_std, with the same eps
            torch.manual_seed(1)
            sampled_obs, sampled_reward = model.predict(obs, act, sample=True)
            torch.manual_seed(1)
            eps = torch.randn_like(expected)
            noisy = expected + eps * torch.exp(0.5 * logvar) * model.target_std
            torch.testing.assert_close(sampled_obs, obs + noisy[..., :-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sampled_reward, noisy[..., -1], rtol=1e-5, atol=1e-5)


# (the termination rules are tested for every script that has them in tests/test_termination_rules.py)


# ----------------------------------------------------------------------------------------------------
# Smoke: logs, checkpoint, resume, determinism, bad input
# ----------------------------------------------------------------------------------------------------
def tiny(**overrides) -> mpc.Args:
    base = dict(env_id="InvertedPendulum-v5", total_timesteps=60, trial_length=20, init_random_episodes=2,
                ensemble_size=2, hidden_size=16, num_hidden_layers=2, population_size=16, num_elites=4,
                cem_iterations=2, horizon=5, num_particles=2, eval_episodes=1, seed=3, checkpoint_every=1, device="cpu")
    return mpc.Args(**{**base, **overrides})


def test_smoke_run_writes_logs_checkpoint_and_resumes(in_tmp):
    first = mpc.main(tiny())
    run_dir = first["run_dir"]
    events = run_events(run_dir, "mbrl_mpc")
    assert first["global_step"] == 60
    assert {"charts/episodic_return", "charts/SPS", "model/holdout_mse", "losses/model_loss", "time/plan_ms",
            "eval/return"} <= set(events.Tags()["scalars"])
    assert first["eval_return"] is not None and "model/holdout_mse" in first
    logged = [e.step for e in events.Scalars("charts/SPS")]
    resumed = mpc.main(tiny(total_timesteps=100, resume=os.path.join(run_dir, "mbrl_mpc.pt")))
    assert os.path.samefile(resumed["run_dir"], run_dir) and resumed["global_step"] == 100
    assert len(resumed["episodic_returns"]) > len(first["episodic_returns"])
    after = [e.step for e in run_events(run_dir, "mbrl_mpc").Scalars("charts/SPS")]
    assert after[:len(logged)] == logged and after[-1] > logged[-1]  # the resume kept the checkpoint's own step


def test_same_seed_same_returns_and_resume_equals_an_uninterrupted_run(in_tmp):
    straight = mpc.main(tiny(total_timesteps=100))
    again = mpc.main(tiny(total_timesteps=100))
    assert straight["episodic_returns"] == again["episodic_returns"]
    # stop exactly where the uninterrupted run ended its 4th episode, then resume to the same budget
    stop = int(sum(straight["episodic_lengths"][:4]))
    first = mpc.main(tiny(total_timesteps=stop))
    resumed = mpc.main(tiny(total_timesteps=100, resume=os.path.join(first["run_dir"], "mbrl_mpc.pt")))
    assert resumed["episodic_returns"] == straight["episodic_returns"]
    assert mpc.main(tiny(total_timesteps=100, seed=4))["episodic_returns"] != straight["episodic_returns"]


@pytest.mark.parametrize("overrides, message", [
    (dict(env_id="CartPole-v1"), "Discrete actions"),
    (dict(env_id="NoSuchEnv-v0"), "unknown environment"),
    (dict(horizon=0), "--horizon must be positive"),
    (dict(num_elites=20, population_size=16), "cannot exceed --population-size"),
    (dict(total_timesteps=-5), "--total-timesteps must be positive"),
    (dict(population_size=-1), "--population-size must be positive"),
    (dict(num_particles=3), "multiple of --ensemble-size"),
    (dict(weight_decays=(1e-4,)), "--weight-decays needs 3 values"),
    (dict(device="tpu:x"), "is not a device"),
    (dict(device="meta"), "runs on cpu or cuda"),
    (dict(model_lr=float("nan")), "--model-lr must be a finite number, got nan"),
    (dict(weight_decays=(1e-4, -1.0, 1e-4)), "--weight-decays must be >= 0"),
    (dict(capture_video=True, eval_episodes=0), "it needs --eval-episodes >= 1"),
    (dict(init_random_episodes=0), "the first model needs data"),
])
def test_bad_input_is_one_clear_error_before_anything_is_written(in_tmp, overrides, message):
    assert_refused_before_writing(mpc, tiny(**overrides), message)


def test_checkpoints_of_other_scripts_versions_or_envs_are_refused(in_tmp):
    assert_foreign_checkpoints_are_refused(mpc, tiny, dict(total_timesteps=20), dict(env_id="HalfCheetah-v5"),
                                           "is a run on InvertedPendulum-v5", lacks="model, optimizer, data")


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="moviepy is an optional extra")
def test_capture_video_records_each_evaluation_episode(in_tmp):
    run_dir = mpc.main(tiny(total_timesteps=40, eval_episodes=2, capture_video=True))["run_dir"]
    videos = sorted(f for f in os.listdir(os.path.join(run_dir, "videos")) if f.endswith(".mp4"))
    assert videos == ["rl-video-episode-0.mp4", "rl-video-episode-1.mp4"]


# ----------------------------------------------------------------------------------------------------
# Learning: the documented CPU configuration against the random policy of the same run
# ----------------------------------------------------------------------------------------------------
CPU_CONFIG = dict(population_size=100, num_elites=10, num_particles=5, horizon=15, cem_iterations=3, model_epochs=25,
                  eval_episodes=0, seed=1)


@pytest.mark.slow
def test_learns_inverted_pendulum_within_a_few_episodes(in_tmp):
    # Episodes are capped at 50 steps: the CPU configuration's 15-step horizon balances the pole, but over
    # 100+ steps the cart drifts into the end of its rail (docs/mbrl_mpc.md), a longer-horizon problem.
    cap, warmup = 50, 10
    result = mpc.main(mpc.Args(env_id="InvertedPendulum-v5", total_timesteps=450, trial_length=cap,
                               init_random_episodes=warmup, **CPU_CONFIG))
    random_returns, mpc_returns = result["episodic_returns"][:warmup], result["episodic_returns"][warmup:]
    assert np.mean(random_returns) < 0.2 * cap, random_returns  # uniform random actions fall within ~6 steps
    assert max(mpc_returns[:5]) >= 0.9 * cap, mpc_returns


@pytest.mark.slow
def test_beats_random_on_reacher(in_tmp):
    warmup = 5
    result = mpc.main(mpc.Args(env_id="Reacher-v5", total_timesteps=600, init_random_episodes=warmup, **CPU_CONFIG))
    random_returns, mpc_returns = result["episodic_returns"][:warmup], result["episodic_returns"][warmup:]
    # random actions: about -43 per 50-step episode (mostly control cost); a working planner: about -10. Seen
    # (2026-11-27), mean of the planned episodes 3-7 against random, seeds 1-3: -8.5 / -43.5, -7.2 / -43.4,
    # -10.2 / -41.2
    assert np.mean(mpc_returns[-5:]) > np.mean(random_returns) + 25, (random_returns, mpc_returns)
