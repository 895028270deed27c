"""Tests of mbrl_ensemble.py (MBPO): the ensemble on a known noisy system and its elites, the rollout schedule,
branched rollouts and terminations, SAC's pieces, per-env defaults, smoke/resume/bad input, and learning."""
import copy
import importlib.util
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro

import mbrl_ensemble as mbpo
from conftest import (assert_foreign_checkpoints_are_refused, assert_refused_before_writing,
                      heteroscedastic_data, run_events)


# ----------------------------------------------------------------------------------------------------
# Ensemble: the Gaussian NLL learns where the system is noisy; elites have the lowest held-out loss
# ----------------------------------------------------------------------------------------------------
def as_model_data(data: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    obs, act, next_obs, rew = (torch.as_tensor(data[k]) for k in ("obs", "act", "next_obs", "rew"))
    return torch.cat([obs, act], -1), torch.cat([next_obs - obs, rew[:, None]], -1)


def test_ensemble_variance_tracks_the_noise_and_training_stops_on_the_holdout():
    torch.manual_seed(0)
    inputs, targets = as_model_data(heteroscedastic_data(3000, np.random.default_rng(0)))
    args = mbpo.Args(ensemble_size=5, num_elites=3, num_hidden_layers=3, model_batch_size=64)
    model = mbpo.DynamicsEnsemble(1, 1, 5, 64, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.model_lr)
    elites, metrics = mbpo.train_model(model, optimizer, inputs, targets, args)
    # early stopping ended training on its own (no epoch cap) after the held-out loss flattened
    assert 6 < metrics["model/train_epochs"] < 300 and metrics["model/holdout_mse"] < 0.3, metrics

    grid = torch.linspace(-0.95, 0.95, 200)[:, None]
    x = (torch.cat([grid, torch.full_like(grid, 0.7)], -1) - model.input_mean) / model.input_std
    with torch.no_grad():
        _, logvar = model(x.expand(5, -1, -1))
    std = torch.exp(0.5 * logvar[..., 0]).mean(0) * model.target_std[0]  # predicted std of s' - s
    noisy, quiet = std[grid[:, 0] > 0.1].mean(), std[grid[:, 0] < -0.1].mean()
    assert 0.2 < noisy < 0.4 and quiet < 0.1 and noisy > 4 * quiet, (noisy, quiet)  # true: 0.3 and 0.01


def test_training_stops_after_more_than_patience_epochs_without_a_1_percent_improvement_of_any_member():
    stopping = mbpo.HoldoutStopping(num_members=2, patience=2)
    assert stopping.update(torch.tensor([10.0, 10.0])).tolist() == [True, True]  # the first epoch always improves
    assert stopping.update(torch.tensor([9.95, 9.0])).tolist() == [False, True]  # 0.5 % is not an improvement
    assert stopping.best.tolist() == [10.0, 9.0] and not stopping.stop
    for _ in range(3):  # no member improves: stop after more than 2 such epochs
        assert not stopping.stop
        assert not stopping.update(torch.tensor([9.92, 8.95])).any()  # below 1 % of each member's best
    assert stopping.stop
    stopping.update(torch.tensor([9.8, 8.95]))  # one member improving by > 1 % restarts the count
    assert stopping.epochs_since_update == 0 and not stopping.stop


def test_elites_are_the_members_with_the_lowest_holdout_loss():
    torch.manual_seed(1)
    inputs, targets = as_model_data(heteroscedastic_data(2000, np.random.default_rng(1)))
    args = mbpo.Args(ensemble_size=4, num_elites=2, num_hidden_layers=2, model_max_epochs=10, model_batch_size=128)
    model = mbpo.DynamicsEnsemble(1, 1, 4, 32, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.model_lr)
    mbpo.train_model(model, optimizer, inputs, targets, args)
    with torch.no_grad():  # spoil members 0 and 2, then train so little that they stay worse
        for weight in model.weights:
            weight[[0, 2]] += 0.5 * torch.randn_like(weight[[0, 2]])
    for group in optimizer.param_groups:
        group["lr"] = 1e-7
    elites, _ = mbpo.train_model(model, optimizer, inputs, targets, mbpo.Args(**{**args.__dict__,
                                                                              "model_max_epochs": 1}))
    assert sorted(elites.tolist()) == [1, 3]


def test_a_training_capped_at_one_epoch_keeps_that_epoch():
    torch.manual_seed(2)
    inputs, targets = as_model_data(heteroscedastic_data(1000, np.random.default_rng(2)))
    model = mbpo.DynamicsEnsemble(1, 1, 3, 32, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [w.detach().clone() for w in model.weights]
    mbpo.train_model(model, optimizer, inputs, targets, mbpo.Args(ensemble_size=3, num_elites=2, num_hidden_layers=2,
                                                                  model_max_epochs=1, model_batch_size=32))
    # the epoch improved on the 1e10 start, so restoring each member's best epoch must keep it
    assert all(not torch.equal(a, b) for a, b in zip(before, model.weights))


def test_each_member_returns_to_the_weights_of_its_best_holdout_epoch(monkeypatch):
    torch.manual_seed(3)
    inputs, targets = as_model_data(heteroscedastic_data(600, np.random.default_rng(3)))
    model = mbpo.DynamicsEnsemble(1, 1, 3, 16, 2)
    epochs, update = [], mbpo.HoldoutStopping.update  # per epoch: the weights at its end, who improved

    def recording_update(self, losses):
        improved = update(self, losses)
        epochs.append(([w.detach().clone() for w in model.weights], improved.clone()))
        return improved

    monkeypatch.setattr(mbpo.HoldoutStopping, "update", recording_update)
    args = mbpo.Args(ensemble_size=3, num_elites=2, num_hidden_layers=2, model_max_epochs=500, model_batch_size=64)
    mbpo.train_model(model, torch.optim.Adam(model.parameters(), lr=1e-3), inputs, targets, args)
    assert len(epochs) < 500  # stopped by the held-out loss, so every member's best epoch lies before the last
    for e in range(3):
        best = max(i for i, (_, improved) in enumerate(epochs) if improved[e])
        for final, at_best, at_end in zip(model.weights, epochs[best][0], epochs[-1][0]):
            assert torch.equal(final[e], at_best[e]) and not torch.equal(final[e], at_end[e])


def test_model_loss_is_the_gaussian_nll_with_bound_penalty_and_weight_decay():
    torch.manual_seed(0)
    model = mbpo.DynamicsEnsemble(2, 1, 3, 16, 2)
    x, y = torch.randn(3, 10, 3), torch.randn(3, 10, 3)
    decays = (1e-3, 2e-3, 3e-3)
    with torch.no_grad():
        mean, logvar = model(x)
        nll = sum(((mean[e] - y[e]) ** 2 / logvar[e].exp() + logvar[e]).mean() for e in range(3))
        penalty = 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
        l2 = sum(d * 0.5 * (w**2).sum() for d, w in zip(decays, model.weights))
    assert torch.allclose(mbpo.model_loss(model, x, y), nll + penalty)
    assert torch.allclose(mbpo.weight_decay_loss(model, decays), l2)


def test_weight_decay_through_its_gradient_gives_the_steps_of_differentiating_the_whole_loss():
    torch.manual_seed(0)
    model = mbpo.DynamicsEnsemble(2, 1, 3, 16, 2)
    x, y = torch.randn(3, 10, 3), torch.randn(3, 10, 3)
    decays = (0.5, 1.0, 2.0)  # large enough that Adam's normalised steps differ by far more than 1e-6 without them
    reference = copy.deepcopy(model)
    ours_adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    reference_adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for _ in range(3):
        ours_adam.zero_grad()
        mbpo.model_loss(model, x, y).backward()
        mbpo.add_weight_decay_grads(model, decays)
        ours_adam.step()
        reference_adam.zero_grad()
        (mbpo.model_loss(reference, x, y) + mbpo.weight_decay_loss(reference, decays)).backward()
        reference_adam.step()
    for ours, expected in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(ours, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Rollout schedule, branched rollouts, terminations
# ----------------------------------------------------------------------------------------------------
def test_rollout_length_schedule_is_the_papers_linear_schedule():
    hopper = (20, 150, 1, 15)
    # k = x for epoch <= a; x + (epoch - a) / (b - a) * (y - x) rounded down in between; y from epoch b
    assert [mbpo.rollout_length(e, hopper) for e in (0, 1, 20, 21, 85, 149, 150, 400)] == [1, 1, 1, 1, 8, 14, 15, 15]
    assert [mbpo.rollout_length(e, (20, 100, 1, 25)) for e in (20, 60, 100)] == [1, 13, 25]
    assert {mbpo.rollout_length(e, (1, 15, 1, 1)) for e in range(50)} == {1}


def step_model(step: float, reward: float) -> mbpo.DynamicsEnsemble:
    """A 3-member ensemble whose every member predicts s' = s + (step, 0), r = reward with ~zero noise."""
    model = mbpo.DynamicsEnsemble(2, 1, 3, 8, 1)
    with torch.no_grad():
        for weight in model.weights:
            weight.zero_()
        model.biases[-1][..., :3] = torch.tensor([step, 0.0, reward])
        model.max_logvar.fill_(-40.0)  # std < 1e-8
        model.min_logvar.fill_(-50.0)
    return model


def test_branched_rollouts_stop_at_terminations_and_keep_the_terminal_transition():
    model = step_model(0.1, 1.0)
    start = torch.tensor([[0.0, 5.0], [0.1, 6.0], [0.2, 7.0], [0.3, 8.0]])  # the last: terminal after one step
    rows = mbpo.branched_rollouts(model, torch.tensor([0, 2]), lambda o: torch.zeros(len(o), 1), start, 10,
                                  lambda s: s[..., 0] > 0.35)
    buffer = mbpo.TransitionBuffer(100, 2, 1, torch.device("cpu"))
    obs, act, rew, next_obs, terminated = buffer.split(rows)
    # rollouts from x = 0, 0.1, 0.2, 0.3 take 4, 3, 2, 1 steps to pass 0.35; then they stop
    assert len(rows) == 10 and terminated.sum() == 4
    assert (obs[:, 0] <= 0.35).all()  # no transition starts from a terminal state
    assert torch.allclose(next_obs - obs, torch.tensor([0.1, 0.0]).expand(10, 2), atol=1e-5)
    assert torch.allclose(rew, torch.ones(10), atol=1e-5)
    for y in (5.0, 6.0, 7.0, 8.0):  # each rollout ends with exactly one terminal transition
        mine = obs[:, 1] == y
        assert terminated[mine].sum() == 1 and terminated[mine][-1] == 1


def test_each_state_is_predicted_by_one_random_elite():
    model = mbpo.DynamicsEnsemble(1, 1, 4, 8, 1)
    with torch.no_grad():  # member e predicts s' = s + e, exactly
        for weight in model.weights:
            weight.zero_()
        model.biases[-1][:, 0, 0] = torch.arange(4.0)
        model.max_logvar.fill_(-40.0)
        model.min_logvar.fill_(-50.0)
    torch.manual_seed(0)
    next_obs, _ = model.sample_random_elite(torch.zeros(1001, 1), torch.zeros(1001, 1), torch.tensor([1, 3]))
    used = next_obs[:, 0].round()
    assert set(used.tolist()) == {1.0, 3.0}  # only elites
    assert abs((used == 1).float().mean() - 0.5) < 0.01  # half each (equal groups, one padded row)
    again, _ = model.sample_random_elite(torch.zeros(1001, 1), torch.zeros(1001, 1), torch.tensor([1, 3]))
    assert not torch.equal(again, next_obs)  # a fresh draw at every step
    for n in [1, 2, 3]:  # fewer states than elites (the last live rollouts): every state still gets one elite
        few, _ = model.sample_random_elite(torch.zeros(n, 1), torch.zeros(n, 1), torch.tensor([0, 1, 2, 3]))
        assert few.shape == (n, 1) and set(few[:, 0].round().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_transition_buffer_keeps_the_latest_rows_when_full_or_resized():
    buffer = mbpo.TransitionBuffer(5, 1, 1, torch.device("cpu"))
    buffer.add(torch.arange(3.0)[:, None].expand(3, 5))
    buffer.add(torch.arange(3.0, 7.0)[:, None].expand(4, 5))
    assert buffer.size == 5 and buffer.ordered()[:, 0].tolist() == [2, 3, 4, 5, 6]
    buffer.resize(3)
    assert buffer.ordered()[:, 0].tolist() == [4, 5, 6]
    buffer.resize(6)
    buffer.add(torch.full((1, 5), 7.0))
    assert buffer.ordered()[:, 0].tolist() == [4, 5, 6, 7]
    buffer.add(torch.arange(8.0, 11.0)[:, None].expand(3, 5))  # wraps: row i is no longer the i-th oldest
    assert buffer.rows[:, 0].tolist() == [10, 5, 6, 7, 8, 9]
    copy = mbpo.TransitionBuffer(1, 1, 1, torch.device("cpu"))
    copy.load_state_dict(buffer.state_dict())
    # batches draw rows by position, so a resumed buffer keeps every row where it was, and where the next goes
    assert copy.capacity == 6 and torch.equal(copy.rows, buffer.rows) and copy.next == buffer.next


def test_mixed_batches_take_the_real_ratio_from_real_data():
    real = mbpo.TransitionBuffer(100, 1, 1, torch.device("cpu"))
    model_data = mbpo.TransitionBuffer(100, 1, 1, torch.device("cpu"))
    real.add(torch.zeros(50, 5))
    model_data.add(torch.ones(80, 5))
    batches = mbpo.sample_batches(real, model_data, 7, 256, 0.05)
    assert batches.shape == (7, 256, 5)
    assert (batches[..., 0] == 0).sum(1).tolist() == [12] * 7  # int(256 * 0.05) real rows per batch


# ----------------------------------------------------------------------------------------------------
# SAC pieces
# ----------------------------------------------------------------------------------------------------
def test_actor_log_prob_is_that_of_the_squashed_gaussian_in_unit_action_space():
    torch.manual_seed(0)
    low, high = np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32)
    actor = mbpo.Actor(3, 2, 16, low, high)
    obs = torch.randn(500, 3)
    action, log_prob = actor(obs)
    assert (action > torch.as_tensor(low)).all() and (action < torch.as_tensor(high)).all()
    mean, log_std = actor.net(obs).chunk(2, dim=-1)
    scale, shift = torch.tensor([2.0, 0.5]), torch.tensor([0.0, 0.5])
    # the density of tanh(u) in [-1, 1]^d (softlearning's units, those of MBPO's target entropies), not of the
    # action in the env's bounds, which would add -sum log(scale)
    squashed = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.clamp(-20, 2).exp()), [torch.distributions.TanhTransform()])
    inside = (action - shift).abs() < 0.999 * scale  # atanh is ill-conditioned at the bounds
    expected = squashed.log_prob((action - shift) / scale)
    assert torch.allclose(log_prob[inside.all(-1)], expected.sum(-1)[inside.all(-1)], atol=1e-3)
    assert torch.allclose(actor.mean_action(obs), torch.tanh(mean) * scale + shift)


def test_networks_start_with_glorot_uniform_weights_per_matrix_as_softlearning():
    torch.manual_seed(0)
    critic, actor = mbpo.TwinCritic(11, 3, 256), mbpo.Actor(11, 3, 256, -np.ones(3), np.ones(3))
    matrices = [w[j] for w in critic.weights for j in range(2)] + [layer.weight.T for layer in actor.net[::2]]
    for weight in matrices:  # U(+-b), b = sqrt(6 / (fan_in + fan_out)): max |w| close to b, variance b^2 / 3
        bound = (6 / sum(weight.shape)) ** 0.5
        assert 0.95 * bound < weight.abs().max() <= bound
        assert abs(weight.var().item() / (bound**2 / 3) - 1) < 0.25
    assert all((layer.bias == 0).all() for layer in actor.net[::2])


def test_twin_critic_is_two_independent_mlps():
    critic = mbpo.TwinCritic(3, 2, 8)
    obs, act = torch.randn(6, 3), torch.randn(6, 2)
    out = critic(obs, act)
    for j in range(2):
        x = torch.cat([obs, act], -1)
        for i, (w, b) in enumerate(zip(critic.weights, critic.biases)):
            x = x @ w[j] + b[j]
            x = torch.relu(x) if i < 2 else x
        assert torch.allclose(out[j], x[:, 0], atol=1e-6)


def test_sac_update_bootstraps_only_non_terminal_transitions():
    torch.manual_seed(0)
    args = mbpo.with_env_defaults(mbpo.Args(env_id="Hopper-v5", sac_hidden_size=16))
    agent = mbpo.SAC(3, 1, -np.ones(1, np.float32), np.ones(1, np.float32), args, torch.device("cpu"))
    obs, act, next_obs = torch.randn(8, 3), torch.rand(8, 1) * 2 - 1, torch.randn(8, 3)
    rew, terminated = torch.randn(8), torch.tensor([1.0, 0.0] * 4)
    seen = {}
    original = agent.critic.forward

    def record(o, a, detach_params=False):
        q = original(o, a, detach_params)
        if not detach_params and o is obs:
            q.register_hook(lambda g: seen.setdefault("grad", g))
        return q

    agent.critic.forward = record
    torch.manual_seed(1)
    with torch.no_grad():
        next_act, next_log_prob = agent.actor(next_obs)
        alpha = agent.log_alpha.exp()
        bootstrap = agent.critic_target(next_obs, next_act).min(0).values - alpha * next_log_prob
        q = original(obs, act)
        _, log_prob = agent.actor(obs)  # the update's second draw, as here
    torch.manual_seed(1)
    logged = agent.update(obs, act, rew, next_obs, terminated)
    # dJ_Q/dQ_j = (Q_j - y) / B with y = r + gamma (1 - d) (min Q' - alpha log pi)
    target = rew + args.gamma * (1 - terminated) * bootstrap
    assert torch.allclose(seen["grad"], (q - target) / 8, atol=1e-5)
    assert not torch.allclose(rew, target)  # the non-terminal rows did bootstrap
    # the diagnostics it returns (losses/qf_values, losses/qf_target, losses/entropy): pre-update Q, y, -log pi
    assert torch.allclose(logged[4:], torch.stack([q.mean(), target.mean(), -log_prob.mean()]), atol=1e-5)


def test_evaluation_reports_the_discounted_return_beside_the_critics_estimate_at_the_first_state():
    # InvertedPendulum pays 1 per step; 4-step episodes with the pole near upright do not terminate early,
    # so the discounted return is exactly 1 + g + g^2 + g^3; critics with zero weights and biases 3 and 5
    # estimate min(3, 5) = 3 at any state
    env = gym.wrappers.TimeLimit(gym.make("InvertedPendulum-v5").unwrapped, max_episode_steps=4)
    args = mbpo.with_env_defaults(mbpo.Args(env_id="InvertedPendulum-v5", sac_hidden_size=8))
    agent = mbpo.SAC(4, 1, -3 * np.ones(1, np.float32), 3 * np.ones(1, np.float32), args, torch.device("cpu"))
    with torch.no_grad():
        for weight in agent.critic.weights:
            weight.zero_()
        agent.critic.biases[-1].copy_(torch.tensor([3.0, 5.0]).view(2, 1, 1))
    result = mbpo.evaluate(env, agent, episodes=2, seed=0, device=torch.device("cpu"))
    gamma = args.gamma
    assert result["eval/return"] == 4.0
    assert result["eval/discounted_return"] == pytest.approx(1 + gamma + gamma**2 + gamma**3)
    assert result["eval/q_start"] == pytest.approx(3.0)


# ----------------------------------------------------------------------------------------------------
# Per-env defaults (official MBPO config) and the command line
# ----------------------------------------------------------------------------------------------------
def test_env_id_picks_the_official_config_and_any_flag_overrides_it():
    hopper = mbpo.with_env_defaults(tyro.cli(mbpo.Args, args=["--env-id", "Hopper-v5"]))
    assert (hopper.updates_per_step, hopper.rollout_schedule, hopper.target_entropy) == (20, (20, 150, 1, 15), -1.0)
    assert (hopper.epoch_length, hopper.init_exploration_steps, hopper.model_train_freq, hopper.total_timesteps) == \
        (1000, 5000, 250, 125_000)
    cheetah = mbpo.with_env_defaults(mbpo.Args(env_id="HalfCheetah-v5"))
    assert (cheetah.updates_per_step, cheetah.rollout_schedule, cheetah.target_entropy) == (40, (20, 150, 1, 1), -3.0)
    humanoid = mbpo.with_env_defaults(mbpo.Args(env_id="Humanoid-v5"))
    assert (humanoid.model_hidden_size, humanoid.model_train_freq, humanoid.model_retain_epochs,
            humanoid.rollout_schedule) == (400, 1000, 5, (20, 300, 1, 25))
    pendulum = mbpo.with_env_defaults(mbpo.Args(env_id="InvertedPendulum-v5"))
    assert (pendulum.epoch_length, pendulum.init_exploration_steps, pendulum.updates_per_step,
            pendulum.target_entropy) == (250, 500, 10, -0.05)
    double = mbpo.with_env_defaults(mbpo.Args(env_id="InvertedDoublePendulum-v5"))
    assert (double.epoch_length, double.init_exploration_steps, double.updates_per_step, double.rollout_schedule,
            double.target_entropy) == (250, 500, 20, (1, 15, 1, 1), -0.5)
    override = mbpo.with_env_defaults(tyro.cli(mbpo.Args, args=["--env-id", "Hopper-v5", "--updates-per-step", "5",
                                                                "--rollout-schedule", "1", "2", "3", "4"]))
    assert (override.updates_per_step, override.rollout_schedule, override.target_entropy) == (5, (1, 2, 3, 4), -1.0)
    other = mbpo.with_env_defaults(mbpo.Args(env_id="Swimmer-v5"))
    assert other.target_entropy is None and other.updates_per_step == 20  # SAC then uses -(action dimensions)
    assert mbpo.make_env("Ant-v5").observation_space.shape == (27,)  # MBPO's truncated observations
    assert mbpo.make_env("Humanoid-v5").observation_space.shape == (45,)


# ----------------------------------------------------------------------------------------------------
# Smoke: logs, checkpoint, resume, determinism, bad input
# ----------------------------------------------------------------------------------------------------
def tiny(**overrides) -> mbpo.Args:
    base = dict(env_id="InvertedPendulum-v5", total_timesteps=200, init_exploration_steps=60, epoch_length=40,
                model_train_freq=20, updates_per_step=2, ensemble_size=3, num_elites=2, model_hidden_size=16,
                num_hidden_layers=2, model_max_epochs=3, rollout_batch_size=64, rollout_schedule=(0, 2, 1, 3),
                sac_hidden_size=32, batch_size=32, eval_episodes=1, checkpoint_every=1, seed=3, device="cpu")
    return mbpo.Args(**{**base, **overrides})


def test_smoke_run_writes_logs_checkpoint_and_resumes(in_tmp):
    first = mbpo.main(tiny())
    run_dir = first["run_dir"]
    events = run_events(run_dir, "mbrl_ensemble")
    assert first["global_step"] == 200
    assert {"charts/episodic_return", "charts/SPS", "eval/return", "model/holdout_mse", "model/rollout_length",
            "losses/model_loss", "losses/model_weight_decay", "losses/qf_loss", "losses/actor_loss", "losses/alpha",
            "losses/qf_values", "losses/qf_target", "losses/entropy", "eval/discounted_return", "eval/q_start",
            "time/sac_s"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("model/rollout_length")][-1] == 3  # epoch 3 > b = 2: k = y
    logged = [e.step for e in events.Scalars("eval/return")]
    resumed = mbpo.main(tiny(total_timesteps=260, resume=os.path.join(run_dir, "mbrl_ensemble.pt")))
    assert os.path.samefile(resumed["run_dir"], run_dir) and resumed["global_step"] == 260
    assert len(resumed["episodic_returns"]) > len(first["episodic_returns"])
    after = [e.step for e in run_events(run_dir, "mbrl_ensemble").Scalars("eval/return")]
    assert after[:len(logged)] == logged and after[-1] == 260  # the resume kept the checkpoint's own step
    no_budget = mbpo.main(tiny(total_timesteps=None, resume=os.path.join(run_dir, "mbrl_ensemble.pt")))
    assert no_budget["global_step"] == 260  # without --total-timesteps a resumed run keeps its own budget
    # a resume that took no step rewrote the checkpoint; it still resumes
    assert mbpo.main(tiny(total_timesteps=280, resume=os.path.join(run_dir, "mbrl_ensemble.pt")))["global_step"] == 280


def test_same_seed_same_returns_and_resume_equals_an_uninterrupted_run(in_tmp):
    straight = mbpo.main(tiny(total_timesteps=250))
    assert mbpo.main(tiny(total_timesteps=250))["episodic_returns"] == straight["episodic_returns"]
    # stop where the uninterrupted run ended an episode after training began, then resume to the same budget
    ends = np.cumsum(straight["episodic_lengths"])
    stop = int(ends[(ends > 100) & (ends < 230)][0])
    first = mbpo.main(tiny(total_timesteps=stop))
    resumed = mbpo.main(tiny(total_timesteps=250, resume=os.path.join(first["run_dir"], "mbrl_ensemble.pt")))
    assert resumed["episodic_returns"] == straight["episodic_returns"]
    assert resumed["eval_return"] == straight["eval_return"]
    assert mbpo.main(tiny(total_timesteps=250, seed=4))["episodic_returns"] != straight["episodic_returns"]


def test_model_rollouts_never_start_from_terminal_states_of_a_terminating_env(in_tmp):
    result = mbpo.main(tiny(env_id="Hopper-v5", total_timesteps=180, rollout_batch_size=500))
    ckpt = torch.load(os.path.join(result["run_dir"], "mbrl_ensemble.pt"), weights_only=False)
    real, model_rows = ckpt["real_data"]["rows"], ckpt["model_data"]["rows"]
    obs_dim = 11
    assert real[:, -1].sum() >= 3  # the random warm-up fell several times: D_env holds terminal states
    model_obs, model_terminated = model_rows[:, :obs_dim], model_rows[:, -1]
    assert model_terminated.sum() > 0  # some rollouts terminated ...
    assert not mbpo.hopper_terminated(model_obs).any()  # ... and none continued from (or began at) a terminal state
    assert torch.equal(model_terminated.bool(), mbpo.hopper_terminated(model_rows[:, -obs_dim - 1:-1]))


@pytest.mark.parametrize("overrides, message", [
    (dict(env_id="CartPole-v1"), "Discrete actions"),
    (dict(env_id="NoSuchEnv-v0"), "unknown environment"),
    (dict(real_ratio=1.5), "--real-ratio must be in"),
    (dict(real_ratio=-0.1), "--real-ratio must be in"),
    (dict(rollout_schedule=(150, 20, 1, 15)), "is not \\[a, b, x, y\\]"),
    (dict(rollout_schedule=(20, 150, 0, 15)), "is not \\[a, b, x, y\\]"),
    (dict(rollout_batch_size=0), "--rollout-batch-size must be positive"),
    (dict(num_elites=5), "cannot exceed --ensemble-size"),
    (dict(updates_per_step=-1), "--updates-per-step must be positive"),
    (dict(weight_decays=(1e-4,)), "--weight-decays needs 3 values"),
    (dict(device="tpu:x"), "is not a device"),
    (dict(init_exploration_steps=0), "the first model and SAC batch need data"),
    (dict(model_lr=float("nan")), "--model-lr must be a finite number, got nan"),
    (dict(learning_rate=float("inf")), "--learning-rate must be a finite number"),
    (dict(weight_decays=(1e-4, -1.0, 1e-4)), "--weight-decays must be >= 0"),
    (dict(max_holdout=-1), "--max-holdout must be >= 0"),
    (dict(capture_video=True, eval_episodes=0), "it needs --eval-episodes >= 1"),
    (dict(device="meta"), "runs on cpu or cuda"),
])
def test_bad_input_is_one_clear_error_before_anything_is_written(in_tmp, overrides, message):
    assert_refused_before_writing(mbpo, tiny(**overrides), message)


def test_checkpoints_of_other_scripts_versions_or_envs_are_refused(in_tmp):
    assert_foreign_checkpoints_are_refused(mbpo, tiny, dict(total_timesteps=70), dict(env_id="Hopper-v5"),
                                           "is a run on InvertedPendulum-v5", lacks="agent, model")


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="moviepy is an optional extra")
def test_capture_video_records_the_final_evaluation_episodes(in_tmp):
    run_dir = mbpo.main(tiny(total_timesteps=70, eval_episodes=2, capture_video=True, save_model=False))["run_dir"]
    videos = sorted(f for f in os.listdir(os.path.join(run_dir, "videos")) if f.endswith(".mp4"))
    assert videos == ["rl-video-episode-0.mp4", "rl-video-episode-1.mp4"]


