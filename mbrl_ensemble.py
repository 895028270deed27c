"""Model-based policy optimisation (MBPO): a probabilistic ensemble, short branched model rollouts, SAC.

Algorithm (lecture: "Ensemble approach", "model errors compound over long horizons"; Janner, Fu, Zhang,
Levine 2019, "When to Trust Your Model: Model-Based Policy Optimization"):
  1. collect real data D_env with a random policy (5000 steps);
  2. every 250 real steps: fit an ensemble of 7 probabilistic models p_theta(s' - s, r | s, a) on D_env
     until its held-out loss stops improving, keep the 5 best members (elites); then branch 100 000
     rollouts of k steps from states drawn from D_env, each step predicted by a random elite and acted
     by the current policy, into a model buffer D_model (k grows with the epoch: schedule [a, b, x, y]);
  3. every real step: act with SAC's stochastic policy, add the transition to D_env, and make G SAC updates
     on batches of 5 % real and 95 % model transitions.
Short rollouts keep the compounding model error small, while branching from every real state still
gives SAC many more transitions than the real ones.

Headline benchmark (MBPO Hopper, 125k steps):  python mbrl_ensemble.py --env-id Hopper-v5
Per-env settings of the official config (jannerm/mbpo examples/config) are picked by --env-id:
Hopper, Walker2d, HalfCheetah, Ant, Humanoid, InvertedPendulum, InvertedDoublePendulum (v5); any flag
overrides them.
Small CPU configuration (the official InvertedPendulum config, ~6 minutes on 2 cores):
    python mbrl_ensemble.py --env-id InvertedPendulum-v5 --total-timesteps 3000
    (seed 1: mean-action return 1000/1000 from step 2250 on; docs/mbrl_ensemble.md)

Where this script differs from the official MBPO code (TF1 on gym v2) and why:
  - gymnasium v5 environments; Ant-v5 and Humanoid-v5 are made without contact forces / com inertia,
    velocities and actuator forces in the observation (27 and 45 dims), which are the observations of
    MBPO's AntTruncatedObs and HumanoidTruncatedObs.
  - Model targets (s' - s, r) are normalised with the training data's mean/std for the NLL (official:
    inputs only); the held-out MSE that stops training and ranks the elites is in the targets' own
    units, as in the official code.
  - A random elite per sampled state is drawn by shuffling the states into equal groups, one per elite,
    so each step costs one batched forward of the elites instead of all 7 members on every state.
  - `--total-timesteps` counts the 5000 random warm-up steps: Hopper's 125 000 are 120 epochs of 1000 steps
    after them (the official run makes its 125 epochs after the warm-up).
  - Actions are stored and given to the critics in the env's units; softlearning rescaled them to [-1, 1]
    first. The same for Hopper, Walker2d, HalfCheetah and Ant (bounds +-1); the critics of Humanoid (+-0.4)
    and InvertedPendulum (+-3) see differently scaled action inputs (the models normalise their inputs).
  - InvertedPendulum and InvertedDoublePendulum take the 500 random warm-up steps of their official config
    files; the official launcher (examples/development/base.py) may merge its MBPO default of 5000 over them.
  - An env id without a known termination rule (e.g. Hopper-v4, whose observations may differ) runs with
    model rollouts that never terminate, with a note on stderr.
  - Checkpoints are written at episode ends (so a resumed run repeats an uninterrupted one exactly);
    a crash loses at most `checkpoint_every` steps plus one episode.
Speed (docs/mbrl_ensemble.md): on an NVIDIA H200 the G SAC updates of an env step run as one CUDA graph,
0.51 ms per update instead of 4.7 (Hopper 47 env steps/s); on 2 CPU cores 1.74x to 1.94x mbrl-lib's env steps/s
in three runs (Hopper, G = 20, SAC width 256, mbrl-lib given the replay buffer of a real run; 1.94x with nothing
else running), 1.84x and 1.90x in two runs with mbrl-lib's model stopping rule (`--model-patience 4`), short of
the 2x goal.
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
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

SCRIPT = "mbrl_ensemble"


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of random, numpy, torch and the environment"""
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
    """record the final evaluation episodes to runs/{run_name}/videos (needs moviepy, MUJOCO_GL=egl headless)"""
    save_model: bool = True
    """write runs/{run_name}/mbrl_ensemble.pt every `checkpoint_every` steps (at episode ends) and at the end"""
    checkpoint_every: int = 5000
    """env steps between checkpoints (written at the next episode end)"""
    resume: Optional[str] = None
    """path of a mbrl_ensemble.pt checkpoint to continue from (its flags are kept, except run-control ones)"""
    env_id: str = "Hopper-v5"
    """gymnasium id of a continuous-action environment with vector observations"""
    total_timesteps: Optional[int] = None
    """real environment steps, random warm-up included (default: the paper's budget for the env, 125k Hopper)"""
    eval_episodes: int = 1
    """mean-action episodes after every epoch (eval/return, and eval/discounted_return beside the critics'
    estimate eval/q_start), as the official config"""

    # Per-env settings: None takes the official config's value for --env-id (ENV_DEFAULTS below)
    epoch_length: Optional[int] = None
    """real steps per epoch (the unit of the rollout schedule and of evaluation); 1000, InvertedPendulum 250"""
    init_exploration_steps: Optional[int] = None
    """real steps of uniform random actions before training starts (>= 1); 5000, InvertedPendulum 500"""
    updates_per_step: Optional[int] = None
    """G: SAC updates per real env step; Hopper 20, HalfCheetah 40, InvertedPendulum 10"""
    rollout_schedule: Optional[tuple[int, int, int, int]] = None
    """[a, b, x, y]: rollout length k = x until epoch a, then linear to y at epoch b, y after"""
    target_entropy: Optional[float] = None
    """SAC's entropy target; Hopper -1, Walker2d/HalfCheetah -3, Ant -4, Humanoid -2, InvertedPendulum -0.05"""
    model_hidden_size: Optional[int] = None
    """units per hidden layer of the models; 200, Humanoid 400"""
    model_train_freq: Optional[int] = None
    """real steps between model training + rollouts; 250, Humanoid 1000"""
    model_retain_epochs: Optional[int] = None
    """epochs of model rollouts D_model keeps; 1, Humanoid 5"""

    # Dynamics ensemble (MBPO / PETS)
    ensemble_size: int = 7
    """number of bootstrapped members"""
    num_elites: int = 5
    """members with the lowest held-out loss, used for rollouts"""
    num_hidden_layers: int = 4
    """hidden layers (SiLU/swish)"""
    weight_decays: Optional[tuple[float, ...]] = None
    """L2 coefficient per weight layer (num_hidden_layers + 1 values); default PETS's (2.5e-5, 5e-5, 7.5e-5,
    7.5e-5, 1e-4)"""
    model_lr: float = 1e-3
    """Adam learning rate of the models"""
    model_batch_size: int = 256
    """minibatch size of model training"""
    holdout_ratio: float = 0.2
    """fraction of D_env held out at each training (at most `max_holdout`); with none held out, each training
    is one epoch (or `model_max_epochs`)"""
    max_holdout: int = 5000
    """cap on the held-out transitions"""
    model_patience: int = 5
    """training stops once no member improved its held-out loss by >1 % for more than this many epochs"""
    model_max_epochs: Optional[int] = None
    """cap on epochs per training (official: none)"""
    rollout_batch_size: int = 100_000
    """rollouts branched from real states at each model training (400 per env step x 250)"""

    # SAC (softlearning, as used by MBPO)
    real_ratio: float = 0.05
    """fraction of each SAC batch drawn from D_env, the rest from D_model"""
    gamma: float = 0.99
    """discount"""
    tau: float = 5e-3
    """target critic update rate"""
    learning_rate: float = 3e-4
    """Adam learning rate of actor, critics and entropy temperature"""
    sac_hidden_size: int = 256
    """units of each of the two hidden layers of actor and critics"""
    batch_size: int = 256
    """SAC minibatch size"""
    cuda_graph: bool = True
    """on CUDA, capture the G SAC updates of an env step as one CUDA graph and replay it (removes the launch
    overhead of ~100 small kernels per update); no effect on CPU"""


