"""rl2_recurrent.py: the trial structure (hidden state, inputs, advantages), the bandit evaluator against the
paper's table, smoke/resume/bad input, and learning on bandits and 2D navigation."""
import importlib.util
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import rl2_recurrent as rl2
from conftest import assert_foreign_checkpoints_are_refused, assert_refused_before_writing, run_events

CPU = torch.device("cpu")


def tiny(**overrides) -> rl2.Args:
    base = dict(task="bandit", total_timesteps=400, num_trials=8, num_minibatches=2, hidden_size=16,
                update_epochs=2, eval_tasks=5, eval_every=2, checkpoint_every=1, seed=3, device="cpu")
    return rl2.Args(**{**base, **overrides})


# ----------------------------------------------------------------------------------------------------
# Trials: the hidden state carries across episodes and is reset between trials; GAE crosses episodes
# ----------------------------------------------------------------------------------------------------
def test_hidden_state_is_carried_across_episodes_and_reset_between_trials():
    torch.manual_seed(0)
    args = rl2.with_task_defaults(rl2.Args(task="navigation2d", episode_length=5, episodes_per_trial=3))
    tasks = rl2.make_tasks(args, 4)
    policy = rl2.RecurrentPolicy(tasks.obs_dim, tasks.action_space, 8)
    params = tasks.sample_tasks(4, np.random.default_rng(0))
    first = rl2.run_trials(policy, tasks, params, 3, 5, CPU)
    second = rl2.run_trials(policy, tasks, params, 3, 5, CPU)
    for trial in [first, second]:
        hiddens, inputs = trial["hiddens"], trial["inputs"]  # hidden state *before* each step, its GRU input
        assert torch.equal(hiddens[0], torch.zeros_like(hiddens[0]))  # a trial starts from zero
        assert torch.equal(inputs[0, :, 2:], torch.zeros_like(inputs[0, :, 2:]))  # no previous a, r, d
        # the first step of episodes 2 and 3 continues from the GRU state after the episode before
        _, after_episode_1 = policy(inputs[:5], torch.zeros(1, 4, 8))
        _, after_episode_2 = policy(inputs[:10], torch.zeros(1, 4, 8))
        torch.testing.assert_close(hiddens[5], after_episode_1[0])
        torch.testing.assert_close(hiddens[10], after_episode_2[0])
        assert hiddens[5].abs().min() > 0
        # the done flag (last input) is 1 exactly after an episode's last step; the observation restarts at 0
        assert inputs[:, :, -1].mean(1).tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
        assert torch.equal(inputs[5, :, :2], torch.zeros(4, 2))
    ablation = rl2.run_trials(policy, tasks, params, 3, 5, CPU, reset_hidden_each_episode=True)
    assert torch.equal(ablation["hiddens"][5], torch.zeros(4, 8))
    assert torch.equal(ablation["inputs"][5, :, 2:], torch.zeros(4, 4))  # and no previous a, r, d either


@pytest.mark.parametrize("task", ["navigation2d", "bandit"])
def test_replaying_a_trial_from_zero_gives_the_sampled_log_probs(task):
    # PPO's ratio is exactly 1 before the first update: sampling and the update see the same policy
    torch.manual_seed(0)
    args = rl2.with_task_defaults(rl2.Args(task=task, episode_length=5 if task == "navigation2d" else None))
    tasks = rl2.make_tasks(args, 6)
    policy = rl2.RecurrentPolicy(tasks.obs_dim, tasks.action_space, 8)
    trial = rl2.run_trials(policy, tasks, tasks.sample_tasks(6, np.random.default_rng(0)), args.episodes_per_trial,
                           args.episode_length, CPU)
    with torch.no_grad():
        out, _ = policy(trial["inputs"], policy.initial_hidden(6, CPU))
        replayed = policy.log_prob(policy.distribution(out), trial["actions"])
    torch.testing.assert_close(replayed, trial["log_probs"])
    assert trial["log_probs"].std() > 0