# ----------------------------------------------------------------------------------------------------
# Learning, against the random policy measured in the same run
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sac_alone_learns_inverted_pendulum(in_tmp):
    # seen at 2000 steps (~80 s here): random 5.7, 3.3, 5.9 and eval 180, 1000, 114 for seeds 1, 2, 3; seed 1
    # 120 after the Glorot initialisation and [-1, 1]-unit entropy of commit aee2a5e
    result = mbpo.main(mbpo.Args(env_id="InvertedPendulum-v5", real_ratio=1.0, total_timesteps=2000,
                                 sac_hidden_size=64, eval_episodes=3, save_model=False))
    random_returns = result["episodic_returns"][:10]  # the 500 warm-up steps: uniform random actions
    assert np.mean(random_returns) < 30, random_returns
    assert result["eval_return"] > 10 * np.mean(random_returns), (result["eval_return"], random_returns)


@pytest.mark.slow
def test_mbpo_solves_inverted_pendulum_within_a_few_thousand_steps(in_tmp):
    # the official InvertedPendulum config (500 random steps, G = 10, epochs of 250 steps); seen: 1000 from 2250 on
    # (seed 1; the CPU sweep's 3 seeds from 2500 on, docs/mbrl_ensemble.md), but on 2026-11-27 seed 1 evaluated
    # 54.7 at 2500 steps and 1000 at 3000 (cause of the change not found), and after commit aee2a5e 132 at 2500
    # and 1000 at 2750 and 3000: 3000 steps, ~3-4 min here
    result = mbpo.main(mbpo.Args(env_id="InvertedPendulum-v5", total_timesteps=3000, eval_episodes=3,
                                 save_model=False))
    random_returns = result["episodic_returns"][:10]
    assert np.mean(random_returns) < 30, random_returns
    assert result["eval_return"] >= 900, result["eval_return"]  # max return 1000


