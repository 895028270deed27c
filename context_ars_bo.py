"""Meta Strategy Optimization: a latent-conditioned policy trained with ARS, adapted by Bayesian optimisation.

Algorithm (lecture: "Meta-learning with simple optimization"; Yu, Tan, Bai, Coumans, Ha 2020, "Learning Fast
Adaptation with Meta Strategy Optimization", IEEE RA-L; Augmented Random Search: Mania, Guy, Recht 2018):
  A policy pi(a | s, mu) takes a low-dimensional latent mu in [-1, 1]^d -- a "knob" that tunes its behaviour.
  Training alternates two optimisations:
  1. strategy optimisation: every `resample_every` ARS iterations, sample `train_tasks` dynamics (masses,
     friction, motor strength, damping) and find, for each, the mu with the best return by Bayesian
     optimisation (a Gaussian process over mu, 5 random points + 20 BO iterations, 1 episode each);
  2. ARS on the policy's weights theta: antithetic perturbations theta +- nu delta_k, each scored by its mean
     return over the current tasks, every task run with its own best mu; theta moves along the best
     directions:  theta += alpha / (b sigma_R) sum_{k in top b} (r+_k - r-_k) delta_k.
  So training finds a theta for which *some* mu works well on every dynamics. On unseen dynamics only mu is
  searched: BO with 5 random + 20 BO points x 3 episodes each (75 episodes), gradient-free.
  `meta/adapt_return` is the best-so-far of those noisy 3-episode means (optimistic); `eval/return` runs the
  chosen mu on fresh episodes.
Baselines with the same ARS budget (`--method`): dr, domain randomisation (a policy without mu), and up, the
universal policy that is told the true dynamics (mu = the normalised true parameters).

Official configuration (VincentYu68/policy_transfer, meta_strategy_optimization): MLP 2 x 64 tanh on the
running-normalised [obs, mu] (clipped to +-5), weights normc(1) / normc(0.01) for the output layer, zero
biases, deterministic actions; latent dim 2; ARS with 32 directions, the top 8, noise 0.02, step size 0.005,
the update divided by the std of the 2 x 8 selected returns, the normaliser updated from every perturbed
rollout (ARS V2), 1000 iterations, episodes of 1000 steps; 8 tasks re-sampled every 30 iterations; BO with
5 random points, 20 iterations, a confidence-bound acquisition (kappa 5) maximised over 1000 random
candidates, the best observed mu returned; at test time 3 episodes per evaluation, then 5 fresh episodes of
the chosen mu (`eval/return`).

Headline benchmark (Hopper-v5, MSO; up to 5e8 env steps in the original's 1000 iterations):  python context_ars_bo.py
Small CPU configuration (HalfCheetah with a motor of unknown sign, strength in [-1, 1]: the latent must carry
the sign; 100-step episodes; 28 s on 2 idle cores, the configuration of the learning test):
  python context_ars_bo.py --env-id HalfCheetah-v5 --params strength=-1:1 --iterations 20 --num-directions 8 \
      --top-directions 4 --step-size 0.02 --noise 0.03 --train-tasks 4 --resample-every 5 \
      --max-episode-steps 100 --test-tasks 8 --test-tasks-outside 0 --eval-every 20 --num-workers 2

Where this script differs from the official code and why:
  - gymnasium v5 MuJoCo envs (the official trained on DART and tested on MuJoCo); their own reward and
    termination (DART's hopper also ended an episode that had not moved 1 m in 1.5 s). No restitution
    parameter (MuJoCo has no coefficient of restitution); motor strength x[1/3, 1] (the issue's range; the
    official [100, 300] = x[0.5, 1.5]) and joint damping x[0.5, 3] (the official's unused range) replace it.
    Friction sets every geom's sliding friction (MuJoCo's contacts take the larger of the pair); a mass
    change scales the body's inertia with it. Parameters are sampled uniformly within their ranges (the
    official drew the normalised parameters from U(-0.05, 1.05)).
  - Held-out test dynamics: `test_tasks` drawn from the training ranges with another seed, and
    `test_tasks_outside` with one parameter pushed beyond its range by 10-30 % of its width (e.g. a weaker
    motor).
  - The GP is written here: a Matern-5/2 kernel (the official used sklearn's default Matern, nu = 3/2) times
    a fitted signal variance, plus fitted white noise, targets standardised; the hyper-parameters maximise
    the marginal likelihood over a grid of lengthscales and noise ratios with the signal variance in closed
    form (one batched Cholesky for all tasks' GPs; sklearn ran L-BFGS from 10 starts).
  - The + and - perturbation of a direction share their env reset seed (common random numbers); actions are
    clipped to the env's bounds.
  - Training returns keep the env's survival bonus (ARS, Mania et al. 2018, subtracted it on Hopper, Walker2d
    and Ant: its code's `shift`).
  - Test-time adaptation always runs its --bo-init-points + --bo-iterations evaluations (the official search
    stopped after a budget of 50 000 env steps); UCB uses the GP's noise-free predictive std (official:
    sklearn's, which adds the fitted white noise and a fixed alpha = 1e-2 on min-max-scaled returns) and may
    evaluate a latent twice (the official re-drew a duplicate); returns are the env's dense reward (the
    official DART search used a sparse one).
"""

import importlib.util
import json
import math
import multiprocessing
import os
import random
import re
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