def test_advantages_run_across_episode_boundaries_but_stop_at_the_trial_end():
    # one trial of two 2-step episodes; gamma 0.9, lambda 0.8 (gamma * lambda = 0.72), by hand:
    # delta_3 = 1 - 0.4 = 0.6                (trial end: V_4 = 0)
    # delta_2 = 2 + 0.9 * 0.4 - 0.2 = 2.16
    # delta_1 = 0 + 0.9 * 0.2 - 1.0 = -0.82  (episode 1's last step bootstraps from episode 2's first value)
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4
    rewards = torch.tensor([[1.0], [0.0], [2.0], [1.0]])
    values = torch.tensor([[0.5], [1.0], [0.2], [0.4]])
    a3 = 0.6
    a2 = 2.16 + 0.72 * a3
    a1 = -0.82 + 0.72 * a2
    a0 = 1.4 + 0.72 * a1
    advantages = rl2.trial_advantages(rewards, values, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([a0, a1, a2, a3]))


def test_running_statistics_equal_those_of_all_batches_at_once():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 5.0, (n, 4)) for n in [7, 100, 1]]
    stats = rl2.RunningMeanStd((4,))
    for batch in batches:
        stats.update(torch.tensor(batch, dtype=torch.float32))
    everything = np.concatenate(batches)
    np.testing.assert_allclose(stats.mean.numpy(), everything.mean(0), rtol=1e-4)
    np.testing.assert_allclose(stats.var.numpy(), everything.var(0), rtol=1e-3)


def test_normalised_observations_use_statistics_fixed_for_the_whole_trial():
    torch.manual_seed(0)
    tasks = rl2.make_tasks(rl2.with_task_defaults(rl2.Args(task="navigation2d")), 4)
    policy = rl2.RecurrentPolicy(tasks.obs_dim, tasks.action_space, 8, normalize_obs=True)
    policy.obs_rms.update(torch.tensor([[1.0, -2.0], [3.0, 2.0]]))  # mean (2, 0), std (1, 2)
    trial = rl2.run_trials(policy, tasks, tasks.sample_tasks(4, np.random.default_rng(0)), 2, 5, CPU)
    expected = ((trial["observations"] - torch.tensor([2.0, 0.0])) / torch.tensor([1.0, 2.0])).clamp(-10, 10)
    torch.testing.assert_close(trial["inputs"][..., :2], expected, atol=1e-3, rtol=0)  # the 1e-4 prior count
    assert trial["observations"].abs().max() > 0  # the robot moved: raw observations are what the stats see


def test_scaled_rewards_make_the_update_independent_of_the_reward_scale():
    # the same trials with rewards x 1 and x 1000 give the same PPO step when rewards are scaled by the
    # running std of the returns (and a different one without), so one set of PPO settings fits every task
    torch.manual_seed(0)
    args = rl2.with_task_defaults(rl2.Args(task="navigation2d", episode_length=5, update_epochs=2))
    tasks = rl2.make_tasks(args, 8)
    trial = rl2.run_trials(rl2.RecurrentPolicy(tasks.obs_dim, tasks.action_space, 8), tasks,
                           tasks.sample_tasks(8, np.random.default_rng(0)), 2, 5, CPU)

    def updated_parameters(scale_rewards: bool, reward_scale: float) -> torch.Tensor:
        torch.manual_seed(1)
        policy = rl2.RecurrentPolicy(tasks.obs_dim, tasks.action_space, 8)
        optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
        rewards = trial["rewards"] * reward_scale
        rl2.ppo_update(policy, optimizer, {**trial, "rewards": rewards}, replace(args, scale_rewards=scale_rewards))
        if scale_rewards:  # the scale is the std of the discounted returns-to-go, not of single rewards
            returns_to_go = rl2.trial_advantages(rewards, torch.zeros_like(rewards), args.gamma, 1.0)
            torch.testing.assert_close(policy.return_rms.var, returns_to_go.var(unbiased=False), rtol=1e-3, atol=0)
        return torch.cat([p.detach().flatten() for p in policy.parameters()])

    torch.testing.assert_close(updated_parameters(True, 1.0), updated_parameters(True, 1000.0), atol=1e-5, rtol=0)
    assert (updated_parameters(False, 1.0) - updated_parameters(False, 1000.0)).abs().max() > 1e-4


