"""maml_rl.py: the meta-gradient against finite differences, the linear baseline, conjugate gradient and the
line search, per-task sampling and task rewards, smoke/resume/bad input, and learning on 2D navigation."""
import importlib.util
import os

import numpy as np
import pytest
import torch

import maml_rl as maml
from conftest import assert_foreign_checkpoints_are_refused, assert_refused_before_writing, run_events

CPU = torch.device("cpu")


def tiny(**overrides) -> maml.Args:
    base = dict(task="navigation2d", meta_iterations=3, meta_batch_size=4, fast_batch_size=4,
                horizon=10, hidden_sizes=(8,), eval_tasks=3, eval_every=2, checkpoint_every=1, seed=3, device="cpu")
    return maml.Args(**{**base, **overrides})


def random_batch(rng: torch.Generator, tasks: int, trajectories: int, horizon: int, obs_dim: int, act_dim: int,
                 dtype=torch.float64) -> dict:
    shape = (tasks, trajectories, horizon)
    batch = {"obs": torch.randn(*shape, obs_dim, generator=rng, dtype=dtype),
             "actions": torch.randn(*shape, act_dim, generator=rng, dtype=dtype),
             "advantages": torch.randn(*shape, generator=rng, dtype=dtype),
             "log_probs": -1.0 - torch.rand(*shape, generator=rng, dtype=dtype),  # of some older policy
             "means": torch.randn(*shape, act_dim, generator=rng, dtype=dtype) * 0.1,
             "masks": torch.ones(shape, dtype=dtype),
             "log_std": torch.zeros(tasks, act_dim, dtype=dtype)}
    batch["rewards"] = torch.zeros(shape, dtype=dtype)
    return batch


# ----------------------------------------------------------------------------------------------------
# The meta-gradient
# ----------------------------------------------------------------------------------------------------
def tiny_problem(inner_steps: int = 1):
    """A float64 policy and fixed trajectories: the meta-objective is a deterministic function of theta."""
    rng = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    policy = maml.GaussianMLPPolicy(3, 2, (5,), init_std=0.7).double()
    inner = [random_batch(rng, 2, 3, 4, 3, 2) for _ in range(inner_steps)]
    return policy, inner, random_batch(rng, 2, 3, 4, 3, 2)


def test_steps_after_a_trajectory_ended_change_no_loss_advantage_or_kl():
    # navigation2d's trajectories stop at the goal and keep their slot, masked: whatever the masked steps hold
    # must not reach the inner loss, the advantages, the adapted parameters or the meta-objective and its KL
    policy, (inner,), outer = tiny_problem()
    for batch in (inner, outer):
        batch["masks"][0, 1, 2:] = 0  # task 0, trajectory 1 ended after 2 of its 4 steps
        batch["masks"][1, 0, 1:] = 0
        batch["rewards"] = torch.rand(batch["masks"].shape, generator=torch.Generator().manual_seed(1),
                                      dtype=torch.float64) * batch["masks"]
    args = maml.Args(inner_lr=0.5)

    def everything(inner: dict, outer: dict):
        inner = {**inner, "advantages": maml.compute_advantages(inner, 0.99, 1.0, 1e-5)}
        params = {k: p.detach() for k, p in policy.named_parameters()}
        loss = maml.inner_loss(policy, maml.per_task(params, 2), inner)
        return [loss, inner["advantages"], *maml.meta_objective(policy, [inner], outer, args, differentiable=False)]

    before = everything(inner, outer)
    junk = torch.Generator().manual_seed(2)
    scrambled = []
    for batch in (inner, outer):
        ended = batch["masks"] == 0
        batch = dict(batch)
        for key in ("obs", "actions", "means", "advantages", "log_probs"):
            noise = 100 * torch.randn(batch[key].shape, generator=junk, dtype=batch[key].dtype)
            mask = ended if batch[key].dim() == ended.dim() else ended[..., None]
            batch[key] = torch.where(mask, noise, batch[key])
        scrambled.append(batch)
    for a, b in zip(before, everything(*scrambled)):
        torch.testing.assert_close(a, b)