SCRIPT = "context_ars_bo"


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of random, numpy, torch, the dynamics sampler and the environments"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`: where the Gaussian processes are fitted; the
    policy runs next to MuJoCo in the rollout workers, on the CPU"""
    track: bool = False
    """log the same scalars to Weights & Biases"""
    wandb_project_name: str = "mbrl-reference"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team)"""
    capture_video: bool = False
    """record the final policy on the first test dynamics to runs/{run_name}/videos (needs moviepy)"""
    save_model: bool = True
    """write runs/{run_name}/context_ars_bo.pt every `checkpoint_every` env steps and at the end"""
    checkpoint_every: int = 2_000_000
    """env steps between checkpoints (written after the next ARS iteration)"""
    resume: Optional[str] = None
    """path of a context_ars_bo.pt checkpoint to continue from (its flags are kept, except run-control ones)"""
    env_id: str = "Hopper-v5"
    """a gymnasium MuJoCo env with continuous actions"""
    iterations: Optional[int] = None
    """ARS iterations of training (default: the official 1000)"""
    total_timesteps: Optional[int] = None
    """if given, train until this many env steps were taken instead of for `iterations`"""
    eval_episodes: int = 5
    """fresh episodes of the adapted policy on each test dynamics (`eval/return`)"""
    eval_every: int = 50
    """ARS iterations between evaluations on the test dynamics (and one at the end)"""

    # the task distribution: physical parameters of the MuJoCo model
    params: Optional[tuple[str, ...]] = None
    """randomised dynamics, as name=low:high: friction (every geom's sliding friction), mass.<body> (kg),
    strength (x every actuator's gear), damping (x every joint's damping); default per env (see
    DYNAMICS_DEFAULTS)"""
    test_tasks: int = 12
    """held-out test dynamics drawn from the training ranges"""
    test_tasks_outside: int = 4
    """held-out test dynamics with one parameter beyond its training range by 10-30 % of the range's width"""

    # the method and its policy
    method: str = "mso"
    """mso (latent-conditioned policy + BO), dr (domain randomisation: no latent), up (universal policy: the
    latent is the normalised true dynamics)"""
    latent_dim: int = 2
    """dimension d of the latent mu in [-1, 1]^d (mso)"""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """the policy MLP's hidden layers (tanh)"""
    max_episode_steps: int = 1000
    """episode length limit"""

    # Augmented Random Search
    num_directions: int = 32
    """N, perturbation directions per iteration (each evaluated at +nu and -nu)"""
    top_directions: int = 8
    """b, the directions with the best max(r+, r-) that enter the update"""
    noise: float = 0.02
    """nu, the std of the perturbations"""
    step_size: float = 0.005
    """alpha, the ARS step size"""
    num_workers: int = 1
    """rollout worker processes (1: in this process)"""

    # strategy optimisation during training and test-time adaptation (Bayesian optimisation of mu)
    train_tasks: int = 8
    """dynamics the policy trains on at a time"""
    resample_every: int = 30
    """ARS iterations between re-sampling the training dynamics (and searching their best mu)"""
    bo_init_points: int = 5
    """random mu evaluated before the GP proposes points"""
    bo_iterations: int = 20
    """BO iterations of the strategy search during training (1 episode each)"""
    adapt_iterations: int = 20
    """BO iterations of the test-time adaptation (after `bo_init_points` random points)"""
    adapt_episodes: int = 3
    """episodes per evaluation of a mu at test time"""
    acquisition: str = "ucb"
    """ucb (mean + kappa std, the official) or ei (expected improvement)"""
    ucb_kappa: float = 5.0
    """kappa of the confidence bound (on standardised returns)"""
    bo_candidates: int = 1000
    """random candidates over which the acquisition is maximised"""


# flags that a resumed run takes from the command line; every other flag comes from the checkpoint
RUN_CONTROL_FIELDS = ("resume", "iterations", "total_timesteps", "track", "wandb_project_name", "wandb_entity",
                      "capture_video", "save_model", "checkpoint_every", "num_workers", "device")

# (name, low, high) per env: the official Hopper set (friction, torso and foot mass) with motor strength and
# damping in place of restitution, and the same kinds of parameters for the other envs
DYNAMICS_DEFAULTS = {
    "Hopper-v5": ("friction=0.2:1.0", "mass.torso=2:15", "mass.foot=2:15", "strength=0.333:1.0", "damping=0.5:3.0"),
    "Walker2d-v5": ("friction=0.2:1.0", "mass.torso=2:15", "strength=0.333:1.0", "damping=0.5:3.0"),
    "HalfCheetah-v5": ("friction=0.2:1.0", "mass.torso=3:12", "strength=0.333:1.0", "damping=0.5:3.0"),
    "Ant-v5": ("friction=0.2:1.0", "mass.torso=0.15:0.6", "strength=0.333:1.0", "damping=0.5:3.0"),
}
METHODS = ("mso", "dr", "up")