@pytest.mark.slow
def test_mbpo_beats_random_on_hopper_at_a_small_budget(in_tmp):
    # 1000 random steps, then 2000 MBPO steps with a cheaper G, SAC width and model-epoch cap (~3 min on 2 cores);
    # seen: random 15 per episode, the last training episodes 200-260, eval 1035; after commit aee2a5e the last
    # three 123-135, eval 134
    result = mbpo.main(mbpo.Args(env_id="Hopper-v5", total_timesteps=3000, init_exploration_steps=1000,
                                 rollout_batch_size=20_000, updates_per_step=10, sac_hidden_size=64,
                                 model_max_epochs=20, eval_episodes=3, save_model=False))
    ends = np.cumsum(result["episodic_lengths"])
    returns = np.array(result["episodic_returns"])
    random_mean = returns[ends <= 1000].mean()
    assert random_mean < 30, random_mean
    assert returns[-3:].mean() > 5 * random_mean, (returns[-3:], random_mean)
    assert result["eval_return"] > 5 * random_mean, (result["eval_return"], random_mean)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_updates_equal_eager_updates():
    device = torch.device("cuda")
    buffer = mbpo.TransitionBuffer(1000, 3, 1, device)
    buffer.add(torch.randn(1000, 9, device=device))
    results = []
    for graph in (False, True):
        torch.manual_seed(0)
        args = mbpo.with_env_defaults(mbpo.Args(env_id="Hopper-v5", sac_hidden_size=32, cuda_graph=graph))
        agent = mbpo.SAC(3, 1, -np.ones(1, np.float32), np.ones(1, np.float32), args, device)
        torch.manual_seed(1)
        losses = torch.cat([agent.updates(mbpo.sample_batches(buffer, buffer, 5, 64, 0.05), buffer.split)
                            for _ in range(4)])  # warm-up + capture, then three replays
        results.append((losses, agent.actor.net[0].weight.detach().clone()))
    assert torch.allclose(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1])