@pytest.mark.parametrize("arms, pulls, paper", [(5, 10, {"random": 5.0, "greedy": 6.6, "ucb1": 6.7, "thompson": 5.7}),
                                                (10, 10, {"random": 5.0, "greedy": 6.6, "ucb1": 6.7, "thompson": 5.5})])
def test_bandit_evaluator_reproduces_the_papers_baselines(arms, pulls, paper):
    # RL^2 paper, Table 1: means over 1000 bandits (std error ~0.07), printed to 0.1; ours over 10 000 bandits
    # (std error ~0.02). 0.3 is about 3 combined standard errors plus the rounding; a strategy that explores
    # wrongly (Thompson sampling without its posterior = random: 5.0) is further off.
    rng = np.random.default_rng(0)
    ours = rl2.bandit_baselines(rng.uniform(0, 1, (10_000, arms)), pulls, rng)
    for strategy, value in paper.items():
        assert abs(ours[strategy] - value) < 0.3, (strategy, ours)
    # the grid search matters: UCB1's textbook constant c = 1 explores too much for 10 pulls
    assert rl2.bandit_baselines(rng.uniform(0, 1, (10_000, arms)), pulls, rng, ucb_c=1.0)["ucb1"] < ours["ucb1"] - 0.5


# ----------------------------------------------------------------------------------------------------
# Smoke: logs, checkpoint, resume, bad input
# ----------------------------------------------------------------------------------------------------
def test_smoke_run_writes_logs_checkpoint_and_resume_equals_an_uninterrupted_run(in_tmp):
    straight = rl2.main(tiny())
    events = run_events(straight["run_dir"], "rl2_recurrent")
    assert straight["global_step"] == 400 and straight["updates"] == 5  # 8 trials x 10 pulls per update
    assert {"charts/trial_return", "charts/SPS", "losses/policy_loss", "losses/value_loss", "meta/trial_return",
            "meta/ucb1_trial_return", "meta/thompson_trial_return",
            "meta/episode_1_return", "meta/episode_10_return", "time/sampling_sps"} <= set(events.Tags()["scalars"])
    first = rl2.main(tiny(total_timesteps=160))
    checkpoint = os.path.join(first["run_dir"], "rl2_recurrent.pt")
    assert rl2.main(tiny(total_timesteps=None, resume=checkpoint))["global_step"] == 160  # no flag: its own budget
    resumed = rl2.main(tiny(total_timesteps=400, resume=checkpoint))
    assert os.path.samefile(resumed["run_dir"], first["run_dir"]) and resumed["updates"] == 5
    assert resumed["train_trial_returns"] == straight["train_trial_returns"][2:]
    assert resumed["meta/trial_return"] == straight["meta/trial_return"]
    events = run_events(resumed["run_dir"], "rl2_recurrent")  # one curve: no step lost or doubled at the resume
    assert [e.step for e in events.Scalars("charts/trial_return")] == [80, 160, 240, 320, 400]
    assert [e.step for e in events.Scalars("meta/trial_return")] == [160, 320, 400]
    assert rl2.main(tiny(seed=4))["train_trial_returns"] != straight["train_trial_returns"]


def test_resume_keeps_the_observation_and_return_statistics(in_tmp):
    mujoco = dict(task="HalfCheetahVel", num_trials=2, num_minibatches=1, episode_length=10, episodes_per_trial=2,
                  eval_tasks=2)  # 40 steps per update; observations normalised and rewards scaled by default
    straight = rl2.main(tiny(**mujoco, total_timesteps=160))
    first = rl2.main(tiny(**mujoco, total_timesteps=80))
    resumed = rl2.main(tiny(**mujoco, total_timesteps=160, resume=os.path.join(first["run_dir"], "rl2_recurrent.pt")))
    assert resumed["train_trial_returns"] == straight["train_trial_returns"][2:]
    for name, value in straight["policy"].state_dict().items():
        assert torch.equal(resumed["policy"].state_dict()[name], value), name
    assert straight["policy"].normalize_obs and straight["policy"].obs_rms.count > 100
    assert straight["policy"].return_rms.count > 100


