"""RL^2: a recurrent policy whose hidden state is the learned task context.

Algorithm (lecture: "Meta-RL with recurrent policies"; Duan et al. 2016, "RL^2: Fast Reinforcement Learning
via Slow Reinforcement Learning"; Wang et al. 2016, "Learning to reinforcement learn"):
  1. sample a batch of tasks T_i ~ p(T); in each, run one *trial*: `episodes_per_trial` episodes with a GRU
     policy pi(a_t | h_t), h_t = GRU(h_{t-1}, [s_t, a_{t-1}, r_{t-1}, d_{t-1}]) -- the hidden state starts at
     zero for a trial and is *not* reset between its episodes, so what episode 1 found can be used in episode 2;
  2. treat each trial as one long episode (returns and advantages run across its episode boundaries) and
     improve the policy with PPO -- the "slow" RL that trains the "fast" RL inside the hidden state;
  3. meta-test on held-out tasks: the return of episode k of a trial (`meta/episode_k_return`) rises with k.

Task families (`--task`): bandit (k-armed Bernoulli, p_i ~ U[0, 1], one pull = one episode), navigation2d
(point robot, goal ~ U[-0.5, 0.5]^2, r = -distance), HalfCheetahVel (v* ~ U[0, 2], r = -|v_x - v*| -
0.05 |a|^2), HalfCheetahDir (+-1, r = d v_x - 0.05 |a|^2), AntDir (+-1, r = d v_x + Ant-v5's other terms: its
control and contact costs and its healthy bonus, which is 1 only while the ant is healthy; MAML's and ProMP's
AntDir build on Ant variants of their own).

Headline benchmark (HalfCheetahVel, 2 episodes of 200 steps per trial):  python rl2_recurrent.py
Small CPU configurations (a few minutes each on 2 cores; docs/rl2_recurrent.md):
  python rl2_recurrent.py --task bandit --total-timesteps 1000000 --hidden-size 64   # 5 arms, 10 pulls per trial
  python rl2_recurrent.py --task navigation2d --episode-length 20 --total-timesteps 600000 --hidden-size 64

Where this script differs from the paper and garage's RL2PPO (rlworkgroup/garage) and why:
  - PPO (clip 0.2, GAE lambda 0.95, gamma 0.99, Adam 1e-3, 10 epochs, as garage's RL2PPO) instead of the
    paper's first-order TRPO. On MuJoCo tasks all trials form one minibatch, as in garage's HalfCheetah
    example (10 Adam steps per update); 4 minibatches there (40 steps) drove PPO's clip fraction to 0.5.
    The value baseline is a GRU of its own like the paper's (garage: a linear feature baseline), trained by
    the same optimiser step with its own gradient-norm clip.
  - MuJoCo families standardise the observations (running mean and std of the training trials, fixed during
    a trial; the first batch, with no statistics yet, sees raw ones; both clipped to +-10, as CleanRL's
    PPO clips its normalised observations) and scale PPO's rewards by the running
    std of the trials' discounted returns-to-go, in the spirit of CleanRL's PPO with gymnasium's
    NormalizeObservation / NormalizeReward (those update every step, track a forward discounted sum and clip
    the scaled reward to +-10); neither the paper nor garage does either. Without them HalfCheetahVel did not
    learn in 1M steps (2 seeds; the policy's entropy drifted up), with them it did (docs/rl2_recurrent.md).
    `--normalize-obs False --scale-rewards False` switch them off.
  - Advantages are standardised within each PPO minibatch (CleanRL's PPO; garage's RL2PPO examples pass
    center_adv=False).
  - The input at an episode's first step carries the previous episode's last action and reward and d = 1, as
    the paper's input (s, a, r, d) says; garage's RL2Env gives each episode's first step zero action, zero
    reward and d = 0, so its acting policy never sees d = 1.
  - The Gaussian's log-std starts at -0.5 (std 0.61; garage's GaussianGRUPolicy: std 1) and its mean head
    starts near zero (orthogonal init, gain 0.01), so early trials are not dominated by clipped actions.
  - Continuous actions are sampled in [-1, 1] units per dimension and scaled to the env's bounds (clipped
    when sent to the env; navigation2d's bounds are +-0.1).
  - The policy's state-independent log-std is clamped to [-5, 1] (unbounded, the entropy bonus could grow it
    at no cost, the env clipping the actions).
  - Entropy bonus in the loss (0.01), not garage's entropy-in-the-reward ("max" method, 0.02).
  - Every episode of a trial has the same fixed length, so all trials run in lockstep: Ant never terminates
    (terminate_when_unhealthy=False, as MAML's and ProMP's AntDir), navigation2d never stops at the goal.
  - Returns run across the episodes of a trial; the paper's value baseline and garage's fit per-episode
    returns, ours fits the trial's return (the done flag is an input, so it can tell which episode it is in;
    it gets no time feature, unlike garage's linear baseline, and has to count the steps left itself).
  - Bandits use PPO with GAE lambda 0.95 and an entropy bonus like the other tasks (the authors' final bandit
    launcher, below: lambda 1, no entropy bonus; a replication used TRPO with lambda 0.3); the Gittins index
    is not among the evaluator's baselines (random, greedy, UCB1, Thompson sampling are).
  - Training budgets and trials per update (TASK_DEFAULTS) are our choices: the paper's appendix was not
    available to us and garage's example runs 10 trials of 4 x 100 steps for 10 updates only. The authors'
    launcher "MAB final run" (florensacc/rllab-curriculum, sandbox/rocky/neural_learner/launchers/102016/
    1019/mab_9.py) trained every (k, n) with 250 000 steps per iteration for 500 iterations (125M steps),
    gamma 0.99, GRU 128, clipped-ratio SGD with a KL line search (mean KL 0.01); our bandit default is 5M.
  - Meta-test trials act greedily (argmax / mean action, this project's evaluation convention); training
    trials sample. `eval/return` is the meta-test return of a trial's last episode.
  - A task family holds one task per parallel env slot, so it has `sample_tasks(n, rng)` and a batched
    `set_tasks(tasks)` (one row per slot) in place of garage's per-env `sample_tasks` / `set_task(task)`.
"""

