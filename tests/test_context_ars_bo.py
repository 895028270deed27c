"""context_ars_bo.py: the Gaussian process and Bayesian optimisation against closed forms and random search,
the ARS update and ARS on a toy objective, the batched policy, dynamics variation, the rollout workers,
learning (BO's latent against a random one on held-out dynamics), smoke/resume/bad input."""
import importlib.util
import math
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import context_ars_bo as mso
from conftest import assert_foreign_checkpoints_are_refused, assert_refused_before_writing, run_events

CPU = torch.device("cpu")


def tiny(**overrides) -> mso.Args:
    base = dict(env_id="InvertedPendulum-v5", params=("strength=-1:1",), iterations=3, num_directions=3,
                top_directions=2, train_tasks=2, resample_every=2, bo_init_points=2, bo_iterations=1,
                adapt_iterations=1, adapt_episodes=1, eval_episodes=1, test_tasks=2, test_tasks_outside=1,
                eval_every=2, max_episode_steps=20, hidden_sizes=(8,), bo_candidates=50, checkpoint_every=1,
                seed=3, device="cpu")
    return mso.Args(**{**base, **overrides})


# ----------------------------------------------------------------------------------------------------
# Gaussian process and Bayesian optimisation
# ----------------------------------------------------------------------------------------------------
def numpy_matern52(a: np.ndarray, b: np.ndarray, lengthscale: float) -> np.ndarray:
    r = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)) / lengthscale
    return (1 + math.sqrt(5) * r + 5 * r**2 / 3) * np.exp(-math.sqrt(5) * r)


def test_gp_posterior_and_marginal_likelihood_match_the_closed_form():
    x = np.array([[-0.5, 0.1], [0.2, 0.4], [0.7, -0.3]])
    y = np.array([0.3, -1.2, 0.8])
    query = np.array([[0.0, 0.0], [0.2, 0.4], [1.0, 1.0]])
    lengthscale, signal, noise = 0.6, 1.7, 0.05
    kernel = signal * numpy_matern52(x, x, lengthscale) + noise * np.eye(3)
    k_star = signal * numpy_matern52(x, query, lengthscale)
    want_mean = k_star.T @ np.linalg.solve(kernel, y)
    want_var = signal - np.einsum("ij,ij->j", k_star, np.linalg.solve(kernel, k_star))
    want_loglik = (-0.5 * y @ np.linalg.solve(kernel, y) - 0.5 * np.linalg.slogdet(kernel)[1]
                   - 1.5 * math.log(2 * math.pi))
    tx, ty, tq = (torch.as_tensor(a)[None] for a in (x, y, query))
    hypers = torch.tensor([[lengthscale, signal, noise]], dtype=torch.float64)
    mean, var = mso.gp_posterior(tx, ty, tq, hypers)
    np.testing.assert_allclose(mean[0].numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[0].numpy(), want_var, rtol=1e-4, atol=1e-5)  # the kernel's 1e-6 jitter
    np.testing.assert_allclose(mso.gp_log_marginal_likelihood(tx, ty, hypers).item(), want_loglik, rtol=1e-5)
    assert var[0, 1] < 0.1 * var[0, 2]  # small at an observed point, large far from the data


def test_the_marginal_likelihood_fit_recovers_a_known_lengthscale():
    rng = np.random.default_rng(0)
    for lengthscale in [0.2, 1.0]:
        x = torch.as_tensor(rng.uniform(-1, 1, (6, 60, 2)))
        kernel = mso.matern52(x, x, torch.full((6,), lengthscale, dtype=torch.float64)) + 1e-4 * torch.eye(60)
        y = (torch.linalg.cholesky(kernel) @ torch.as_tensor(rng.standard_normal((6, 60, 1)))).squeeze(-1)
        fitted = mso.fit_gp(x, y)
        assert 0.6 < fitted[:, 0].median().item() / lengthscale < 1.6, fitted[:, 0]
        # no neighbour on the grid of lengthscales, and no other signal variance (closed form), fits better
        best = mso.gp_log_marginal_likelihood(x, y, fitted)
        grid_step = (mso.GP_LENGTHSCALES[1] / mso.GP_LENGTHSCALES[0]).item()
        for k, factor in [(0, grid_step), (0, 1 / grid_step), (1, 0.8), (1, 1.25)]:
            other = fitted.clone()
            other[:, k] *= factor
            assert (mso.gp_log_marginal_likelihood(x, y, other) < best).all()