@pytest.mark.parametrize("task", ["HalfCheetahVel", "HalfCheetahDir", "AntDir", "navigation2d"])
def test_every_task_family_runs(in_tmp, task):
    result = rl2.main(tiny(task=task, total_timesteps=40, num_trials=2, num_minibatches=1, episode_length=10,
                           episodes_per_trial=2, eval_tasks=2, save_model=False))
    assert result["global_step"] == 40 and np.isfinite(result["meta/episode_2_return"])


@pytest.mark.parametrize("overrides, message", [
    (dict(task="CartPole-v1"), "unknown --task CartPole-v1; use one of bandit, navigation2d"),
    (dict(task="Hopper-v5"), "unknown --task Hopper-v5"),
    (dict(episodes_per_trial=0), "--episodes-per-trial must be at least 1, got 0"),
    (dict(num_minibatches=9), "--num-minibatches 9 is more than --num-trials 8"),
    (dict(num_arms=1), "--num-arms must be at least 2"),
    (dict(episodes_per_trial=1, num_minibatches=8), "leaves a minibatch of one step"),
    (dict(normalize_obs=True), "a bandit has no observations to standardise"),
    (dict(gamma=1.5), "--gamma must be in"),
    (dict(learning_rate=float("nan")), "--learning-rate must be a finite number, got nan"),
    (dict(device="meta"), "runs on cpu or cuda"),
    (dict(capture_video=True), "--capture-video records MuJoCo tasks"),
    (dict(task="HalfCheetahVel", capture_video=True, eval_tasks=0), "it needs --eval-tasks >= 1"),
    (dict(device="cuda:7" if not torch.cuda.is_available() else "nonsense"), "--device"),
])
def test_bad_input_is_one_clear_error_before_anything_is_written(in_tmp, overrides, message):
    assert_refused_before_writing(rl2, tiny(**overrides), message)


@pytest.mark.skipif(importlib.util.find_spec("moviepy") is None, reason="moviepy is an optional extra")
def test_capture_video_records_a_meta_test_trial(in_tmp):
    run_dir = rl2.main(tiny(task="HalfCheetahVel", total_timesteps=40, num_trials=2, num_minibatches=1,
                            episode_length=10, episodes_per_trial=2, eval_tasks=2, capture_video=True))["run_dir"]
    assert os.listdir(os.path.join(run_dir, "videos")) == ["meta_test_trial.mp4"]


def test_checkpoints_of_other_scripts_versions_or_tasks_are_refused(in_tmp):
    assert_foreign_checkpoints_are_refused(rl2, tiny, dict(total_timesteps=80), dict(task="navigation2d"),
                                           "is a run on --task bandit", lacks="policy, optimizer")


# ----------------------------------------------------------------------------------------------------
# Learning
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_learns_bandits_close_to_ucb1_and_thompson_sampling(in_tmp):
    # 5 arms, 10 pulls per trial (the paper's first row); the classic strategies on the same held-out tasks
    result = rl2.main(rl2.Args(task="bandit", total_timesteps=500_000, hidden_size=64, eval_tasks=2000,
                               eval_every=1000, seed=1, device="cpu", save_model=False))
    learned, random_, ucb1, thompson = (result[f"meta/{name}trial_return"] for name in ["", "random_", "ucb1_",
                                                                                          "thompson_"])
    print(f"RL^2 {learned:.2f}, random {random_:.2f}, UCB1 {ucb1:.2f}, Thompson sampling {thompson:.2f}")
    assert learned > random_ + 1.0
    assert learned > thompson and learned > ucb1 - 0.4


@pytest.mark.slow
def test_navigation_second_episode_uses_what_the_first_found(in_tmp):
    args = rl2.Args(task="navigation2d", episode_length=20, total_timesteps=350_000, hidden_size=64, eval_tasks=200,
                    eval_every=1000, seed=1, device="cpu", save_model=False)
    result = rl2.main(args)
    full = rl2.with_task_defaults(args)
    with_memory = rl2.meta_test(result["policy"], full, result["eval_task_params"], CPU).mean(0)
    without = rl2.meta_test(result["policy"], full, result["eval_task_params"], CPU,
                            reset_hidden_each_episode=True).mean(0)
    print(f"episode returns with memory {with_memory}, hidden state reset each episode {without}")
    assert with_memory[1] > with_memory[0] + 1.0
    assert with_memory[1] > without[1] + 1.0
