"""Model-based RL with a learned dynamics model and model-predictive control (MB-MPC, PETS).

Algorithm (lecture: "Extension to model-based RL", "Model-predictive control", "Ensemble approach"):
  1. run a random policy for a few episodes to collect D = {(s, a, r, s')};
  2. repeat: fit f(s, a) -> (s' - s, r) on all of D (data aggregation);
     plan an action sequence through f with CEM or random shooting, execute only its first action,
     re-plan at the next state (MPC), add every real transition to D.
With `--no-probabilistic --ensemble-size 1 --num-particles 1 --planner rs` this is Nagabandi et al. 2018
("Neural Network Dynamics for Model-Based Deep RL", the lecture's objective sum ||f(s,a) - s'||^2; add
`--population-size 1000 --horizon 20` for their HalfCheetah K and H);
the defaults are PETS, Chua et al. 2018 ("Deep RL in a Handful of Trials using Probabilistic
Dynamics Models"): 5 probabilistic members, trajectory sampling TS-inf with 20 particles, CEM.

Headline benchmark (PETS HalfCheetah: 1 random episode, then 300 planned episodes of 1000 steps):  python mbrl_mpc.py
Small CPU configuration (a smaller planner, and more model epochs for the little data of a short run):
  python mbrl_mpc.py --env-id InvertedPendulum-v5 --total-timesteps 500 --trial-length 50 \
      --init-random-episodes 10 --population-size 100 --num-elites 10 --num-particles 5 --horizon 15 \
      --cem-iterations 3 --model-epochs 25
balances the pole for whole 50-step episodes after 1-4 planned episodes (~2 minutes on 2 cores). In longer
episodes its 15-step (0.6 s) horizon lets the cart drift into the end of its rail; see docs/mbrl_mpc.md.

Where this script differs from PETS (kchua/handful-of-trials) and why:
  - Rewards are learned (an extra model output) instead of PETS's hand-written cost functions, and
    observations are used as gymnasium v5 gives them (PETS turned the HalfCheetah angle into sin/cos),
    so any continuous-action env works without per-env code. Only termination rules are per-env.
  - Targets (s' - s, r) are normalised with the data's mean/std (PETS normalised inputs only), so each
    output dimension weighs equally in the loss whatever its scale.
  - 5 % of the transitions (drawn once, when collected) are held out to log `model/holdout_mse`;
    PETS trained on all of them.
  - The learned reward is sampled from its Gaussian like the next state (PETS's reward was exact).
  - CEM runs its fixed number of iterations; PETS also stopped early once max variance < 1e-3 (a test
    that would cost a device sync per iteration on a GPU; it rarely fires within 5 iterations).
  - With `--no-probabilistic`, each member propagates one particle per candidate (more would be copies).
  - Nagabandi's network was 2 x 500 ReLU; `--no-probabilistic` keeps this script's 4 x 200 SiLU, PETS's
    per-layer weight decay, and (with one member too) a bootstrap resample of the data per member.
  - The CEM warm start appends the middle of the action bounds after shifting the plan (PETS appended
    zeros; the same for the symmetric bounds of the MuJoCo tasks, and inside the bounds for any others).
  - Checkpoints are written at episode ends (a crash loses at most the current episode).
Speed, measured side by side with mbrl-lib 0.2.0 on a 2-core AMD EPYC with nothing else running
(docs/mbrl_mpc.md, benchmarks/planner_speed.py): PETS paper planner 4.0 s/action vs 5.5 s (1.37x), 99 GFLOP/s,
and 3.8 vs 5.3 s (1.41x) on another day; the CPU configuration's planner 82 ms/action vs 99 ms (1.20x), and 62 vs
82 ms (1.34x) on that other day. Beside other jobs the gaps were larger (1.64x, 1.35x), because mbrl-lib's planner
slows down more than ours on a busy machine.
On an NVIDIA H200, with each planning step replayed as a CUDA graph (`--cuda-graph`, default on CUDA):
32 ms/action vs mbrl-lib's 184 ms on the same GPU (5.7x).
"""

import importlib.util
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