RUN_CONTROL_FIELDS = ("resume", "total_timesteps", "device", "track", "wandb_project_name", "wandb_entity",
                      "capture_video", "save_model", "checkpoint_every", "eval_episodes", "cuda_graph")
"""Flags a resumed run takes from the command line; every other flag comes from the checkpoint."""

# Official MBPO config per env (jannerm/mbpo examples/config/<env>/0.py); total_timesteps = the paper's plots.
ENV_DEFAULTS: dict[str, dict] = {
    "Hopper-v5": dict(total_timesteps=125_000, updates_per_step=20, rollout_schedule=(20, 150, 1, 15),
                      target_entropy=-1.0),
    "Walker2d-v5": dict(total_timesteps=300_000, updates_per_step=20, rollout_schedule=(20, 150, 1, 1),
                        target_entropy=-3.0),
    "HalfCheetah-v5": dict(total_timesteps=400_000, updates_per_step=40, rollout_schedule=(20, 150, 1, 1),
                           target_entropy=-3.0),
    "Ant-v5": dict(total_timesteps=300_000, updates_per_step=20, rollout_schedule=(20, 100, 1, 25),
                   target_entropy=-4.0),
    "Humanoid-v5": dict(total_timesteps=300_000, updates_per_step=20, rollout_schedule=(20, 300, 1, 25),
                        target_entropy=-2.0, model_hidden_size=400, model_train_freq=1000, model_retain_epochs=5),
    "InvertedPendulum-v5": dict(total_timesteps=20_000, updates_per_step=10, rollout_schedule=(1, 15, 1, 1),
                                target_entropy=-0.05, epoch_length=250, init_exploration_steps=500),
    "InvertedDoublePendulum-v5": dict(total_timesteps=20_000, updates_per_step=20, rollout_schedule=(1, 15, 1, 1),
                                      target_entropy=-0.5, epoch_length=250, init_exploration_steps=500),
}
GENERIC_DEFAULTS = dict(total_timesteps=100_000, epoch_length=1000, init_exploration_steps=5000, updates_per_step=20,
                        rollout_schedule=(20, 150, 1, 1), target_entropy=None, model_hidden_size=200,
                        model_train_freq=250, model_retain_epochs=1)
"""Used where ENV_DEFAULTS says nothing; target_entropy None = -(action dimensions), SAC's usual choice."""

# MBPO's truncated observations for Ant and Humanoid (mbpo/env/ant.py, humanoid.py) in v5 terms
ENV_KWARGS: dict[str, dict] = {
    "Ant-v5": dict(include_cfrc_ext_in_observation=False),
    "Humanoid-v5": dict(include_cinert_in_observation=False, include_cvel_in_observation=False,
                        include_qfrc_actuator_in_observation=False, include_cfrc_ext_in_observation=False),
}


class ConfigError(ValueError):
    """A bad flag, environment or checkpoint: the message is one line saying what to do."""


def with_env_defaults(args: Args) -> Args:
    """Fill every per-env flag left at None with the official value for args.env_id."""
    preset = {**GENERIC_DEFAULTS, **ENV_DEFAULTS.get(args.env_id, {})}
    filled = {k: v for k, v in preset.items() if getattr(args, k) is None and k != "target_entropy"}
    if args.target_entropy is None and preset["target_entropy"] is not None:
        filled["target_entropy"] = preset["target_entropy"]
    return replace(args, **filled)