def test_expected_improvement_and_ucb_closed_forms():
    mean, std, best = torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([[1.0, 1e-9, 2.0]]), torch.tensor([0.0])
    ei = mso.expected_improvement(mean, std, best)[0]
    assert ei[0].item() == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-6)  # sigma phi(0)
    assert ei[1].item() == pytest.approx(1.0, rel=1e-6)  # a certain improvement of 1
    samples = 0.5 + 2.0 * torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    assert ei[2].item() == pytest.approx(samples.clamp_min(0).mean().item(), rel=0.01)  # E[max(f - 0, 0)]
    assert torch.equal(mso.upper_confidence_bound(mean, std, 5.0), mean + 5.0 * std)


@pytest.mark.parametrize("acquisition", ["ucb", "ei"])
def test_bayesian_optimisation_finds_a_2d_maximum_sooner_than_random_search(acquisition):
    """16 problems in one batch (the average over seeds): a smooth bump with its peak at a random point."""
    rng = np.random.default_rng(1)
    peaks = rng.uniform(-0.8, 0.8, (16, 2))

    def f(points: np.ndarray) -> np.ndarray:
        return np.exp(-np.square(points - peaks).sum(-1) / 0.3) + 0.3 * np.sin(3 * points[:, 0])

    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 201), np.linspace(-1, 1, 201)), -1).reshape(-1, 2)
    optimum = np.array([f(np.broadcast_to(g, peaks.shape)) for g in grid]).max(0)
    args = mso.Args(acquisition=acquisition, bo_candidates=1000)
    points, values = mso.bayesian_optimisation(f, 16, 2, 5, 15, args, np.random.default_rng(2), CPU)
    assert points.shape == (16, 20, 2) and np.allclose(values, np.array([f(points[:, k]) for k in range(20)]).T)
    bo_regret = (optimum - values.max(1)).mean()
    random_regret = (optimum - np.max([f(rng.uniform(-1, 1, (16, 2))) for _ in range(20)], 0)).mean()
    assert bo_regret < 0.5 * random_regret, (bo_regret, random_regret)


def test_strategy_search_returns_each_tasks_best_evaluated_latent_and_counts_its_steps(monkeypatch):
    targets = np.array([[0.5, -0.5], [-0.3, 0.8], [0.0, 0.0]])  # a different best mu for each of 3 tasks

    def returns_of(latents):  # the policy's return on each task as a function of its latent, 7 steps an episode
        return -np.square(latents - targets).sum(-1)

    def fake_episode_returns(rollouts, theta, dynamics, latents, episodes, normaliser, rng):
        return returns_of(latents), 7 * episodes * len(dynamics)

    monkeypatch.setattr(mso, "episode_returns", fake_episode_returns)
    best, values, steps = mso.strategy_search(None, np.zeros(4), np.zeros((3, 1)), None, iterations=6, episodes=2,
                                              args=mso.Args(latent_dim=2, bo_init_points=4),
                                              rng=np.random.default_rng(0), device=CPU)
    assert values.shape == (3, 10) and steps == 10 * 7 * 2 * 3
    np.testing.assert_allclose(returns_of(best), values.max(1), rtol=1e-6)  # the best mu seen, not the last


# ----------------------------------------------------------------------------------------------------
# ARS
# ----------------------------------------------------------------------------------------------------
def test_ars_update_matches_the_formula_on_a_hand_made_example():
    theta = np.array([1.0, -1.0])
    deltas = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    plus, minus = np.array([3.0, 0.0, 2.5]), np.array([1.0, 2.0, 2.4])
    # top 2 by max(r+, r-): directions 0 (3) and 2 (2.5), not 1 (whose |r+ - r-| = 2 would rank it with 0);
    # sigma_R = std(3, 2.5, 1, 2.4)
    new, sigma = mso.ars_update(theta, deltas, plus, minus, top_directions=2, step_size=0.1)
    assert sigma == pytest.approx(np.std([3, 2.5, 1, 2.4]))
    step = 0.1 / (2 * sigma) * ((3 - 1) * deltas[0] + (2.5 - 2.4) * deltas[2])
    np.testing.assert_allclose(new, theta + step)