SCRIPT = "mbrl_mpc"


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
    cuda_graph: bool = True
    """on CUDA, record one planning step as a CUDA graph and replay it for every action (ignored on CPU)"""
    track: bool = False
    """log the same scalars to Weights & Biases"""
    wandb_project_name: str = "mbrl-reference"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team)"""
    capture_video: bool = False
    """record the evaluation episodes to runs/{run_name}/videos (needs moviepy, MUJOCO_GL=egl headless)"""
    save_model: bool = True
    """write runs/{run_name}/mbrl_mpc.pt every `checkpoint_every` steps (at episode ends) and at the end"""
    checkpoint_every: int = 1000
    """env steps between checkpoints (checked at episode ends)"""
    resume: Optional[str] = None
    """path of a mbrl_mpc.pt checkpoint to continue from (its flags are kept, except run-control ones)"""
    env_id: str = "HalfCheetah-v5"
    """gymnasium id of a continuous-action environment with vector observations"""
    total_timesteps: int = 301_000
    """real environment steps, random warm-up included (PETS HalfCheetah: 1 random + 300 MPC trials of 1000)"""
    eval_episodes: int = 1
    """MPC episodes after training whose data are not added to D (eval/return); MPC adds no exploration
    noise, so they are planned exactly like training episodes"""
    trial_length: Optional[int] = None
    """episode cap in steps; default: the environment's own limit (1000 for HalfCheetah, as PETS)"""

    # Dynamics model (PETS, handful-of-trials config/halfcheetah.py)
    ensemble_size: int = 5
    """number of bootstrapped members E"""
    probabilistic: bool = True
    """Gaussian outputs + NLL (PETS); `--no-probabilistic` fits the mean with squared error (Nagabandi)"""
    hidden_size: int = 200
    """units per hidden layer"""
    num_hidden_layers: int = 4
    """hidden layers (SiLU/swish)"""
    weight_decays: Optional[tuple[float, ...]] = None
    """L2 coefficient per weight layer (num_hidden_layers + 1 values), loss += wd * ||W||^2 / 2;
    default PETS's (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4), with 7.5e-5 for any further hidden layer"""
    model_lr: float = 1e-3
    """Adam learning rate of the model"""
    model_batch_size: int = 32
    """minibatch size of model training"""
    model_epochs: int = 5
    """passes over each member's bootstrap per training iteration"""
    holdout_ratio: float = 0.05
    """fraction of transitions held out (drawn when collected) to measure the model"""
    init_random_episodes: int = 1
    """episodes of uniform random actions before the first model is trained"""

    # Planner (PETS CEM; Nagabandi random shooting used K=1000, H=20)
    planner: Literal["cem", "rs"] = "cem"
    """`cem` (cross-entropy method) or `rs` (random shooting)"""
    horizon: int = 30
    """planning horizon H"""
    population_size: int = 500
    """candidate action sequences per CEM iteration (K for random shooting)"""
    num_elites: int = 50
    """best candidates that refit the CEM distribution"""
    cem_iterations: int = 5
    """CEM iterations per action"""
    cem_alpha: float = 0.1
    """CEM smoothing: new = alpha * old + (1 - alpha) * elite statistic"""
    num_particles: int = 20
    """TS-inf particles per candidate (a multiple of ensemble_size)"""


RUN_CONTROL_FIELDS = ("resume", "total_timesteps", "device", "cuda_graph", "track", "wandb_project_name",
                      "wandb_entity", "capture_video", "save_model", "checkpoint_every", "eval_episodes")
"""Flags a resumed run takes from the command line; every other flag comes from the checkpoint."""


class ConfigError(ValueError):
    """A bad flag, environment or checkpoint: the message is one line saying what to do."""