def check_args(args: Args) -> None:
    for field in fields(args):  # nan passes every range check below (nan <= 0 is False), inf most of them
        values = getattr(args, field.name)
        for value in values if isinstance(values, tuple) else [values]:
            if isinstance(value, float) and not np.isfinite(value):
                raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**31:  # evaluation seeds add offsets; numpy's seeds end at 2^32
        raise ConfigError(f"--seed must be in [0, 2^31), got {args.seed}")
    positive = ["total_timesteps", "epoch_length", "updates_per_step", "model_hidden_size", "model_train_freq",
                "model_retain_epochs", "ensemble_size", "num_elites", "num_hidden_layers", "model_batch_size",
                "model_patience", "rollout_batch_size", "sac_hidden_size", "batch_size", "checkpoint_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_episodes < 0:
        raise ConfigError(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
    if args.init_exploration_steps < 1:
        raise ConfigError(f"--init-exploration-steps must be >= 1 (the first model and SAC batch need data), "
                          f"got {args.init_exploration_steps}")
    if args.model_max_epochs is not None and args.model_max_epochs <= 0:
        raise ConfigError(f"--model-max-epochs must be positive, got {args.model_max_epochs}")
    if args.num_elites > args.ensemble_size:
        raise ConfigError(f"--num-elites ({args.num_elites}) cannot exceed --ensemble-size ({args.ensemble_size})")
    if not 0.0 <= args.real_ratio <= 1.0:
        raise ConfigError(f"--real-ratio must be in [0, 1] (the fraction of real data per SAC batch), "
                          f"got {args.real_ratio}")
    a, b, x, y = args.rollout_schedule
    if not (0 <= a <= b and x >= 1 and y >= 1):
        raise ConfigError(f"--rollout-schedule {a} {b} {x} {y} is not [a, b, x, y] with 0 <= a <= b (epochs) "
                          "and x, y >= 1 (rollout lengths); e.g. 20 150 1 15")
    if args.weight_decays is not None and len(args.weight_decays) != args.num_hidden_layers + 1:
        raise ConfigError(f"--weight-decays needs {args.num_hidden_layers + 1} values (one per layer), "
                          f"got {len(args.weight_decays)}")
    if not 0.0 <= args.holdout_ratio < 1.0:
        raise ConfigError(f"--holdout-ratio must be in [0, 1), got {args.holdout_ratio}")
    if args.weight_decays is not None and min(args.weight_decays) < 0:
        raise ConfigError(f"--weight-decays must be >= 0, got {args.weight_decays}")
    if args.capture_video and args.eval_episodes == 0:
        raise ConfigError("--capture-video records the evaluation episodes; it needs --eval-episodes >= 1")
    if args.max_holdout < 0:
        raise ConfigError(f"--max-holdout must be >= 0, got {args.max_holdout}")
    if not 0.0 < args.tau <= 1.0 or not 0.0 <= args.gamma <= 1.0:
        raise ConfigError(f"--tau must be in (0, 1] and --gamma in [0, 1], got {args.tau} and {args.gamma}")
    for name in ["model_lr", "learning_rate"]:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def layer_weight_decays(args: Args) -> tuple[float, ...]:
    if args.weight_decays is not None:
        return tuple(args.weight_decays)
    hidden = ((2.5e-5, 5e-5) + (7.5e-5,) * max(args.num_hidden_layers - 2, 0))[:args.num_hidden_layers]
    return hidden + (1e-4,)


def pick_device(name: str) -> torch.device:
    """The run's device; a CUDA one always with its index (cuda -> cuda:0), as torch.cuda.set_device needs."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: this script runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def rollout_length(epoch: int, schedule: tuple[int, int, int, int]) -> int:
    """MBPO's schedule: k = x for epoch <= a, linear from x to y over epochs a..b, y after (rounded down)."""
    a, b, x, y = schedule
    if epoch <= a:
        return x
    progress = min((epoch - a) / max(b - a, 1), 1.0)
    return int(x + progress * (y - x))


# ----------------------------------------------------------------------------------------------------
# Environment and termination rules
# ----------------------------------------------------------------------------------------------------
def make_env(env_id: str, video_folder: Optional[str] = None) -> gym.Env:
    try:
        env = gym.make(env_id, render_mode="rgb_array" if video_folder else None, **ENV_KWARGS.get(env_id, {}))
    except gym.error.DependencyNotInstalled as err:
        raise ConfigError(f"{env_id} needs a package that is not installed: {err}")
    except gym.error.Error as err:
        raise ConfigError(f"unknown environment '{env_id}' ({err}); use a gymnasium id such as Hopper-v5")
    if not isinstance(env.action_space, gym.spaces.Box):
        env.close()
        raise ConfigError(f"{env_id} has {type(env.action_space).__name__} actions; mbrl_ensemble.py (SAC) needs "
                          "continuous (Box) actions, use e.g. Hopper-v5 or InvertedPendulum-v5")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        env.close()
        raise ConfigError(f"{env_id} observations are {env.observation_space}; mbrl_ensemble.py needs flat state "
                          "vectors (for pixels use dreamer_latent.py)")
    if video_folder:
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda _: True, disable_logger=True)
    return env


# Termination rules of gymnasium v5 MuJoCo envs, written for their observation layout (x, y excluded),
# applied to predicted next observations [..., obs_dim] -> bool [...]. Time-limit truncation is not here.
def hopper_terminated(obs):  # obs = [z, angle, joints..., clipped qvel]; healthy state: obs[1:] in (-100, 100)
    healthy = (obs[..., 1:].abs() < 100).all(-1) & (obs[..., 0] > 0.7) & (obs[..., 1].abs() < 0.2)
    return ~(healthy & torch.isfinite(obs).all(-1))


def walker2d_terminated(obs):  # obs = [z, angle, ...]
    z, angle = obs[..., 0], obs[..., 1]
    return ~((z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0))


def ant_terminated(obs):  # obs = [z, quaternion, ...]; gymnasium checks the whole state is finite
    return ~(torch.isfinite(obs).all(-1) & (obs[..., 0] >= 0.2) & (obs[..., 0] <= 1.0))


def humanoid_terminated(obs):  # obs = [z, ...]
    return ~((obs[..., 0] > 1.0) & (obs[..., 0] < 2.0))


def inverted_pendulum_terminated(obs):  # obs = [cart x, pole angle, velocities]
    return ~(torch.isfinite(obs).all(-1) & (obs[..., 1].abs() <= 0.2))


def inverted_double_pendulum_terminated(obs):  # obs = [x, sin q1, sin q2, cos q1, cos q2, ...]
    # tip height y = 0.6 cos(q1) + 0.6 cos(q1 + q2) (two 0.6 m poles on the cart); done when y <= 1
    sin1, sin2, cos1, cos2 = obs[..., 1], obs[..., 2], obs[..., 3], obs[..., 4]
    return 0.6 * cos1 + 0.6 * (cos1 * cos2 - sin1 * sin2) <= 1.0


TERMINATION_RULES: dict[str, Optional[Callable[[torch.Tensor], torch.Tensor]]] = {
    "Hopper-v5": hopper_terminated, "Walker2d-v5": walker2d_terminated, "Ant-v5": ant_terminated,
    "Humanoid-v5": humanoid_terminated, "InvertedPendulum-v5": inverted_pendulum_terminated,
    "InvertedDoublePendulum-v5": inverted_double_pendulum_terminated,
    # these never terminate
    "HalfCheetah-v5": None, "Reacher-v5": None, "Swimmer-v5": None, "Pusher-v5": None,
}


# ----------------------------------------------------------------------------------------------------
# Dynamics model: E Gaussian MLPs as one batched module, weights [E, in, out]
# ----------------------------------------------------------------------------------------------------
class DynamicsEnsemble(nn.Module):
    """p_e(s' - s, r | s, a) = N(mean_e, exp(logvar_e)), e = 1..E, in normalised units."""

    def __init__(self, obs_dim: int, act_dim: int, ensemble_size: int, hidden_size: int, num_hidden_layers: int):
        super().__init__()
        in_dim, self.out_dim = obs_dim + act_dim, obs_dim + 1
        sizes = [in_dim] + [hidden_size] * num_hidden_layers + [2 * self.out_dim]
        # PETS/MBPO initialisation: truncated normal with std 1 / (2 sqrt(fan_in)), zero biases
        self.weights = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.empty(ensemble_size, i, o), std=1 / (2 * i**0.5),
                                               a=-1 / i**0.5, b=1 / i**0.5))  # truncated at 2 std
            for i, o in zip(sizes[:-1], sizes[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(ensemble_size, 1, o)) for o in sizes[1:])
        # learned soft bounds on the log-variance (PETS appendix A.1), shared by the members
        self.max_logvar = nn.Parameter(torch.full((self.out_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((self.out_dim,), -10.0))
        # normalisation statistics of the data are part of the model (saved in checkpoints)
        for name, dim in [("input_mean", in_dim), ("input_std", in_dim), ("target_mean", self.out_dim),
                          ("target_std", self.out_dim)]:
            self.register_buffer(name, torch.zeros(dim) if name.endswith("mean") else torch.ones(dim))

    @property
    def ensemble_size(self) -> int:
        return self.weights[0].shape[0]

    def set_normalizers(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        for (mean, std), data in [((self.input_mean, self.input_std), inputs),
                                  ((self.target_mean, self.target_std), targets)]:
            mean.copy_(data.mean(0))
            spread = data.std(0, unbiased=False)
            std.copy_(torch.where(spread < 1e-6, torch.ones_like(spread), spread))  # constant dims keep scale 1

    def forward(self, x: torch.Tensor, members: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised inputs x [M, N, in] -> mean, log-variance [M, N, out] of the members `members` (all: M = E)."""
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if members is not None:
                weight, bias = weight[members], bias[members]
            x = torch.baddbmm(bias, x, weight)  # one batched matmul for all members, bias fused
            if i < last:
                x = F.silu(x)
        mean, logvar = x.split(self.out_dim, dim=-1)
        # soft bounds: logvar stays in (min_logvar, max_logvar) with gradients everywhere
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    @torch.no_grad()
    def sample_random_elite(self, obs: torch.Tensor, act: torch.Tensor,
                            elites: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw obs [N, o], act [N, a] -> sampled next obs [N, o], reward [N], each row from a random elite.

        The rows are shuffled into len(elites) equal groups (the last padded with repeated rows), so that
        one batched forward of the elites serves all of them.
        """
        n, m = obs.shape[0], len(elites)
        per_member = -(-n // m)
        order = torch.randperm(n, device=obs.device)
        padding = torch.arange(per_member * m - n, device=obs.device) % n  # fewer rows than elites: repeats
        order = torch.cat([order, order[padding]])  # pad to m equal groups
        x = (torch.cat([obs, act], dim=-1)[order] - self.input_mean) / self.input_std
        mean, logvar = self(x.view(m, per_member, -1), elites)
        sample = (mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)) * self.target_std + self.target_mean
        out = torch.empty(n, self.out_dim, device=obs.device)
        out[order[:n]] = sample.reshape(-1, self.out_dim)[:n]  # back to the input order
        return obs + out[:, :-1], out[:, -1]


def model_loss(model: DynamicsEnsemble, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL summed over members + soft-bound penalty (PETS/MBPO); the loss's third term, the per-layer
    L2, enters through its gradient (add_weight_decay_grads)."""
    mean, logvar = model(x)
    # -log N(y | mean, exp(logvar)) up to constants and a factor 1/2, averaged over rows and dimensions
    loss = ((mean - y).pow(2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
    return loss + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())


def weight_decay_loss(model: DynamicsEnsemble, weight_decays) -> torch.Tensor:
    """The L2 term of the MBPO loss, sum_l wd_l / 2 ||W_l||^2 (biases and log-variance bounds not decayed)."""
    return sum(wd * 0.5 * weight.pow(2).sum() for wd, weight in zip(weight_decays, model.weights))


@torch.no_grad()
def add_weight_decay_grads(model: DynamicsEnsemble, weight_decays) -> None:
    """After backward of model_loss: add the L2 term's gradient wd_l W_l to each layer's weight gradient. Adam then
    steps on the gradient of the whole loss, as if autograd had differentiated weight_decay_loss (the same
    weights to ~1e-7), but with 5 in-place adds instead of ~30 autograd ops: 8 % less time per model minibatch
    (docs/mbrl_ensemble.md)."""
    for wd, weight in zip(weight_decays, model.weights):
        weight.grad.add_(weight, alpha=wd)


class HoldoutStopping:
    """MBPO's stopping rule (official bnn.py, _save_best): an epoch improves member e when its held-out MSE drops
    by more than 1 % relative to its best so far; training stops once no member improved for more than
    `patience` epochs. The first epoch always improves (the best starts at 1e10, as the official)."""

    def __init__(self, num_members: int, patience: int):
        self.best, self.patience, self.epochs_since_update = torch.full((num_members,), 1e10), patience, 0

    def update(self, current: torch.Tensor) -> torch.Tensor:
        """This epoch's held-out MSE [E] -> which members improved [E] (their weights are the ones to keep)."""
        improved = (self.best - current) / self.best > 0.01
        self.best = torch.where(improved, current, self.best)
        self.epochs_since_update = 0 if improved.any() else self.epochs_since_update + 1
        return improved

    @property
    def stop(self) -> bool:
        return self.epochs_since_update > self.patience


def train_model(model: DynamicsEnsemble, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                targets: torch.Tensor, args: Args) -> tuple[torch.Tensor, dict[str, float]]:
    """Fit every member on its own bootstrap of D_env until the held-out loss stops improving (MBPO).

    inputs [N, o + a] = (s, a), targets [N, o + 1] = (s' - s, r). A fresh held-out split of
    min(20 %, 5000) transitions is drawn each call; an epoch improves a member when its held-out MSE
    drops by more than 1 % relative to its best; training stops when no member improved for more than
    `model_patience` epochs, and each member returns to the weights of its best epoch (as the official
    code). Returns the elites (lowest held-out MSE first) and metrics.
    """
    n, E, device = inputs.shape[0], model.ensemble_size, inputs.device
    n_holdout = min(int(n * args.holdout_ratio), args.max_holdout)
    permutation = torch.randperm(n, device=device)
    holdout, train = permutation[:n_holdout], permutation[n_holdout:]
    model.set_normalizers(inputs[train], targets[train])
    x_all = (inputs - model.input_mean) / model.input_std
    y_all = (targets - model.target_mean) / model.target_std
    n_train, weight_decays = len(train), layer_weight_decays(args)
    bootstrap = train[torch.randint(n_train, (E, n_train), device=device)]  # [E, n_train], with replacement
    x_holdout, y_holdout = x_all[holdout].expand(E, -1, -1), y_all[holdout]

    def holdout_mse() -> torch.Tensor:  # [E], in the targets' own units (official), not normalised ones
        with torch.no_grad():
            mean, _ = model(x_holdout)
            return ((mean - y_holdout) * model.target_std).pow(2).mean(dim=(1, 2))

    stopping = HoldoutStopping(E, args.model_patience)
    member_params = [*model.weights, *model.biases]  # each [E, ...]: member e's weights are [e]
    snapshot = [p.detach().clone() for p in member_params]  # each member's weights at its best held-out loss
    max_epochs = args.model_max_epochs if n_holdout else (args.model_max_epochs or 1)  # nothing to stop on
    epoch, losses = 0, []
    while True:
        shuffled = bootstrap.gather(1, torch.argsort(torch.rand(E, n_train, device=device), dim=1))
        for start in range(0, n_train, args.model_batch_size):
            idx = shuffled[:, start:start + args.model_batch_size]  # [E, B]
            loss = model_loss(model, x_all[idx], y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            add_weight_decay_grads(model, weight_decays)
            optimizer.step()
            losses.append(loss.detach())
        epoch += 1
        if n_holdout:
            improved = stopping.update(holdout_mse().cpu()).to(device)  # one host sync per epoch
            with torch.no_grad():
                for saved, param in zip(snapshot, member_params):
                    saved[improved] = param[improved]
            if stopping.stop:
                break
        if max_epochs is not None and epoch >= max_epochs:
            break
    if n_holdout:  # each member goes back to its best epoch (official _set_state); the elites are ranked then
        with torch.no_grad():
            for saved, param in zip(snapshot, member_params):
                param.copy_(saved)
    final = holdout_mse().cpu() if n_holdout else torch.zeros(E)
    elites = torch.argsort(final)[:args.num_elites].to(device)
    # model_loss: the minibatches' mean NLL + bound penalty; model_weight_decay: the L2 term at the end
    metrics = {"losses/model_loss": torch.stack(losses).mean().item(),
               "losses/model_weight_decay": weight_decay_loss(model, weight_decays).item(),
               "model/train_epochs": epoch, "model/holdout_mse": final[elites.cpu()].mean().item()}  # elites' mean
    return elites, metrics


# ----------------------------------------------------------------------------------------------------
# Replay: real data D_env and model data D_model, one row per transition on the training device
# ----------------------------------------------------------------------------------------------------
class TransitionBuffer:
    """A ring of the latest `capacity` transitions, rows = [s, a, r, s', terminated] in one tensor."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.rows = torch.zeros(capacity, 2 * obs_dim + act_dim + 2, device=device)
        self.size, self.next = 0, 0

    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    def add(self, rows: torch.Tensor) -> None:
        rows = rows[-self.capacity:]  # more rows than room: the latest ones stay
        idx = (self.next + torch.arange(len(rows), device=rows.device)) % self.capacity
        self.rows[idx] = rows
        self.next = (self.next + len(rows)) % self.capacity
        self.size = min(self.size + len(rows), self.capacity)

    def ordered(self) -> torch.Tensor:
        """The stored rows, oldest first."""
        if self.size < self.capacity:
            return self.rows[:self.size]
        return torch.cat([self.rows[self.next:], self.rows[:self.next]])

    def resize(self, capacity: int) -> None:
        """New capacity, keeping the latest rows (MBPO reallocates D_model when k changes)."""
        if capacity != self.capacity:
            kept = self.ordered()[-capacity:]
            self.rows = torch.zeros(capacity, self.rows.shape[1], device=self.rows.device)
            self.size, self.next = 0, 0
            self.add(kept)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """rows [..., width] -> obs, act, rew, next_obs, terminated."""
        o, a = self.obs_dim, self.act_dim
        return rows[..., :o], rows[..., o:o + a], rows[..., o + a], rows[..., o + a + 1:-1], rows[..., -1]

    def state_dict(self) -> dict:  # the rows where they lie: batches index them, so a resume must not reorder
        return {"rows": self.rows[:self.size].cpu(), "next": self.next, "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        self.rows = torch.zeros(state["capacity"], self.rows.shape[1], device=self.rows.device)
        self.size = len(state["rows"])
        self.rows[:self.size] = state["rows"].to(self.rows.device)
        self.next = state.get("next", self.size % self.capacity)  # older checkpoints saved the rows in order


def transition_rows(obs, act, rew, next_obs, terminated) -> torch.Tensor:
    return torch.cat([obs, act, rew[:, None], next_obs, terminated.float()[:, None]], dim=-1)


@torch.no_grad()
def branched_rollouts(model: DynamicsEnsemble, elites: torch.Tensor, policy: Callable[[torch.Tensor], torch.Tensor],
                      start_obs: torch.Tensor, length: int, termination_fn) -> torch.Tensor:
    """k-step model rollouts from real states start_obs [N, o] (MBPO Algorithm 2, lines 8-10).

    Each step: a ~ pi(s), (s', r) ~ a random elite; a rollout that reaches a terminal state stops there
    (its last transition is kept, marked terminated). Returns all transitions as buffer rows.
    """
    obs, collected = start_obs, []
    for _ in range(length):
        act = policy(obs)
        next_obs, rew = model.sample_random_elite(obs, act, elites)
        terminated = (termination_fn(next_obs) if termination_fn is not None
                      else torch.zeros(len(obs), dtype=torch.bool, device=obs.device))
        collected.append(transition_rows(obs, act, rew, next_obs, terminated))
        obs = next_obs[~terminated]
        if len(obs) == 0:
            break
    return torch.cat(collected)


# ----------------------------------------------------------------------------------------------------
# SAC: tanh-Gaussian actor, twin critics stacked as one batched module, automatic entropy temperature
# ----------------------------------------------------------------------------------------------------
def glorot_(weight: torch.Tensor) -> torch.Tensor:
    """Keras's default initialisation (softlearning's networks): U(+-sqrt(6 / (fan_in + fan_out))), applied to
    each [in, out] matrix of a stacked [..., in, out] weight (nn.init would count the stack in its fans)."""
    fan_in, fan_out = weight.shape[-2:]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class Actor(nn.Module):
    """pi(a | s): a = low + (tanh(u) + 1) / 2 * (high - low), u ~ N(mean(s), std(s)).

    Its log-probability is that of tanh(u) in [-1, 1]^d, as softlearning's, whose policy acts in [-1, 1]^d and
    whose env wrapper rescales: the target entropies of MBPO's configs are in those units whatever the env's
    action bounds (Humanoid's are +-0.4, InvertedPendulum's +-3)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, action_low: np.ndarray, action_high: np.ndarray):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, 2 * act_dim))
        for layer in self.net[::2]:
            glorot_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("action_scale", torch.as_tensor((action_high - action_low) / 2, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((action_high + action_low) / 2, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled action and its log-probability log pi(a | s) (reparameterised)."""
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = log_std.clamp(-20, 2)  # softlearning's bounds
        noise = torch.randn_like(mean)
        u = mean + log_std.exp() * noise
        # log N(u | mean, std) - sum log |d tanh(u) / d u|, with (u - mean) / std = noise and
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) written stably; the constants summed once
        log_prob = ((2 * (u + F.softplus(-2 * u)) - 0.5 * noise.pow(2) - log_std).sum(-1)
                    - mean.shape[-1] * (0.5 * math.log(2 * math.pi) + 2 * math.log(2)))
        return torch.tanh(u) * self.action_scale + self.action_bias, log_prob

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        mean, _ = self.net(obs).chunk(2, dim=-1)
        return torch.tanh(mean) * self.action_scale + self.action_bias


class TwinCritic(nn.Module):
    """Q_1(s, a), Q_2(s, a) as one batched module: weights [2, in, out], one bmm per layer for both."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        sizes = [obs_dim + act_dim, hidden, hidden, 1]
        self.weights = nn.ParameterList(nn.Parameter(glorot_(torch.empty(2, i, o)))
                                        for i, o in zip(sizes[:-1], sizes[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(2, 1, o)) for o in sizes[1:])

    def forward(self, obs: torch.Tensor, act: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """[B, o], [B, a] -> [2, B]. detach_params: gradients reach the action only (the actor's loss)."""
        x = torch.cat([obs, act], dim=-1).expand(2, -1, -1)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                weight, bias = weight.detach(), bias.detach()
            x = torch.baddbmm(bias, x, weight)
            if i < len(self.weights) - 1:
                x = F.relu(x, inplace=True)  # baddbmm's backward needs its inputs, not its output
        return x[..., 0]


class SAC:
    """Soft actor-critic (Haarnoja et al. 2018) with the settings MBPO used (softlearning)."""

    def __init__(self, obs_dim: int, act_dim: int, action_low: np.ndarray, action_high: np.ndarray, args: Args,
                 device: torch.device):
        self.actor = Actor(obs_dim, act_dim, args.sac_hidden_size, action_low, action_high).to(device)
        self.critic = TwinCritic(obs_dim, act_dim, args.sac_hidden_size).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)  # alpha starts at 1
        self.target_entropy = args.target_entropy if args.target_entropy is not None else -float(act_dim)
        self.gamma, self.tau = args.gamma, args.tau
        # one Adam over actor, critics and temperature: their losses share no parameters, so this is three
        # Adams with the same settings, stepped together from the same pre-update values (as softlearning's
        # single training op), with one backward pass and one fused optimizer kernel per update
        self.use_graph = args.cuda_graph and device.type == "cuda"
        self.optimizer = torch.optim.Adam([*self.actor.parameters(), *self.critic.parameters(), self.log_alpha],
                                          lr=args.learning_rate, fused=True, capturable=self.use_graph)
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    # what update() returns, in order (logged as losses/<name>): the three losses, alpha, and for diagnosis
    # the batch's mean Q (both critics), mean target y and entropy -log pi
    LOGGED = ("qf_loss", "actor_loss", "alpha_loss", "alpha", "qf_values", "qf_target", "entropy")

    def update(self, obs, act, rew, next_obs, terminated) -> torch.Tensor:
        """One gradient step of critics, actor and temperature on a batch; returns the LOGGED values, detached."""
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():  # y = r + gamma (1 - d) (min_j Q'_j(s', a') - alpha log pi(a' | s')), a' ~ pi(s')
            next_act, next_log_prob = self.actor(next_obs)
            next_q = self.critic_target(next_obs, next_act).min(0).values - alpha * next_log_prob
            target = rew + self.gamma * (1 - terminated) * next_q
        # J_Q = sum_j 1/2 E[(Q_j(s, a) - y)^2]
        q_values = self.critic(obs, act)
        critic_loss = 0.5 * (q_values - target).pow(2).mean(1).sum()
        # J_pi = E[alpha log pi(a|s) - min_j Q_j(s, a)], a ~ pi(s); the critics' weights are constants here
        new_act, log_prob = self.actor(obs)
        actor_loss = (alpha * log_prob - self.critic(obs, new_act, detach_params=True).min(0).values).mean()
        # J_alpha = E[-log alpha (log pi(a|s) + target entropy)]
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        (critic_loss + actor_loss + alpha_loss).backward()
        self.optimizer.step()
        with torch.no_grad():  # polyak averaging of the target critics, one fused op over all tensors
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), self.tau)
        return torch.stack([critic_loss, actor_loss, alpha_loss, alpha, q_values.mean(), target.mean(),
                            -log_prob.mean()]).detach()

    def updates(self, batches: torch.Tensor, split: Callable) -> torch.Tensor:
        """One update per batch of batches [G, B, width], in order; returns update()'s values [G, len(LOGGED)].

        On CUDA the G updates are captured once as a CUDA graph (after a warm-up on a side stream, as
        torch.cuda.graphs asks) and then replayed on new batches copied into the captured input tensor.
        """
        if not self.use_graph:
            return torch.stack([self.update(*split(batch)) for batch in batches])
        if self.graph is not None and self.static_batches.shape == batches.shape:
            self.static_batches.copy_(batches)
            self.graph.replay()
            return self.static_losses.clone()
        self.static_batches = batches.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the warm-up updates are this step's real updates
            losses = torch.stack([self.update(*split(batch)) for batch in self.static_batches])
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run
            self.static_losses = torch.stack([self.update(*split(batch)) for batch in self.static_batches])
        return losses

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for name in ["actor", "critic", "critic_target", "optimizer"]:
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])


def sample_batches(real: TransitionBuffer, model_data: TransitionBuffer, num_batches: int, batch_size: int,
                   real_ratio: float) -> torch.Tensor:
    """`num_batches` SAC batches [G, B, width] at once: int(B * real_ratio) rows from D_env, the rest D_model."""
    n_real = batch_size if model_data.size == 0 else int(batch_size * real_ratio)
    device = real.rows.device
    parts = [real.rows[torch.randint(real.size, (num_batches, n_real), device=device)]]
    if n_real < batch_size:
        parts.append(model_data.rows[torch.randint(model_data.size, (num_batches, batch_size - n_real),
                                                   device=device)])
    return torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------------------------------
# Evaluation, checkpoints, logging
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(env: gym.Env, agent: SAC, episodes: int, seed: int, device: torch.device) -> dict[str, float]:
    """`episodes` episodes with the mean action (no exploration noise): their mean return (eval/return), and
    as a check of the critics (Fujimoto et al. 2018, Fig. 1) their mean discounted return sum_t gamma^t r_t
    next to the critics' estimate of it, min_j Q_j(s_0, mu(s_0)) at each first state (eval/q_start).

    The critics estimate the soft value of the stochastic policy, which adds -alpha log pi per step; with the
    negative target entropies used here that term is negative (about -alpha per step for Hopper), so an
    accurate q_start lies below the stochastic policy's discounted return, which the mean action's usually
    exceeds; a q_start far above eval/discounted_return is over-estimation.
    """
    returns, discounted_returns, q_starts = [], [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        first_obs = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
        q_starts.append(agent.critic(first_obs, agent.actor.mean_action(first_obs)).min(0).values.item())
        done, total, discounted, discount = False, 0.0, 0.0, 1.0
        while not done:
            action = agent.actor.mean_action(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action.cpu().numpy())
            total += float(reward)
            discounted += discount * float(reward)
            discount *= agent.gamma
            done = terminated or truncated
        returns.append(total)
        discounted_returns.append(discounted)
    return {"eval/return": float(np.mean(returns)), "eval/discounted_return": float(np.mean(discounted_returns)),
            "eval/q_start": float(np.mean(q_starts))}


def check_rendering(env_id: str) -> None:
    """Fail before training, not after it, when --capture-video cannot render on this machine."""
    env = gym.make(env_id, render_mode="rgb_array", **ENV_KWARGS.get(env_id, {}))
    try:
        env.reset(seed=0)
        env.render()
    except Exception as err:  # noqa: BLE001 - any rendering failure gets the same advice
        raise ConfigError(f"--capture-video cannot render {env_id} ({type(err).__name__}: {err}); headless, set "
                          "MUJOCO_GL=egl and install libEGL (Debian/Ubuntu: apt-get install libegl1)")
    finally:
        env.close()


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
    missing = [k for k in ["args", "agent", "model", "model_optimizer", "elites", "real_data", "model_data",
                           "global_step", "rng"] if k not in ckpt]
    missing += [f"args.{f.name}" for f in fields(Args)  # run-control flags come from the command line anyway
                if f.name not in ckpt.get("args", {}) and f.name not in RUN_CONTROL_FIELDS]
    if missing:
        raise ConfigError(f"--resume {path} lacks {', '.join(missing)} (written by another version of {SCRIPT}.py?)")
    if ckpt["args"]["env_id"] != args.env_id:
        raise ConfigError(f"--resume {path} is a run on {ckpt['args']['env_id']}, not --env-id {args.env_id}; "
                          f"pass --env-id {ckpt['args']['env_id']}")
    saved = {f.name: ckpt["args"][f.name] for f in fields(Args) if f.name not in RUN_CONTROL_FIELDS}
    if args.total_timesteps is None:  # no new budget given: the run's own, not the env's default
        saved["total_timesteps"] = ckpt["args"]["total_timesteps"]
    for name in ["weight_decays", "rollout_schedule"]:
        if saved[name] is not None:
            saved[name] = tuple(saved[name])
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
            print(f"\rstep {step}/{total}  SPS {sps:.1f}  return {last_return:.1f}  ETA {eta / 60:.0f} min",
                  end="", flush=True)

    def close(self) -> None:
        if self.tty:
            print()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------------------------------
# Main loop (MBPO Algorithm 2)
# ----------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    ckpt = None
    if args.resume:
        ckpt, args = load_checkpoint(args.resume, args)
    args = with_env_defaults(args)
    check_args(args)
    device = pick_device(args.device)
    if device.type == "cuda":  # CUDA graphs record and replay on the current device: make it this one
        torch.cuda.set_device(device)
    for wanted, module in [(args.capture_video, "moviepy"), (args.track, "wandb")]:
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--{'capture-video' if module == 'moviepy' else 'track'} needs {module}: "
                              f"pip install {module}")
    env = make_env(args.env_id)
    if args.capture_video:
        check_rendering(args.env_id)
    if args.env_id not in TERMINATION_RULES:
        print(f"note: no termination rule known for {args.env_id}; model rollouts assume it never terminates",
              file=sys.stderr)
    termination_fn = TERMINATION_RULES.get(args.env_id)
    use_model = args.real_ratio < 1.0  # real_ratio 1 is plain SAC: no model, no rollouts

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
    logger = Logger(run_dir, run_name, args, ckpt["global_step"] if ckpt else None)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    action_rng = np.random.default_rng(args.seed)  # the random warm-up policy

    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low.astype(np.float32), env.action_space.high.astype(np.float32)
    agent = SAC(obs_dim, act_dim, low, high, args, device)
    model = DynamicsEnsemble(obs_dim, act_dim, args.ensemble_size, args.model_hidden_size,
                             args.num_hidden_layers).to(device)
    model_optimizer = torch.optim.Adam(model.parameters(), lr=args.model_lr, fused=True)
    elites = torch.arange(args.num_elites, device=device)
    real_data = TransitionBuffer(args.total_timesteps, obs_dim, act_dim, device)  # D_env keeps every transition
    model_data = TransitionBuffer(1, obs_dim, act_dim, device)  # D_model, sized at the first rollout

    def model_buffer_capacity(k: int) -> int:  # MBPO: retain_epochs x rollouts per epoch x k
        rollouts_per_epoch = args.rollout_batch_size * args.epoch_length // args.model_train_freq
        return args.model_retain_epochs * rollouts_per_epoch * k

    global_step, elapsed, returns, lengths, episode_seed = 0, 0.0, [], [], args.seed
    if ckpt:
        agent.load_state_dict(ckpt["agent"])
        model.load_state_dict(ckpt["model"])
        model_optimizer.load_state_dict(ckpt["model_optimizer"])
        elites = ckpt["elites"].to(device)
        real_data.load_state_dict(ckpt["real_data"])
        real_data.resize(max(real_data.capacity, args.total_timesteps))  # room for a larger --total-timesteps
        model_data.load_state_dict(ckpt["model_data"])
        global_step, elapsed, returns, lengths = ckpt["global_step"], ckpt["elapsed"], ckpt["returns"], ckpt["lengths"]
        episode_seed = None  # the env's RNG state comes from the checkpoint
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        action_rng.bit_generator.state = ckpt["rng"]["actions"]
        print(f"resumed {run_name} at step {global_step} with the checkpoint's flags; "
              f"from the command line only: {', '.join(RUN_CONTROL_FIELDS[1:])}")
    obs, _ = env.reset(seed=episode_seed)
    if ckpt:
        env.unwrapped.np_random.bit_generator.state = ckpt["rng"]["env"]
        obs, _ = env.reset()
    ckpt_path = os.path.join(run_dir, f"{SCRIPT}.pt")

    def checkpoint():  # at an episode end: the next step starts from env.reset(), restored exactly on resume
        save_checkpoint(ckpt_path, {
            "script": SCRIPT, "args": asdict(args), "agent": agent.state_dict(), "model": model.state_dict(),
            "model_optimizer": model_optimizer.state_dict(), "elites": elites.cpu(),
            "real_data": real_data.state_dict(), "model_data": model_data.state_dict(),
            "global_step": global_step, "elapsed": elapsed, "returns": returns, "lengths": lengths,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                    "actions": action_rng.bit_generator.state, "env": env_rng_before_reset}})

    eval_env = make_env(args.env_id)
    # the env's RNG state before its last reset, saved by checkpoints (a resumed run that takes no step saves
    # the one it was resumed with)
    episode_return, episode_length, env_rng_before_reset = 0.0, 0, ckpt["rng"]["env"] if ckpt else None
    last_checkpoint_step, eval_return, model_metrics = global_step, None, {}
    timers = {"model_train": 0.0, "rollout": 0.0, "sac": 0.0}
    sac_losses = []
    start = time.perf_counter()
    while global_step < args.total_timesteps:
        training = global_step >= args.init_exploration_steps
        steps_into_training = global_step - args.init_exploration_steps
        epoch = steps_into_training // args.epoch_length  # MBPO's epoch counter starts after the warm-up

        # every model_train_freq steps: fit the ensemble on D_env, then branch rollouts into D_model
        if training and use_model and steps_into_training % args.model_train_freq == 0:
            t0 = time.perf_counter()
            rows = real_data.ordered()
            s, a, r, s_next, _ = real_data.split(rows)
            model.train()
            elites, model_metrics = train_model(model, model_optimizer, torch.cat([s, a], -1),
                                                torch.cat([s_next - s, r[:, None]], -1), args)
            model.eval()
            t1 = time.perf_counter()
            k = rollout_length(epoch, args.rollout_schedule)
            model_data.resize(model_buffer_capacity(k))
            start_obs = s[torch.randint(len(s), (args.rollout_batch_size,), device=device)]  # never terminal: s
            new_rows = branched_rollouts(model, elites, lambda o: agent.actor(o)[0], start_obs, k, termination_fn)
            model_data.add(new_rows)
            t2 = time.perf_counter()
            timers["model_train"] += t1 - t0
            timers["rollout"] += t2 - t1
            model_metrics.update({"model/rollout_length": k, "model/buffer_size": model_data.size,
                                  "model/rollout_transitions": len(new_rows)})

        # act in the real environment
        if training:
            with torch.no_grad():
                action = agent.actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0][0].cpu().numpy()
        else:
            action = action_rng.uniform(low, high).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        real_data.add(torch.as_tensor(np.concatenate([obs, action, [reward], next_obs, [float(terminated)]]),
                                      dtype=torch.float32, device=device)[None])
        global_step += 1
        episode_return += float(reward)
        episode_length += 1
        obs = next_obs

        # G SAC updates on mixed batches, sampled together so that no update waits on the host
        if training:
            t0 = time.perf_counter()
            batches = sample_batches(real_data, model_data, args.updates_per_step, args.batch_size,
                                     args.real_ratio if use_model else 1.0)
            sac_losses.append(agent.updates(batches, real_data.split))
            timers["sac"] += time.perf_counter() - t0

        episode_ended = terminated or truncated
        if episode_ended:
            returns.append(episode_return)
            lengths.append(episode_length)
            logger.scalars({"charts/episodic_return": episode_return, "charts/episodic_length": episode_length},
                           global_step)
            episode_return, episode_length = 0.0, 0
            env_rng_before_reset = copy.deepcopy(env.unwrapped.np_random.bit_generator.state)
            obs, _ = env.reset()

        # end of an epoch: evaluate with the mean action, log, report where the time went
        if training and (steps_into_training + 1) % args.epoch_length == 0 or global_step == args.total_timesteps:
            elapsed += time.perf_counter() - start
            start = time.perf_counter()
            metrics = {"charts/SPS": global_step / max(elapsed, 1e-9), **model_metrics,
                       **{f"time/{name}_s": value for name, value in timers.items()}}
            if sac_losses:
                metrics.update({f"losses/{name}": value
                                for name, value in zip(SAC.LOGGED, torch.cat(sac_losses).mean(0).tolist())})
                sac_losses.clear()
            if args.eval_episodes:
                metrics.update(evaluate(eval_env, agent, args.eval_episodes, args.seed + 10_000, device))
                eval_return = metrics["eval/return"]
            logger.scalars(metrics, global_step)
            logger.progress(global_step, args.total_timesteps, metrics["charts/SPS"],
                            returns[-1] if returns else episode_return)

        if args.save_model and episode_ended and global_step - last_checkpoint_step >= args.checkpoint_every:
            elapsed += time.perf_counter() - start
            start = time.perf_counter()
            checkpoint()
            last_checkpoint_step = global_step
    elapsed += time.perf_counter() - start
    if args.save_model:  # the final state; resumed with a larger --total-timesteps, a cut episode starts anew
        if episode_length:
            env_rng_before_reset = copy.deepcopy(env.unwrapped.np_random.bit_generator.state)
        checkpoint()
    eval_env.close()

    if args.capture_video and args.eval_episodes:
        video_env = make_env(args.env_id, os.path.join(run_dir, "videos"))
        evaluate(video_env, agent, args.eval_episodes, args.seed + 10_000, device)
        video_env.close()
    logger.close()
    env.close()
    return {"run_dir": run_dir, "global_step": global_step, "episodic_returns": returns, "episodic_lengths": lengths,
            "eval_return": eval_return, "elapsed_s": elapsed, "time_s": dict(timers), **model_metrics}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ConfigError as err:
        sys.exit(f"error: {err}")