class ConfigError(ValueError):
    """A flag value or environment this script cannot run; main() prints it as one line."""


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
    positive = ["iterations", "eval_episodes", "eval_every", "latent_dim", "max_episode_steps", "num_directions",
                "top_directions", "num_workers", "train_tasks", "resample_every", "bo_init_points",
                "adapt_episodes", "bo_candidates", "checkpoint_every"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    for name in ["bo_iterations", "adapt_iterations", "test_tasks", "test_tasks_outside"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    for name in ["noise", "step_size"]:
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    if args.top_directions > args.num_directions:
        raise ConfigError(f"--top-directions {args.top_directions} > --num-directions {args.num_directions}: "
                          f"the update keeps at most all directions")
    if args.method not in METHODS:
        raise ConfigError(f"--method {args.method} is unknown; choose one of {', '.join(METHODS)}")
    if args.acquisition not in ("ucb", "ei"):
        raise ConfigError(f"--acquisition {args.acquisition} is unknown; choose ucb or ei")
    if args.ucb_kappa < 0:
        raise ConfigError(f"--ucb-kappa must be >= 0 (got {args.ucb_kappa})")
    if args.total_timesteps is not None and args.total_timesteps < 1:
        raise ConfigError(f"--total-timesteps must be >= 1 (got {args.total_timesteps})")


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
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


# ----------------------------------------------------------------------------------------------------
# Tasks: physical parameters of the MuJoCo model
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DynamicsParameter:
    name: str  # friction, mass.<body>, strength, damping
    low: float
    high: float


def parse_params(specs: tuple[str, ...], model: mujoco.MjModel) -> list[DynamicsParameter]:
    """'name=low:high' strings -> parameters, checked against the model's bodies."""
    bodies = [model.body(i).name for i in range(1, model.nbody) if model.body(i).name]
    known = f"friction, strength, damping, mass.<body> with a body of {', '.join(bodies)}"
    parsed = []
    for spec in specs:
        match = re.fullmatch(r"([\w.]+)=([-+0-9.eE]+):([-+0-9.eE]+)", spec)
        if not match:
            raise ConfigError(f"--params {spec}: write name=low:high, e.g. friction=0.2:1.0 ({known})")
        try:
            name, low, high = match.group(1), float(match.group(2)), float(match.group(3))
        except ValueError:
            raise ConfigError(f"--params {spec}: low and high must be numbers, e.g. friction=0.2:1.0") from None
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ConfigError(f"--params {spec}: low and high must be finite")
        kind, _, body = name.partition(".")
        if kind not in ("friction", "mass", "strength", "damping") or bool(body) != (kind == "mass"):
            raise ConfigError(f"--params {spec}: unknown parameter '{name}'; known: {known}")
        if kind == "mass" and body not in bodies:
            raise ConfigError(f"--params {spec}: the model has no body '{body}'; bodies: {', '.join(bodies)}")
        if not low < high:
            raise ConfigError(f"--params {spec}: needs low < high")
        if kind != "strength" and low < 0:
            raise ConfigError(f"--params {spec}: {kind} cannot be negative")
        if kind == "mass" and low == 0:
            raise ConfigError(f"--params {spec}: a body needs a mass > 0")
        if kind == "mass" and model.body_mass[model.body(body).id] == 0:
            raise ConfigError(f"--params {spec}: body '{body}' has no mass of its own to scale its inertia by")
        if name in [p.name for p in parsed]:
            raise ConfigError(f"--params names {name} twice")
        parsed.append(DynamicsParameter(name, low, high))
    return parsed


class DynamicsVariation:
    """Writes a task (one value per parameter) into an env's MjModel, always starting from the nominal model,
    and restores the nominal model."""

    def __init__(self, model: mujoco.MjModel, params: list[DynamicsParameter]):
        self.model, self.params = model, params
        self.nominal = {name: getattr(model, name).copy()
                        for name in ["geom_friction", "body_mass", "body_inertia", "actuator_gear", "dof_damping"]}
        self.data = mujoco.MjData(model)  # scratch data for mj_setConst

    def set(self, values: np.ndarray) -> None:
        self.restore(recompute=False)
        m = self.model
        for param, value in zip(self.params, values):
            kind, _, body = param.name.partition(".")
            if kind == "friction":
                m.geom_friction[:, 0] = value
            elif kind == "mass":
                b = m.body(body).id
                m.body_mass[b] = value
                m.body_inertia[b] = self.nominal["body_inertia"][b] * value / self.nominal["body_mass"][b]
            elif kind == "strength":
                m.actuator_gear[:, 0] = self.nominal["actuator_gear"][:, 0] * value
            else:
                m.dof_damping[:] = self.nominal["dof_damping"] * value
        mujoco.mj_setConst(m, self.data)  # derived constants (inverse weights, subtree masses) of the new model

    def restore(self, recompute: bool = True) -> None:
        for name, array in self.nominal.items():
            getattr(self.model, name)[:] = array
        if recompute:
            mujoco.mj_setConst(self.model, self.data)


def bounds(params: list[DynamicsParameter]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([p.low for p in params]), np.array([p.high for p in params])


def sample_dynamics(params: list[DynamicsParameter], n: int, rng: np.random.Generator) -> np.ndarray:
    low, high = bounds(params)
    return rng.uniform(low, high, (n, len(params)))


def sample_outside_dynamics(params: list[DynamicsParameter], n: int, rng: np.random.Generator) -> np.ndarray:
    """In-range dynamics with one random parameter moved beyond its range by u ~ U[0.1, 0.3] of the range's
    width: above it, or below it where the value stays > 0 (strength may go anywhere: e.g. a weaker motor)."""
    values = sample_dynamics(params, n, rng)
    for row in values:
        k = rng.integers(len(params))
        low, high = params[k].low, params[k].high
        shift = rng.uniform(0.1, 0.3) * (high - low)
        below_allowed = params[k].name == "strength" or low - shift > 0
        row[k] = low - shift if below_allowed and rng.random() < 0.5 else high + shift
    return values


def normalise_dynamics(params: list[DynamicsParameter], values: np.ndarray) -> np.ndarray:
    """The universal policy's input: each parameter mapped from [low, high] to [-1, 1]."""
    low, high = bounds(params)
    return (2 * (values - low) / (high - low) - 1).astype(np.float32)


def make_env(env_id: str, render: bool = False) -> gym.Env:
    """A gymnasium MuJoCo env; anything else (unknown id, discrete actions, no MjModel) is refused."""
    if env_id not in gym.registry:
        raise ConfigError(f"--env-id {env_id} is not a registered gymnasium env (e.g. Hopper-v5)")
    env = gym.make(env_id, render_mode="rgb_array" if render else None)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise ConfigError(f"--env-id {env_id} has {type(env.action_space).__name__} actions; this script needs "
                          f"continuous (Box) actions")
    if not isinstance(getattr(env.unwrapped, "model", None), mujoco.MjModel):
        raise ConfigError(f"--env-id {env_id} is not a MuJoCo env: its dynamics cannot be varied")
    return env


# ----------------------------------------------------------------------------------------------------
# The policy pi(a | s, mu): one flat parameter vector per episode, all episodes in one batched call
# ----------------------------------------------------------------------------------------------------
class LatentConditionedPolicy(nn.Module):
    """MLP on the normalised [obs, mu] with tanh hidden layers; the deterministic action (ARS perturbs the
    weights, not the actions)."""

    def __init__(self, obs_dim: int, latent_dim: int, action_dim: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        sizes = [obs_dim + latent_dim, *hidden_sizes, action_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        for k, layer in enumerate(self.layers):  # normc: each unit's weights a random direction of norm std
            std = 0.01 if k == len(self.layers) - 1 else 1.0
            w = torch.randn_like(layer.weight)
            layer.weight.data = std * w / w.norm(dim=1, keepdim=True)
            nn.init.zeros_(layer.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            inputs = torch.tanh(layer(inputs))
        return self.layers[-1](inputs)


def layer_shapes(policy: LatentConditionedPolicy) -> list[tuple[int, int]]:
    return [(layer.out_features, layer.in_features) for layer in policy.layers]


def unflatten_layers(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[J, P] flat parameter vectors (nn.utils.parameters_to_vector's order) -> per layer ([J, out, in], [J, out])."""
    layers, offset = [], 0
    for out_dim, in_dim in shapes:
        weight = flat[:, offset:offset + out_dim * in_dim].view(-1, out_dim, in_dim)
        offset += out_dim * in_dim
        layers.append((weight, flat[:, offset:offset + out_dim]))
        offset += out_dim
    return layers


def batched_policy(layers: list[tuple[torch.Tensor, torch.Tensor]], inputs: torch.Tensor) -> torch.Tensor:
    """Each of the J rows of inputs through its own parameters: one bmm per layer."""
    x = inputs.unsqueeze(-1)
    for k, (weight, bias) in enumerate(layers):
        x = torch.baddbmm(bias.unsqueeze(-1), weight, x)
        if k < len(layers) - 1:
            x = torch.tanh(x)
    return x.squeeze(-1)


class RunningMeanStd:
    """ARS V2's state normaliser over the policy inputs [obs, mu]: statistics of every state visited by the
    perturbed policies, frozen within an iteration. Dimensions that never varied are zeroed (ARS's rule)."""

    def __init__(self, dim: int):
        self.count, self.mean, self.m2 = 0.0, np.zeros(dim), np.zeros(dim)

    def update(self, count: float, total: np.ndarray, total_sq: np.ndarray) -> None:
        """Merge a batch given by its count, sum and sum of squares (Chan et al.'s parallel variance)."""
        if count == 0:
            return
        batch_mean = total / count
        batch_m2 = np.maximum(total_sq - count * batch_mean**2, 0.0)
        delta, merged = batch_mean - self.mean, self.count + count
        self.mean = self.mean + delta * count / merged
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * count / merged
        self.count = merged

    @property
    def std(self) -> np.ndarray:
        if self.count < 2:
            return np.ones_like(self.mean)
        std = np.sqrt(self.m2 / self.count)
        return np.where(std < 1e-7, np.inf, std)

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean.copy(), "m2": self.m2.copy()}

    def load(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"].copy(), state["m2"].copy()


# ----------------------------------------------------------------------------------------------------
# Rollouts: J episodes, each with its own policy parameters, dynamics, latent and seed
# ----------------------------------------------------------------------------------------------------
class RolloutWorker:
    """A pool of env copies stepped in a loop, one batched policy call per env step for all live episodes."""

    def __init__(self, env_id: str, param_specs: tuple[str, ...], shapes: list[tuple[int, int]],
                 max_episode_steps: int):
        self.first = make_env(env_id)
        self.params = parse_params(param_specs, self.first.unwrapped.model)
        self.shapes, self.max_episode_steps = shapes, max_episode_steps
        self.low, self.high = self.first.action_space.low, self.first.action_space.high
        self.envs, self.variations = [], []

    def _grow(self, n: int) -> None:
        while len(self.envs) < n:  # one env (own MjModel and MjData) per episode of a batch, kept for the next
            env = (self.first if not self.envs else self._copy()).unwrapped
            self.envs.append(env)
            self.variations.append(DynamicsVariation(env.model, self.params))

    def _copy(self) -> gym.Env:
        """Another env like the first, built without repeating MuJoCo's compiler warnings (HalfCheetah-v5's XML
        has a deprecated attribute): the first copy showed them, hundreds of copies would bury the log."""
        previous = mujoco.get_mju_user_warning()
        mujoco.set_mju_user_warning(lambda message: None)
        try:
            return gym.make(self.first.spec.id)
        finally:
            mujoco.set_mju_user_warning(previous)

    def run(self, policies: np.ndarray, policy_index: np.ndarray, dynamics: np.ndarray, latents: np.ndarray,
            seeds: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict:
        """Returns each episode's return and length, and per episode the sum and sum of squares of the policy
        inputs it visited."""
        n = len(seeds)
        self._grow(n)
        obs = np.empty((n, self.first.observation_space.shape[0]))
        for j in range(n):
            self.variations[j].set(dynamics[j])
            obs[j] = self.envs[j].reset(seed=int(seeds[j]))[0]
        returns, lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
        total, total_sq = np.zeros((n, len(mean))), np.zeros((n, len(mean)))
        flat = torch.as_tensor(policies, dtype=torch.float32)
        live = np.arange(n)
        # the policy runs on `rows` (live episodes and, until they are half of them, ended ones): gathering
        # the live episodes' weights at every step would cost more than computing a few idle rows
        rows = live
        layers = unflatten_layers(flat[policy_index[rows]], self.shapes)
        with torch.no_grad():
            for _ in range(self.max_episode_steps):
                picked = np.searchsorted(rows, live)
                inputs = np.concatenate([obs[rows], latents[rows]], axis=1)
                total[live] += inputs[picked]
                total_sq[live] += np.square(inputs[picked])
                normalised = torch.as_tensor(np.clip((inputs - mean) / std, -5.0, 5.0), dtype=torch.float32)
                actions = np.clip(batched_policy(layers, normalised).numpy()[picked], self.low, self.high)
                ended = np.zeros(len(live), dtype=bool)
                for k, j in enumerate(live):
                    obs[j], reward, ended[k], _, _ = self.envs[j].step(actions[k])
                    returns[j] += reward
                lengths[live] += 1
                live = live[~ended]
                if not len(live):
                    break
                if len(live) < len(rows) // 2:  # gather fewer rows once half the episodes have ended
                    rows = live
                    layers = unflatten_layers(flat[policy_index[rows]], self.shapes)
        for variation in self.variations[:n]:
            variation.restore()
        return {"returns": returns, "lengths": lengths, "sum": total, "sum_sq": total_sq}


def _worker_loop(conn, worker_kwargs: dict) -> None:
    torch.set_num_threads(1)
    try:
        worker = RolloutWorker(**worker_kwargs)
    except Exception as err:  # noqa: BLE001 - reported to the parent as one line
        conn.send(f"{type(err).__name__}: {err}")
        return
    conn.send("ready")
    while (job := conn.recv()) is not None:
        try:
            conn.send(worker.run(**job))
        except Exception as err:  # noqa: BLE001
            conn.send(f"{type(err).__name__}: {err}")


class Rollouts:
    """Splits a batch of episodes over `num_workers` processes (or runs it here when 1). Results do not depend
    on the number of workers: every episode brings its own seed."""

    def __init__(self, num_workers: int, **worker_kwargs):
        self.local = RolloutWorker(**worker_kwargs) if num_workers == 1 else None
        self.pipes, self.processes = [], []
        if num_workers > 1:
            context = multiprocessing.get_context("spawn")  # fork after torch's thread pools start is unsafe
            for _ in range(num_workers):
                parent, child = context.Pipe()
                process = context.Process(target=_worker_loop, args=(child, worker_kwargs), daemon=True)
                process.start()
                child.close()  # only the worker holds this end: its death ends the pipe (EOFError, not a hang)
                self.pipes.append(parent)
                self.processes.append(process)
            for parent in self.pipes:
                self._receive(parent)

    @staticmethod
    def _receive(pipe):
        try:
            message = pipe.recv()
        except EOFError:
            raise RuntimeError("a rollout worker died (out of memory or killed?)") from None
        if isinstance(message, str) and message != "ready":
            raise RuntimeError(f"rollout worker failed: {message}")
        return message

    def run(self, policies: np.ndarray, policy_index: np.ndarray, dynamics: np.ndarray, latents: np.ndarray,
            seeds: np.ndarray, normaliser: RunningMeanStd) -> dict:
        job = dict(policies=policies, policy_index=policy_index, dynamics=dynamics, latents=latents, seeds=seeds,
                   mean=normaliser.mean, std=normaliser.std)
        if self.local is not None:
            return self.local.run(**job)
        chunks = np.array_split(np.arange(len(seeds)), len(self.pipes))
        for pipe, chunk in zip(self.pipes, chunks):
            pipe.send({**job, **{k: job[k][chunk] for k in ["policy_index", "dynamics", "latents", "seeds"]}})
        parts = [self._receive(pipe) for pipe in self.pipes]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except (BrokenPipeError, OSError):  # a worker that already died
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


# ----------------------------------------------------------------------------------------------------
# Augmented Random Search (Mania et al. 2018, V2-t)
# ----------------------------------------------------------------------------------------------------
def ars_update(theta: np.ndarray, deltas: np.ndarray, returns_plus: np.ndarray, returns_minus: np.ndarray,
               top_directions: int, step_size: float) -> tuple[np.ndarray, float]:
    """theta + alpha / (b sigma_R) sum_{k in top b} (r+_k - r-_k) delta_k, the top b directions by
    max(r+_k, r-_k), sigma_R the std of their 2b returns. Returns the new theta and sigma_R."""
    top = np.argsort(-np.maximum(returns_plus, returns_minus), kind="stable")[:top_directions]
    sigma_r = np.concatenate([returns_plus[top], returns_minus[top]]).std()
    sigma_r = sigma_r if sigma_r > 1e-8 else 1.0  # all selected returns equal: a plain average step
    step = (returns_plus[top] - returns_minus[top]) @ deltas[top]
    return theta + step_size / (top_directions * sigma_r) * step, float(sigma_r)


# ----------------------------------------------------------------------------------------------------
# Bayesian optimisation of mu: a batch of independent Gaussian processes (one per task), written out
# ----------------------------------------------------------------------------------------------------
def matern52(x1: torch.Tensor, x2: torch.Tensor, lengthscale: torch.Tensor) -> torch.Tensor:
    """k(r) = (1 + sqrt5 r / l + 5 r^2 / (3 l^2)) exp(-sqrt5 r / l) for [B, n, d] x [B, m, d] -> [B, n, m]."""
    return matern52_of_distance(torch.cdist(x1, x2), lengthscale)


def matern52_of_distance(distance: torch.Tensor, lengthscale: torch.Tensor) -> torch.Tensor:
    scaled = math.sqrt(5.0) * distance / lengthscale[:, None, None]
    return (1 + scaled + scaled**2 / 3) * torch.exp(-scaled)


def gp_covariance(x: torch.Tensor, hypers: torch.Tensor) -> torch.Tensor:
    """K + sigma_n^2 I with hypers [B, 3] = (lengthscale, signal variance, noise variance)."""
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return hypers[:, 1, None, None] * (matern52(x, x, hypers[:, 0]) + 1e-6 * eye) + hypers[:, 2, None, None] * eye


def gp_log_marginal_likelihood(x: torch.Tensor, y: torch.Tensor, hypers: torch.Tensor) -> torch.Tensor:
    """log p(y | X) = -1/2 y^T K^-1 y - 1/2 log|K| - n/2 log 2 pi, per batch element."""
    chol = torch.linalg.cholesky(gp_covariance(x, hypers))
    alpha = torch.cholesky_solve(y.unsqueeze(-1), chol).squeeze(-1)
    return (-0.5 * (y * alpha).sum(-1) - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            - 0.5 * y.shape[-1] * math.log(2 * math.pi))


# the grid of the marginal-likelihood fit (inputs in [-1, 1]^d, targets standardised): lengthscales and noise
# ratios sigma_n^2 / sigma_f^2; the signal variance sigma_f^2 is optimised in closed form for each pair
GP_LENGTHSCALES = torch.logspace(-2, 2, 25, dtype=torch.float64)
GP_NOISE_RATIOS = torch.logspace(-6, 2, 9, dtype=torch.float64)  # up to noise-dominated (1-episode returns)
GP_SIGNAL_BOUNDS = (1e-2, 1e2)


def fit_gp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hyper-parameters [B, 3] = (lengthscale l, signal variance sf2, noise variance sn2) maximising each GP's
    log marginal likelihood over a grid of (l, r = sn2 / sf2), every grid point of every GP in one batched
    Cholesky. For K = sf2 A with A = C_l + r I, the best sf2 is y^T A^-1 y / n (clipped to its bounds), so
    log p = -y^T A^-1 y / (2 sf2) - n/2 log sf2 - 1/2 log|A| - n/2 log 2 pi."""
    batch, n = y.shape
    grid_l, grid_r = torch.meshgrid(GP_LENGTHSCALES.to(x.device), GP_NOISE_RATIOS.to(x.device), indexing="ij")
    grid_l, grid_r = grid_l.reshape(-1), grid_r.reshape(-1)
    size = len(grid_l)
    distance = torch.cdist(x, x).repeat_interleave(size, 0)  # [B * size, n, n], problem-major
    ys = y.repeat_interleave(size, 0)
    lengthscale, ratio = grid_l.repeat(batch), grid_r.repeat(batch)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    chol = torch.linalg.cholesky(matern52_of_distance(distance, lengthscale) + (ratio[:, None, None] + 1e-6) * eye)
    quad = (ys * torch.cholesky_solve(ys.unsqueeze(-1), chol).squeeze(-1)).sum(-1)
    signal = (quad / n).clamp(*GP_SIGNAL_BOUNDS)
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    likelihood = -0.5 * quad / signal - 0.5 * n * torch.log(signal) - 0.5 * log_det - 0.5 * n * math.log(2 * math.pi)
    best = likelihood.view(batch, size).argmax(1) + torch.arange(batch, device=x.device) * size
    return torch.stack([lengthscale[best], signal[best], ratio[best] * signal[best]], 1)


def gp_posterior(x: torch.Tensor, y: torch.Tensor, x_query: torch.Tensor,
                 hypers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean k*^T K^-1 y and variance k** - k*^T K^-1 k* of the latent function at x_query."""
    chol = torch.linalg.cholesky(gp_covariance(x, hypers))
    k_star = hypers[:, 1, None, None] * matern52(x, x_query, hypers[:, 0])  # [B, n, m]
    mean = (k_star * torch.cholesky_solve(y.unsqueeze(-1), chol)).sum(1)
    v = torch.linalg.solve_triangular(chol, k_star, upper=False)
    variance = hypers[:, 1, None] - (v**2).sum(1)
    return mean, variance.clamp_min(1e-12)


def upper_confidence_bound(mean: torch.Tensor, std: torch.Tensor, kappa: float) -> torch.Tensor:
    return mean + kappa * std


def expected_improvement(mean: torch.Tensor, std: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """E[max(f - best, 0)] = (mu - best) Phi(z) + sigma phi(z), z = (mu - best) / sigma."""
    z = (mean - best[:, None]) / std
    normal = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    return (mean - best[:, None]) * normal.cdf(z) + std * normal.log_prob(z).exp()


def bayesian_optimisation(evaluate: Callable[[np.ndarray], np.ndarray], num_problems: int, dim: int,
                          init_points: int, iterations: int, args: Args, rng: np.random.Generator,
                          device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Maximise num_problems functions over [-1, 1]^dim in lockstep: evaluate([P, dim] points) -> [P] values.
    init_points random points, then each iteration fits the GPs to the standardised values seen so far and
    evaluates, per problem, the best of bo_candidates random points under the acquisition. Returns every
    evaluated point [P, n, dim] and value [P, n]."""
    points = [rng.uniform(-1, 1, (num_problems, dim)) for _ in range(init_points)]
    values = [evaluate(p) for p in points]
    for _ in range(iterations):
        x = torch.as_tensor(np.stack(points, 1), device=device)
        y = torch.as_tensor(np.stack(values, 1), device=device)
        y = (y - y.mean(1, keepdim=True)) / y.std(1, correction=0, keepdim=True).clamp_min(1e-8)
        hypers = fit_gp(x, y)
        candidates = torch.as_tensor(rng.uniform(-1, 1, (num_problems, args.bo_candidates, dim)), device=device)
        with torch.no_grad():
            mean, variance = gp_posterior(x, y, candidates, hypers)
            if args.acquisition == "ucb":
                score = upper_confidence_bound(mean, variance.sqrt(), args.ucb_kappa)
            else:
                score = expected_improvement(mean, variance.sqrt(), y.max(1).values)
        best = score.argmax(1).cpu().numpy()
        points.append(candidates.cpu().numpy()[np.arange(num_problems), best])
        values.append(evaluate(points[-1]))
    return np.stack(points, 1), np.stack(values, 1)


# ----------------------------------------------------------------------------------------------------
# MSO's two searches: the best mu per task, and ARS on theta
# ----------------------------------------------------------------------------------------------------
def episode_returns(rollouts: Rollouts, theta: np.ndarray, dynamics: np.ndarray, latents: np.ndarray,
                    episodes: int, normaliser: RunningMeanStd, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Mean return of `episodes` episodes of theta on each (dynamics, latent) row; and the env steps taken."""
    n = len(dynamics)
    seeds = rng.integers(2**31 - 1, size=n * episodes)
    result = rollouts.run(theta[None], np.zeros(n * episodes, dtype=np.int64), np.repeat(dynamics, episodes, 0),
                          np.repeat(latents, episodes, 0), seeds, normaliser)
    return result["returns"].reshape(n, episodes).mean(1), int(result["lengths"].sum())


def strategy_search(rollouts: Rollouts, theta: np.ndarray, dynamics: np.ndarray, normaliser: RunningMeanStd,
                    iterations: int, episodes: int, args: Args, rng: np.random.Generator,
                    device: torch.device) -> tuple[np.ndarray, np.ndarray, int]:
    """argmax_mu of the return of pi(. | s, mu) on each dynamics by BO: the best evaluated mu [T, d], every
    evaluated value [T, n], and the env steps taken."""
    steps = 0

    def evaluate(latents: np.ndarray) -> np.ndarray:
        nonlocal steps
        returns, taken = episode_returns(rollouts, theta, dynamics, latents.astype(np.float32), episodes,
                                         normaliser, rng)
        steps += taken
        return returns

    points, values = bayesian_optimisation(evaluate, len(dynamics), args.latent_dim, args.bo_init_points,
                                           iterations, args, rng, device)
    best = points[np.arange(len(dynamics)), values.argmax(1)].astype(np.float32)
    return best, values, steps


def ars_iteration(rollouts: Rollouts, theta: np.ndarray, dynamics: np.ndarray, latents: np.ndarray,
                  normaliser: RunningMeanStd, args: Args, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One ARS step: every perturbation theta +- nu delta_k on every training task (with that task's latent);
    a direction's score is its mean return over the tasks. The normaliser takes in every visited state."""
    n_dirs, n_tasks = args.num_directions, len(dynamics)
    deltas = rng.standard_normal((n_dirs, len(theta))).astype(np.float32)
    policies = np.concatenate([theta + args.noise * deltas, theta - args.noise * deltas])  # [2N, P]
    seeds = np.tile(rng.integers(2**31 - 1, size=(n_dirs, n_tasks)), (2, 1))  # + and - share a reset seed
    result = rollouts.run(policies, np.repeat(np.arange(2 * n_dirs), n_tasks), np.tile(dynamics, (2 * n_dirs, 1)),
                          np.tile(latents, (2 * n_dirs, 1)), seeds.ravel(), normaliser)
    returns = result["returns"].reshape(2, n_dirs, n_tasks).mean(-1)
    new_theta, sigma_r = ars_update(theta, deltas, returns[0], returns[1], args.top_directions, args.step_size)
    normaliser.update(result["lengths"].sum(), result["sum"].sum(0), result["sum_sq"].sum(0))
    return new_theta.astype(np.float32), {
        "charts/episodic_return": result["returns"].mean(), "charts/episodic_length": result["lengths"].mean(),
        "losses/return_std": sigma_r, "losses/update_norm": float(np.linalg.norm(new_theta - theta)),
        "env_steps": int(result["lengths"].sum())}


def task_latents(method: str, params: list[DynamicsParameter], dynamics: np.ndarray) -> np.ndarray:
    """The latent input of each task for the baselines (MSO searches its own): none for dr, the true
    parameters for up."""
    if method == "up":
        return normalise_dynamics(params, dynamics)
    return np.zeros((len(dynamics), 0), dtype=np.float32)


def evaluate_on_test_dynamics(rollouts: Rollouts, theta: np.ndarray, test_dynamics: np.ndarray,
                              num_inside: int, normaliser: RunningMeanStd, params: list[DynamicsParameter],
                              args: Args, device: torch.device) -> tuple[dict, dict]:
    """MSO: BO of mu on each test dynamics ((bo_init_points + adapt_iterations) x adapt_episodes episodes),
    then eval_episodes fresh episodes of the chosen mu; dr / up: eval_episodes episodes of their fixed input.
    The same seeds every time. Returns the metrics and the adaptation curve (best-so-far mean return vs
    episodes used)."""
    rng = np.random.default_rng(args.seed + 20_000)
    metrics, curve = {}, {}
    if args.method == "mso":
        latents, values, _ = strategy_search(rollouts, theta, test_dynamics, normaliser, args.adapt_iterations,
                                             args.adapt_episodes, args, rng, device)
        best_so_far = np.maximum.accumulate(values, axis=1).mean(0)
        curve = {"episodes": (np.arange(1, values.shape[1] + 1) * args.adapt_episodes).tolist(),
                 "best_return": best_so_far.tolist()}
        metrics["meta/adapt_return"] = float(best_so_far[-1])
        metrics["meta/adapt_episodes"] = float(values.shape[1] * args.adapt_episodes)
        random_latents = rng.uniform(-1, 1, latents.shape).astype(np.float32)
        random_returns, _ = episode_returns(rollouts, theta, test_dynamics, random_latents, args.eval_episodes,
                                            normaliser, np.random.default_rng(args.seed + 30_000))
        metrics["eval/random_latent_return"] = float(random_returns.mean())
    else:
        latents = task_latents(args.method, params, test_dynamics)
    returns, _ = episode_returns(rollouts, theta, test_dynamics, latents, args.eval_episodes, normaliser,
                                 np.random.default_rng(args.seed + 30_000))
    metrics["eval/return"] = float(returns.mean())
    if num_inside:
        metrics["eval/return_in_range"] = float(returns[:num_inside].mean())
    if len(returns) > num_inside:
        metrics["eval/return_outside"] = float(returns[num_inside:].mean())
    return metrics, {"latents": latents, "returns": returns, **curve}


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
    missing = [k for k in ["args", "theta", "normaliser", "train_dynamics", "train_latents", "global_step",
                           "iteration", "elapsed", "rng"] if k not in ckpt]
    missing += [f"args.{f.name}" for f in fields(Args) if f.name not in ckpt.get("args", {})]
    if missing:
        raise ConfigError(f"--resume {path} lacks {', '.join(missing)} (written by another version of {SCRIPT}.py?)")
    if ckpt["args"]["env_id"] != args.env_id:
        raise ConfigError(f"--resume {path} is a run on --env-id {ckpt['args']['env_id']}, not --env-id "
                          f"{args.env_id}; pass --env-id {ckpt['args']['env_id']}")
    saved = {f.name: ckpt["args"][f.name] for f in fields(Args) if f.name not in RUN_CONTROL_FIELDS}
    saved["hidden_sizes"] = tuple(saved["hidden_sizes"])
    saved["params"] = tuple(saved["params"])
    if args.total_timesteps is None and args.iterations is None:  # no new budget: the run's own
        saved.update(total_timesteps=ckpt["args"]["total_timesteps"], iterations=ckpt["args"]["iterations"])
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
        # on resume, drop events logged after the checkpoint (they are about to be logged again)
        self.writer = SummaryWriter(run_dir, purge_step=None if resume_step is None else resume_step + 1)
        self.tty = sys.stdout.isatty()

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def progress(self, step: int, iteration: int, args: Args, sps: float, train_return: float,
                 eval_return: Optional[float]) -> None:
        if self.tty:
            budget = (f"step {step}/{args.total_timesteps}" if args.total_timesteps
                      else f"iteration {iteration}/{args.iterations}  step {step}")
            last = "" if eval_return is None else f"  eval/return {eval_return:.1f}"
            print(f"\r{budget}  SPS {sps:.0f}  perturbed return {train_return:.1f}{last}", end="", flush=True)

    def close(self) -> None:
        if self.tty:
            print()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def record_video(theta: np.ndarray, shapes: list, normaliser: RunningMeanStd, dynamics: np.ndarray,
                 latent: np.ndarray, args: Args, params: list[DynamicsParameter], folder: str) -> None:
    """One episode of the final policy on the first test dynamics, with its adapted (or given) latent."""
    from moviepy import ImageSequenceClip

    os.makedirs(folder, exist_ok=True)
    env = make_env(args.env_id, render=True)
    variation = DynamicsVariation(env.unwrapped.model, params)
    variation.set(dynamics)
    layers = unflatten_layers(torch.as_tensor(theta[None]), shapes)
    obs, frames = env.reset(seed=args.seed)[0], []
    for _ in range(args.max_episode_steps):
        inputs = np.clip((np.concatenate([obs, latent]) - normaliser.mean) / normaliser.std, -5.0, 5.0)
        with torch.no_grad():
            action = batched_policy(layers, torch.as_tensor(inputs[None], dtype=torch.float32))[0].numpy()
        obs, _, terminated, _, _ = env.unwrapped.step(np.clip(action, env.action_space.low, env.action_space.high))
        frames.append(env.render())
        if terminated:
            break
    ImageSequenceClip(frames, fps=env.metadata.get("render_fps", 30)).write_videofile(
        os.path.join(folder, "test_dynamics_0.mp4"), logger=None)
    env.close()


# ----------------------------------------------------------------------------------------------------
# Main loop: every resample_every iterations new training dynamics and their best mu, then ARS steps
# ----------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    ckpt = None
    if args.resume:
        ckpt, args = load_checkpoint(args.resume, args)
    if args.iterations is None:
        args = replace(args, iterations=1000)
    check_args(args)
    probe = make_env(args.env_id)  # refuses non-MuJoCo / discrete envs before anything else happens
    if args.params is None:
        if args.env_id not in DYNAMICS_DEFAULTS:
            raise ConfigError(f"--env-id {args.env_id} has no default dynamics parameters; pass --params, e.g. "
                              f"--params friction=0.2:1.0 strength=0.333:1.0")
        args = replace(args, params=DYNAMICS_DEFAULTS[args.env_id])
    params = parse_params(args.params, probe.unwrapped.model)
    if not params:
        raise ConfigError("--params is empty: name at least one dynamics parameter to vary")
    obs_dim, action_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    probe.close()
    for wanted, module in [(args.capture_video, "moviepy"), (args.track, "wandb")]:
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--{'capture-video' if module == 'moviepy' else 'track'} needs {module}: "
                              f"pip install {module}")
    if args.capture_video and not args.test_tasks + args.test_tasks_outside:
        raise ConfigError("--capture-video records a test dynamics; it needs --test-tasks >= 1")
    device = pick_device(args.device)
    latent_dim = {"mso": args.latent_dim, "dr": 0, "up": len(params)}[args.method]

    if ckpt:  # continue in the checkpoint's own folder, wherever it was moved to
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        run_name = os.path.basename(run_dir)
    else:
        run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir, suffix = os.path.join("runs", run_name), 1
        while os.path.exists(run_dir):  # two runs started in the same second never share a folder
            suffix += 1
            run_dir = os.path.join("runs", f"{run_name}-{suffix}")
        run_name = os.path.basename(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    policy = LatentConditionedPolicy(obs_dim, latent_dim, action_dim, args.hidden_sizes)
    shapes = layer_shapes(policy)
    theta = nn.utils.parameters_to_vector(policy.parameters()).detach().numpy().copy()
    normaliser = RunningMeanStd(obs_dim + latent_dim)
    rng = np.random.default_rng(args.seed)  # dynamics, perturbations, BO and env seeds of training
    test_rng = np.random.default_rng(args.seed + 10_000)
    test_dynamics = np.concatenate([sample_dynamics(params, args.test_tasks, test_rng),
                                    sample_outside_dynamics(params, args.test_tasks_outside, test_rng)])
    train_dynamics = np.zeros((0, len(params)))
    train_latents = np.zeros((0, latent_dim), dtype=np.float32)
    global_step, iteration, elapsed = 0, 0, 0.0
    if ckpt:
        theta = ckpt["theta"].copy()
        normaliser.load(ckpt["normaliser"])
        train_dynamics, train_latents = ckpt["train_dynamics"], ckpt["train_latents"]
        global_step, iteration, elapsed = ckpt["global_step"], ckpt["iteration"], ckpt["elapsed"]
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        rng.bit_generator.state = ckpt["rng"]["train"]
        print(f"resumed {run_name} at step {global_step} (iteration {iteration}) with the checkpoint's flags; "
              f"from the command line only: {', '.join(RUN_CONTROL_FIELDS[1:])}")
    logger = Logger(run_dir, run_name, args, global_step if ckpt else None)
    rollouts = None
    ckpt_path = os.path.join(run_dir, f"{SCRIPT}.pt")

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "script": SCRIPT, "args": asdict(args), "theta": theta, "normaliser": normaliser.state(),
            "train_dynamics": train_dynamics, "train_latents": train_latents, "global_step": global_step,
            "iteration": iteration, "elapsed": elapsed,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "train": rng.bit_generator.state}})

    def done() -> bool:
        return global_step >= args.total_timesteps if args.total_timesteps else iteration >= args.iterations

    def evaluate() -> tuple[dict, dict]:
        metrics, details = evaluate_on_test_dynamics(rollouts, theta, test_dynamics, args.test_tasks, normaliser,
                                                     params, args, device)
        logger.scalars(metrics, global_step)
        return metrics, details

    eval_metrics, details, history = {}, {}, []
    last_checkpoint_step, start = global_step, time.perf_counter()
    try:
        rollouts = Rollouts(args.num_workers, env_id=args.env_id, param_specs=args.params, shapes=shapes,
                            max_episode_steps=args.max_episode_steps)
        while not done():
            t0 = time.perf_counter()
            stats = {}
            if iteration % args.resample_every == 0:  # new training dynamics and, for MSO, their best mu
                train_dynamics = sample_dynamics(params, args.train_tasks, rng)
                if args.method == "mso":
                    train_latents, values, steps = strategy_search(rollouts, theta, train_dynamics, normaliser,
                                                                   args.bo_iterations, 1, args, rng, device)
                    global_step += steps
                    stats["meta/strategy_search_return"] = float(values.max(1).mean())
                    stats["time/strategy_search_s"] = time.perf_counter() - t0
                else:
                    train_latents = task_latents(args.method, params, train_dynamics)
            t1 = time.perf_counter()
            theta, ars_stats = ars_iteration(rollouts, theta, train_dynamics, train_latents, normaliser, args, rng)
            steps = ars_stats.pop("env_steps")
            t2 = time.perf_counter()
            global_step += steps
            iteration += 1
            elapsed += time.perf_counter() - start
            start = time.perf_counter()
            history.append({"step": global_step, "iteration": iteration,
                            "episodic_return": ars_stats["charts/episodic_return"]})
            logger.scalars({**ars_stats, **stats, "charts/SPS": global_step / max(elapsed, 1e-9),
                            "charts/iteration": iteration, "time/ars_iteration_s": t2 - t1,
                            "time/rollout_sps": steps / max(t2 - t1, 1e-9)}, global_step)
            if args.test_tasks + args.test_tasks_outside and (iteration % args.eval_every == 0 or done()):
                eval_metrics, details = evaluate()
                start = time.perf_counter()  # evaluation time is not training time
            logger.progress(global_step, iteration, args, global_step / max(elapsed, 1e-9),
                            ars_stats["charts/episodic_return"], eval_metrics.get("eval/return"))
            if args.save_model and (global_step - last_checkpoint_step >= args.checkpoint_every or done()):
                checkpoint()
                last_checkpoint_step = global_step
        elapsed += time.perf_counter() - start
        if not eval_metrics and args.test_tasks + args.test_tasks_outside:  # resumed a finished run
            eval_metrics, details = evaluate()
        if details.get("episodes"):
            with open(os.path.join(run_dir, "adaptation.json"), "w") as f:
                json.dump({"step": global_step, "episodes": details["episodes"],
                           "best_return": details["best_return"]}, f, indent=2)
        if args.capture_video:
            record_video(theta, shapes, normaliser, test_dynamics[0], details["latents"][0], args, params,
                         os.path.join(run_dir, "videos"))
    finally:
        if rollouts is not None:
            rollouts.close()
        logger.close()
    return {"run_dir": run_dir, "global_step": global_step, "iterations": iteration, "elapsed_s": elapsed,
            "history": history, "theta": theta, "normaliser": normaliser, "shapes": shapes, "params": params,
            "test_dynamics": test_dynamics, "adaptation": details, **eval_metrics}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ConfigError as err:
        sys.exit(f"error: {err}")