def check_args(args: Args) -> None:
    for field in fields(args):  # nan passes every range check below (nan <= 0 is False), inf most of them
        values = getattr(args, field.name)
        for value in values if isinstance(values, tuple) else [values]:
            if isinstance(value, float) and not np.isfinite(value):
                raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**31:  # evaluation seeds add offsets; numpy's seeds end at 2^32
        raise ConfigError(f"--seed must be in [0, 2^31), got {args.seed}")
    positive = ["total_timesteps", "ensemble_size", "hidden_size", "num_hidden_layers", "model_batch_size",
                "model_epochs", "horizon", "population_size", "num_elites", "cem_iterations", "num_particles",
                "checkpoint_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_episodes < 0:
        raise ConfigError(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
    if args.init_random_episodes < 1:
        raise ConfigError(f"--init-random-episodes must be >= 1 (the first model needs data), "
                          f"got {args.init_random_episodes}")
    if args.trial_length is not None and args.trial_length <= 0:
        raise ConfigError(f"--trial-length must be positive, got {args.trial_length}")
    if args.planner == "cem" and args.num_elites > args.population_size:
        raise ConfigError(f"--num-elites ({args.num_elites}) cannot exceed --population-size ({args.population_size})")
    if args.num_particles % args.ensemble_size:
        raise ConfigError(f"--num-particles ({args.num_particles}) must be a multiple of --ensemble-size "
                          f"({args.ensemble_size}): each member propagates the same number of particles")
    if args.weight_decays is not None and len(args.weight_decays) != args.num_hidden_layers + 1:
        raise ConfigError(f"--weight-decays needs {args.num_hidden_layers + 1} values (one per layer), "
                          f"got {len(args.weight_decays)}")
    if not 0.0 <= args.holdout_ratio < 1.0:
        raise ConfigError(f"--holdout-ratio must be in [0, 1), got {args.holdout_ratio}")
    if args.weight_decays is not None and min(args.weight_decays) < 0:
        raise ConfigError(f"--weight-decays must be >= 0, got {args.weight_decays}")
    if args.capture_video and args.eval_episodes == 0:
        raise ConfigError("--capture-video records the evaluation episodes; it needs --eval-episodes >= 1")
    if not 0.0 <= args.cem_alpha < 1.0:
        raise ConfigError(f"--cem-alpha must be in [0, 1), got {args.cem_alpha}")
    if args.model_lr <= 0:
        raise ConfigError(f"--model-lr must be positive, got {args.model_lr}")


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


# ----------------------------------------------------------------------------------------------------
# Environment and termination rules
# ----------------------------------------------------------------------------------------------------
def make_env(env_id: str, trial_length: Optional[int] = None, video_folder: Optional[str] = None) -> gym.Env:
    try:
        env = gym.make(env_id, max_episode_steps=trial_length,
                       render_mode="rgb_array" if video_folder else None)
    except gym.error.DependencyNotInstalled as err:
        raise ConfigError(f"{env_id} needs a package that is not installed: {err}")
    except gym.error.Error as err:
        raise ConfigError(f"unknown environment '{env_id}' ({err}); use a gymnasium id such as HalfCheetah-v5")
    if not isinstance(env.action_space, gym.spaces.Box):
        env.close()
        raise ConfigError(f"{env_id} has {type(env.action_space).__name__} actions; mbrl_mpc.py plans "
                          "continuous (Box) actions only, use e.g. InvertedPendulum-v5 or HalfCheetah-v5")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        env.close()
        raise ConfigError(f"{env_id} observations are {env.observation_space}; mbrl_mpc.py needs flat state "
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
# Dynamics model: E MLPs as one batched module, weights [E, in, out]
# ----------------------------------------------------------------------------------------------------
class DynamicsEnsemble(nn.Module):
    """f_e(s, a) -> (s' - s, r), e = 1..E, in normalised units; Gaussian outputs when probabilistic."""

    def __init__(self, obs_dim: int, act_dim: int, ensemble_size: int, hidden_size: int,
                 num_hidden_layers: int, probabilistic: bool):
        super().__init__()
        self.obs_dim, self.probabilistic = obs_dim, probabilistic
        in_dim, self.out_dim = obs_dim + act_dim, obs_dim + 1
        sizes = [in_dim] + [hidden_size] * num_hidden_layers + [self.out_dim * (2 if probabilistic else 1)]
        # PETS initialisation: truncated normal with std 1 / (2 sqrt(fan_in)), zero biases
        self.weights = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.empty(ensemble_size, i, o), std=1 / (2 * i**0.5),
                                               a=-1 / i**0.5, b=1 / i**0.5))  # truncated at 2 std
            for i, o in zip(sizes[:-1], sizes[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(ensemble_size, 1, o)) for o in sizes[1:])
        if probabilistic:  # learned soft bounds on the log-variance (PETS appendix A.1)
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
            # a dimension constant so far (e.g. a contact force) keeps unit scale, as in PETS (whose float64
            # threshold is 1e-12; the float32 statistics here leave rounding noise up to ~1e-7 instead of 0)
            std.copy_(torch.where(spread < 1e-6, torch.ones_like(spread), spread))

    def forward(self, x: torch.Tensor, layers: Optional[tuple[list, list]] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: normalised inputs [E, N, in] -> mean [E, N, out], log-variance [E, N, out] or None (normalised
        units); with `layers` from raw_unit_layers(), x and the mean are in raw units instead."""
        rows = self.cpu_block_rows
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.shape[1] <= rows:
            return self.mlp(x, layers)
        # CPU planning: run the whole MLP on one block of rows at a time, so that a block's activations
        # (~2 MiB) stay in cache between layers; the PETS-size planner then beats a plain layer-by-layer
        # forward over all rows (5.1 vs 5.8 s/action, docs/mbrl_mpc.md). Candidates x particles x members
        # remain one tensor; only the matmul chain is tiled.
        blocks = [self.mlp(block, layers) for block in x.split(rows, dim=1)]
        mean = torch.cat([m for m, _ in blocks], dim=1)
        return mean, (torch.cat([v for _, v in blocks], dim=1) if self.probabilistic else None)

    @property
    def cpu_block_rows(self) -> int:
        return max(64, 2**21 // (4 * self.ensemble_size * self.weights[0].shape[-1]))

    def mlp(self, x: torch.Tensor, layers: Optional[tuple[list, list]] = None
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        inplace = not torch.is_grad_enabled()  # planning: no autograd, reuse buffers
        weights, biases = layers or (self.weights, self.biases)
        last = len(weights) - 1
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(bias, x, weight)  # one batched matmul for all members, bias fused
            if i < last:
                x = F.silu(x, inplace=inplace)
        if not self.probabilistic:
            return x, None
        mean, logvar = x.split(self.out_dim, dim=-1)
        # soft bounds: logvar stays in (min_logvar, max_logvar) with gradients everywhere
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def raw_unit_layers(self) -> tuple[list, list]:
        """The weights and biases with the normalisers folded in, for planning: the input's
        ((x - m) / s) W1 + b1 = x (W1 / s) + (b1 - (m / s) W1), and the mean half of the last layer times the
        targets' std plus their mean. Computed once per planning call, they spare every model step four
        element-wise passes over its inputs and outputs (the CPU config's planner 4-10 % faster in A/Bs on
        2026-12-07; the PETS-size one within the noise, docs/mbrl_mpc.md)."""
        first_w = self.weights[0] / self.input_std[:, None]
        first_b = self.biases[0] - ((self.input_mean / self.input_std) @ self.weights[0])[:, None]
        scale = torch.ones_like(self.biases[-1][0, 0])  # the log-variance half stays normalised
        scale[:self.out_dim] = self.target_std
        shift = torch.zeros_like(scale)
        shift[:self.out_dim] = self.target_mean
        last_w, last_b = self.weights[-1] * scale, self.biases[-1] * scale + shift
        return [first_w, *self.weights[1:-1], last_w], [first_b, *self.biases[1:-1], last_b]  # >= 1 hidden layer

    def predict(self, obs: torch.Tensor, act: torch.Tensor, sample: bool,
                layers: Optional[tuple[list, list]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw obs [E, N, o], act [E, N, a] -> next obs [E, N, o], reward [E, N] (sampled or mean); `layers`:
        raw_unit_layers(), which a planner computes once for all its steps."""
        mean, logvar = self(torch.cat([obs, act], dim=-1), layers or self.raw_unit_layers())  # raw units
        if sample and logvar is not None:  # mean + eps * sigma * s_y, sigma in normalised units
            std = torch.exp(torch.add(self.target_std.log(), logvar, alpha=0.5))
            mean = torch.addcmul(mean, torch.randn_like(mean), std)
        return obs + mean[..., :-1], mean[..., -1]


def model_loss(model: DynamicsEnsemble, x: torch.Tensor, y: torch.Tensor, weight_decays) -> torch.Tensor:
    """PETS loss summed over members: Gaussian NLL (or squared error) + bound penalty + L2 per layer."""
    mean, logvar = model(x)
    if logvar is None:  # Nagabandi / the lecture: sum ||f(s, a) - (s' - s)||^2 in normalised units
        loss = (mean - y).pow(2).mean(dim=(1, 2)).sum()
    else:  # -log N(y | mean, exp(logvar)) up to constants and a factor 1/2
        loss = ((mean - y).pow(2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
        loss = loss + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
    for wd, weight in zip(weight_decays, model.weights):
        loss = loss + wd * 0.5 * weight.pow(2).sum()
    return loss


def train_model(model: DynamicsEnsemble, optimizer: torch.optim.Optimizer, data: dict[str, np.ndarray],
                args: Args, device: torch.device) -> dict[str, float]:
    """Fit every member on its own bootstrap of D for `model_epochs` epochs; measure on a held-out split."""
    obs, act, next_obs, rew = (torch.as_tensor(data[k], device=device) for k in ("obs", "act", "next_obs", "rew"))
    inputs = torch.cat([obs, act], dim=-1)
    targets = torch.cat([next_obs - obs, rew[:, None]], dim=-1)
    held_out = torch.as_tensor(data["holdout"], device=device)
    holdout, train = held_out.nonzero()[:, 0], (~held_out).nonzero()[:, 0]
    if len(train) == 0:  # only possible with a handful of transitions: train on them all
        holdout, train = holdout[:0], holdout
    n_holdout = len(holdout)
    model.set_normalizers(inputs[train], targets[train])
    x_all = (inputs - model.input_mean) / model.input_std
    y_all = (targets - model.target_mean) / model.target_std
    E, n_train = model.ensemble_size, len(train)
    weight_decays = layer_weight_decays(args)
    bootstrap = train[torch.randint(n_train, (E, n_train), device=device)]  # [E, n_train], with replacement
    losses = []
    for _ in range(args.model_epochs):
        shuffled = bootstrap.gather(1, torch.argsort(torch.rand(E, n_train, device=device), dim=1))
        for start in range(0, n_train, args.model_batch_size):
            idx = shuffled[:, start:start + args.model_batch_size]  # [E, B]
            loss = model_loss(model, x_all[idx], y_all[idx], weight_decays)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    metrics = {"losses/model_loss": torch.stack(losses).mean().item()} if losses else {}
    if n_holdout:
        with torch.no_grad():
            mean, logvar = model(x_all[holdout].expand(E, -1, -1))
            y = y_all[holdout]
            metrics["model/holdout_mse"] = (mean - y).pow(2).mean().item()  # normalised units, all members
            if logvar is not None:
                metrics["model/holdout_nll"] = ((mean - y).pow(2) * torch.exp(-logvar) + logvar).mean().item()
    return metrics


# ----------------------------------------------------------------------------------------------------
# Planning: trajectory sampling (TS-inf), CEM, random shooting
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def trajectory_sampling_returns(model: DynamicsEnsemble, obs: torch.Tensor, actions: torch.Tensor,
                                num_particles: int, termination_fn=None) -> torch.Tensor:
    """Expected return of each candidate sequence actions [N, H, A] from obs [o] (PETS TS-inf).

    All candidates x particles x members are one tensor [E, N * P/E, .]: as in PETS, each member
    propagates P/E particles of every candidate and keeps them for the whole horizon (TS-inf), and
    return = mean over particles. A particle that terminates stops collecting reward.
    """
    E = model.ensemble_size
    N, H, A = actions.shape
    per_member = num_particles // E if model.probabilistic else 1  # deterministic particles would be copies
    state = obs.expand(E, N * per_member, obs.shape[-1])
    # [N, H, A] -> [H, E, N * P/E, A] once, so every step reads one contiguous slice
    step_actions = actions.permute(1, 0, 2)[:, None, :, None, :].expand(H, E, N, per_member, A)
    step_actions = step_actions.reshape(H, E, N * per_member, A)
    returns = torch.zeros(E, N * per_member, device=obs.device)
    alive = torch.ones_like(returns, dtype=torch.bool)
    layers = model.raw_unit_layers()  # the normalisers folded into the first and last layers, once
    for t in range(H):
        state, reward = model.predict(state, step_actions[t], sample=True, layers=layers)
        if termination_fn is None:
            returns += reward
        else:
            returns += torch.where(alive, reward, 0.0)  # a terminated particle adds nothing, not even NaN
            alive &= ~termination_fn(state)
    returns = returns.view(E, N, per_member)
    returns = torch.nan_to_num(returns, nan=-1e6, posinf=-1e6, neginf=-1e6)  # PETS: diverged costs 1e6
    return returns.mean(dim=(0, 2))


@torch.no_grad()
def cem_plan(evaluate: Callable[[torch.Tensor], torch.Tensor], init_mean: torch.Tensor,
             action_low: torch.Tensor, action_high: torch.Tensor, population_size: int, num_elites: int,
             iterations: int, alpha: float) -> torch.Tensor:
    """Cross-entropy method over sequences [H, A] (PETS): returns the final mean of the sampling distribution.

    Samples are a truncated normal (+-2 std) whose variance is capped so that mean +- 2 std stays
    inside the action bounds; the mean and variance are smoothed with `alpha`.
    """
    mean = init_mean.clone()
    var = ((action_high - action_low) ** 2 / 16).expand_as(mean).clone()
    for _ in range(iterations):
        bound_var = torch.minimum((mean - action_low) / 2, (action_high - mean) / 2).pow(2)
        std = torch.minimum(var, bound_var).sqrt()
        noise = nn.init.trunc_normal_(torch.empty(population_size, *mean.shape, device=mean.device), a=-2, b=2)
        samples = mean + std * noise
        elites = samples[torch.topk(evaluate(samples), num_elites).indices]
        # smoothing of mean and variance as in handful-of-trials (its first release left var unsmoothed)
        mean = alpha * mean + (1 - alpha) * elites.mean(0)
        var = alpha * var + (1 - alpha) * elites.var(0, unbiased=False)
    return mean


@torch.no_grad()
def random_shooting_plan(evaluate: Callable[[torch.Tensor], torch.Tensor], horizon: int,
                         action_low: torch.Tensor, action_high: torch.Tensor, population_size: int) -> torch.Tensor:
    """Random shooting (Nagabandi 2018): the best of K uniform sequences [H, A]."""
    u = torch.rand(population_size, horizon, action_low.shape[-1], device=action_low.device)
    samples = action_low + u * (action_high - action_low)
    return samples.index_select(0, torch.argmax(evaluate(samples)).view(1))[0]  # no host sync: no int index


class MPCController:
    """Re-plans at every real step and executes the first action; CEM starts from the shifted last plan.

    On CUDA (`--cuda-graph`) one planning step, several thousand small kernels for the PETS configuration
    (~28 per model step: normalisation, 5 matmuls, activations, log-variance bounds, sampling; x 30 steps x 5
    iterations), is recorded once as a CUDA graph and replayed for every action, so that the GPU no longer
    waits for Python to launch each kernel. The graph reads the observation, the plan, the model's
    parameters and its normalisers where they are, so training the model in place needs no new recording.
    """

    def __init__(self, model: DynamicsEnsemble, args: Args, action_low: torch.Tensor, action_high: torch.Tensor,
                 termination_fn):
        self.model, self.args, self.termination_fn = model, args, termination_fn
        self.action_low, self.action_high = action_low, action_high
        self.use_graph = args.cuda_graph and action_low.device.type == "cuda"
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.obs: Optional[torch.Tensor] = None  # the graph's input
        self.plan = ((action_low + action_high) / 2).expand(args.horizon, -1).clone()

    def reset(self) -> None:
        self.plan.copy_((self.action_low + self.action_high) / 2)  # in place: a recorded graph reads this tensor

    @torch.no_grad()
    def plan_step(self) -> torch.Tensor:
        """Plan from self.obs; the first action of the plan, and self.plan shifted for the next step."""
        args = self.args

        def evaluate(candidates):
            return trajectory_sampling_returns(self.model, self.obs, candidates, args.num_particles,
                                               self.termination_fn)

        if args.planner == "cem":
            plan = cem_plan(evaluate, self.plan, self.action_low, self.action_high, args.population_size,
                            args.num_elites, args.cem_iterations, args.cem_alpha)
            self.plan.copy_(torch.cat([plan[1:], (self.action_low + self.action_high)[None] / 2]))
        else:
            plan = random_shooting_plan(evaluate, args.horizon, self.action_low, self.action_high,
                                        args.population_size)
        return plan[0]

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32)
        if self.obs is None:
            self.obs = torch.empty_like(obs_t, device=self.action_low.device)
        self.obs.copy_(obs_t)
        if not self.use_graph:
            return self.plan_step().cpu().numpy()
        if self.graph is None:
            self.record_graph()
        self.graph.replay()
        return self.graph_action.cpu().numpy()

    def record_graph(self) -> None:
        """One eager planning step on a side stream (allocations, cuBLAS workspaces), then the recording; the
        plan and the random-number state are put back, so the first replay plans what an eager step would."""
        plan, rng = self.plan.clone(), torch.cuda.get_rng_state(self.obs.device)
        side = torch.cuda.Stream(self.obs.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.plan_step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run
            self.graph_action = self.plan_step()
        self.plan.copy_(plan)
        torch.cuda.set_rng_state(rng, self.obs.device)


# ----------------------------------------------------------------------------------------------------
# Data, episodes, checkpoints
# ----------------------------------------------------------------------------------------------------
def run_episode(env: gym.Env, policy: Callable[[np.ndarray], np.ndarray], max_steps: int,
                seed: Optional[int] = None) -> dict:
    """One episode (cut at `max_steps`); returns its transitions, return, length and ms per action."""
    obs, _ = env.reset(seed=seed)
    traj = {"obs": [], "act": [], "next_obs": [], "rew": []}
    episode_return, plan_seconds, ended = 0.0, 0.0, False
    for _ in range(max_steps):
        start = time.perf_counter()
        action = policy(obs.astype(np.float32))
        plan_seconds += time.perf_counter() - start
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(traj, (obs, action, next_obs, reward)):
            traj[key].append(value)
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            ended = True
            break
    length = len(traj["rew"])
    data = {k: np.asarray(v, dtype=np.float32) for k, v in traj.items()}
    return {"data": data, "return": episode_return, "length": length, "ended": ended,
            "plan_ms": 1e3 * plan_seconds / length}


def check_rendering(env_id: str) -> None:
    """Fail before training, not after it, when --capture-video cannot render on this machine."""
    env = gym.make(env_id, render_mode="rgb_array")
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
    missing = [k for k in ["args", "model", "optimizer", "data", "global_step", "episode", "rng"] if k not in ckpt]
    missing += [f"args.{f.name}" for f in fields(Args)  # run-control flags come from the command line anyway
                if f.name not in ckpt.get("args", {}) and f.name not in RUN_CONTROL_FIELDS]
    if missing:
        raise ConfigError(f"--resume {path} lacks {', '.join(missing)} (written by another version of {SCRIPT}.py?)")
    if ckpt["args"]["env_id"] != args.env_id:
        raise ConfigError(f"--resume {path} is a run on {ckpt['args']['env_id']}, not --env-id {args.env_id}; "
                          f"pass --env-id {ckpt['args']['env_id']}")
    saved = {f.name: ckpt["args"][f.name] for f in fields(Args) if f.name not in RUN_CONTROL_FIELDS}
    if saved["weight_decays"] is not None:
        saved["weight_decays"] = tuple(saved["weight_decays"])
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
# Main loop
# ----------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    check_args(args)
    ckpt = None
    if args.resume:
        ckpt, args = load_checkpoint(args.resume, args)
        check_args(args)
    device = pick_device(args.device)
    if device.type == "cuda":  # CUDA graphs record and replay on the current device: make it this one
        torch.cuda.set_device(device)
    for wanted, module in [(args.capture_video, "moviepy"), (args.track, "wandb")]:
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--{'capture-video' if module == 'moviepy' else 'track'} needs {module}: "
                              f"pip install {module}")
    env = make_env(args.env_id, args.trial_length)
    if args.capture_video:
        check_rendering(args.env_id)
    if args.env_id not in TERMINATION_RULES:
        print(f"note: no termination rule known for {args.env_id}; planning assumes it never terminates",
              file=sys.stderr)
    termination_fn = TERMINATION_RULES.get(args.env_id)
    max_episode_steps = env.spec.max_episode_steps or 1000

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
    env.reset(seed=args.seed)
    action_rng = np.random.default_rng(args.seed)  # the random warm-up policy

    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    model = DynamicsEnsemble(obs_dim, act_dim, args.ensemble_size, args.hidden_size, args.num_hidden_layers,
                             args.probabilistic).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.model_lr)
    low, high = env.action_space.low.astype(np.float32), env.action_space.high.astype(np.float32)
    controller = MPCController(model, args, torch.as_tensor(low, device=device), torch.as_tensor(high, device=device),
                               termination_fn)

    data: dict[str, np.ndarray] = {k: np.zeros((0, d), np.float32)
                                   for k, d in [("obs", obs_dim), ("act", act_dim), ("next_obs", obs_dim)]}
    data["rew"] = np.zeros(0, np.float32)
    data["holdout"] = np.zeros(0, bool)  # drawn once per transition, so held-out data are never trained on
    global_step, episode, elapsed, returns, lengths = 0, 0, 0.0, [], []
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        data = ckpt["data"]
        global_step, episode, elapsed = ckpt["global_step"], ckpt["episode"], ckpt["elapsed"]
        returns, lengths = ckpt["returns"], ckpt["lengths"]
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        action_rng.bit_generator.state = ckpt["rng"]["actions"]
        env.unwrapped.np_random.bit_generator.state = ckpt["rng"]["env"]
        print(f"resumed {run_name} at step {global_step} (episode {episode}) with the checkpoint's flags; "
              f"from the command line only: {', '.join(RUN_CONTROL_FIELDS[1:])}")

    ckpt_path = os.path.join(run_dir, f"{SCRIPT}.pt")

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "script": SCRIPT, "args": asdict(args), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "data": data, "global_step": global_step, "episode": episode,
            "elapsed": elapsed, "returns": returns, "lengths": lengths,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                    "actions": action_rng.bit_generator.state, "env": env.unwrapped.np_random.bit_generator.state}})

    last_checkpoint_step, model_metrics = global_step, {}
    while global_step < args.total_timesteps:
        start = time.perf_counter()
        planning = episode >= args.init_random_episodes
        if not planning:
            policy = lambda _obs: action_rng.uniform(low, high).astype(np.float32)  # noqa: E731
        else:
            model.train()
            model_metrics = train_model(model, optimizer, data, args, device)
            model.eval()
            controller.reset()
            policy = controller.act
        result = run_episode(env, policy, min(max_episode_steps, args.total_timesteps - global_step))
        result["data"]["holdout"] = np.random.random(result["length"]) < args.holdout_ratio
        data = {k: np.concatenate([data[k], result["data"][k]]) for k in data}  # aggregation
        global_step += result["length"]
        episode += 1
        elapsed += time.perf_counter() - start
        sps = global_step / elapsed
        metrics = {"charts/SPS": sps, **model_metrics}
        if result["ended"]:  # an episode cut short by the step budget is not logged as an episode
            returns.append(result["return"])
            lengths.append(result["length"])
            metrics.update({"charts/episodic_return": result["return"], "charts/episodic_length": result["length"]})
        if planning:
            metrics["time/plan_ms"] = result["plan_ms"]
        logger.scalars(metrics, global_step)
        logger.progress(global_step, args.total_timesteps, sps, result["return"])
        if args.save_model and (global_step - last_checkpoint_step >= args.checkpoint_every
                                or global_step >= args.total_timesteps):
            checkpoint()
            last_checkpoint_step = global_step

    eval_returns = []
    if args.eval_episodes:
        eval_env = make_env(args.env_id, args.trial_length,
                            os.path.join(run_dir, "videos") if args.capture_video else None)
        model.eval()
        for i in range(args.eval_episodes):
            controller.reset()
            seed = args.seed + 10_000 if i == 0 else None
            eval_returns.append(run_episode(eval_env, controller.act, max_episode_steps, seed)["return"])
        eval_env.close()
        logger.scalars({"eval/return": float(np.mean(eval_returns))}, global_step)
    logger.close()
    env.close()
    return {"run_dir": run_dir, "global_step": global_step, "episodic_returns": returns, "episodic_lengths": lengths,
            "eval_return": float(np.mean(eval_returns)) if eval_returns else None, **model_metrics}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ConfigError as err:
        sys.exit(f"error: {err}")
