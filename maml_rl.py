"""MAML for RL: meta-learn an initialisation that one policy-gradient step adapts to a new task (MAML-TRPO).

Algorithm (lecture: "Meta-RL with gradient descent", Algorithm 1; Finn, Abbeel, Levine 2017, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks", section 3.3 and the RL experiments of section 5.3):
  1. sample a meta-batch of tasks T_i ~ p(T); in each, roll out K trajectories with the policy pi_theta;
  2. adapt with one vanilla policy-gradient step: theta'_i = theta - alpha grad_theta L_Ti(pi_theta);
  3. roll out K new trajectories with each pi_theta'_i;
  4. meta-update theta on sum_i L_Ti(pi_theta'_i) -- a function of theta *through* theta'_i, so its gradient
     holds the Hessian of the inner loss (second order; `--first-order` drops it, FOMAML). The update is a
     TRPO step: natural gradient by conjugate gradient on Hessian-vector products of the KL through the
     adaptation step, then a backtracking line search that needs both improvement and KL <= max_kl;
  5. meta-test on held-out tasks: the return after 0, 1, 2, 3 gradient steps (`meta/return_step_k`).

Task families (`--task`): navigation2d (point robot from (0, 0) to a goal ~ U[-0.5, 0.5]^2, velocity clipped to
+-0.1, r = -distance, 100 steps), HalfCheetahVel (v* ~ U[0, 2], r = -|v_x - v*| - 0.05 |a|^2), HalfCheetahDir
(+-1, r = d v_x - 0.05 |a|^2), AntVel (v* ~ U[0, 3]), AntDir (+-1); MuJoCo trajectories last 200 steps.

Original configuration (cbfinn/maml_rl's example scripts): 40 tasks per meta-batch, 20 trajectories per
task, Gaussian MLP (100, 100) ReLU with initial std 1 acting in [-1, 1] units (rllab's `normalize`: clipped and
scaled to the env's bounds), inner step size 0.1 (navigation2d 0.5), gamma 0.99, GAE lambda 1 with rllab's
linear feature baseline fitted per task on the trajectories it scores, advantages normalised per task, TRPO
with max KL 0.01, 10 CG iterations, damping 1e-5, line search 0.8 x 15, Xavier-uniform weights and zero biases;
100 meta-iterations on navigation2d, 800 on MuJoCo (the cheetah script's first version; a later one ran 1000).
The meta-test samples 4000 env steps per task and step (40 trajectories on navigation2d, 20 on MuJoCo) and
adapts with step size alpha, then alpha / 2 (the original test scripts).

Headline benchmark (HalfCheetahVel, 40 tasks x 20 trajectories x 200 steps, twice per meta-iteration = 320k
env steps):  python maml_rl.py
Small CPU configuration (about a minute on 2 cores; docs/maml_rl.md):
  python maml_rl.py --task navigation2d --meta-batch-size 20 --fast-batch-size 10 --hidden-sizes 32 32 \
      --meta-iterations 30
The paper's navigation2d (python maml_rl.py --task navigation2d) takes ~25 min on 2 CPU cores.

Where this script differs from the original code and why:
  - gymnasium v5 MuJoCo envs with the task reward computed from their `info` (x velocity from positions), and
    their observations (v5 excludes the x position; rllab's added the torso's centre of mass). Ant never
    terminates (terminate_when_unhealthy=False), so every Ant trajectory lasts the full horizon (rllab's ant
    ended an episode when the torso left z in [0.2, 1]); its other reward terms use rllab's constants (see
    `ANT_KWARGS`). Initial states use gymnasium's reset noise (uniform +-0.1 on the
    joint positions), not rllab's.
  - A trajectory that ends early (navigation2d within 0.01 of its goal, as rllab's point env) keeps its env
    slot until the batch's last step, masked out of every loss, mean and count; rllab filled a batch of
    4000 steps with as many trajectories as fit, we sample fast_batch_size trajectories per task.
  - Hessian-vector products of the KL are exact (double back-propagation through the adaptation step);
    rllab's optimiser used finite differences of gradients.
  - `meta/return_step_k` are returns of the sampled (stochastic) trajectories, as the paper's; `eval/return`
    adds the mean-action return after `num_inner_steps` steps, this project's evaluation convention. With
    `--num-inner-steps` N > 1 the meta-test's first N steps use alpha, as training does (the test scripts'
    alpha / 2 applies to the steps after them).
  - The horizon's cut is treated as terminal (no bootstrap past the last step), as rllab's returns and
    baseline did; CONVENTIONS.md would bootstrap a time-limit truncation.
  - `eval/return` and `meta/*` are of the current policy at each evaluation; no best iterate is selected.
"""

import copy
import importlib.util
import json
import math
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