def test_ars_maximises_a_quadratic():
    rng = np.random.default_rng(0)
    optimum = rng.standard_normal(10)
    theta = np.zeros(10)
    for _ in range(300):
        deltas = rng.standard_normal((8, 10))
        plus = -np.square(theta + 0.05 * deltas - optimum).sum(1)
        minus = -np.square(theta - 0.05 * deltas - optimum).sum(1)
        theta, _ = mso.ars_update(theta, deltas, plus, minus, top_directions=4, step_size=0.05)
    # from a distance of |optimum| to within 10 % of it (the normalised step keeps ARS moving at ~step size
    # near the optimum; a wrong-signed or unnormalised update ends far off)
    assert np.linalg.norm(theta - optimum) < 0.1 * np.linalg.norm(optimum)


def test_running_normaliser_matches_numpy_and_zeroes_constant_inputs():
    rng = np.random.default_rng(0)
    data = [np.column_stack([rng.normal(3, 2, n), np.full(n, 0.5)]) for n in (5, 40, 17)]
    normaliser = mso.RunningMeanStd(2)
    assert np.array_equal(normaliser.std, [1.0, 1.0])  # before any data: the identity
    for batch in data:
        normaliser.update(len(batch), batch.sum(0), np.square(batch).sum(0))
    everything = np.concatenate(data)
    np.testing.assert_allclose(normaliser.mean, everything.mean(0))
    assert normaliser.std[0] == pytest.approx(everything[:, 0].std()) and normaliser.std[1] == np.inf