def finite_differences(f, theta: torch.Tensor, params: list, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of f() (a tensor) in each coordinate of the parameter vector theta."""
    columns = []
    for k in range(len(theta)):
        values = []
        for sign in [1, -1]:
            shifted = theta.clone()
            shifted[k] += sign * eps
            torch.nn.utils.vector_to_parameters(shifted, params)
            values.append(f().detach())
        columns.append((values[0] - values[1]) / (2 * eps))
    torch.nn.utils.vector_to_parameters(theta, params)
    return torch.stack(columns, -1)


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_meta_gradient_matches_finite_differences_and_first_order_drops_the_hessian_term(inner_steps):
    # J(theta) = post-adaptation surrogate of theta'_i = theta - alpha grad L_i(theta) (one or two steps) on
    # fixed trajectories: a deterministic function of theta, so its finite differences are the meta-gradient
    policy, inner, outer = tiny_problem(inner_steps)
    params = list(policy.parameters())
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()

    def objective(first_order: bool, differentiable: bool = True) -> torch.Tensor:
        return maml.meta_objective(policy, inner, outer, maml.Args(inner_lr=0.5, first_order=first_order),
                                   differentiable)[0]

    def gradient(first_order: bool) -> torch.Tensor:
        return torch.nn.utils.parameters_to_vector(torch.autograd.grad(objective(first_order), params))

    expected = finite_differences(lambda: objective(False, differentiable=False), theta, params)
    torch.testing.assert_close(gradient(False), expected, rtol=1e-6, atol=1e-8)
    # FOMAML: (I - alpha H) replaced by I, i.e. the outer loss's gradient at theta'_i, summed over tasks --
    # a different vector here
    first_order = gradient(True)
    assert (first_order - expected).norm() > 0.05 * expected.norm()
    adapted = {k: v.requires_grad_() for k, v in maml.adapted_params(policy, inner, maml.Args(inner_lr=0.5),
                                                                      differentiable=False).items()}
    mean, log_std = maml.policy_forward(policy, adapted, outer["obs"].flatten(1, 2))
    log_probs = maml.gaussian_log_prob(mean, log_std, outer["actions"].flatten(1, 2))
    ratio = torch.exp(log_probs - outer["log_probs"].flatten(1))
    at_adapted = torch.autograd.grad(-(ratio * outer["advantages"].flatten(1)).mean(), list(adapted.values()))
    torch.testing.assert_close(first_order, torch.cat([g.sum(0).flatten() for g in at_adapted]))


def test_kl_hessian_vector_product_through_the_adaptation_matches_finite_differences():
    # F v must be the derivative of grad_theta KL(pi_old || pi_theta'(theta)) along v, adaptation included
    policy, inner, outer = tiny_problem()
    params = list(policy.parameters())
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    args = maml.Args(inner_lr=0.5)

    def kl_gradient():
        kl = maml.meta_objective(policy, inner, outer, args)[1]
        return torch.nn.utils.parameters_to_vector(torch.autograd.grad(kl, params))

    v = torch.randn(len(theta), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    product = maml.kl_hessian_vector_product(maml.meta_objective(policy, inner, outer, args)[1], params, 0.0)
    hessian = finite_differences(kl_gradient, theta, params)
    torch.testing.assert_close(product(v), hessian @ v, rtol=1e-5, atol=1e-8)
    damped = maml.kl_hessian_vector_product(maml.meta_objective(policy, inner, outer, args)[1], params, 0.1)
    torch.testing.assert_close(damped(v), hessian @ v + 0.1 * v, rtol=1e-5, atol=1e-8)


def test_gaussian_kl_and_log_prob_match_torch_distributions():
    rng = torch.Generator().manual_seed(6)
    mean_p, mean_q, actions = (torch.randn(2, 4, 3, generator=rng, dtype=torch.float64) for _ in range(3))
    log_std_p, log_std_q = (torch.randn(2, 3, generator=rng, dtype=torch.float64) * 0.5 for _ in range(2))
    p = torch.distributions.Normal(mean_p, log_std_p.exp()[:, None])
    q = torch.distributions.Normal(mean_q, log_std_q.exp()[:, None])
    torch.testing.assert_close(maml.gaussian_kl(mean_p, log_std_p, mean_q, log_std_q),
                               torch.distributions.kl_divergence(p, q).sum(-1))
    torch.testing.assert_close(maml.gaussian_log_prob(mean_p, log_std_p, actions), p.log_prob(actions).sum(-1))


def test_inner_adapt_takes_each_tasks_own_gradient_step():
    # all tasks in one call must equal one task at a time
    rng = torch.Generator().manual_seed(1)
    policy = maml.GaussianMLPPolicy(3, 2, (5,), init_std=1.0).double()
    batch = random_batch(rng, 3, 2, 4, 3, 2)
    together = maml.inner_adapt(policy, maml.per_task(dict(policy.named_parameters()), 3), batch, 0.1, False)
    for i in range(3):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        alone = maml.inner_adapt(policy, maml.per_task(dict(policy.named_parameters()), 1), one, 0.1, False)
        for name in together:
            torch.testing.assert_close(together[name][i], alone[name][0])
    assert not torch.allclose(together["mean.0.weight"][0], together["mean.0.weight"][1])


# ----------------------------------------------------------------------------------------------------
# Baseline, conjugate gradient, line search, the TRPO step
# ----------------------------------------------------------------------------------------------------
def test_linear_feature_baseline_recovers_a_linear_value_function():
    rng = torch.Generator().manual_seed(2)
    obs = torch.rand(2, 5, 30, 3, generator=rng, dtype=torch.float64) * 4 - 2
    features = maml.baseline_features(obs)
    assert features.shape == (2, 5, 30, 3 + 3 + 4)
    torch.testing.assert_close(features[0, 0, 7], torch.cat([obs[0, 0, 7], obs[0, 0, 7] ** 2, torch.tensor(
        [0.07, 0.07 ** 2, 0.07 ** 3, 1.0], dtype=torch.float64)]))
    true_weights = torch.randn(2, 10, generator=rng, dtype=torch.float64)  # one value function per task
    values = (features @ true_weights[:, None, :, None])[..., 0]
    # the cubic time feature is nearly collinear with the others over 30 steps: agreement to 1e-4, not 1e-7
    torch.testing.assert_close(maml.fit_linear_baseline(features, values, reg=1e-10), true_weights, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("lam", [1.0, 0.0])
@pytest.mark.parametrize("ended_early", [False, True])
def test_advantages_use_each_tasks_own_baseline_and_are_normalised_per_task(lam, ended_early):
    # by hand with numpy, trajectory by trajectory over its own length L: per task, b = X w with w the ridge
    # fit of X to the discounted returns G over all its steps; lambda = 1: A = G - b (rllab), lambda = 0:
    # A = r_t + gamma b_{t+1} - b_t (b = 0 after the last step); then A is normalised to mean 0, std 1 over the
    # task's steps; steps after a trajectory's end (masked) get 0 and count nowhere
    rng = np.random.default_rng(4)
    obs, rewards, gamma = rng.normal(size=(2, 3, 5, 2)), rng.normal(size=(2, 3, 5)), 0.9
    lengths = np.array([[5, 2, 4], [3, 5, 1]]) if ended_early else np.full((2, 3), 5)
    masks = (np.arange(5) < lengths[..., None]).astype(float)
    batch = {"obs": torch.tensor(obs), "rewards": torch.tensor(rewards * masks), "masks": torch.tensor(masks)}
    advantages = maml.compute_advantages(batch, gamma=gamma, lam=lam, reg=1e-5).numpy()
    for task in range(2):
        rows, returns, trajectories = [], [], []
        for n, length in enumerate(lengths[task]):
            o, r, t = obs[task, n, :length], rewards[task, n, :length], np.arange(length)[:, None] / 100
            rows.append(np.concatenate([o, o ** 2, t, t ** 2, t ** 3, np.ones_like(t)], -1))
            returns.append([sum(gamma ** k * r[s + k] for k in range(length - s)) for s in range(length)])
        x, y = np.concatenate(rows), np.concatenate(returns)
        w = np.linalg.solve(x.T @ x + 1e-5 * np.eye(8), x.T @ y)
        for n, length in enumerate(lengths[task]):
            b = rows[n] @ w
            if lam == 1.0:
                trajectories.append(np.array(returns[n]) - b)
            else:
                trajectories.append(rewards[task, n, :length] + gamma * np.append(b[1:], 0.0) - b)
        flat = np.concatenate(trajectories)
        for n, length in enumerate(lengths[task]):
            expected = (trajectories[n] - flat.mean()) / (flat.std() + 1e-8)  # population std, as rllab
            np.testing.assert_allclose(advantages[task, n, :length], expected, rtol=1e-6, atol=1e-8)
            assert not advantages[task, n, length:].any()


def test_conjugate_gradient_solves_a_known_spd_system():
    rng = torch.Generator().manual_seed(3)
    m = torch.randn(6, 6, generator=rng, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(maml.conjugate_gradient(lambda v: a @ v, b, iters=10), torch.linalg.solve(a, b))
    assert (maml.conjugate_gradient(lambda v: a @ v, b, iters=2) - torch.linalg.solve(a, b)).norm() > 1e-3


def test_line_search_rejects_steps_that_violate_the_kl_bound_or_do_not_improve():
    # loss falls along the step, KL = |x|^2 / 2: the full step (KL 0.02) breaks max_kl 0.01, 0.8 of it
    # (0.0128) too, 0.64 of it (0.0082) is the first that passes
    tried = []

    def evaluate(x):
        tried.append(x.clone())
        return -x.sum().item(), 0.5 * x.square().sum().item()

    theta, step = torch.zeros(2, dtype=torch.float64), torch.tensor([0.2, 0.0], dtype=torch.float64)
    new, steps, loss, kl = maml.line_search(evaluate, theta, step, loss_before=0.0, max_kl=0.01, backtrack_ratio=0.8,
                                            max_steps=15)
    torch.testing.assert_close(new, 0.64 * step)
    assert steps == 3 and len(tried) == 3 and loss == pytest.approx(-0.128) and kl == pytest.approx(0.008192)
    # a step that never improves the loss is rejected whatever its KL: theta stays
    new, steps, loss, kl = maml.line_search(lambda x: (1.0, 0.0), theta, step, 0.0, 0.01, 0.8, 15)
    assert new is theta and steps == 15 and loss == 0.0


def navigation_meta_batch(max_kl: float = 0.01):
    torch.manual_seed(0)
    args = maml.with_task_defaults(tiny(meta_batch_size=6, fast_batch_size=5, max_kl=max_kl))
    tasks = maml.make_tasks(args, 30)
    policy = maml.GaussianMLPPolicy(2, 2, (16,), 1.0)
    rng = np.random.default_rng(0)
    inner, outer = maml.sample_meta_batch(policy, tasks, tasks.sample_tasks(6, rng), args, CPU, rng)
    return args, policy, inner, outer


def test_trpo_meta_update_improves_the_surrogate_inside_the_trust_region():
    args, policy, inner, outer = navigation_meta_batch()
    # at the sampling parameters theta'_i(theta) reproduces the policies that sampled: ratio 1, KL 0
    adapted = maml.adapted_params(policy, inner, args, differentiable=False)
    mean, log_std = maml.policy_forward(policy, adapted, outer["obs"].flatten(1, 2))
    log_probs = maml.gaussian_log_prob(mean, log_std, outer["actions"].flatten(1, 2))
    torch.testing.assert_close(log_probs, outer["log_probs"].flatten(1), atol=1e-4, rtol=1e-5)
    surrogate, kl = maml.meta_objective(policy, inner, outer, args)
    assert abs(kl.item()) < 1e-6
    before = torch.nn.utils.parameters_to_vector(policy.parameters()).detach().clone()
    stats = maml.trpo_meta_update(policy, inner, outer, args)
    after, kl_after = maml.meta_objective(policy, inner, outer, args, differentiable=False)
    assert stats["losses/step_accepted"] == 1.0
    assert after.item() < surrogate.item() and 0 < kl_after.item() <= args.max_kl
    assert stats["losses/kl"] == pytest.approx(kl_after.item(), rel=1e-4)
    assert not torch.equal(torch.nn.utils.parameters_to_vector(policy.parameters()), before)


def test_full_step_meets_the_quadratic_trust_region_and_a_rejected_update_restores_theta(monkeypatch):
    # the full step s must satisfy 1/2 s^T F s = max_kl with F the KL's Hessian through the adaptation --
    # checked with F s from finite differences of grad KL along s (float64, smooth: random observations keep
    # ReLUs off their kinks; navigation's (0, 0) start with zero biases sits on them); a Fisher product of the
    # wrong matrix (e.g. F = I) or a step off by sqrt(2) fails. The line search below rejects every step.
    policy, inner, outer = tiny_problem()
    args = maml.Args(inner_lr=0.5, max_kl=0.01, cg_damping=0.0)
    params = list(policy.parameters())
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    steps = []

    def reject_all(evaluate, theta, full_step, loss_before, max_kl, backtrack_ratio, max_steps):
        steps.append(full_step)
        evaluate(theta + full_step)  # moves the policy's parameters
        return theta, max_steps, loss_before, 0.0

    monkeypatch.setattr(maml, "line_search", reject_all)
    stats = maml.trpo_meta_update(policy, inner, outer, args)
    assert stats["losses/step_accepted"] == 0.0
    assert torch.equal(torch.nn.utils.parameters_to_vector(policy.parameters()), theta)

    def kl_gradient_at(x):
        torch.nn.utils.vector_to_parameters(x, params)
        kl = maml.meta_objective(policy, inner, outer, args)[1]
        return torch.nn.utils.parameters_to_vector(torch.autograd.grad(kl, params))

    s, eps = steps[0], 1e-6
    fisher_s = (kl_gradient_at(theta + eps * s) - kl_gradient_at(theta - eps * s)) / (2 * eps)
    assert 0.5 * s @ fisher_s == pytest.approx(args.max_kl, rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# Sampling and tasks
# ----------------------------------------------------------------------------------------------------
def test_each_task_samples_with_its_own_parameters_and_a_trajectory_ends_at_the_goal():
    # two tasks x three trajectories; task 0's policy says (+1, +1), task 1's (-1, -1) in [-1, 1] units: with
    # the mean action the point moves by 0.1 per step along the diagonal of its task; task 0's goal (0.3, 0.3)
    # is reached at the third step, which ends its trajectories there
    args = maml.with_task_defaults(tiny())
    tasks = maml.make_tasks(args, 6)
    policy = maml.GaussianMLPPolicy(2, 2, (4,), 1.0)
    params = {k: torch.zeros(2, *p.shape) for k, p in policy.named_parameters()}
    params["mean.2.bias"] = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    goals = np.array([[0.3, 0.3], [0.2, -0.1]])
    batch = maml.sample_trajectories(policy, params, tasks, goals, 3, 5, CPU, greedy=True)
    assert batch["obs"].shape == (2, 3, 5, 2) and batch["rewards"].shape == (2, 3, 5)
    steps = torch.arange(5, dtype=torch.float32)[:, None] * 0.1  # the observation before step t
    torch.testing.assert_close(batch["obs"][0, 2], steps.expand(5, 2))
    torch.testing.assert_close(batch["obs"][1, 0], -steps.expand(5, 2))
    after = torch.tensor([1.0, -1.0])[:, None, None, None] * (steps + 0.1)  # the position after step t
    distance = (after.expand(2, 3, 5, 2) - torch.tensor(goals, dtype=torch.float32)[:, None, None]).norm(dim=-1)
    masks = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])[:, None].expand(2, 3, 5)
    torch.testing.assert_close(batch["masks"], masks)
    torch.testing.assert_close(batch["rewards"], -distance * masks)


@pytest.mark.parametrize("family", ["HalfCheetahVel", "HalfCheetahDir", "AntVel", "AntDir"])
def test_mujoco_task_reward_uses_the_velocity_from_positions(family):
    args = maml.with_task_defaults(tiny(task=family))
    tasks = maml.make_tasks(args, 2)
    task = np.array([0.5, 2.0]) if family.endswith("Vel") else np.array([1.0, -1.0])
    tasks.set_tasks(task[:, None])
    tasks.reset(seed=[0, 1])
    rng = np.random.default_rng(0)
    envs = [env.unwrapped for env in tasks.envs.envs]
    # the x position gymnasium differentiates: HalfCheetah's root joint, Ant's torso (its xpos lags a substep)
    x = (lambda: np.array([env.data.qpos[0] for env in envs])) if family.startswith("HalfCheetah") else (
        lambda: np.array([env.data.body("torso").xpos[0] for env in envs]))
    for _ in range(3):
        x_before = x()
        actions = rng.uniform(-1.5, 1.5, (2, tasks.action_space.shape[0]))  # beyond the bounds: clipped
        _, rewards, terminated = tasks.step(actions)
        assert not terminated.any()  # Ant included: it never terminates
        velocity = (x() - x_before) / envs[0].dt
        control = np.square(np.clip(actions, -1, 1)).sum(-1)
        forward = -np.abs(velocity - task) if family.endswith("Vel") else task * velocity
        if family.startswith("HalfCheetah"):  # r = -|v_x - v*| or d v_x, - 0.05 |a|^2
            expected = forward - 0.05 * control
        else:  # rllab's ant: (1 - |v_x - v*| or d v_x) - 0.005 |a|^2 - contact cost + 0.05, also when unhealthy
            contact = np.array([5e-4 * np.square(np.clip(env.data.cfrc_ext, -1, 1)).sum() for env in envs])
            expected = forward + family.endswith("Vel") - 0.005 * control - contact + 0.05
        np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-5)
    tasks.envs.close()


@pytest.mark.parametrize("family, low, high, values", [
    ("navigation2d", -0.5, 0.5, None), ("HalfCheetahVel", 0.0, 2.0, None), ("AntVel", 0.0, 3.0, None),
    ("HalfCheetahDir", -1, 1, {-1.0, 1.0}), ("AntDir", -1, 1, {-1.0, 1.0})])
def test_task_distributions(family, low, high, values):
    tasks = maml.make_tasks(maml.with_task_defaults(tiny(task=family)), 1)
    params = tasks.sample_tasks(2000, np.random.default_rng(0))
    assert params.min() >= low and params.max() <= high
    assert params.min() < low + 0.05 and params.max() > high - 0.05  # the whole range, not a corner of it
    if values is not None:
        assert set(params.ravel()) == values and abs(params.mean()) < 0.1


def test_meta_test_adapts_with_alpha_then_half_alpha_on_fresh_trajectories(monkeypatch):
    args = maml.with_task_defaults(tiny(eval_trajectories=6, eval_tasks=2))
    tasks = maml.make_tasks(args, 12)
    policy = maml.GaussianMLPPolicy(2, 2, (8,), 1.0)
    calls, sampled = [], []
    real_adapt, real_sample = maml.inner_adapt, maml.sample_trajectories
    monkeypatch.setattr(maml, "inner_adapt", lambda *a, **k: calls.append(a[3]) or real_adapt(*a, **k))
    monkeypatch.setattr(maml, "sample_trajectories", lambda *a, **k: sampled.append(a[4]) or real_sample(*a, **k))
    metrics = maml.meta_test(policy, tasks, tasks.sample_tasks(2, np.random.default_rng(0)), args, CPU)
    assert calls == [0.5, 0.25, 0.25] and sampled == [6, 6, 6, 6]
    assert sorted(metrics) == [f"meta/return_step_{k}" for k in range(4)]


# ----------------------------------------------------------------------------------------------------
# Smoke: logs, checkpoint, resume, bad input
# ----------------------------------------------------------------------------------------------------
def test_smoke_run_writes_logs_checkpoint_and_resume_equals_an_uninterrupted_run(in_tmp):
    straight = maml.main(tiny())
    events = run_events(straight["run_dir"], "maml_rl")
    assert straight["iterations"] == 3 and 0 < straight["global_step"] <= 960  # <= 4 tasks x 4 x 10 steps x 2 x 3
    assert {"meta/pre_adapt_return", "meta/post_adapt_return", "charts/SPS", "losses/kl", "losses/surrogate_after",
            "meta/return_step_0", "meta/return_step_3", "eval/return", "time/sampling_s",
            "time/meta_update_s"} <= set(events.Tags()["scalars"])
    first = maml.main(tiny(meta_iterations=1))
    checkpoint = os.path.join(first["run_dir"], "maml_rl.pt")
    assert maml.main(tiny(meta_iterations=None, resume=checkpoint))["iterations"] == 1  # its own budget
    resumed = maml.main(tiny(meta_iterations=3, resume=checkpoint))
    assert os.path.samefile(resumed["run_dir"], first["run_dir"]) and resumed["iterations"] == 3
    assert resumed["history"] == straight["history"][1:]
    assert resumed["meta/return_step_1"] == straight["meta/return_step_1"]
    events = run_events(resumed["run_dir"], "maml_rl")  # one curve: no step lost or doubled at the resume
    steps = [h["step"] for h in straight["history"]]
    assert [e.step for e in events.Scalars("meta/post_adapt_return")] == steps
    assert [e.step for e in events.Scalars("meta/return_step_0")] == steps  # steps[0]: the first run's end
    # an env-step budget instead of meta-iterations
    assert maml.main(tiny(meta_iterations=None, total_timesteps=steps[1]))["iterations"] == 2
    assert maml.main(tiny(seed=4))["history"] != straight["history"]


@pytest.mark.parametrize("task", ["HalfCheetahVel", "HalfCheetahDir", "AntVel", "AntDir"])
def test_every_mujoco_task_family_runs(in_tmp, task):
    result = maml.main(tiny(task=task, total_timesteps=40, meta_batch_size=2, fast_batch_size=2, horizon=5,
                            eval_tasks=2, eval_grad_steps=1, save_model=False))
    assert result["global_step"] == 40 and np.isfinite(result["meta/return_step_1"])


@pytest.mark.parametrize("overrides, logged, absent", [
    (dict(num_inner_steps=2, eval_grad_steps=1), {"meta/return_step_1", "eval/return"}, {"meta/return_step_2"}),
    (dict(eval_grad_steps=0), {"meta/return_step_0", "eval/return"}, {"meta/return_step_1"}),
    (dict(eval_tasks=0), {"meta/post_adapt_return"}, {"meta/return_step_0", "eval/return"}),
])
def test_other_inner_steps_and_meta_test_settings_run(in_tmp, overrides, logged, absent):
    result = maml.main(tiny(meta_iterations=1, **overrides))
    tags = set(run_events(result["run_dir"], "maml_rl").Tags()["scalars"])
    assert logged <= tags and not absent & tags
    assert result["global_step"] == 4 * 4 * 10 * (overrides.get("num_inner_steps", 1) + 1)


@pytest.mark.parametrize("overrides, message", [
    (dict(task="Walker"), "unknown --task Walker; use one of navigation2d, HalfCheetahVel"),
    (dict(task="CarRacing-v3"), "--task CarRacing-v3 is a single environment"),  # made or not (Box2D is optional)
    (dict(task="CartPole-v1"), "--task CartPole-v1 has discrete actions"),
    (dict(task="Hopper-v5"), "--task Hopper-v5 is a single environment, not a task family"),
    (dict(inner_lr=0.0), "--inner-lr must be > 0, got 0.0"),
    (dict(inner_lr=-0.1), "--inner-lr must be > 0"),
    (dict(inner_lr=float("nan")), "--inner-lr must be a finite number, got nan"),
    (dict(device="meta"), "runs on cpu or cuda"),
    (dict(seed=-1), "--seed must be in"),
    (dict(init_std=1e-7), "--init-std must be > 1e-6"),
    (dict(hidden_sizes=(32, 0)), "--hidden-sizes must be layer widths >= 1"),
    (dict(meta_batch_size=0), "--meta-batch-size must be at least 1, got 0"),
    (dict(meta_iterations=0), "--meta-iterations must be at least 1, got 0"),
    (dict(ls_backtrack_ratio=1.0), "--ls-backtrack-ratio must be in"),
    (dict(hidden_sizes=()), "--hidden-sizes needs at least one layer"),
    (dict(baseline_reg=0.0), "--baseline-reg must be > 0"),
    (dict(capture_video=True), "--capture-video records MuJoCo tasks"),
    (dict(device="cuda:7" if not torch.cuda.is_available() else "nonsense"), "--device"),
])
def test_bad_input_is_one_clear_error_before_anything_is_written(in_tmp, overrides, message):
    assert_refused_before_writing(maml, tiny(**overrides), message)


def test_checkpoints_of_other_scripts_versions_or_tasks_are_refused(in_tmp):
    assert_foreign_checkpoints_are_refused(maml, tiny, dict(meta_iterations=1), dict(task="HalfCheetahVel"),
                                           "is a run on --task navigation2d", lacks="policy, global_step")


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="moviepy is an optional extra")
def test_capture_video_records_the_policy_before_and_after_adaptation(in_tmp):
    run_dir = maml.main(tiny(task="HalfCheetahVel", total_timesteps=40, meta_batch_size=2, fast_batch_size=2,
                             horizon=5, eval_tasks=2, capture_video=True))["run_dir"]
    assert sorted(os.listdir(os.path.join(run_dir, "videos"))) == ["after_adaptation.mp4", "before_adaptation.mp4"]


# ----------------------------------------------------------------------------------------------------
# Learning
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_navigation_one_step_adapts_the_meta_learned_policy_better_than_a_random_one(in_tmp):
    # a smaller navigation2d than the paper's (20 tasks x 10 trajectories, 32 x 32 policy, 15 meta-iterations)
    args = tiny(meta_iterations=15, meta_batch_size=20, fast_batch_size=10, horizon=None,
                hidden_sizes=(32, 32), eval_tasks=40, eval_every=1000, save_model=False, seed=1)
    result = maml.main(args)
    full = maml.with_task_defaults(args)
    tasks = maml.make_tasks(full, full.eval_tasks * full.eval_trajectories)
    torch.manual_seed(123)
    untrained = maml.GaussianMLPPolicy(2, 2, full.hidden_sizes, full.init_std)
    random_init = maml.meta_test(untrained, tasks, result["eval_task_params"], full, CPU)
    learned = {k: result[k] for k in random_init}
    print(f"meta-learned {learned}\nrandom init {random_init}")
    # seen (seed 1): meta-learned -41.6 before, -13.3 after one step; random initialisation -86.6, -61.7. A
    # step that does not adapt (zero or wrong-signed inner gradient) ends at or below its start; an
    # initialisation that was not meta-learned adapts from far worse
    assert learned["meta/return_step_1"] > learned["meta/return_step_0"] + 10
    assert learned["meta/return_step_1"] > random_init["meta/return_step_1"] + 10