import importlib.util
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro

SCRIPT = "rl2_recurrent"


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of random, numpy, torch, the task sampler and the environments"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`"""
    track: bool = False
    """log the same scalars to Weights & Biases"""
    wandb_project_name: str = "mbrl-reference"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team)"""
    capture_video: bool = False
    """record one meta-test trial of a MuJoCo task at the end to runs/{run_name}/videos (needs moviepy)"""
    save_model: bool = True
    """write runs/{run_name}/rl2_recurrent.pt every `checkpoint_every` env steps (after an update) and at the end"""
    checkpoint_every: int = 100_000
    """env steps between checkpoints (written after the next policy update)"""
    resume: Optional[str] = None
    """path of a rl2_recurrent.pt checkpoint to continue from (its flags are kept, except run-control ones)"""
    task: str = "HalfCheetahVel"
    """task family: bandit, navigation2d, HalfCheetahVel, HalfCheetahDir, AntDir"""
    total_timesteps: Optional[int] = None
    """env steps of training (default per task family)"""
    eval_tasks: int = 40
    """held-out tasks of each meta-test (one trial each)"""
    eval_every: int = 10
    """policy updates between meta-tests"""

    # trials
    episodes_per_trial: Optional[int] = None
    """episodes that share one hidden state (default: bandit = pulls per trial 10, others 2)"""
    episode_length: Optional[int] = None
    """steps per episode (default: bandit 1, navigation2d 100, MuJoCo 200 as in MAML)"""
    num_arms: int = 5
    """bandit: arms k"""
    num_trials: Optional[int] = None
    """trials (tasks) sampled in parallel per policy update, one env slot each (default per task family)"""

    # recurrent policy
    hidden_size: int = 256
    """GRU units (paper 256; garage's HalfCheetah example 64)"""
    normalize_obs: Optional[bool] = None
    """feed the GRUs observations standardised by running statistics of the training trials (default: on
    for MuJoCo families, off for bandit and navigation2d)"""
    scale_rewards: Optional[bool] = None
    """PPO sees rewards divided by the running std of the trials' discounted returns; the GRUs' reward input
    stays raw (default: on for MuJoCo families, off for bandit and navigation2d)"""

    # PPO on whole trials
    learning_rate: float = 1e-3
    """Adam step size (garage RL2PPO)"""
    gamma: float = 0.99
    """discount, applied across the episodes of a trial"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    update_epochs: int = 10
    """PPO epochs over each batch of trials"""
    num_minibatches: Optional[int] = None
    """recurrent minibatches per epoch, each of num_trials / num_minibatches whole trials (back-propagation
    through the full trial); default bandit and navigation2d 4, MuJoCo 1 (garage: all trials in one)"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    ent_coef: float = 0.01
    """entropy bonus"""
    vf_coef: float = 0.5
    """value loss weight"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""


RUN_CONTROL_FIELDS = ("resume", "total_timesteps", "device", "track", "wandb_project_name", "wandb_entity",
                      "capture_video", "save_model", "checkpoint_every", "eval_every")
"""Flags a resumed run takes from the command line; every other flag comes from the checkpoint."""

TASK_DEFAULTS = {  # our choices where neither the paper nor garage fixes a value (see the docstring)
    "bandit": dict(total_timesteps=5_000_000, episodes_per_trial=10, episode_length=1, num_trials=500,
                   num_minibatches=4, normalize_obs=False, scale_rewards=False),
    "navigation2d": dict(total_timesteps=5_000_000, episodes_per_trial=2, episode_length=100, num_trials=64,
                         num_minibatches=4, normalize_obs=False, scale_rewards=False),
    **{family: dict(total_timesteps=20_000_000, episodes_per_trial=2, episode_length=200, num_trials=20,
                    num_minibatches=1, normalize_obs=True, scale_rewards=True)
       for family in ["HalfCheetahVel", "HalfCheetahDir", "AntDir"]},
}


class ConfigError(ValueError):
    """A bad flag, task or checkpoint: the message is one line saying what to do."""


def with_task_defaults(args: Args) -> Args:
    if args.task not in TASK_DEFAULTS:
        raise ConfigError(f"unknown --task {args.task}; use one of {', '.join(TASK_DEFAULTS)} (a gymnasium id "
                          "alone is not a task family)")
    return replace(args, **{k: v for k, v in TASK_DEFAULTS[args.task].items() if getattr(args, k) is None})


def check_args(args: Args) -> None:
    for field in fields(args):  # nan passes every range check below (nan <= 0 is False), inf most of them
        values = getattr(args, field.name)
        for value in values if isinstance(values, tuple) else [values]:
            if isinstance(value, float) and not np.isfinite(value):
                raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**31:  # evaluation seeds add offsets; numpy's seeds end at 2^32
        raise ConfigError(f"--seed must be in [0, 2^31), got {args.seed}")
    for name in ["total_timesteps", "episodes_per_trial", "episode_length", "num_trials", "num_arms", "hidden_size",
                 "update_epochs", "num_minibatches", "checkpoint_every", "eval_every"]:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.task == "bandit" and args.num_arms < 2:
        raise ConfigError(f"--num-arms must be at least 2 for a bandit, got {args.num_arms}")
    if args.num_minibatches > args.num_trials:
        raise ConfigError(f"--num-minibatches {args.num_minibatches} is more than --num-trials {args.num_trials}: "
                          "each minibatch needs at least one trial")
    per_minibatch = -(-args.num_trials // args.num_minibatches)  # torch.chunk's sizes; the last chunk is the rest
    smallest = args.num_trials - per_minibatch * ((args.num_trials - 1) // per_minibatch)
    if smallest * args.episodes_per_trial * args.episode_length < 2:
        raise ConfigError(f"--num-minibatches {args.num_minibatches} leaves a minibatch of one step (1-step trials): "
                          "advantages are standardised per minibatch, which needs at least 2; use fewer minibatches")
    if args.task == "bandit" and args.normalize_obs:
        raise ConfigError("--normalize-obs: a bandit has no observations to standardise; leave it off")
    if args.eval_tasks < 0:
        raise ConfigError(f"--eval-tasks must be >= 0, got {args.eval_tasks}")
    for name in ["gamma", "gae_lambda"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.learning_rate <= 0 or args.clip_coef <= 0:
        raise ConfigError("--learning-rate and --clip-coef must be > 0")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: this script runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return device


# ----------------------------------------------------------------------------------------------------
# Task families: N env slots stepped together, one task per slot; every episode lasts episode_length steps
# ----------------------------------------------------------------------------------------------------
class Bandit:
    """k-armed Bernoulli bandit; a task is the arms' success probabilities p ~ U[0, 1]^k. No observation."""

    def __init__(self, num_envs: int, num_arms: int):
        self.num_envs, self.num_arms = num_envs, num_arms
        self.obs_dim, self.action_space = 0, gym.spaces.Discrete(num_arms)
        self.rng = np.random.default_rng()

    def sample_tasks(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(0.0, 1.0, (n, self.num_arms))

    def set_tasks(self, tasks: np.ndarray) -> None:
        self.probs = tasks

    def reset(self, seed: Optional[list[int]] = None) -> np.ndarray:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        return np.zeros((self.num_envs, 0), dtype=np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chosen = self.probs[np.arange(self.num_envs), actions]
        rewards = (self.rng.random(self.num_envs) < chosen).astype(np.float32)
        return np.zeros((self.num_envs, 0), dtype=np.float32), rewards


class Navigation2D:
    """Point robot from (0, 0) to an unseen goal ~ U[-0.5, 0.5]^2 (MAML's 2D navigation): the action is a
    velocity clipped to [-0.1, 0.1]^2, the observation the position, the reward -||position - goal||."""

    def __init__(self, num_envs: int):
        self.num_envs, self.obs_dim = num_envs, 2
        self.action_space = gym.spaces.Box(-0.1, 0.1, (2,), np.float32)

    def sample_tasks(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(-0.5, 0.5, (n, 2))

    def set_tasks(self, tasks: np.ndarray) -> None:
        self.goals = tasks.astype(np.float32)

    def reset(self, seed: Optional[list[int]] = None) -> np.ndarray:
        self.position = np.zeros((self.num_envs, 2), dtype=np.float32)
        return self.position.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.position = self.position + np.clip(actions, -0.1, 0.1)
        rewards = -np.linalg.norm(self.position - self.goals, axis=-1)
        return self.position.copy(), rewards.astype(np.float32)


def without_mujoco_warnings(build: Callable[[], gym.Env]) -> gym.Env:
    """build() with MuJoCo's warnings silenced, for the 2nd..nth copy of an env: the first copy printed its
    XML's warnings (HalfCheetah-v5 has a deprecated attribute); one per copy would bury the log."""
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda message: None)
    try:
        return build()
    finally:
        mujoco.set_mju_user_warning(previous)


class MujocoTasks:
    """A gymnasium v5 MuJoCo env per slot (one vector env); the task reward replaces the env's reward."""

    env_id, env_kwargs = "", {}

    def __init__(self, num_envs: int, episode_length: int, render: bool = False):
        self.num_envs, self.frames = num_envs, [] if render else None
        make = lambda: gym.make(self.env_id, max_episode_steps=episode_length,  # noqa: E731
                                render_mode="rgb_array" if render else None, **self.env_kwargs)
        # trials run in lockstep and reset every slot together, so the vector env never auto-resets
        self.envs = gym.vector.SyncVectorEnv([make] + [lambda: without_mujoco_warnings(make)] * (num_envs - 1),
                                             autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.action_space = self.envs.single_action_space

    def set_tasks(self, tasks: np.ndarray) -> None:
        self.tasks = tasks[:, 0].astype(np.float32)

    def reset(self, seed: Optional[list[int]] = None) -> np.ndarray:
        return self.envs.reset(seed=seed)[0].astype(np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        obs, _, _, _, info = self.envs.step(actions)
        if self.frames is not None:
            self.frames.append(self.envs.render()[0])
        return obs.astype(np.float32), self.task_reward(info, actions).astype(np.float32)


class HalfCheetahVel(MujocoTasks):
    env_id = "HalfCheetah-v5"

    def sample_tasks(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(0.0, 2.0, (n, 1))  # target velocity v*

    def task_reward(self, info: dict, actions: np.ndarray) -> np.ndarray:
        return -np.abs(info["x_velocity"] - self.tasks) - 0.05 * np.square(actions).sum(-1)


class HalfCheetahDir(MujocoTasks):
    env_id = "HalfCheetah-v5"

    def sample_tasks(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice([-1.0, 1.0], (n, 1))  # direction d

    def task_reward(self, info: dict, actions: np.ndarray) -> np.ndarray:
        return self.tasks * info["x_velocity"] - 0.05 * np.square(actions).sum(-1)


class AntDir(MujocoTasks):
    env_id, env_kwargs = "Ant-v5", {"terminate_when_unhealthy": False}

    def sample_tasks(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice([-1.0, 1.0], (n, 1))

    def task_reward(self, info: dict, actions: np.ndarray) -> np.ndarray:  # Ant-v5's reward, forward term signed
        return self.tasks * info["x_velocity"] + info["reward_ctrl"] + info["reward_contact"] + info["reward_survive"]


def make_tasks(args: Args, num_envs: int, render: bool = False):
    if args.task == "bandit":
        return Bandit(num_envs, args.num_arms)
    if args.task == "navigation2d":
        return Navigation2D(num_envs)
    family = {"HalfCheetahVel": HalfCheetahVel, "HalfCheetahDir": HalfCheetahDir, "AntDir": AntDir}[args.task]
    return family(num_envs, args.episode_length, render)


class RunningMeanStd(nn.Module):
    """Mean and variance of everything seen so far, updated a batch at a time (Chan et al.'s parallel
    formula); buffers, so they travel with the policy's state_dict into checkpoints."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(1e-4))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, *self.mean.shape)
        batch_mean, batch_var, batch_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = batch_mean - self.mean, self.count + batch_count
        self.var.copy_((self.var * self.count + batch_var * batch_count
                        + delta.square() * self.count * batch_count / total) / total)
        self.mean.add_(delta * batch_count / total)
        self.count.copy_(total)


# ----------------------------------------------------------------------------------------------------
# The recurrent policy: x_t = [s_t, a_{t-1}, r_{t-1}, d_{t-1}] -> GRU -> (policy head, value head)
# ----------------------------------------------------------------------------------------------------
class RecurrentPolicy(nn.Module):
    def __init__(self, obs_dim: int, action_space: gym.Space, hidden_size: int, normalize_obs: bool = False):
        super().__init__()
        self.normalize_obs = normalize_obs
        self.obs_rms = RunningMeanStd((obs_dim,))  # of the training trials' observations (if normalize_obs)
        self.return_rms = RunningMeanStd(())  # of their discounted returns-to-go (if the rewards are scaled)
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.act_dim = int(action_space.n) if self.discrete else action_space.shape[0]
        self.input_dim = obs_dim + self.act_dim + 2  # one-hot previous action for a bandit
        self.gru = nn.GRU(self.input_dim, hidden_size)
        self.policy_head = nn.Linear(hidden_size, self.act_dim)  # logits, or the Gaussian's mean
        # the value baseline is a GRU of its own (as the paper's): a shared trunk would let the large value
        # loss drown the policy gradient; it never acts, so it runs once over whole trials, not per step
        self.value_gru = nn.GRU(self.input_dim, hidden_size)
        self.value_head = nn.Linear(hidden_size, 1)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((self.act_dim,), -0.5))
            nn.init.orthogonal_(self.policy_head.weight, 0.01)  # start near the zero action
            nn.init.zeros_(self.policy_head.bias)

    def observation_input(self) -> Callable[[np.ndarray], np.ndarray]:
        """s_t -> the s_t part of the GRUs' input: standardised with the statistics of now, which stay fixed
        during a trial. In NumPy, because the sampler builds each step's input on the host, where the env's
        observation arrives (a NumPy op on [N, obs_dim] costs ~1 us, a torch op ~5-10 us)."""
        if not self.normalize_obs:
            return lambda obs: obs
        mean, std = self.obs_rms.mean.cpu().numpy(), (self.obs_rms.var + 1e-8).sqrt().cpu().numpy()
        return lambda obs: np.clip((obs - mean) / std, -10.0, 10.0)

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [T, N, input_dim], hidden [1, N, H] -> (logits or Gaussian means [T, N, act_dim], last hidden)."""
        features, hidden = self.gru(inputs, hidden)
        return self.policy_head(features), hidden

    def step(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One env step of all trials, x [N, input_dim], hidden [N, H]: the cell of self.gru with the same
        weights (a length-1 sequence through nn.GRU costs 1.5x as much on a CPU)."""
        hidden = torch.gru_cell(x, hidden, self.gru.weight_ih_l0, self.gru.weight_hh_l0, self.gru.bias_ih_l0,
                                self.gru.bias_hh_l0)
        return self.policy_head(hidden), hidden

    def distribution(self, out: torch.Tensor):
        if self.discrete:
            return torch.distributions.Categorical(logits=out, validate_args=False)
        return torch.distributions.Normal(out, self.std().expand_as(out), validate_args=False)

    def act(self, out: torch.Tensor, greedy: bool, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """An action from the head's output; the per-step path of sampling, so no distribution object. A
        sampled Gaussian action is mean + noise, so `noise` ~ N(0, std^2) is required then (run_trials draws it
        for the whole trial at once)."""
        if self.discrete:
            return out.argmax(-1) if greedy else torch.multinomial(out.softmax(-1), 1)[:, 0]
        return out if greedy else out + noise

    def std(self) -> torch.Tensor:
        return self.log_std.clamp(-5.0, 1.0).exp()

    def value(self, inputs: torch.Tensor) -> torch.Tensor:
        """V(x_1, ..., x_t) for whole trials [T, N, input_dim] -> [T, N]."""
        features, _ = self.value_gru(inputs)
        return self.value_head(features)[..., 0]

    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("value_")]

    def critic_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name.startswith("value_")]

    def log_prob(self, dist, actions: torch.Tensor) -> torch.Tensor:
        return dist.log_prob(actions) if self.discrete else dist.log_prob(actions).sum(-1)

    def entropy(self, dist) -> torch.Tensor:
        return dist.entropy() if self.discrete else dist.entropy().sum(-1)

    def initial_hidden(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(1, n, self.gru.hidden_size, device=device)



# ----------------------------------------------------------------------------------------------------
# Trials: sampling (one batched GRU step per env step) and the advantage across a trial's episodes
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def run_trials(policy: RecurrentPolicy, tasks, task_params: np.ndarray, episodes: int, length: int,
               device: torch.device, greedy: bool = False, env_seeds: Optional[list[int]] = None,
               reset_hidden_each_episode: bool = False) -> dict:
    """One trial per slot: `episodes` episodes of `length` steps, the hidden state carried across episodes
    (reset only at the trial's start, or at every episode with reset_hidden_each_episode, for ablations).
    Returns the GRU inputs, raw observations, actions, log-probs, rewards and hidden states as [T, N, ...] tensors
    (T = episodes x length) and the episode returns [N, episodes]. The value baseline is not needed to act:
    ppo_update runs it over the finished trials."""
    n, steps, obs_dim, act_dim = len(task_params), episodes * length, tasks.obs_dim, policy.act_dim
    tasks.set_tasks(task_params)
    # x_t = [s_t, a_{t-1} (one-hot for a bandit), r_{t-1}, d_{t-1}], zeros for what precedes a trial. The
    # trial's record is written step by step on the host, where the env's results arrive, into preallocated
    # NumPy arrays (row T of `inputs` is never read): per step, torch only runs the policy and keeps its outputs.
    inputs = np.zeros((steps + 1, n, policy.input_dim), dtype=np.float32)
    inputs[length::length, :, -1] = 1.0  # d_{t-1} = 1 after each episode's last step (episodes end there)
    observations = np.empty((steps, n, obs_dim), dtype=np.float32)
    rewards = np.empty((steps, n), dtype=np.float32)
    observation_input = policy.observation_input()
    hiddens = torch.empty(steps, n, policy.gru.hidden_size, device=device)
    outs = torch.empty(steps, n, act_dim, device=device)
    actions = torch.empty((steps, n) if policy.discrete else (steps, n, act_dim),
                          dtype=torch.long if policy.discrete else torch.float32, device=device)
    # the Gaussian's noise for the whole trial in one draw (a sampled action is mean + noise)
    noise = None if policy.discrete or greedy else policy.std() * torch.randn(steps, n, act_dim, device=device)
    if not policy.discrete:  # the policy acts in [-1, 1] per dimension, scaled to the env's bounds
        low, high = tasks.action_space.low, tasks.action_space.high
        scale, offset = (high - low) / 2, (high + low) / 2
    hidden = policy.initial_hidden(n, device)[0]
    for episode in range(episodes):
        obs = tasks.reset(seed=env_seeds if episode == 0 else None)
        if reset_hidden_each_episode and episode > 0:  # the ablation: every episode starts as a fresh trial
            hidden = policy.initial_hidden(n, device)[0]
            inputs[episode * length, :, obs_dim:] = 0.0
        for i in range(episode * length, (episode + 1) * length):
            observations[i] = obs
            inputs[i, :, :obs_dim] = observation_input(obs)
            hiddens[i] = hidden
            out, hidden = policy.step(torch.from_numpy(inputs[i]).to(device), hidden)
            outs[i] = out
            actions[i] = action = policy.act(out, greedy, None if noise is None else noise[i])
            action_np = action.cpu().numpy()
            if policy.discrete:
                obs, reward = tasks.step(action_np)
                inputs[i + 1, np.arange(n), obs_dim + action_np] = 1.0  # one-hot a_t
            else:
                action_np = np.clip(action_np, -1, 1)
                obs, reward = tasks.step(action_np * scale + offset)
                inputs[i + 1, :, obs_dim:obs_dim + act_dim] = action_np
            rewards[i] = inputs[i + 1, :, -2] = reward
    rewards_t = torch.from_numpy(rewards).to(device)
    trial = {"inputs": torch.from_numpy(inputs[:steps]).to(device),
             "observations": torch.from_numpy(observations).to(device), "actions": actions, "rewards": rewards_t,
             "hiddens": hiddens}
    trial["log_probs"] = policy.log_prob(policy.distribution(outs), actions)
    trial["episode_returns"] = rewards_t.reshape(episodes, length, n).sum(1).T.cpu()
    return trial


def trial_advantages(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE over whole trials [T, N]: A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t.
    Episode boundaries inside a trial do not stop the sum (RL^2: the trial is the episode of the slow RL);
    the trial's end does (V_T = 0)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else torch.zeros_like(values[t])
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


def ppo_update(policy: RecurrentPolicy, optimizer: torch.optim.Optimizer, batch: dict, args: Args) -> dict:
    """PPO over recurrent minibatches of whole trials; each replays its trials from a zero hidden state."""
    rewards = batch["rewards"]
    if args.scale_rewards:  # value targets of about unit scale, whatever the task's reward scale
        policy.return_rms.update(trial_advantages(rewards, torch.zeros_like(rewards), args.gamma, 1.0))
        rewards = rewards / (policy.return_rms.var + 1e-8).sqrt()
    with torch.no_grad():
        values = policy.value(batch["inputs"])  # V(x_1..x_t) of the sampled trials, before the update
    advantages = trial_advantages(rewards, values, args.gamma, args.gae_lambda)
    returns = advantages + values
    n = batch["rewards"].shape[1]
    stats = []
    for _ in range(args.update_epochs):
        for trials in torch.randperm(n, device=returns.device).chunk(args.num_minibatches):
            out, _ = policy(batch["inputs"][:, trials], policy.initial_hidden(len(trials), returns.device))
            dist = policy.distribution(out)
            value = policy.value(batch["inputs"][:, trials])
            log_prob = policy.log_prob(dist, batch["actions"][:, trials])
            ratio = (log_prob - batch["log_probs"][:, trials]).exp()
            adv = advantages[:, trials]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
            value_loss = 0.5 * (value - returns[:, trials]).square().mean()
            entropy = policy.entropy(dist).mean()
            loss = policy_loss - args.ent_coef * entropy + args.vf_coef * value_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.actor_parameters(), args.max_grad_norm)  # each net its own budget
            nn.utils.clip_grad_norm_(policy.critic_parameters(), args.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                clip_fraction = ((ratio - 1).abs() > args.clip_coef).float().mean()
            stats.append(torch.stack([policy_loss.detach(), value_loss.detach(), entropy.detach(), clip_fraction]))
    policy_loss, value_loss, entropy, clip_fraction = torch.stack(stats).mean(0).tolist()
    return {"losses/policy_loss": policy_loss, "losses/value_loss": value_loss, "losses/entropy": entropy,
            "losses/clip_fraction": clip_fraction}


# ----------------------------------------------------------------------------------------------------
# Meta-test and, for bandits, the classic strategies on the same tasks
# ----------------------------------------------------------------------------------------------------
def meta_test(policy: RecurrentPolicy, args: Args, task_params: np.ndarray, device: torch.device,
              reset_hidden_each_episode: bool = False) -> np.ndarray:
    """Episode returns [tasks, episodes] of one greedy trial per held-out task."""
    tasks = make_tasks(args, len(task_params))
    seeds = [args.seed + 10_000 + i for i in range(len(task_params))]
    result = run_trials(policy, tasks, task_params, args.episodes_per_trial, args.episode_length, device,
                        greedy=True, env_seeds=seeds, reset_hidden_each_episode=reset_hidden_each_episode)
    return result["episode_returns"].numpy()


def bandit_baselines(probs: np.ndarray, pulls: int, rng: np.random.Generator,
                     ucb_c: Optional[float] = None) -> dict[str, float]:
    """Mean total reward per trial of classic strategies on bandit tasks [N, k]: random, greedy, UCB1 and
    Thompson sampling. As in the RL^2 paper, the estimates start from one success and one failure per arm
    (a Beta(1, 1) prior): greedy pulls the arm of highest posterior mean, UCB1 the highest
    mean + c sqrt(2 ln t / pulls), Thompson sampling the highest draw from each arm's Beta posterior.
    UCB1's c is, like the paper's, grid-searched for this (k, n) -- on other tasks of the same distribution."""
    n, k = probs.shape
    if ucb_c is None:
        tuning_tasks = rng.uniform(0.0, 1.0, probs.shape)
        ucb_c = max([0.03, 0.1, 0.2, 0.3, 0.5, 1.0],
                    key=lambda c: bandit_baselines(tuning_tasks, pulls, rng, ucb_c=c)["ucb1"])
    rows = np.arange(n)
    totals = {}
    for strategy in ["random", "greedy", "ucb1", "thompson"]:
        successes, failures, total = np.ones((n, k)), np.ones((n, k)), np.zeros(n)
        for t in range(1, pulls + 1):
            mean = successes / (successes + failures)
            if strategy == "random":
                score = rng.random((n, k))
            elif strategy == "greedy":
                score = mean + 1e-9 * rng.random((n, k))  # ties broken at random
            elif strategy == "ucb1":
                score = mean + ucb_c * np.sqrt(2 * np.log(t) / (successes + failures)) + 1e-9 * rng.random((n, k))
            else:
                score = rng.beta(successes, failures)
            arm = score.argmax(-1)
            reward = (rng.random(n) < probs[rows, arm]).astype(float)
            successes[rows, arm] += reward
            failures[rows, arm] += 1 - reward
            total += reward
        totals[strategy] = float(total.mean())
    return {**totals, "ucb1_c": ucb_c}


# ----------------------------------------------------------------------------------------------------
# Checkpoints and logging
# ----------------------------------------------------------------------------------------------------
def save_checkpoint(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path: str, args: Args) -> tuple[dict, Args]:
    """Read a checkpoint of this script; the run continues with its flags except the run-control ones."""
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ConfigError(f"--resume {path} is not a readable checkpoint ({type(err).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        writer = ckpt.get("script", "an unknown program") if isinstance(ckpt, dict) else "an unknown program"
        raise ConfigError(f"--resume {path} was written by {writer}, not {SCRIPT}.py; resume it with that script")
    missing = [k for k in ["args", "policy", "optimizer", "global_step", "update", "elapsed", "rng"] if k not in ckpt]
    missing += [f"args.{f.name}" for f in fields(Args) if f.name not in ckpt.get("args", {})]
    if missing:
        raise ConfigError(f"--resume {path} lacks {', '.join(missing)} (written by another version of {SCRIPT}.py?)")
    if ckpt["args"]["task"] != args.task:
        raise ConfigError(f"--resume {path} is a run on --task {ckpt['args']['task']}, not --task {args.task}; "
                          f"pass --task {ckpt['args']['task']}")
    saved = {f.name: ckpt["args"][f.name] for f in fields(Args) if f.name not in RUN_CONTROL_FIELDS}
    if args.total_timesteps is None:  # no new budget given: the run's own, not the task family's default
        saved["total_timesteps"] = ckpt["args"]["total_timesteps"]
    return ckpt, replace(args, **saved)


class Logger:
    """TensorBoard (+ optional W&B) scalars and a one-line progress display on a terminal."""

    def __init__(self, run_dir: str, run_name: str, args: Args, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter

        self.wandb = None
        if args.track:  # before the SummaryWriter exists, so that wandb can mirror its events
            import wandb

            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args),
                                    name=run_name, sync_tensorboard=True, resume="allow", id=run_name)
        # on resume, drop events logged after the checkpoint (they are about to be logged again), keep those of
        # the checkpoint's own step (logged before it was written)
        self.writer = SummaryWriter(run_dir, purge_step=None if resume_step is None else resume_step + 1)
        self.tty = sys.stdout.isatty()

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def progress(self, step: int, total: int, sps: float, last_return: float) -> None:
        if self.tty:
            eta = (total - step) / max(sps, 1e-9)
            print(f"\rstep {step}/{total}  SPS {sps:.0f}  trial return {last_return:.2f}  ETA {eta / 60:.0f} min",
                  end="", flush=True)

    def close(self) -> None:
        if self.tty:
            print()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def record_video(policy: RecurrentPolicy, args: Args, task_params: np.ndarray, folder: str,
                 device: torch.device) -> None:
    """One greedy meta-test trial of the first held-out task, every episode of it as one video."""
    from moviepy import ImageSequenceClip

    tasks = make_tasks(args, 1, render=True)
    run_trials(policy, tasks, task_params[:1], args.episodes_per_trial, args.episode_length, device, greedy=True,
               env_seeds=[args.seed + 10_000])
    os.makedirs(folder, exist_ok=True)
    fps = tasks.envs.envs[0].metadata.get("render_fps", 30)
    ImageSequenceClip(tasks.frames, fps=fps).write_videofile(os.path.join(folder, "meta_test_trial.mp4"), logger=None)
    tasks.envs.close()


# ----------------------------------------------------------------------------------------------------
# Main loop: sample trials on fresh tasks, PPO on them, meta-test on held-out tasks
# ----------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    ckpt = None
    if args.resume:
        ckpt, args = load_checkpoint(args.resume, args)
    args = with_task_defaults(args)
    check_args(args)
    device = pick_device(args.device)
    mujoco = args.task not in ("bandit", "navigation2d")
    if args.capture_video and not mujoco:
        raise ConfigError(f"--capture-video records MuJoCo tasks; --task {args.task} has nothing to render")
    if args.capture_video and not args.eval_tasks:
        raise ConfigError("--capture-video records a meta-test trial; it needs --eval-tasks >= 1")
    for wanted, module in [(args.capture_video, "moviepy"), (args.track, "wandb")]:
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--{'capture-video' if module == 'moviepy' else 'track'} needs {module}: "
                              f"pip install {module}")
    tasks = make_tasks(args, args.num_trials)

    if ckpt:  # continue in the checkpoint's own folder, wherever it was moved to
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        run_name = os.path.basename(run_dir)
    else:
        run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir, suffix = os.path.join("runs", run_name), 1
        while os.path.exists(run_dir):  # two runs started in the same second never share a folder
            suffix += 1
            run_dir = os.path.join("runs", f"{run_name}-{suffix}")
        run_name = os.path.basename(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    logger = Logger(run_dir, run_name, args, ckpt["global_step"] if ckpt else None)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    task_rng = np.random.default_rng(args.seed)  # training tasks
    eval_task_params = tasks.sample_tasks(args.eval_tasks, np.random.default_rng(args.seed + 10_000))

    policy = RecurrentPolicy(tasks.obs_dim, tasks.action_space, args.hidden_size, args.normalize_obs).to(device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    steps_per_update = args.num_trials * args.episodes_per_trial * args.episode_length
    global_step, update, elapsed = 0, 0, 0.0
    if ckpt:
        policy.load_state_dict(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        global_step, update, elapsed = ckpt["global_step"], ckpt["update"], ckpt["elapsed"]
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        task_rng.bit_generator.state = ckpt["rng"]["tasks"]
        print(f"resumed {run_name} at step {global_step} (update {update}) with the checkpoint's flags; "
              f"from the command line only: {', '.join(RUN_CONTROL_FIELDS[1:])}")
    ckpt_path = os.path.join(run_dir, f"{SCRIPT}.pt")

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "script": SCRIPT, "args": asdict(args), "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
            "global_step": global_step, "update": update, "elapsed": elapsed,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                    "tasks": task_rng.bit_generator.state}})

    # the classic bandit strategies on the same held-out tasks, the yardstick of the paper's Table 1
    baselines = ({f"meta/{name}_trial_return": value for name, value in bandit_baselines(
        eval_task_params, args.episodes_per_trial, np.random.default_rng(args.seed + 20_000)).items()
        if name != "ucb1_c"} if args.task == "bandit" and args.eval_tasks else {})

    def evaluate(step: int) -> dict:
        returns = meta_test(policy, args, eval_task_params, device)  # [tasks, episodes]
        metrics = {"meta/trial_return": float(returns.sum(1).mean()), "eval/return": float(returns[:, -1].mean()),
                   **baselines}
        if args.episodes_per_trial <= 10:
            metrics.update({f"meta/episode_{k + 1}_return": float(r) for k, r in enumerate(returns.mean(0))})
        logger.scalars(metrics, step)
        return metrics

    last_checkpoint_step, eval_metrics, train_trial_returns = global_step, {}, []
    start = time.perf_counter()
    while global_step < args.total_timesteps:
        t0 = time.perf_counter()
        task_params = tasks.sample_tasks(args.num_trials, task_rng)
        seeds = [int(s) for s in task_rng.integers(2**31 - 1, size=args.num_trials)]  # exact on resume
        batch = run_trials(policy, tasks, task_params, args.episodes_per_trial, args.episode_length, device,
                           env_seeds=seeds)
        t1 = time.perf_counter()
        losses = ppo_update(policy, optimizer, batch, args)
        if args.normalize_obs:  # for the next trials: each trial is normalised by one fixed set of statistics
            policy.obs_rms.update(batch["observations"])
        t2 = time.perf_counter()
        global_step += steps_per_update
        update += 1
        episode_returns = batch["episode_returns"]
        train_trial_returns.append(float(episode_returns.sum(1).mean()))
        elapsed += time.perf_counter() - start
        start = time.perf_counter()
        logger.scalars({"charts/trial_return": train_trial_returns[-1],
                        "charts/episodic_return": float(episode_returns.mean()),
                        "charts/episodic_length": args.episode_length, "charts/SPS": global_step / max(elapsed, 1e-9),
                        "time/sampling_sps": steps_per_update / max(t1 - t0, 1e-9),
                        "time/update_s": t2 - t1, **losses}, global_step)
        if args.eval_tasks and (update % args.eval_every == 0 or global_step >= args.total_timesteps):
            eval_metrics = evaluate(global_step)
        logger.progress(global_step, args.total_timesteps, global_step / max(elapsed, 1e-9), train_trial_returns[-1])
        if args.save_model and (global_step - last_checkpoint_step >= args.checkpoint_every
                                or global_step >= args.total_timesteps):
            checkpoint()
            last_checkpoint_step = global_step
    elapsed += time.perf_counter() - start

    if args.capture_video and args.eval_tasks:
        record_video(policy, args, eval_task_params, os.path.join(run_dir, "videos"), device)
    logger.close()
    return {"run_dir": run_dir, "global_step": global_step, "updates": update, "elapsed_s": elapsed,
            "train_trial_returns": train_trial_returns, "policy": policy, "eval_task_params": eval_task_params,
            **eval_metrics}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ConfigError as err:
        sys.exit(f"error: {err}")