def test_batched_policy_gives_each_row_its_own_parameters():
    torch.manual_seed(0)
    policy = mso.LatentConditionedPolicy(obs_dim=3, latent_dim=2, action_dim=2, hidden_sizes=(6, 5))
    flat = torch.randn(4, sum(p.numel() for p in policy.parameters()))
    inputs = torch.randn(4, 5)
    batched = mso.batched_policy(mso.unflatten_layers(flat, mso.layer_shapes(policy)), inputs)
    for row in range(4):
        torch.nn.utils.vector_to_parameters(flat[row], policy.parameters())
        torch.testing.assert_close(batched[row], policy(inputs[row]))
    fresh = mso.LatentConditionedPolicy(3, 2, 2, (64, 64))  # normc: unit-norm rows, 0.01 on the output layer
    torch.testing.assert_close(fresh.layers[0].weight.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(fresh.layers[2].weight.norm(dim=1), torch.full((2,), 0.01))


# ----------------------------------------------------------------------------------------------------
# Dynamics variation and rollouts
# ----------------------------------------------------------------------------------------------------
def test_dynamics_variation_changes_the_model_and_restores_it():
    env = gym.make("Hopper-v5")
    model = env.unwrapped.model
    params = mso.parse_params(mso.DYNAMICS_DEFAULTS["Hopper-v5"], model)
    nominal = {k: getattr(model, k).copy() for k in ["geom_friction", "body_mass", "body_inertia", "actuator_gear",
                                                      "dof_damping"]}
    subtree_mass = model.body_subtreemass.copy()
    variation = mso.DynamicsVariation(model, params)
    variation.set(np.array([0.3, 12.0, 2.5, 0.5, 2.0]))  # friction, torso kg, foot kg, strength, damping
    # the derived constants follow (mj_setConst): the whole robot's mass seen from the root
    assert model.body_subtreemass[0] == pytest.approx(subtree_mass[0] + 12.0 + 2.5 - nominal["body_mass"][1]
                                                      - nominal["body_mass"][4])
    torso, foot = model.body("torso").id, model.body("foot").id
    assert np.all(model.geom_friction[:, 0] == 0.3) and np.array_equal(model.geom_friction[:, 1:],
                                                                      nominal["geom_friction"][:, 1:])
    assert model.body_mass[torso] == 12.0 and model.body_mass[foot] == 2.5
    np.testing.assert_allclose(model.body_inertia[torso], nominal["body_inertia"][torso] * 12.0
                               / nominal["body_mass"][torso])
    assert model.body_mass[model.body("thigh").id] == nominal["body_mass"][model.body("thigh").id]
    np.testing.assert_allclose(model.actuator_gear[:, 0], 0.5 * nominal["actuator_gear"][:, 0])
    np.testing.assert_allclose(model.dof_damping, 2.0 * nominal["dof_damping"])
    variation.set(np.array([0.9, 3.0, 5.0, 1.0, 1.0]))  # a second task starts from the nominal model too
    np.testing.assert_allclose(model.body_inertia[torso], nominal["body_inertia"][torso] * 3.0
                               / nominal["body_mass"][torso])
    variation.restore()
    for name, array in nominal.items():
        assert np.array_equal(getattr(model, name), array), name
    np.testing.assert_allclose(model.body_subtreemass, subtree_mass)


def test_a_weaker_motor_changes_what_the_same_actions_do():
    finals = []
    for strength in [1.0, 0.4]:
        env = gym.make("Hopper-v5")
        mso.DynamicsVariation(env.unwrapped.model, mso.parse_params(("strength=0:2",), env.unwrapped.model)).set(
            np.array([strength]))
        env.reset(seed=0)
        for _ in range(10):
            obs = env.step(np.ones(3))[0]
        finals.append(obs)
    assert np.abs(finals[0] - finals[1]).max() > 0.1


@pytest.mark.parametrize("env_id", sorted(mso.DYNAMICS_DEFAULTS))
def test_every_default_parameter_set_fits_its_model(env_id):
    model = gym.make(env_id).unwrapped.model
    params = mso.parse_params(mso.DYNAMICS_DEFAULTS[env_id], model)
    variation = mso.DynamicsVariation(model, params)
    variation.set(np.array([p.low for p in params]))
    assert model.body_mass[model.body("torso").id] == params[1].low and np.all(model.geom_friction[:, 0] == 0.2)
    variation.restore()


def test_outside_test_dynamics_leave_their_range_by_ten_to_thirty_percent_of_its_width():
    params = mso.parse_params(mso.DYNAMICS_DEFAULTS["Hopper-v5"], gym.make("Hopper-v5").unwrapped.model)
    low, high = np.array([p.low for p in params]), np.array([p.high for p in params])
    values = mso.sample_outside_dynamics(params, 200, np.random.default_rng(0))
    below, above = values < low, values > high
    assert np.all(below.sum(1) + above.sum(1) == 1) and below.any() and above.any()
    ratio = np.where(below, low - values, values - high)[below | above] / np.tile(high - low, (200, 1))[below | above]
    assert ratio.min() >= 0.1 and ratio.max() <= 0.3
    strength = [p.name for p in params].index("strength")
    assert np.all(np.delete(values, strength, 1) > 0) and below[:, strength].any()  # a weaker motor among them
    inside = mso.sample_dynamics(params, 200, np.random.default_rng(0))
    assert np.all((inside >= low) & (inside <= high))
    np.testing.assert_allclose(mso.normalise_dynamics(params, np.stack([low, high])), [[-1] * 5, [1] * 5])


def test_env_copies_do_not_repeat_mujocos_compiler_warnings(capfd):
    worker = mso.RolloutWorker("HalfCheetah-v5", ("strength=-1:1",), [(4, 19), (6, 4)], 10)
    worker._grow(4)
    assert capfd.readouterr().err.count("settotalmass") == 1  # the first copy's, not one per copy
    gym.make("HalfCheetah-v5")  # MuJoCo's own warning handler is back afterwards
    assert capfd.readouterr().err.count("settotalmass") == 1


def test_rollouts_match_a_plain_gymnasium_loop_and_do_not_depend_on_the_worker_count():
    torch.manual_seed(0)
    policy = mso.LatentConditionedPolicy(4, 1, 1, (8,))
    for layer in policy.layers:  # a policy that acts, so that episodes end at different times
        layer.weight.data *= 30
    shapes = mso.layer_shapes(policy)
    theta = torch.nn.utils.parameters_to_vector(policy.parameters()).detach().numpy()
    policies = np.stack([theta, -theta, 0.5 * theta])
    normaliser = mso.RunningMeanStd(5)
    normaliser.update(3, np.array([0.3, 0.0, 3.0, -3.0, 0.0]), np.array([0.5, 0.03, 9.0, 6.0, 3.0]))
    index, seeds = np.array([0, 1, 2, 0, 1, 2]), np.arange(6) + 10
    dynamics, latents = np.array([[1.0], [0.5], [-1.0], [0.8], [1.0], [0.2]]), np.linspace(-1, 1, 6)[:, None]
    kwargs = dict(env_id="InvertedPendulum-v5", param_specs=("strength=-1:1",), shapes=shapes, max_episode_steps=40)
    results = []
    for workers in [1, 2]:
        rollouts = mso.Rollouts(workers, **kwargs)
        results.append(rollouts.run(policies, index, dynamics, latents.astype(np.float32), seeds, normaliser))
        rollouts.close()
    for key in ["returns", "lengths", "sum", "sum_sq"]:
        np.testing.assert_array_equal(results[0][key], results[1][key])
    assert len(set(results[0]["lengths"])) > 1 and results[0]["lengths"].max() <= 40
    for j in range(6):  # the same episode by hand: gymnasium's own TimeLimit, reward and termination
        env = gym.make("InvertedPendulum-v5", max_episode_steps=40)
        mso.DynamicsVariation(env.unwrapped.model, mso.parse_params(("strength=-1:1",), env.unwrapped.model)).set(
            dynamics[j])
        torch.nn.utils.vector_to_parameters(torch.as_tensor(policies[index[j]]), policy.parameters())
        obs, total, length, done = env.reset(seed=int(seeds[j]))[0], 0.0, 0, False
        visited = []
        while not done:
            visited.append(np.concatenate([obs, latents[j]]))
            inputs = np.clip((visited[-1] - normaliser.mean) / normaliser.std, -5, 5)
            with torch.no_grad():
                action = policy(torch.as_tensor(inputs, dtype=torch.float32)).numpy()
            obs, reward, terminated, truncated, _ = env.step(np.clip(action, -3, 3))
            total, length, done = total + reward, length + 1, terminated or truncated
        assert (length, total) == (results[0]["lengths"][j], pytest.approx(results[0]["returns"][j]))
        # statistics of live steps only (float32 policies: the batched and the single call differ in rounding)
        np.testing.assert_allclose(results[0]["sum"][j], np.sum(visited, 0), rtol=1e-4)
        np.testing.assert_allclose(results[0]["sum_sq"][j], np.square(visited).sum(0), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Learning: adaptation of mu on held-out dynamics beats a random mu
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_adapted_latent_beats_a_random_one_on_a_motor_of_unknown_sign(in_tmp):
    # HalfCheetah-v5 whose motor strength is drawn from [-1, 1]: no single reactive policy runs forward for
    # both signs, so the latent has to carry the sign. 20 small ARS iterations (~236k env steps with the
    # searches and the evaluation); on 8 held-out dynamics, BO's mu ((5 + 20) x 3 episodes) then 5 fresh
    # episodes each, against the same policy with a random mu on the same dynamics and seeds. Seeds 1-5 of this
    # configuration (docs/context_ars_bo.md): adapted 36.5 / 36.0 / 37.0 / 30.6 / 18.3, random mu -0.9 / 18.3
    # / 7.9 / 13.6 / -0.8; the untrained policy's 100-step return is -0.2.
    result = mso.main(mso.Args(env_id="HalfCheetah-v5", params=("strength=-1:1",), iterations=20,
                               num_directions=8, top_directions=4, step_size=0.02, noise=0.03, train_tasks=4,
                               resample_every=5, max_episode_steps=100, test_tasks=8, test_tasks_outside=0,
                               eval_every=20, num_workers=2, save_model=False, seed=1, device="cpu"))
    adapted, random_latent = result["eval/return"], result["eval/random_latent_return"]
    assert adapted > 10, f"ARS did not learn to run: adapted return {adapted:.1f}"
    assert adapted > random_latent + 10, f"adapted mu {adapted:.1f} vs a random mu {random_latent:.1f}"


# ----------------------------------------------------------------------------------------------------
# Smoke: logs, checkpoint, resume, bad input
# ----------------------------------------------------------------------------------------------------
def test_smoke_run_writes_logs_checkpoint_and_resume_equals_an_uninterrupted_run(in_tmp):
    straight = mso.main(tiny())
    events = run_events(straight["run_dir"], "context_ars_bo")
    assert straight["iterations"] == 3
    assert {"charts/episodic_return", "charts/SPS", "losses/return_std", "meta/strategy_search_return",
            "meta/adapt_return", "meta/adapt_episodes", "eval/return", "eval/return_in_range",
            "eval/return_outside", "eval/random_latent_return", "time/rollout_sps"} <= set(events.Tags()["scalars"])
    assert events.Scalars("meta/adapt_episodes")[-1].value == 2 * 1 + 1 * 1  # (init + iterations) x episodes
    assert os.path.isfile(os.path.join(straight["run_dir"], "adaptation.json"))
    first = mso.main(tiny(iterations=1))
    checkpoint = os.path.join(first["run_dir"], "context_ars_bo.pt")
    assert mso.main(tiny(iterations=None, resume=checkpoint))["iterations"] == 1  # its own budget
    resumed = mso.main(tiny(iterations=3, resume=checkpoint))
    assert os.path.samefile(resumed["run_dir"], first["run_dir"]) and resumed["iterations"] == 3
    assert resumed["history"] == straight["history"][1:]
    np.testing.assert_array_equal(resumed["theta"], straight["theta"])
    assert resumed["eval/return"] == straight["eval/return"]
    assert mso.main(tiny(iterations=None, total_timesteps=straight["history"][1]["step"]))["iterations"] == 2
    assert mso.main(tiny(seed=4))["history"] != straight["history"]


@pytest.mark.parametrize("method, latent_dim", [("dr", 0), ("up", 1)])
def test_baselines_run_with_their_own_policy_input(in_tmp, method, latent_dim):
    result = mso.main(tiny(method=method, iterations=2, save_model=False))
    assert len(result["normaliser"].mean) == 4 + latent_dim  # InvertedPendulum's 4 observations + the latent
    assert np.isfinite(result["eval/return"]) and "meta/adapt_return" not in result


@pytest.mark.parametrize("overrides, message", [
    (dict(latent_dim=0), "--latent-dim must be >= 1"),
    (dict(top_directions=4), "--top-directions 4 > --num-directions 3"),
    (dict(params=("frction=0.2:1",)), "unknown parameter 'frction'; known: friction, strength, damping, mass"),
    (dict(params=("mass.head=1:2",)), "the model has no body 'head'; bodies: cart, pole"),
    (dict(params=("friction=1:0.2",)), "needs low < high"),
    (dict(params=("friction=0.2:1e",)), "low and high must be numbers"),
    (dict(params=("friction=0:1e400",)), "low and high must be finite"),
    (dict(params=("friction=0.2-1",)), "write name=low:high"),
    (dict(params=()), "--params is empty"),
    (dict(env_id="CartPole-v1"), "CartPole-v1 has Discrete actions; this script needs continuous"),
    (dict(env_id="Pendulum-v1"), "Pendulum-v1 is not a MuJoCo env"),
    (dict(env_id="Hopper-v9"), "not a registered gymnasium env"),
    (dict(env_id="Swimmer-v5", params=None), "Swimmer-v5 has no default dynamics parameters; pass --params"),
    (dict(method="maml"), "--method maml is unknown"),
    (dict(noise=0.0), "--noise must be > 0"),
    (dict(step_size=float("nan")), "--step-size must be a finite number, got nan"),
    (dict(device="meta"), "runs on cpu or cuda"),
    (dict(seed=2**40), "--seed must be in"),
    (dict(hidden_sizes=(-1,)), "--hidden-sizes must be layer widths >= 1"),
    (dict(acquisition="pi"), "--acquisition pi is unknown"),
    (dict(device="cuda:7" if not torch.cuda.is_available() else "nonsense"), "--device"),
])
def test_bad_input_is_one_clear_error_before_anything_is_written(in_tmp, overrides, message):
    assert_refused_before_writing(mso, tiny(**overrides), message)


def test_checkpoints_of_other_scripts_versions_or_envs_are_refused(in_tmp):
    assert_foreign_checkpoints_are_refused(mso, tiny, dict(iterations=1), dict(env_id="Hopper-v5"),
                                           "is a run on --env-id InvertedPendulum-v5", lacks="theta, normaliser")


def test_hopper_defaults_run(in_tmp):
    result = mso.main(tiny(env_id="Hopper-v5", params=None, iterations=1, test_tasks=1, test_tasks_outside=1,
                           save_model=False))
    assert [p.name for p in result["params"]] == ["friction", "mass.torso", "mass.foot", "strength", "damping"]
    assert np.isfinite(result["eval/return"])


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="moviepy is an optional extra")
def test_capture_video_records_the_adapted_policy(in_tmp):
    run_dir = mso.main(tiny(iterations=1, capture_video=True))["run_dir"]
    assert os.listdir(os.path.join(run_dir, "videos")) == ["test_dynamics_0.mp4"]