SCRIPT = "maml_rl"


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
    """record the adapted policy on the first held-out MuJoCo task at the end to runs/{run_name}/videos (needs
    moviepy)"""
    save_model: bool = True
    """write runs/{run_name}/maml_rl.pt every `checkpoint_every` env steps (after a meta-update) and at the end"""
    checkpoint_every: int = 1_000_000
    """env steps between checkpoints (written after the next meta-update)"""
    resume: Optional[str] = None
    """path of a maml_rl.pt checkpoint to continue from (its flags are kept, except run-control ones)"""
    task: str = "HalfCheetahVel"
    """task family: navigation2d, HalfCheetahVel, HalfCheetahDir, AntVel, AntDir"""
    meta_iterations: Optional[int] = None
    """meta-iterations of training (default per task family: the original's, navigation2d 100, MuJoCo 800)"""
    total_timesteps: Optional[int] = None
    """if given, train until this many env steps were taken instead of for meta_iterations (a meta-iteration
    takes up to meta_batch_size x fast_batch_size x horizon x (num_inner_steps + 1) steps)"""
    eval_tasks: int = 40
    """held-out tasks of each meta-test"""
    eval_every: int = 10
    """meta-iterations between meta-tests"""
    eval_grad_steps: int = 3
    """meta-test: gradient steps on held-out tasks (returns after 0..eval_grad_steps steps are logged)"""
    eval_trajectories: Optional[int] = None
    """meta-test: trajectories per held-out task for each step (default 4000 env steps' worth, as the original
    test scripts: navigation2d 40, MuJoCo 20)"""

    # MAML
    meta_batch_size: int = 40
    """tasks per meta-iteration"""
    fast_batch_size: int = 20
    """trajectories per task for each adaptation step and for the post-adaptation objective"""
    horizon: Optional[int] = None
    """steps per trajectory (default: navigation2d 100, MuJoCo 200)"""
    inner_lr: Optional[float] = None
    """alpha, the step size of the inner policy-gradient step (default: navigation2d 0.5, MuJoCo 0.1)"""
    num_inner_steps: int = 1
    """inner policy-gradient steps during meta-training, each on fresh trajectories"""
    first_order: bool = False
    """FOMAML: treat the inner gradient as a constant (drops the Hessian term of the meta-gradient)"""
    hidden_sizes: tuple[int, ...] = (100, 100)
    """the Gaussian MLP policy's hidden layers (ReLU)"""
    init_std: float = 1.0
    """initial standard deviation of the state-independent Gaussian"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 1.0
    """GAE lambda (1: discounted return minus the baseline, as rllab)"""
    baseline_reg: float = 1e-5
    """ridge coefficient of the linear feature baseline's least-squares fit (> 0)"""

    # TRPO meta-update
    max_kl: float = 0.01
    """trust region: mean KL between the old and the new adapted policies"""
    cg_iters: int = 10
    """conjugate-gradient iterations"""
    cg_damping: float = 1e-5
    """damping added to the KL Hessian (F + damping I)"""
    ls_backtrack_ratio: float = 0.8
    """line search: each backtrack scales the step by this"""
    ls_max_steps: int = 15
    """line search: most step sizes tried before the update is rejected"""


RUN_CONTROL_FIELDS = ("resume", "meta_iterations", "total_timesteps", "device", "track", "wandb_project_name",
                      "wandb_entity", "capture_video", "save_model", "checkpoint_every", "eval_every")
"""Flags a resumed run takes from the command line; every other flag comes from the checkpoint."""

MUJOCO_DEFAULTS = dict(horizon=200, inner_lr=0.1, meta_iterations=800, eval_trajectories=20)
TASK_DEFAULTS = {  # horizon, inner step size, meta-iterations and test batch of the original code's scripts
    "navigation2d": dict(horizon=100, inner_lr=0.5, meta_iterations=100, eval_trajectories=40),
    "HalfCheetahVel": MUJOCO_DEFAULTS, "HalfCheetahDir": MUJOCO_DEFAULTS, "AntVel": MUJOCO_DEFAULTS,
    "AntDir": MUJOCO_DEFAULTS,
}


class ConfigError(ValueError):
    """A bad flag, task or checkpoint: the message is one line saying what to do."""


def with_task_defaults(args: Args) -> Args:
    if args.task not in TASK_DEFAULTS:
        if args.task in gym.registry:  # a plain env: say why it is not enough
            try:
                env = gym.make(args.task)
            except (gym.error.Error, ImportError) as err:
                raise ConfigError(f"--task {args.task} is a single environment (one that cannot be made here: "
                                  f"{err}), not a task family; use one of {', '.join(TASK_DEFAULTS)}") from None
            continuous = isinstance(env.action_space, gym.spaces.Box)
            env.close()
            if not continuous:
                raise ConfigError(f"--task {args.task} has discrete actions; maml_rl.py's Gaussian policy needs "
                                  f"continuous ones: use one of {', '.join(TASK_DEFAULTS)}")
            raise ConfigError(f"--task {args.task} is a single environment, not a task family (a distribution "
                              f"over tasks); use one of {', '.join(TASK_DEFAULTS)}")
        raise ConfigError(f"unknown --task {args.task}; use one of {', '.join(TASK_DEFAULTS)}")
    defaults = dict(TASK_DEFAULTS[args.task])
    if args.total_timesteps is not None:  # the env-step budget replaces the meta-iterations
        defaults.pop("meta_iterations")
    return replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})


def check_args(args: Args) -> None:
    for field in fields(args):  # nan passes every range check below (nan <= 0 is False), inf most of them
        values = getattr(args, field.name)
        for value in values if isinstance(values, tuple) else [values]:
            if isinstance(value, float) and not np.isfinite(value):
                raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**31:  # evaluation seeds add offsets; numpy's seeds end at 2^32
        raise ConfigError(f"--seed must be in [0, 2^31), got {args.seed}")
    if any(width < 1 for width in args.hidden_sizes):
        raise ConfigError(f"--hidden-sizes must be layer widths >= 1, got {args.hidden_sizes}")
    for name in ["meta_iterations", "total_timesteps", "meta_batch_size", "fast_batch_size", "horizon",
                 "num_inner_steps", "eval_trajectories", "cg_iters", "ls_max_steps", "checkpoint_every", "eval_every"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ["inner_lr", "max_kl", "init_std", "baseline_reg"]:
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.init_std <= 1e-6:  # the log-std is clamped at log(1e-6): below it, it would never learn
        raise ConfigError(f"--init-std must be > 1e-6, got {args.init_std}")
    for name in ["eval_tasks", "eval_grad_steps", "cg_damping"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ["gamma", "gae_lambda"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not 0.0 < args.ls_backtrack_ratio < 1.0:
        raise ConfigError(f"--ls-backtrack-ratio must be in (0, 1), got {args.ls_backtrack_ratio}")
    if not args.hidden_sizes or min(args.hidden_sizes) < 1:
        raise ConfigError(f"--hidden-sizes needs at least one layer of >= 1 unit, got {args.hidden_sizes}")


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
# Task families: N env slots stepped together, one task per slot; every trajectory lasts `horizon` steps
# ----------------------------------------------------------------------------------------------------
def to_bounds(actions: np.ndarray, space: gym.spaces.Box) -> np.ndarray:
    """The policy acts in [-1, 1] units per dimension (rllab's `normalize` wrapper): clip, then scale to the
    env's bounds."""
    return space.low + (np.clip(actions, -1.0, 1.0) + 1.0) * 0.5 * (space.high - space.low)


class Navigation2D:
    """Point robot from (0, 0) to an unseen goal ~ U[-0.5, 0.5]^2 (MAML's 2D navigation): the action is a
    velocity clipped to [-0.1, 0.1]^2, the observation the position, the reward -||position - goal||; the
    trajectory ends when both coordinates are within 0.01 of the goal."""

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

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.position = self.position + to_bounds(actions, self.action_space)
        rewards = -np.linalg.norm(self.position - self.goals, axis=-1)
        terminated = (np.abs(self.position - self.goals) < 0.01).all(-1)
        return self.position.copy(), rewards.astype(np.float32), terminated


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

    def __init__(self, num_envs: int, horizon: int, render: bool = False):
        self.num_envs, self.frames = num_envs, [] if render else None
        # one env per slot, copies of the first (gymnasium re-builds a copied MuJoCo env from its arguments)
        first = gym.make(self.env_id, max_episode_steps=horizon, render_mode="rgb_array" if render else None,
                         **self.env_kwargs)
        # all slots reset together, so the vector env never auto-resets
        copies = [lambda: without_mujoco_warnings(lambda: copy.deepcopy(first))] * (num_envs - 1)
        self.envs = gym.vector.SyncVectorEnv([lambda: first] + copies, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.action_space = self.envs.single_action_space

    def set_tasks(self, tasks: np.ndarray) -> None:
        self.tasks = tasks[:, 0].astype(np.float32)

    def reset(self, seed: Optional[list[int]] = None) -> np.ndarray:
        return self.envs.reset(seed=seed)[0].astype(np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        actions = to_bounds(actions, self.action_space)
        obs, _, terminated, _, info = self.envs.step(actions)  # never terminated: see the module docstring
        if self.frames is not None:
            self.frames.append(self.envs.render()[0])
        return obs.astype(np.float32), self.task_reward(info, actions).astype(np.float32), terminated


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


# rllab's ant: control cost 0.5e-2 |a|^2, contact cost 0.5e-3 |clip(F_ext, -1, 1)|^2, a survive bonus of 0.05 at
# every step (Ant-v5 pays its own only while healthy), +1 on AntVel's velocity term; rllab ended an episode when
# the torso left z in [0.2, 1], ours never ends
ANT_KWARGS = dict(terminate_when_unhealthy=False, ctrl_cost_weight=0.005, contact_cost_weight=5e-4)
ANT_SURVIVE_BONUS = 0.05


class AntVel(MujocoTasks):
    env_id, env_kwargs = "Ant-v5", ANT_KWARGS

    def sample_tasks(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(0.0, 3.0, (n, 1))

    def task_reward(self, info: dict, actions: np.ndarray) -> np.ndarray:
        return (1.0 - np.abs(info["x_velocity"] - self.tasks) + info["reward_ctrl"] + info["reward_contact"]
                + ANT_SURVIVE_BONUS)


class AntDir(MujocoTasks):
    env_id, env_kwargs = "Ant-v5", ANT_KWARGS

    def sample_tasks(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice([-1.0, 1.0], (n, 1))

    def task_reward(self, info: dict, actions: np.ndarray) -> np.ndarray:
        return self.tasks * info["x_velocity"] + info["reward_ctrl"] + info["reward_contact"] + ANT_SURVIVE_BONUS


def make_tasks(args: Args, num_envs: int, render: bool = False):
    if args.task == "navigation2d":
        return Navigation2D(num_envs)
    family = {"HalfCheetahVel": HalfCheetahVel, "HalfCheetahDir": HalfCheetahDir, "AntVel": AntVel,
              "AntDir": AntDir}[args.task]
    return family(num_envs, args.horizon, render)


# ----------------------------------------------------------------------------------------------------
# The policy, called functionally: params is a dict name -> [tasks, ...] tensor, one parameter set per task
# ----------------------------------------------------------------------------------------------------
class GaussianMLPPolicy(nn.Module):
    """pi(a | s) = N(mu(s), diag(sigma^2)): an MLP mean (ReLU) and a state-independent log-std, sigma >= 1e-6."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: tuple[int, ...], init_std: float):
        super().__init__()
        layers, width = [], obs_dim
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mean = nn.Sequential(*layers, nn.Linear(width, act_dim))
        for layer in self.mean:  # as the original: Xavier-uniform weights, zero biases
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(obs), self.log_std.clamp_min(math.log(1e-6))


def per_task(params: dict[str, torch.Tensor], num_tasks: int) -> dict[str, torch.Tensor]:
    """theta as one parameter set per task: views that stay in the graph, so grad_theta sees every task."""
    return {name: p.unsqueeze(0).expand(num_tasks, *p.shape) for name, p in params.items()}


def policy_forward(policy: GaussianMLPPolicy, params: dict[str, torch.Tensor],
                   obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [T, M, A] and log-stds [T, A] of task i's parameters params[name][i] on its observations
    obs[i] ([T, M, obs_dim]): one batched call (vmap of the module with the parameters as inputs)."""
    return torch.func.vmap(lambda p, o: torch.func.functional_call(policy, p, (o,)))(params, obs)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log N(a; mean, diag(exp(2 log_std))), summed over action dimensions; mean/actions [T, M, A], log_std [T, A]."""
    log_std = log_std.unsqueeze(1)
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean_p: torch.Tensor, log_std_p: torch.Tensor, mean_q: torch.Tensor,
                log_std_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of diagonal Gaussians, summed over action dimensions -> [T, M]."""
    log_std_p, log_std_q = log_std_p.unsqueeze(1), log_std_q.unsqueeze(1)
    var_ratio = torch.exp(2 * (log_std_p - log_std_q))
    return (log_std_q - log_std_p + 0.5 * (var_ratio + (mean_p - mean_q).square() * torch.exp(-2 * log_std_q))
            - 0.5).sum(-1)


# ----------------------------------------------------------------------------------------------------
# Sampling: every task x trajectory is one env slot, one batched policy call per env step
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_trajectories(policy: GaussianMLPPolicy, params: dict[str, torch.Tensor], tasks, task_params: np.ndarray,
                        num_trajectories: int, horizon: int, device: torch.device,
                        env_seeds: Optional[list[int]] = None, greedy: bool = False,
                        generator: Optional[torch.Generator] = None) -> dict:
    """num_trajectories trajectories of each task i with the parameters params[name][i]. Returns obs,
    actions [T, N, H, ...], rewards [T, N, H], masks [T, N, H] (1 up to and including a trajectory's last
    step; a slot whose trajectory ended keeps stepping, unseen), and the sampling policy's log-probs and
    means (for the importance ratio and the KL of the meta-update). Action noise from `generator`."""
    n_tasks = len(task_params)
    tasks.set_tasks(np.repeat(task_params, num_trajectories, axis=0))
    obs = tasks.reset(seed=env_seeds)
    alive = np.ones(n_tasks * num_trajectories, dtype=bool)
    observations, actions, rewards, means, masks = [], [], [], [], []
    for _ in range(horizon):
        obs_t = torch.as_tensor(obs, device=device).view(n_tasks, num_trajectories, -1)
        mean, log_std = policy_forward(policy, params, obs_t)
        action = mean
        if not greedy:
            action = mean + log_std.exp().unsqueeze(1) * torch.randn(mean.shape, generator=generator, device=device)
        obs, reward, terminated = tasks.step(action.view(n_tasks * num_trajectories, -1).cpu().numpy())
        observations.append(obs_t)
        actions.append(action)
        means.append(mean)
        masks.append(torch.as_tensor(alive, dtype=torch.float32, device=device).view(n_tasks, num_trajectories))
        rewards.append(torch.as_tensor(reward, device=device).view(n_tasks, num_trajectories) * masks[-1])
        alive = alive & ~terminated
    batch = {"obs": torch.stack(observations, 2), "actions": torch.stack(actions, 2),
             "rewards": torch.stack(rewards, 2), "masks": torch.stack(masks, 2), "means": torch.stack(means, 2),
             "log_std": log_std}
    batch["log_probs"] = gaussian_log_prob(batch["means"].flatten(1, 2), log_std,
                                           batch["actions"].flatten(1, 2)).view_as(batch["rewards"])
    return batch


# ----------------------------------------------------------------------------------------------------
# Advantages with rllab's linear feature baseline, fitted per task
# ----------------------------------------------------------------------------------------------------
def baseline_features(obs: torch.Tensor) -> torch.Tensor:
    """[clip(o, +-10), o^2, t/100, (t/100)^2, (t/100)^3, 1] for obs [..., H, D] -> [..., H, 2D + 4]."""
    o = obs.clamp(-10, 10)
    t = torch.arange(obs.shape[-2], device=obs.device, dtype=obs.dtype).unsqueeze(-1).expand(*obs.shape[:-1], 1) / 100
    return torch.cat([o, o.square(), t, t.square(), t.pow(3), torch.ones_like(t)], -1)


def fit_linear_baseline(features: torch.Tensor, targets: torch.Tensor, reg: float,
                        masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per task, ridge least squares w = (X^T X + reg I)^-1 X^T y over its (unmasked) steps; features
    [T, ..., F], targets and masks [T, ...] -> w [T, F]. As rllab, the ridge grows tenfold while the solution
    is not finite."""
    if masks is not None:  # a masked step adds a zero row, which changes nothing
        features, targets = features * masks.unsqueeze(-1), targets * masks
    x = features.flatten(1, -2).double()
    y = targets.flatten(1).double()
    gram, rhs = x.transpose(1, 2) @ x, (x.transpose(1, 2) @ y.unsqueeze(-1))
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    for _ in range(5):
        try:
            weights = torch.linalg.solve(gram + reg * eye, rhs)[..., 0]
        except torch.linalg.LinAlgError:  # singular: as not finite
            weights = torch.full_like(rhs[..., 0], math.nan)
        if torch.isfinite(weights).all():
            break
        reg *= 10
    return weights.to(features.dtype)


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_k gamma^k r_{t+k} to the trajectory's end, along the last axis."""
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def masked_mean(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per task, the mean of x [T, ...] over the steps where masks [T, ...] is 1 -> [T]."""
    return (x * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp_min(1)


def compute_advantages(batch: dict, gamma: float, lam: float, reg: float) -> torch.Tensor:
    """GAE with the linear feature baseline fitted to this task's returns, normalised per task to mean 0,
    std 1 over its steps (rllab's center_adv, population std). rewards, masks [T, N, H] -> advantages [T, N, H],
    0 on masked steps."""
    masks = batch["masks"]
    features = baseline_features(batch["obs"])
    weights = fit_linear_baseline(features, discounted_returns(batch["rewards"], gamma), reg, masks)
    values = (features @ weights[:, None, :, None])[..., 0] * masks  # [T, N, H]; V = 0 once a trajectory ended
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], -1)  # and after the horizon
    deltas = (batch["rewards"] + gamma * next_values - values) * masks
    advantages = discounted_returns(deltas, gamma * lam)
    mean = masked_mean(advantages, masks)[:, None, None]
    std = masked_mean((advantages - mean).square(), masks).sqrt()[:, None, None]
    return (advantages - mean) / (std + 1e-8) * masks


# ----------------------------------------------------------------------------------------------------
# The inner loop (adaptation) and the post-adaptation objective of the meta-update
# ----------------------------------------------------------------------------------------------------
def inner_loss(policy: GaussianMLPPolicy, params: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
    """Vanilla policy gradient surrogate of each task, L_Ti = -mean_t log pi(a_t | s_t) A_t over its steps -> [T]."""
    mean, log_std = policy_forward(policy, params, batch["obs"].flatten(1, 2))
    log_probs = gaussian_log_prob(mean, log_std, batch["actions"].flatten(1, 2))
    return -masked_mean(log_probs * batch["advantages"].flatten(1), batch["masks"].flatten(1))


def inner_adapt(policy: GaussianMLPPolicy, params: dict[str, torch.Tensor], batch: dict, inner_lr: float,
                create_graph: bool) -> dict[str, torch.Tensor]:
    """theta'_i = theta_i - alpha grad L_Ti(theta_i) for every task at once (task i's loss depends only on its
    own parameters, so the gradient of the sum holds every task's gradient). create_graph=True keeps the
    gradient in the graph: the meta-gradient then holds the Hessian term (second-order MAML)."""
    grads = torch.autograd.grad(inner_loss(policy, params, batch).sum(), list(params.values()),
                                create_graph=create_graph)
    return {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}


def adapted_params(policy: GaussianMLPPolicy, inner_batches: list[dict], args: Args,
                   differentiable: bool) -> dict[str, torch.Tensor]:
    """theta'_i from the current theta and the stored inner trajectories, one step per inner batch (always from
    theta: the meta-update needs the whole chain in one graph). differentiable=False (line search, sampling)
    returns tensors without a graph back to theta."""
    num_tasks = len(inner_batches[0]["rewards"])
    params = dict(policy.named_parameters())
    if not differentiable:
        params = {k: p.detach().requires_grad_() for k, p in params.items()}
    params = per_task(params, num_tasks)
    for batch in inner_batches:
        params = inner_adapt(policy, params, batch, args.inner_lr,
                             create_graph=differentiable and not args.first_order)
    return params if differentiable else {k: p.detach() for k, p in params.items()}


def meta_objective(policy: GaussianMLPPolicy, inner_batches: list[dict], outer_batch: dict, args: Args,
                   differentiable: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The TRPO surrogate of the post-adaptation policies, -mean_i mean_t [pi_theta'_i / pi_old_i] A_t, and
    the mean KL(pi_old_i || pi_theta'_i) on the post-adaptation trajectories (pi_old_i sampled them)."""
    params = adapted_params(policy, inner_batches, args, differentiable)
    obs, actions = outer_batch["obs"].flatten(1, 2), outer_batch["actions"].flatten(1, 2)
    masks = outer_batch["masks"].flatten(1)
    mean, log_std = policy_forward(policy, params, obs)
    ratio = torch.exp(gaussian_log_prob(mean, log_std, actions) - outer_batch["log_probs"].flatten(1))
    surrogate = -masked_mean(ratio * outer_batch["advantages"].flatten(1), masks).mean()
    kl = masked_mean(gaussian_kl(outer_batch["means"].flatten(1, 2), outer_batch["log_std"], mean, log_std),
                     masks).mean()
    return surrogate, kl


# ----------------------------------------------------------------------------------------------------
# TRPO: conjugate gradient on KL Hessian-vector products, backtracking line search
# ----------------------------------------------------------------------------------------------------
def conjugate_gradient(matrix_vector: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int,
                       tol: float = 1e-10) -> torch.Tensor:
    """Approximately solve A x = b for a symmetric positive-definite A known only through x -> A x."""
    x, r = torch.zeros_like(b), b.clone()
    p, r_dot = r.clone(), r @ r
    for _ in range(iters):
        ap = matrix_vector(p)
        alpha = r_dot / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        new_r_dot = r @ r
        if new_r_dot < tol:
            break
        p = r + (new_r_dot / r_dot) * p
        r_dot = new_r_dot
    return x


def line_search(evaluate: Callable[[torch.Tensor], tuple[float, float]], theta: torch.Tensor,
                full_step: torch.Tensor, loss_before: float, max_kl: float, backtrack_ratio: float,
                max_steps: int) -> tuple[torch.Tensor, int, float, float]:
    """Try theta + ratio^j full_step for j = 0, 1, ...; accept the first with a lower loss and KL <= max_kl.
    Returns the new parameters (theta itself if none passes), the number of steps tried, and the loss and KL
    of the new parameters."""
    for j in range(max_steps):
        candidate = theta + backtrack_ratio ** j * full_step
        loss, kl = evaluate(candidate)
        if loss < loss_before and kl <= max_kl:
            return candidate, j + 1, loss, kl
    return theta, max_steps, loss_before, 0.0


def kl_hessian_vector_product(kl: torch.Tensor, params: list[nn.Parameter],
                              damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (F + damping I) v with F the Hessian of the mean KL in theta -- through the adaptation step when
    the KL's graph holds it. F v = d/dtheta (grad_theta KL . v): the gradient's graph is built once and reused."""
    kl_gradient = nn.utils.parameters_to_vector(torch.autograd.grad(kl, params, create_graph=True))

    def product(v: torch.Tensor) -> torch.Tensor:
        hvp = torch.autograd.grad(kl_gradient @ v, params, retain_graph=True)
        return nn.utils.parameters_to_vector(hvp) + damping * v

    return product


def trpo_meta_update(policy: GaussianMLPPolicy, inner_batches: list[dict], outer_batch: dict, args: Args) -> dict:
    params = list(policy.parameters())
    theta = nn.utils.parameters_to_vector(params).detach()
    surrogate, kl = meta_objective(policy, inner_batches, outer_batch, args)
    # the meta-gradient: through theta'_i(theta), Hessian term included unless --first-order
    gradient = nn.utils.parameters_to_vector(torch.autograd.grad(surrogate, params, retain_graph=True))
    fisher_vector_product = kl_hessian_vector_product(kl, params, args.cg_damping)
    direction = conjugate_gradient(fisher_vector_product, -gradient, args.cg_iters)  # F^-1 (-g)
    # largest step along it inside the quadratic trust region: 1/2 s^T F s = max_kl
    curvature = direction @ fisher_vector_product(direction)
    full_step = direction * torch.sqrt(2 * args.max_kl / curvature.clamp_min(1e-12))

    def evaluate(candidate: torch.Tensor) -> tuple[float, float]:
        nn.utils.vector_to_parameters(candidate, params)
        loss, kl_value = meta_objective(policy, inner_batches, outer_batch, args, differentiable=False)
        return loss.item(), kl_value.item()

    new_theta, tried, loss_after, kl_after = line_search(evaluate, theta, full_step, surrogate.item(), args.max_kl,
                                                         args.ls_backtrack_ratio, args.ls_max_steps)
    nn.utils.vector_to_parameters(new_theta, params)  # theta itself when no step passed
    return {"losses/surrogate_before": surrogate.item(), "losses/surrogate_after": loss_after,
            "losses/kl": kl_after, "losses/line_search_steps": tried,
            "losses/step_accepted": float(new_theta is not theta), "losses/grad_norm": gradient.norm().item()}


# ----------------------------------------------------------------------------------------------------
# One meta-iteration's data and the meta-test
# ----------------------------------------------------------------------------------------------------
def sample_meta_batch(policy: GaussianMLPPolicy, tasks, task_params: np.ndarray, args: Args, device: torch.device,
                      rng: np.random.Generator) -> tuple[list[dict], dict]:
    """Trajectories from theta (and from theta'_i after each further inner step) and from the adapted
    policies theta'_i, with their advantages."""
    n_slots = len(task_params) * args.fast_batch_size
    inner_batches = []
    params = per_task({k: p.detach() for k, p in policy.named_parameters()}, len(task_params))
    for _ in range(args.num_inner_steps + 1):
        seeds = [int(s) for s in rng.integers(2**31 - 1, size=n_slots)]
        batch = sample_trajectories(policy, params, tasks, task_params, args.fast_batch_size, args.horizon, device,
                                    env_seeds=seeds)
        batch["advantages"] = compute_advantages(batch, args.gamma, args.gae_lambda, args.baseline_reg)
        inner_batches.append(batch)
        if len(inner_batches) <= args.num_inner_steps:
            params = adapted_params(policy, inner_batches, args, differentiable=False)
    return inner_batches[:-1], inner_batches[-1]


def meta_test(policy: GaussianMLPPolicy, tasks, task_params: np.ndarray, args: Args, device: torch.device,
              greedy_tasks=None) -> dict[str, float]:
    """The paper's evaluation: on held-out tasks, mean return of eval_trajectories sampled trajectories after
    0, 1, ..., eval_grad_steps inner steps, each step on the trajectories just sampled with step size alpha
    for the steps training takes (num_inner_steps) and alpha / 2 for later ones (the original test scripts,
    which trained one step); with greedy_tasks, also the
    mean-action return after min(num_inner_steps, eval_grad_steps) of these steps (`eval/return`)."""
    # the same env and action noise at every meta-test, and none drawn from the training's generators
    rng = np.random.default_rng(args.seed + 20_000)
    generator = torch.Generator(device).manual_seed(args.seed + 20_000)
    params = per_task({k: p.detach() for k, p in policy.named_parameters()}, len(task_params))
    metrics = {}
    for k in range(args.eval_grad_steps + 1):
        seeds = [int(s) for s in rng.integers(2**31 - 1, size=len(task_params) * args.eval_trajectories)]
        batch = sample_trajectories(policy, params, tasks, task_params, args.eval_trajectories, args.horizon, device,
                                    env_seeds=seeds, generator=generator)
        metrics[f"meta/return_step_{k}"] = batch["rewards"].sum(-1).mean().item()
        if greedy_tasks is not None and k == min(args.num_inner_steps, args.eval_grad_steps):
            greedy = sample_trajectories(policy, params, greedy_tasks, task_params, 1, args.horizon, device,
                                         env_seeds=seeds[:len(task_params)], greedy=True)
            metrics["eval/return"] = greedy["rewards"].sum(-1).mean().item()
        if k < args.eval_grad_steps:
            batch["advantages"] = compute_advantages(batch, args.gamma, args.gae_lambda, args.baseline_reg)
            params = {name: p.requires_grad_() for name, p in params.items()}
            step_size = args.inner_lr if k < args.num_inner_steps else args.inner_lr / 2  # the trained steps: alpha
            params = {name: p.detach() for name, p in inner_adapt(policy, params, batch, step_size,
                                                                   create_graph=False).items()}
    return metrics


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
    missing = [k for k in ["args", "policy", "global_step", "iteration", "elapsed", "rng"] if k not in ckpt]
    missing += [f"args.{f.name}" for f in fields(Args) if f.name not in ckpt.get("args", {})]
    if missing:
        raise ConfigError(f"--resume {path} lacks {', '.join(missing)} (written by another version of {SCRIPT}.py?)")
    if ckpt["args"]["task"] != args.task:
        raise ConfigError(f"--resume {path} is a run on --task {ckpt['args']['task']}, not --task {args.task}; "
                          f"pass --task {ckpt['args']['task']}")
    saved = {f.name: ckpt["args"][f.name] for f in fields(Args) if f.name not in RUN_CONTROL_FIELDS}
    saved["hidden_sizes"] = tuple(saved["hidden_sizes"])
    if args.total_timesteps is None and args.meta_iterations is None:  # no new budget: the run's own
        saved.update(total_timesteps=ckpt["args"]["total_timesteps"], meta_iterations=ckpt["args"]["meta_iterations"])
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

    def progress(self, step: int, iteration: int, args: Args, sps: float, pre: float, post: float) -> None:
        if self.tty:
            budget = (f"step {step}/{args.total_timesteps}" if args.total_timesteps
                      else f"meta-iteration {iteration}/{args.meta_iterations}")
            print(f"\r{budget}  step {step}  SPS {sps:.0f}  return before/after adaptation {pre:.1f}/{post:.1f}",
                  end="", flush=True)

    def close(self) -> None:
        if self.tty:
            print()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def record_video(policy: GaussianMLPPolicy, args: Args, task_params: np.ndarray, folder: str,
                 device: torch.device) -> None:
    """The first held-out task: one mean-action trajectory before adaptation and one after a step on
    fast_batch_size sampled trajectories, as two videos."""
    from moviepy import ImageSequenceClip

    os.makedirs(folder, exist_ok=True)
    sampler = make_tasks(args, args.fast_batch_size)
    camera = make_tasks(args, 1, render=True)
    params = per_task({k: p.detach() for k, p in policy.named_parameters()}, 1)
    fps = camera.envs.envs[0].metadata.get("render_fps", 30)
    for name in ["before_adaptation", "after_adaptation"]:
        if name == "after_adaptation":  # one inner step on sampled trajectories of this task
            batch = sample_trajectories(policy, params, sampler, task_params[:1], args.fast_batch_size, args.horizon,
                                        device, [args.seed + i for i in range(args.fast_batch_size)])
            batch["advantages"] = compute_advantages(batch, args.gamma, args.gae_lambda, args.baseline_reg)
            params = {k: p.detach() for k, p in inner_adapt(
                policy, {k: p.requires_grad_() for k, p in params.items()}, batch, args.inner_lr, False).items()}
        camera.frames.clear()
        sample_trajectories(policy, params, camera, task_params[:1], 1, args.horizon, device, [args.seed], greedy=True)
        ImageSequenceClip(camera.frames, fps=fps).write_videofile(os.path.join(folder, f"{name}.mp4"), logger=None)
    sampler.envs.close()
    camera.envs.close()


# ----------------------------------------------------------------------------------------------------
# Main loop: sample a meta-batch, adapt, TRPO on the post-adaptation objective, meta-test
# ----------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    ckpt = None
    if args.resume:
        ckpt, args = load_checkpoint(args.resume, args)
    args = with_task_defaults(args)
    check_args(args)
    device = pick_device(args.device)
    mujoco = args.task != "navigation2d"
    if args.capture_video and not mujoco:
        raise ConfigError(f"--capture-video records MuJoCo tasks; --task {args.task} has nothing to render")
    if args.capture_video and not args.eval_tasks:
        raise ConfigError("--capture-video records a held-out task; it needs --eval-tasks >= 1")
    for wanted, module in [(args.capture_video, "moviepy"), (args.track, "wandb")]:
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--{'capture-video' if module == 'moviepy' else 'track'} needs {module}: "
                              f"pip install {module}")

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
    # env slots: meta_batch_size x fast_batch_size for training, eval_tasks x eval_trajectories for the meta-test
    # (the same envs when the counts agree), and one per held-out task for the mean-action evaluation
    tasks = make_tasks(args, args.meta_batch_size * args.fast_batch_size)
    test_tasks = greedy_tasks = None
    if args.eval_tasks:
        eval_slots = args.eval_tasks * args.eval_trajectories
        test_tasks = tasks if eval_slots == tasks.num_envs else make_tasks(args, eval_slots)
        greedy_tasks = make_tasks(args, args.eval_tasks)
    task_rng = np.random.default_rng(args.seed)  # training tasks and env seeds
    eval_task_params = tasks.sample_tasks(args.eval_tasks, np.random.default_rng(args.seed + 10_000))

    policy = GaussianMLPPolicy(tasks.obs_dim, tasks.action_space.shape[0], args.hidden_sizes, args.init_std).to(device)
    global_step, iteration, elapsed = 0, 0, 0.0
    if ckpt:
        policy.load_state_dict(ckpt["policy"])
        global_step, iteration, elapsed = ckpt["global_step"], ckpt["iteration"], ckpt["elapsed"]
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        task_rng.bit_generator.state = ckpt["rng"]["tasks"]
        print(f"resumed {run_name} at step {global_step} (meta-iteration {iteration}) with the checkpoint's flags; "
              f"from the command line only: {', '.join(RUN_CONTROL_FIELDS[1:])}")
    ckpt_path = os.path.join(run_dir, f"{SCRIPT}.pt")

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "script": SCRIPT, "args": asdict(args), "policy": policy.state_dict(),
            "global_step": global_step, "iteration": iteration, "elapsed": elapsed,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                    "tasks": task_rng.bit_generator.state}})

    last_checkpoint_step, eval_metrics, history = global_step, {}, []
    start = time.perf_counter()
    def done() -> bool:
        return global_step >= args.total_timesteps if args.total_timesteps else iteration >= args.meta_iterations

    while not done():
        t0 = time.perf_counter()
        task_params = tasks.sample_tasks(args.meta_batch_size, task_rng)
        inner_batches, outer_batch = sample_meta_batch(policy, tasks, task_params, args, device, task_rng)
        t1 = time.perf_counter()
        stats = trpo_meta_update(policy, inner_batches, outer_batch, args)
        t2 = time.perf_counter()
        steps = int(sum(batch["masks"].sum().item() for batch in [*inner_batches, outer_batch]))  # env steps taken
        global_step += steps
        iteration += 1
        pre = inner_batches[0]["rewards"].sum(-1).mean().item()
        post = outer_batch["rewards"].sum(-1).mean().item()
        history.append({"step": global_step, "pre_adapt_return": pre, "post_adapt_return": post})
        elapsed += time.perf_counter() - start
        start = time.perf_counter()
        logger.scalars({"meta/pre_adapt_return": pre, "meta/post_adapt_return": post,
                        "charts/episodic_return": post,
                        "charts/episodic_length": outer_batch["masks"].sum(-1).mean().item(),
                        "charts/SPS": global_step / max(elapsed, 1e-9), "charts/meta_iteration": iteration,
                        "time/sampling_s": t1 - t0, "time/meta_update_s": t2 - t1,
                        "time/sampling_sps": steps / max(t1 - t0, 1e-9), **stats}, global_step)
        if args.eval_tasks and (iteration % args.eval_every == 0 or done()):
            eval_metrics = meta_test(policy, test_tasks, eval_task_params, args, device, greedy_tasks)
            logger.scalars(eval_metrics, global_step)
        logger.progress(global_step, iteration, args, global_step / max(elapsed, 1e-9), pre, post)
        if args.save_model and (global_step - last_checkpoint_step >= args.checkpoint_every or done()):
            checkpoint()
            last_checkpoint_step = global_step
    elapsed += time.perf_counter() - start

    if args.capture_video:
        record_video(policy, args, eval_task_params, os.path.join(run_dir, "videos"), device)
    logger.close()
    return {"run_dir": run_dir, "global_step": global_step, "iterations": iteration, "elapsed_s": elapsed,
            "history": history, "policy": policy, "eval_task_params": eval_task_params, **eval_metrics}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ConfigError as err:
        sys.exit(f"error: {err}")
