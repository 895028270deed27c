"""Dreamer (DreamerV3): a world model in a compact latent space learned from pixels, behaviour learned in imagination.

Algorithm (lecture: "Image-based model ... by modeling a compact latent space dynamics"; Hafner et al. 2023,
"Mastering Diverse Domains through World Models", DreamerV3; before it Dreamer 2020 and DreamerV2 2021):
  1. act in the real environment from 64x64 images and store every step in a replay buffer;
  2. world model: a CNN encodes each image x_t to e_t; a recurrent state-space model (RSSM) keeps a
     deterministic GRU state h_t = f(h_{t-1}, z_{t-1}, a_{t-1}) and a stochastic state of 32 categorical
     variables with 32 classes each, z_t ~ q(z_t | h_t, e_t) (posterior) or ~ p(z_t | h_t) (prior, no image);
     from s_t = (h_t, z_t) heads reconstruct x_t, predict the reward r_t (symlog two-hot) and the continue
     flag c_t. Loss = reconstruction + reward + continue + 0.5 max(1, KL[sg(q) || p]) + 0.1 max(1, KL[q || sg(p)]);
  3. behaviour: from every posterior state of a replayed batch, imagine 15 steps with the prior and the actor;
     the critic learns the lambda-returns of those trajectories, the actor maximises them (normalised by the
     5-95 % percentile range of returns), with an entropy bonus. Nothing of the behaviour ever sees a pixel.

Headline benchmark (DMC walker-walk from pixels, model size S, train ratio 512, 1M env steps; needs the
dm_control extra and, realistically, a GPU):  python dreamer_latent.py
Small CPU configuration: none yet learns a MuJoCo task in minutes. Pixel InvertedPendulum at 32x32 with a
small model (benchmarks/configs/dreamer_latent.toml, cpu_pendulum32; one thread, 35-45 minutes per 6000 env
steps) reached a mean-action return of 38.3 +- 8.0 after 10 000 env steps (3 seeds; random: 3.7; max 1000;
docs/dreamer_latent.md). The tests' cheap pixel task (tests/test_dreamer_latent.py, DotWorld, whose rewarded
side is seen only in the image) is learnt in ~2.5 minutes with about 520 updates.

Defaults are those of the paper and its first reference code (danijar/dreamerv3, configs.yaml, dmc_vision):
Adam 1e-4 (model, eps 1e-8, clip 1000) and 3e-5 (actor, critic; eps 1e-5, clip 100), batch 16 x 64, uniform
replay of 1M steps, learned initial RSSM state, truncated-normal weights with variance 1 / mean(fan_in, fan_out),
LayerNorm eps 1e-3, zero-initialised reward and critic outputs, actor std in [0.1, 1], return normaliser with
EMAs of the 5th and 95th percentiles from 0, DMC camera 0 (quadruped 2). The 2024 version (LaProp, replay-value loss, latents stored in the
replay, dynamics scale 1.0) is not what this script follows.
Where this script differs from that reference and why:
  - The actor's baseline is the critic's value with a stop-gradient also for continuous actions, whose
    gradient is back-propagated through the imagined dynamics; the baseline then only shifts the objective.
  - Model size XS (GRU 256, MLP 256 x 1, CNN depth 24) is the paper's Table B.1; the reference configs start at S.
  - Episodes of gymnasium environments end at `terminated` (continue flag 0) or at the time limit
    (continue flag 1: a time-limit cut is not a terminal state).
  - Random-action prefill of --learning-starts env steps (reference: one batch, 16 x 64 policy steps).
  - `eval/return` is the return of the actor's mean (most likely) action, this project's evaluation
    convention; the reference evaluates sampled actions.
  - Env steps (--total-timesteps, logs) are policy steps x action repeat, as the paper's "env steps"; the last
    policy step of an episode that terminated mid-repeat counts in full (DMC episodes are exact). As in the
    reference, --train-ratio counts replayed steps per policy step.
Speed on 2 CPU cores (AMD EPYC, torch 2.13.0+cpu; docs/dreamer_latent.md): one update of the default
configuration (size S, 16 x 64 steps) takes 14.8 s (XS 7.1 s); acting alone (4 envs, size S) runs 228 env
steps/s on pixel InvertedPendulum and 54 on dmc:walker-walk (software rendering). The paper's train ratio
needs a GPU. On an NVIDIA H200 the eager update (0.22-0.29 s) is bound by launching its ~10k small kernels;
captured as one CUDA graph (--cuda-graph, the default on CUDA) it takes 0.071 s (3.1x faster side by side),
about 0.047 s with TF32 matmuls (--tf32, default): 82 env frames/s at train ratio 512
(benchmarks/dreamer_speed.py). `--amp` (bfloat16 autocast) gains 13 % inside the graph and loses eagerly;
`--compile` of the RSSM steps gains 8 % eagerly and 7-11 % inside the graph (0.0435 s/update, 85 frames/s;
the issue's goal is 150 on an H100).
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
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

SCRIPT = "dreamer_latent"


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of random, numpy, torch and the environments"""
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
    """at the end, record one evaluation episode and the world model's open-loop predictions to runs/{run_name}/videos"""
    save_model: bool = True
    """write runs/{run_name}/dreamer_latent.pt every `checkpoint_every` env steps and at the end"""
    checkpoint_every: int = 50_000
    """env steps between checkpoints"""
    save_replay: bool = True
    """include the replay buffer in checkpoints (about 12 kB per stored step); without it a resumed run starts
    with an empty buffer and collects `learning_starts` steps again before training"""
    resume: Optional[str] = None
    """path of a dreamer_latent.pt checkpoint to continue from (its flags are kept, except run-control ones)"""
    env_id: str = "dmc:walker-walk"
    """a MuJoCo gymnasium id (rendered to pixels, e.g. InvertedPendulum-v5) or dmc:<domain>-<task> (dm_control)"""
    total_timesteps: int = 1_000_000
    """env steps of the underlying environment (with action repeat 2, one policy step is 2 env steps)"""
    eval_episodes: int = 10
    """episodes of each evaluation with the actor's mean action"""
    eval_every: int = 50_000
    """env steps between evaluations"""

    # environment
    action_repeat: int = 2
    """env steps per policy step (rewards are summed)"""
    image_size: int = 64
    """height and width of the rendered images (a power of two, >= 16)"""
    num_envs: int = 4
    """environments stepped together, one batched policy call per step"""

    # replay and schedule
    buffer_size: int = 1_000_000
    """policy steps kept in the replay buffer, in host memory (12 KiB per 64x64 step: up to 12.3 GB at 1M, paged in
    as it fills; each checkpoint writes the filled part)"""
    learning_starts: int = 2048
    """env steps of random actions before the first update (reference: one batch of policy steps, 16 x 64 x 2)"""
    batch_size: int = 16
    """sequences per update"""
    batch_length: int = 64
    """steps per sequence"""
    train_ratio: float = 512
    """replayed steps per policy step (updates per policy step = train_ratio / (batch_size x batch_length))"""

    # world model
    model_size: str = "S"
    """the paper's presets XS, S, M, L, XL (GRU, MLP and CNN widths; the four flags below override one)"""
    deter_size: Optional[int] = None
    """GRU units h_t (XS 256, S 512, M 1024, L 2048, XL 4096)"""
    hidden_units: Optional[int] = None
    """units of every MLP layer (XS 256, S 512, M 640, L 768, XL 1024)"""
    mlp_layers: Optional[int] = None
    """hidden layers of the heads, actor and critic (XS 1, S 2, M 3, L 4, XL 5)"""
    cnn_depth: Optional[int] = None
    """channels of the first conv layer, doubled at each halving of the resolution (XS 24, S 32, M 48, L 64, XL 96)"""
    stoch_vars: int = 32
    """categorical variables of the stochastic state z_t"""
    stoch_classes: int = 32
    """classes of each categorical variable"""
    unimix: float = 0.01
    """share of the uniform distribution mixed into every categorical (latents, discrete actions)"""
    free_nats: float = 1.0
    """free bits: KL terms below this many nats give no gradient"""
    dyn_scale: float = 0.5
    """weight of the dynamics loss max(free, KL[sg(q) || p])"""
    rep_scale: float = 0.1
    """weight of the representation loss max(free, KL[q || sg(p)])"""
    reward_bins: int = 255
    """two-hot bins of the reward and critic heads, evenly spaced in [-20, 20] in symlog space"""
    model_lr: float = 1e-4
    """world model Adam step size"""
    model_grad_clip: float = 1000.0
    """world model gradient-norm clip"""

    # behaviour in imagination
    imag_horizon: int = 15
    """imagined steps from each start state"""
    gamma: float = 0.997
    """discount (1 - 1/333)"""
    lam: float = 0.95
    """lambda of the lambda-returns"""
    actor_lr: float = 3e-5
    """actor Adam step size"""
    critic_lr: float = 3e-5
    """critic Adam step size"""
    ac_grad_clip: float = 100.0
    """actor and critic gradient-norm clip"""
    actor_entropy: float = 3e-4
    """entropy regulariser eta"""
    slow_critic_fraction: float = 0.02
    """EMA step of the slow critic toward the critic, after every update"""
    slow_critic_reg: float = 1.0
    """weight of the critic's regulariser toward the slow critic's predictions"""
    return_norm_decay: float = 0.99
    """EMA decay of the 5-95 % percentile range of returns"""

    # speed
    cuda_graph: bool = True
    """on CUDA, capture the whole update as one CUDA graph after two eager updates and replay it (removes the
    launch cost of its ~10k small kernels, which eagerly takes several times their GPU time)"""
    compile: bool = False
    """torch.compile the RSSM's step functions (combines with the CUDA graph; --compile --amp needs --no-cuda-graph)"""
    amp: bool = False
    """bfloat16 autocast of the update on CUDA"""
    tf32: bool = True
    """on CUDA, float32 matmuls in TensorFloat-32 (the reference computes in bfloat16 throughout)"""


RUN_CONTROL_FIELDS = ("resume", "total_timesteps", "device", "track", "wandb_project_name", "wandb_entity",
                      "capture_video", "save_model", "checkpoint_every", "save_replay", "eval_every", "eval_episodes",
                      "cuda_graph", "compile", "amp", "tf32")
"""Flags a resumed run takes from the command line; every other flag comes from the checkpoint."""

MODEL_SIZES = {  # DreamerV3's presets: (deter_size, hidden_units, mlp_layers, cnn_depth)
    "XS": (256, 256, 1, 24),
    "S": (512, 512, 2, 32),
    "M": (1024, 640, 3, 48),
    "L": (2048, 768, 4, 64),
    "XL": (4096, 1024, 5, 96),
}


class ConfigError(ValueError):
    """A bad flag, environment or checkpoint: the message is one line saying what to do."""


def with_model_size(args: Args) -> Args:
    if args.model_size not in MODEL_SIZES:
        raise ConfigError(f"unknown --model-size {args.model_size}; use one of {', '.join(MODEL_SIZES)}")
    preset = dict(zip(["deter_size", "hidden_units", "mlp_layers", "cnn_depth"], MODEL_SIZES[args.model_size]))
    return replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})


def check_args(args: Args) -> None:
    for field in fields(args):  # nan passes every range check below (nan <= 0 is False), inf most of them
        values = getattr(args, field.name)
        for value in values if isinstance(values, tuple) else [values]:
            if isinstance(value, float) and not np.isfinite(value):
                raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**31:  # evaluation seeds add offsets; numpy's seeds end at 2^32
        raise ConfigError(f"--seed must be in [0, 2^31), got {args.seed}")
    for name in ["total_timesteps", "eval_every", "checkpoint_every", "action_repeat", "num_envs", "batch_size",
                 "batch_length", "deter_size", "hidden_units", "cnn_depth", "stoch_vars", "imag_horizon"]:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ["mlp_layers", "eval_episodes", "learning_starts", "free_nats", "dyn_scale", "rep_scale",
                 "actor_entropy", "slow_critic_reg", "train_ratio"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.stoch_classes < 2 or args.reward_bins < 3:
        raise ConfigError("--stoch-classes must be >= 2 and --reward-bins >= 3")
    if args.image_size < 16 or args.image_size & (args.image_size - 1):
        raise ConfigError(f"--image-size must be a power of two >= 16 (the CNN halves it down to 4x4), "
                          f"got {args.image_size}")
    if args.buffer_size < args.num_envs * args.batch_length:
        raise ConfigError(f"--buffer-size {args.buffer_size} cannot hold one sequence of --batch-length "
                          f"{args.batch_length} per env ({args.num_envs} envs); raise it")
    for name in ["lam", "slow_critic_fraction", "return_norm_decay"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ["gamma", "unimix"]:  # the return weights divide by gamma; the KLs take logs of probabilities
        if not 0.0 < getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name} must be in (0, 1], got {getattr(args, name)}")
    if min(args.model_lr, args.actor_lr, args.critic_lr) <= 0:
        raise ConfigError("--model-lr, --actor-lr and --critic-lr must be > 0")


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
# Pixel environments: observation = uint8 image [3, H, W], actions in [-1, 1] (Box) or an index (Discrete)
# ----------------------------------------------------------------------------------------------------
class PixelEnv(gym.Wrapper):
    """A gymnasium MuJoCo env seen through its default camera (fixed for InvertedPendulum and
    InvertedDoublePendulum; Hopper's and Walker2d's follow the torso), with action repeat (rewards summed,
    stopping at the end of the episode) and continuous actions rescaled from [-1, 1] to the env's bounds."""

    def __init__(self, env: gym.Env, image_size: int, action_repeat: int):
        super().__init__(env)
        self.action_repeat = action_repeat
        self.observation_space = gym.spaces.Box(0, 255, (3, image_size, image_size), np.uint8)
        if isinstance(env.action_space, gym.spaces.Box):
            self.low, self.high = env.action_space.low, env.action_space.high
            self.action_space = gym.spaces.Box(-1.0, 1.0, env.action_space.shape, np.float32)

    def image(self) -> np.ndarray:
        return np.ascontiguousarray(self.env.render().transpose(2, 0, 1))

    def reset(self, **kwargs):
        _, info = self.env.reset(**kwargs)
        return self.image(), info

    def step(self, action):
        if isinstance(self.action_space, gym.spaces.Box):
            action = self.low + (np.clip(action, -1, 1) + 1) * 0.5 * (self.high - self.low)
        total = 0.0
        for _ in range(self.action_repeat):
            _, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return self.image(), total, terminated, truncated, info


class DMCPixelEnv(gym.Env):
    """dm_control suite task as a gymnasium env of images (camera 0, quadruped camera 2, as DreamerV3), with
    action repeat; its 1000-step episodes end in a time-limit truncation, never a termination."""

    def __init__(self, domain: str, task: str, image_size: int, action_repeat: int, seed: int = 0):
        from dm_control import suite

        self.env = suite.load(domain, task, task_kwargs={"random": seed})
        self.image_size, self.action_repeat = image_size, action_repeat
        self.camera = 2 if domain == "quadruped" else 0
        spec = self.env.action_spec()
        self.low, self.high = spec.minimum, spec.maximum
        self.action_space = gym.spaces.Box(-1.0, 1.0, spec.shape, np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (3, image_size, image_size), np.uint8)
        self.metadata = {"render_fps": 50}

    def image(self) -> np.ndarray:
        frame = self.env.physics.render(self.image_size, self.image_size, camera_id=self.camera)
        return np.ascontiguousarray(frame.transpose(2, 0, 1))

    def render(self) -> np.ndarray:
        return self.image().transpose(1, 2, 0)

    def reset(self, seed=None, options=None):
        if seed is not None:
            self.env.task.random.seed(seed)
        self.env.reset()
        return self.image(), {}

    def step(self, action):
        action = self.low + (np.clip(action, -1, 1) + 1) * 0.5 * (self.high - self.low)
        total = 0.0
        for _ in range(self.action_repeat):
            time_step = self.env.step(action)
            total += float(time_step.reward or 0.0)
            if time_step.last():
                break
        return self.image(), total, False, time_step.last(), {}


def make_env(env_id: str, image_size: int, action_repeat: int, seed: int = 0) -> gym.Env:
    if env_id.startswith("dmc:"):
        if importlib.util.find_spec("dm_control") is None:
            raise ConfigError(f"--env-id {env_id} needs dm_control: pip install -r requirements-extras.txt "
                              "(dm_control 1.0.x needs mujoco < 4)")
        domain, _, task = env_id[4:].partition("-")
        from dm_control import suite

        if (domain, task) not in suite.ALL_TASKS:
            raise ConfigError(f"unknown dm_control task {env_id}; use dmc:<domain>-<task>, e.g. dmc:walker-walk, "
                              "dmc:cheetah-run, dmc:cartpole-swingup")
        return DMCPixelEnv(domain, task, image_size, action_repeat, seed)
    try:
        env = gym.make(env_id, render_mode="rgb_array", width=image_size, height=image_size)
    except TypeError:
        raise ConfigError(f"{env_id} cannot render {image_size}x{image_size} pixels; use a MuJoCo gymnasium id "
                          "(e.g. InvertedPendulum-v5) or dmc:<domain>-<task>") from None
    except gym.error.DependencyNotInstalled as err:
        raise ConfigError(f"{env_id} needs a package that is not installed: {err}") from None
    except gym.error.Error as err:
        raise ConfigError(f"unknown environment '{env_id}' ({err}); use a MuJoCo gymnasium id such as "
                          "InvertedPendulum-v5 or dmc:<domain>-<task>") from None
    if not isinstance(env.action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        env.close()
        raise ConfigError(f"{env_id} has {type(env.action_space).__name__} actions; {SCRIPT}.py supports "
                          "continuous (Box) and Discrete actions")
    try:
        env.reset(seed=seed)
        frame = env.render()
    except Exception as err:  # noqa: BLE001 - any rendering failure gets the same advice
        env.close()
        raise ConfigError(f"cannot render {env_id} ({type(err).__name__}: {err}); headless, set MUJOCO_GL=egl and "
                          "install libEGL (Debian/Ubuntu: apt-get install libegl1)") from None
    if not isinstance(frame, np.ndarray) or frame.shape != (image_size, image_size, 3):
        env.close()
        raise ConfigError(f"{env_id} renders {getattr(frame, 'shape', frame)}, not {image_size}x{image_size} RGB "
                          "images; use a MuJoCo gymnasium id or dmc:<domain>-<task>")
    return PixelEnv(env, image_size, action_repeat)


# ----------------------------------------------------------------------------------------------------
# Symlog and two-hot: regression targets of any scale (rewards, returns) as a classification (paper Sec. 2)
# ----------------------------------------------------------------------------------------------------
def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())  # symlog(x) = sign(x) ln(|x| + 1)


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(x.abs())  # its inverse


def twohot_encode(y: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """[...] -> [..., K]: weight on the two bins around y, in proportion to closeness, so that sum_k w_k b_k = y
    (y clipped to the bins' range)."""
    y = y.clamp(bins[0], bins[-1])
    upper = torch.searchsorted(bins, y.contiguous(), right=True).clamp(1, len(bins) - 1)
    lower = upper - 1
    w_upper = (y - bins[lower]) / (bins[upper] - bins[lower])
    out = torch.zeros(*y.shape, len(bins), device=y.device, dtype=y.dtype)
    out.scatter_(-1, lower[..., None], (1 - w_upper)[..., None])
    out.scatter_add_(-1, upper[..., None], w_upper[..., None])
    return out


def twohot_mean(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """The prediction of a two-hot symlog head: symexp(E_softmax(logits)[b])."""
    return symexp((logits.softmax(-1) * bins).sum(-1))


def twohot_loss(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's distribution with twohot(symlog(target)) -- the loss of reward and critic."""
    return -(twohot_encode(symlog(target), bins) * logits.log_softmax(-1)).sum(-1)


# ----------------------------------------------------------------------------------------------------
# Discrete latents: unimix categoricals, straight-through samples, KL with free bits
# ----------------------------------------------------------------------------------------------------
def unimix_probs(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """(1 - unimix) softmax + unimix uniform: no class ever has probability 0, so the KL stays finite."""
    return (1 - unimix) * logits.softmax(-1) + unimix / logits.shape[-1]


def straight_through_sample(probs: torch.Tensor) -> torch.Tensor:
    """A one-hot sample of each categorical whose gradient is that of `probs` (straight-through estimator)."""
    # inverse-CDF sampling: one uniform number per categorical (torch.multinomial is several times slower here)
    index = (probs.cumsum(-1) < torch.rand_like(probs[..., :1])).sum(-1).clamp(max=probs.shape[-1] - 1)
    one_hot = torch.zeros_like(probs).scatter_(-1, index[..., None], 1.0)
    return one_hot + probs - probs.detach()


def categorical_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL[p || q] of the 32 independent categoricals [..., vars, classes], summed over the variables."""
    return (p * (p.log() - q.log())).sum((-2, -1))


def kl_losses(post: torch.Tensor, prior: torch.Tensor, free_nats: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamerV3's KL balancing with free bits: the dynamics loss trains the prior toward the posterior, the
    representation loss the posterior toward the prior; each is clipped below at `free_nats` (no gradient there)."""
    dyn = categorical_kl(post.detach(), prior)
    rep = categorical_kl(post, prior.detach())
    return dyn.clamp(min=free_nats), rep.clamp(min=free_nats), dyn.detach()


# ----------------------------------------------------------------------------------------------------
# World model: CNN encoder / decoder, RSSM, reward and continue heads
# ----------------------------------------------------------------------------------------------------
LN_EPS = 1e-3  # the reference's LayerNorm epsilon


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an image batch [N, C, H, W] (each pixel normalised on its own)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def mlp(in_dim: int, units: int, layers: int, out_dim: Optional[int] = None, zero_out: bool = False) -> nn.Sequential:
    """`layers` x (Linear -> LayerNorm -> SiLU), then an optional output layer (zero-initialised for the reward
    head and the critic, so their first predictions are 0 whatever the inputs)."""
    modules, dim = [], in_dim
    for _ in range(layers):
        modules += [nn.Linear(dim, units, bias=False), nn.LayerNorm(units, eps=LN_EPS), nn.SiLU()]
        dim = units
    if out_dim is not None:
        modules.append(nn.Linear(dim, out_dim))
    net = nn.Sequential(*modules).apply(init_weights)
    if zero_out:
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


def init_weights(module: nn.Module) -> None:
    """The reference's initialisation of linear and conv layers: a normal truncated at 2 std whose variance is
    1 / mean(fan_in, fan_out), and zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
        std = math.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566  # 0.8796: the std of a normal truncated at 2
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """Image [N, 3, S, S] uint8 -> embedding: conv(kernel 4, stride 2) stages halve the resolution down to 4x4,
    doubling the channels (depth, 2 depth, 4 depth, ...)."""

    def __init__(self, image_size: int, depth: int):
        super().__init__()
        stages, channels, size, layers = int(math.log2(image_size // 4)), 3, image_size, []
        for i in range(stages):
            layers += [nn.Conv2d(channels, depth * 2**i, 4, 2, 1, bias=False), ChannelNorm(depth * 2**i), nn.SiLU()]
            channels, size = depth * 2**i, size // 2
        self.net = nn.Sequential(*layers, nn.Flatten()).apply(init_weights)
        self.out_dim = channels * size * size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image.float() / 255.0 - 0.5)


class Decoder(nn.Module):
    """Model state -> predicted image in [-0.5, 0.5] units: the encoder's stages mirrored with transposed convs."""

    def __init__(self, feat_dim: int, image_size: int, depth: int):
        super().__init__()
        stages = int(math.log2(image_size // 4))
        self.top = depth * 2 ** (stages - 1)
        self.linear = nn.Linear(feat_dim, self.top * 16)
        layers, channels = [], self.top
        for i in reversed(range(stages - 1)):
            layers += [nn.ConvTranspose2d(channels, depth * 2**i, 4, 2, 1, bias=False), ChannelNorm(depth * 2**i),
                       nn.SiLU()]
            channels = depth * 2**i
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(channels, 3, 4, 2, 1))
        self.apply(init_weights)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.net(self.linear(feat).reshape(-1, self.top, 4, 4))


class LayerNormGRUCell(nn.Module):
    """DreamerV3's GRU: one linear layer on [input, h] with LayerNorm, the update gate biased toward keeping h."""

    def __init__(self, in_dim: int, size: int):
        super().__init__()
        self.linear = nn.Linear(in_dim + size, 3 * size, bias=False)
        self.norm = nn.LayerNorm(3 * size, eps=LN_EPS)
        init_weights(self.linear)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)
        return update * cand + (1 - update) * h


class RSSM(nn.Module):
    """Recurrent state-space model. State s_t = (h_t deterministic [deter], z_t one-hot [vars, classes]).
      sequence model   h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])
      prior            p(z_t | h_t)          (imagination: no image needed)
      posterior        q(z_t | h_t, e_t)     (e_t = encoder(x_t))"""

    def __init__(self, args: Args, act_dim: int, embed_dim: int):
        super().__init__()
        self.vars, self.classes, self.unimix = args.stoch_vars, args.stoch_classes, args.unimix
        self.deter_size = args.deter_size
        stoch = self.vars * self.classes
        self.img_in = mlp(stoch + act_dim, args.hidden_units, 1)
        self.gru = LayerNormGRUCell(args.hidden_units, args.deter_size)
        self.prior_net = nn.Sequential(mlp(args.deter_size, args.hidden_units, 1), nn.Linear(args.hidden_units, stoch))
        self.post_net = nn.Sequential(mlp(args.deter_size + embed_dim, args.hidden_units, 1),
                                      nn.Linear(args.hidden_units, stoch))
        self.apply(init_weights)
        self.initial_deter = nn.Parameter(torch.zeros(args.deter_size))  # learned initial state (DreamerV3)
        self.feat_dim = args.deter_size + stoch

    def dist(self, logits: torch.Tensor) -> torch.Tensor:
        return unimix_probs(logits.reshape(*logits.shape[:-1], self.vars, self.classes), self.unimix)

    def initial(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        deter = torch.tanh(self.initial_deter).expand(batch, -1)
        probs = self.dist(self.prior_net(deter))
        stoch = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0).flatten(-2)  # prior's mode
        return deter, stoch

    def img_step(self, deter, stoch, action):
        """One step of the prior: (h_{t-1}, z_{t-1}, a_{t-1}) -> h_t and p(z_t | h_t)."""
        deter = self.sequence_step(deter, stoch, self.bounded(action))
        return deter, self.dist(self.prior_net(deter))

    @staticmethod
    def bounded(action):
        """Actions beyond [-1, 1] (unclipped samples of the actor) are scaled back into it, as the env clips them,
        keeping a gradient."""
        return action / action.abs().clamp(min=1.0).detach()

    def sequence_step(self, deter, stoch, action):
        """h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])."""
        return self.gru(self.img_in(torch.cat([stoch, action], -1)), deter)

    def split_posterior_input(self, embed):
        """The posterior's first layer is W [h_t; e_t] = W_h h_t + W_e e_t. The W_e e_t half does not depend on the
        recurrence, so it is computed here for every step of the sequences at once (one large matmul instead of T
        small ones in the sequential loop); each filtering step adds W_h h_t. Returns W_h and W_e e."""
        w_deter, w_embed = self.post_net[0][0].weight.split([self.deter_size, embed.shape[-1]], 1)
        return w_deter, F.linear(embed, w_embed)

    def filter_step(self, deter, stoch, action, embed_in, w_deter):
        """One filtering step: h_t and a sample of q(z_t | h_t, e_t), given embed_in = W_e e_t and w_deter = W_h
        (split_posterior_input)."""
        deter = self.sequence_step(deter, stoch, action)
        _, post_norm, post_act = self.post_net[0]  # after the first layer: LayerNorm, SiLU, then the output layer
        post = self.dist(self.post_net[1](post_act(post_norm(F.linear(deter, w_deter) + embed_in))))
        return deter, straight_through_sample(post).flatten(-2), post

    def observe(self, embed, prev_action, is_first, state=None):
        """Posterior states of sequences [B, T, ...], from `state` (default: the initial state) and restarting from
        the initial state wherever is_first; returns deter, stoch, post, prior [B, T, ...]."""
        B, T = embed.shape[:2]
        initial = self.initial(1)  # once per sequence batch, not per step: its kernels would run T times
        deter, stoch = state if state is not None else (x.expand(B, -1) for x in initial)
        # what does not depend on the recurrence is computed for all T steps at once, before the sequential loop
        w_deter, embed_in = self.split_posterior_input(embed)
        keep = (~is_first).to(embed.dtype)[..., None]  # [B, T, 1]
        reset_deter, reset_stoch = ((1 - keep) * x for x in initial)  # the initial state where a sequence restarts
        action = self.bounded(keep * prev_action)
        outs = []
        for t in range(T):
            deter = keep[:, t] * deter + reset_deter[:, t]
            stoch = keep[:, t] * stoch + reset_stoch[:, t]
            deter, stoch, post = self.filter_step(deter, stoch, action[:, t], embed_in[:, t], w_deter)
            outs.append((deter, stoch, post))
        deter, stoch, post = [torch.stack(x, 1) for x in zip(*outs)]
        # p(z_t | h_t) enters the KL loss but not the recurrence: one batched call over all T steps after the loop
        return deter, stoch, post, self.dist(self.prior_net(deter))


class WorldModel(nn.Module):
    def __init__(self, args: Args, act_dim: int):
        super().__init__()
        self.encoder = Encoder(args.image_size, args.cnn_depth)
        self.rssm = RSSM(args, act_dim, self.encoder.out_dim)
        feat = self.rssm.feat_dim
        self.decoder = Decoder(feat, args.image_size, args.cnn_depth)
        self.reward_head = mlp(feat, args.hidden_units, args.mlp_layers, args.reward_bins, zero_out=True)
        self.cont_head = mlp(feat, args.hidden_units, args.mlp_layers, 1)
        self.register_buffer("bins", torch.linspace(-20.0, 20.0, args.reward_bins))


def world_model_loss(wm: WorldModel, batch: dict, args: Args) -> tuple[torch.Tensor, dict, tuple]:
    """Loss of one batch of sequences [B, T]: prediction (image, reward, continue) + KL balancing with free bits.
    Returns the loss, its parts (detached) and the posterior states (the starts of imagination)."""
    B, T = batch["image"].shape[:2]
    embed = wm.encoder(batch["image"].flatten(0, 1)).reshape(B, T, -1)
    deter, stoch, post, prior = wm.rssm.observe(embed, batch["prev_action"], batch["is_first"])
    feat = torch.cat([deter, stoch], -1)
    recon = wm.decoder(feat.flatten(0, 1)).reshape(B, T, *batch["image"].shape[2:])
    target = batch["image"].float() / 255.0 - 0.5
    image_loss = (recon - target).pow(2).sum((-3, -2, -1))  # -log N(x; x_hat, 1) up to a constant, summed over pixels
    reward_loss = twohot_loss(wm.reward_head(feat), batch["reward"], wm.bins)
    cont_loss = F.binary_cross_entropy_with_logits(wm.cont_head(feat)[..., 0], 1.0 - batch["is_terminal"].float(),
                                                   reduction="none")
    dyn_loss, rep_loss, kl = kl_losses(post, prior, args.free_nats)
    loss = (image_loss + reward_loss + cont_loss + args.dyn_scale * dyn_loss + args.rep_scale * rep_loss).mean()
    parts = {"losses/image": image_loss.mean(), "losses/reward": reward_loss.mean(), "losses/cont": cont_loss.mean(),
             "losses/dyn": dyn_loss.mean(), "losses/rep": rep_loss.mean(), "model/kl": kl.mean(),
             "losses/model": loss}
    return loss, {k: v.detach() for k, v in parts.items()}, (deter, stoch)


# ----------------------------------------------------------------------------------------------------
# Behaviour: actor and critic on model states, trained in imagination
# ----------------------------------------------------------------------------------------------------
class Actor(nn.Module):
    """pi(a | s): for Box actions a Normal with tanh-squashed mean and std in [0.1, 1] (reparameterised samples;
    the env clips them to [-1, 1]); for Discrete actions a unimix categorical (one-hot actions)."""

    def __init__(self, feat_dim: int, act_dim: int, discrete: bool, args: Args):
        super().__init__()
        self.discrete, self.unimix = discrete, args.unimix
        self.net = mlp(feat_dim, args.hidden_units, args.mlp_layers, act_dim if discrete else 2 * act_dim)

    def forward(self, feat: torch.Tensor) -> torch.distributions.Distribution:
        out = self.net(feat)
        check = not out.is_cuda  # the argument checks (e.g. no NaN) would wait for the GPU at every call
        if self.discrete:
            return torch.distributions.OneHotCategoricalStraightThrough(probs=unimix_probs(out, self.unimix),
                                                                        validate_args=check)
        mean, std = out.chunk(2, -1)
        std = 0.9 * torch.sigmoid(std + 2.0) + 0.1
        normal = torch.distributions.Normal(torch.tanh(mean), std, validate_args=check)
        return torch.distributions.Independent(normal, 1, validate_args=check)

    def mode(self, feat: torch.Tensor) -> torch.Tensor:
        dist = self(feat)
        if self.discrete:
            return F.one_hot(dist.probs.argmax(-1), dist.probs.shape[-1]).float()
        return dist.mean


def lambda_returns(reward: torch.Tensor, cont: torch.Tensor, value: torch.Tensor, gamma: float,
                   lam: float) -> torch.Tensor:
    """TD(lambda) returns of imagined trajectories (paper eq. 7):
        R_t = r_{t+1} + gamma c_{t+1} ((1 - lambda) v(s_{t+1}) + lambda R_{t+1}),   R_H = v(s_H),
    with reward[t], cont[t] the predictions for s_{t+1} ([H, N]) and value[t] = v(s_t), t = 0..H ([H + 1, N]).
    Returns R_0 .. R_{H-1} [H, N]."""
    returns, last = [], value[-1]
    for t in reversed(range(len(reward))):
        last = reward[t] + gamma * cont[t] * ((1 - lam) * value[t + 1] + lam * last)
        returns.append(last)
    return torch.stack(returns[::-1])


class ReturnNormalizer(nn.Module):
    """S = EMA(95th percentile of lambda-returns) - EMA(5th percentile), both EMAs starting at 0 without bias
    correction (as the reference); advantages are divided by max(1, S), so large returns are scaled down and
    small ones are not scaled up (sparse rewards keep their signal)."""

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        # the percentile levels live on the model's device: no host-to-device copy per update
        self.register_buffer("levels", torch.tensor([0.05, 0.95]), persistent=False)

    def update(self, returns: torch.Tensor) -> torch.Tensor:
        quantiles = torch.quantile(returns.detach().flatten().float(), self.levels)
        self.low.lerp_(quantiles[0], 1 - self.decay)
        self.high.lerp_(quantiles[1], 1 - self.decay)
        return (self.high - self.low).clamp(min=1.0)


def imagine(wm: WorldModel, actor: Actor, deter: torch.Tensor, stoch: torch.Tensor, horizon: int):
    """Roll the prior forward `horizon` steps from start states [N] with actions of the actor; the actor sees
    its states with a stop-gradient, the return's gradient reaches it through the actions (and dynamics).
    Returns the model states [H + 1, N, feat] and the actions [H + 1, N, act] (the last one for the entropy only)."""
    feats, actions = [], []
    for t in range(horizon + 1):
        feat = torch.cat([deter, stoch], -1)
        action = actor(feat.detach()).rsample()
        feats.append(feat)
        actions.append(action)
        if t < horizon:
            deter, prior = wm.rssm.img_step(deter, stoch, action)
            stoch = straight_through_sample(prior).flatten(-2)
    return torch.stack(feats), torch.stack(actions)


def behaviour_losses(wm: WorldModel, actor: Actor, critic: nn.Module, slow_critic: nn.Module,
                     return_norm: ReturnNormalizer, start: tuple, start_cont: torch.Tensor, args: Args):
    """Actor and critic losses on trajectories imagined from the posterior states `start` (detached) [N]."""
    feats, actions = imagine(wm, actor, start[0].detach(), start[1].detach(), args.imag_horizon)
    reward = twohot_mean(wm.reward_head(feats[1:]), wm.bins)
    cont = (wm.cont_head(feats[1:])[..., 0] > 0).float()  # the continue head's mode
    cont = torch.cat([start_cont[None], cont])  # a terminal start state gets weight 0
    value = twohot_mean(critic(feats), wm.bins)
    returns = lambda_returns(reward, cont[1:], value, args.gamma, args.lam)
    # weight of step t: gamma^t times the chance that the episode is still running
    weight = (torch.cumprod(args.gamma * cont, 0) / args.gamma).detach()

    scale = return_norm.update(returns)
    advantage = (returns - value[:-1].detach()) / scale
    dist = actor(feats[:-1].detach())
    if actor.discrete:  # REINFORCE: the score function weighted by the (stopped) advantage
        objective = dist.log_prob(actions[:-1].detach()) * advantage.detach()
    else:  # reparameterised: the gradient of the return itself, through the imagined dynamics
        objective = advantage
    entropy = dist.entropy()
    actor_loss = -(weight[:-1] * (objective + args.actor_entropy * entropy)).mean()

    critic_feats = feats[:-1].detach()
    critic_logits = critic(critic_feats)
    slow_target = twohot_mean(slow_critic(critic_feats), wm.bins).detach()
    critic_loss = (weight[:-1] * (twohot_loss(critic_logits, returns.detach(), wm.bins)
                                  + args.slow_critic_reg * twohot_loss(critic_logits, slow_target, wm.bins))).mean()
    metrics = {"losses/actor": actor_loss.detach(), "losses/critic": critic_loss.detach(),
               "losses/entropy": entropy.mean().detach(), "charts/return_scale": scale.detach(),
               "charts/imagined_return": returns.mean().detach()}
    return actor_loss, critic_loss, metrics


# ----------------------------------------------------------------------------------------------------
# Replay: uniform sampling of sequences
# ----------------------------------------------------------------------------------------------------
class Replay:
    """The steps of `num_envs` parallel streams in one ring [capacity, num_envs]. A step holds the image x_t, the
    action a_{t-1} and reward r_t that led to it, is_first (x_t starts an episode: a_{t-1} = 0, r_t = 0) and
    is_terminal. Sequences of consecutive steps of one stream are sampled uniformly; they may cross episode
    boundaries, where is_first restarts the RSSM (as in DreamerV3)."""

    def __init__(self, capacity: int, num_envs: int, image_shape: tuple, act_dim: int):
        self.capacity, self.num_envs, self.ptr, self.size = capacity, num_envs, 0, 0
        self.data = {"image": torch.zeros((capacity, num_envs, *image_shape), dtype=torch.uint8),
                     "prev_action": torch.zeros((capacity, num_envs, act_dim)),
                     "reward": torch.zeros((capacity, num_envs)),
                     "is_first": torch.zeros((capacity, num_envs), dtype=torch.bool),
                     "is_terminal": torch.zeros((capacity, num_envs), dtype=torch.bool)}

    def add(self, step: dict) -> None:
        for key, value in step.items():
            self.data[key][self.ptr] = value
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, length: int, device: torch.device) -> dict:
        """[batch_size, length] sequences; the first step of each is marked is_first (the RSSM starts there)."""
        offset = torch.randint(0, self.size - length + 1, (batch_size, 1))
        time_index = (self.ptr - self.size + offset + torch.arange(length)) % self.capacity
        env_index = torch.randint(0, self.num_envs, (batch_size, 1))
        batch = {key: value[time_index, env_index].to(device, non_blocking=True) for key, value in self.data.items()}
        batch["is_first"][:, 0] = True
        return batch

    def state_dict(self) -> dict:  # the filled part (a slice is copied: torch.save would write a view's whole storage)
        filled = {k: v if self.size == self.capacity else v[:self.size].clone() for k, v in self.data.items()}
        return {"ptr": self.ptr, "size": self.size, "data": filled}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] > self.capacity or state["data"]["image"].shape[1:] != self.data["image"].shape[1:]:
            raise ConfigError("the checkpoint's replay buffer does not fit this run's --buffer-size / --num-envs")
        self.ptr, self.size = state["ptr"], state["size"]
        for key, value in state["data"].items():
            self.data[key][:self.size] = value


# ----------------------------------------------------------------------------------------------------
# One update: world model on a replayed batch, then actor and critic on trajectories imagined from it
# ----------------------------------------------------------------------------------------------------
class Dreamer(nn.Module):
    """All learned parts, so that one state_dict / .to(device) covers them."""

    def __init__(self, args: Args, act_dim: int, discrete: bool):
        super().__init__()
        self.wm = WorldModel(args, act_dim)
        feat = self.wm.rssm.feat_dim
        self.actor = Actor(feat, act_dim, discrete, args)
        self.critic = mlp(feat, args.hidden_units, args.mlp_layers, args.reward_bins, zero_out=True)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.return_norm = ReturnNormalizer(args.return_norm_decay)


def make_optimizers(agent: Dreamer, args: Args, capturable: bool = False) -> dict:
    """Adams of world model, actor and critic; `capturable` keeps their step counts on the GPU (CUDA graphs)."""
    return {"model": torch.optim.Adam(agent.wm.parameters(), lr=args.model_lr, eps=1e-8, capturable=capturable),
            "actor": torch.optim.Adam(agent.actor.parameters(), lr=args.actor_lr, eps=1e-5, capturable=capturable),
            "critic": torch.optim.Adam(agent.critic.parameters(), lr=args.critic_lr, eps=1e-5, capturable=capturable)}


def set_capturable(optimizers: dict, capturable: bool) -> None:
    """After loading a checkpoint written with the other setting: the flag and the step counts' device."""
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["capturable"] = capturable
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                if "step" in state:
                    state["step"] = state["step"].to(param.device if capturable else "cpu")


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: list, clip: float) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=params)  # only these parameters: the actor's loss flows through the model but must not train it
    norm = nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return norm


def train_step(agent: Dreamer, optimizers: dict, batch: dict, args: Args) -> dict:
    on = args.amp and batch["image"].is_cuda
    # autocast's cache of bf16 weights must not outlive a graph capture (torch.cuda.graphs)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on,
                         cache_enabled=not (on and torch.cuda.is_current_stream_capturing()))
    with amp:
        model_loss, metrics, (deter, stoch) = world_model_loss(agent.wm, batch, args)
    metrics["model/grad_norm"] = optimizer_step(optimizers["model"], model_loss, list(agent.wm.parameters()),
                                                args.model_grad_clip)
    start = (deter.flatten(0, 1), stoch.flatten(0, 1))
    start_cont = 1.0 - batch["is_terminal"].flatten(0, 1).float()
    with amp:
        actor_loss, critic_loss, behaviour_metrics = behaviour_losses(
            agent.wm, agent.actor, agent.critic, agent.slow_critic, agent.return_norm, start, start_cont, args)
    optimizer_step(optimizers["actor"], actor_loss, list(agent.actor.parameters()), args.ac_grad_clip)
    optimizer_step(optimizers["critic"], critic_loss, list(agent.critic.parameters()), args.ac_grad_clip)
    with torch.no_grad():  # slow critic <- EMA of the critic
        for slow, fast in zip(agent.slow_critic.parameters(), agent.critic.parameters()):
            slow.lerp_(fast, args.slow_critic_fraction)
    return {**metrics, **behaviour_metrics}


class GraphedUpdate:
    """train_step as a CUDA graph: the first `warmup` calls run eagerly on a side stream (Adam's state and
    autograd's buffers must exist before a capture), the last of them also records the update; every later
    call copies its batch into the recorded input tensors and replays the graph. Same kernels, same random
    numbers, same results as the eager updates (tests/test_dreamer_latent.py, CUDA only)."""

    def __init__(self, agent: Dreamer, optimizers: dict, args: Args, warmup: int = 2):
        self.agent, self.optimizers, self.args, self.warmup = agent, optimizers, args, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def __call__(self, batch: dict) -> dict:
        if self.graph is not None:
            for key, value in batch.items():
                self.static_batch[key].copy_(value)
            self.graph.replay()
            return dict(self.static_metrics)  # tensors the next replay overwrites
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            metrics = train_step(self.agent, self.optimizers, batch, self.args)
        torch.cuda.current_stream().wait_stream(side)
        self.warmup -= 1
        if self.warmup == 0:
            self.static_batch = {key: value.clone() for key, value in batch.items()}
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run
                self.static_metrics = train_step(self.agent, self.optimizers, self.static_batch, self.args)
        return metrics


def compile_rssm_steps(rssm: RSSM) -> None:
    """--compile: the RSSM steps run T + H times per update; torch.compile fuses their small element-wise ops.
    Compiled during the eager updates, the fused kernels are then recorded in the CUDA graph like any other."""
    rssm.filter_step = torch.compile(rssm.filter_step)
    rssm.img_step = torch.compile(rssm.img_step)


def make_update(agent: Dreamer, optimizers: dict, args: Args, device: torch.device):
    """batch -> metrics: one update, as a replayed CUDA graph where --cuda-graph applies (optimizers capturable)."""
    if args.cuda_graph and device.type == "cuda":
        return GraphedUpdate(agent, optimizers, args)
    return lambda batch: train_step(agent, optimizers, batch, args)


# ----------------------------------------------------------------------------------------------------
# Acting, evaluation, open-loop predictions
# ----------------------------------------------------------------------------------------------------
class Policy:
    """The actor on the filtered model state: each call encodes the images [N], updates the posterior with the
    previous actions, and returns actions as one-hot / [-1, 1] vectors [N, act_dim]."""

    def __init__(self, agent: Dreamer, num_envs: int, device: torch.device):
        self.agent, self.device = agent, device
        self.state = agent.wm.rssm.initial(num_envs)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, prev_action: torch.Tensor, is_first: np.ndarray, mode: bool) -> torch.Tensor:
        wm = self.agent.wm
        embed = wm.encoder(torch.as_tensor(image, device=self.device))
        deter, stoch, _, _ = wm.rssm.observe(embed[:, None], prev_action.to(self.device)[:, None],
                                             torch.as_tensor(is_first, device=self.device)[:, None], self.state)
        deter, stoch = deter[:, 0], stoch[:, 0]  # one filtering step
        self.state = (deter, stoch)
        feat = torch.cat([deter, stoch], -1)
        return (self.agent.actor.mode(feat) if mode else self.agent.actor(feat).sample()).cpu()


def env_action(action: torch.Tensor, discrete: bool) -> np.ndarray:
    return action.argmax(-1).numpy() if discrete else action.clamp(-1, 1).numpy()


def evaluate(agent: Dreamer, env: gym.Env, episodes: int, seed: int, device: torch.device, discrete: bool,
             frames: Optional[list] = None) -> float:
    """Mean return of `episodes` episodes with the actor's mean (most likely) action."""
    returns = []
    act_dim = agent.actor.net[-1].out_features // (1 if discrete else 2)
    for episode in range(episodes):
        image, _ = env.reset(seed=seed + episode)
        policy, prev_action, is_first = Policy(agent, 1, device), torch.zeros(1, act_dim), np.ones(1, bool)
        done, total = False, 0.0
        while not done:
            if frames is not None:
                frames.append(image.transpose(1, 2, 0))
            prev_action = policy(image[None], prev_action, is_first, mode=True)
            image, reward, terminated, truncated, _ = env.step(env_action(prev_action, discrete)[0])
            total += reward
            done, is_first = terminated or truncated, np.zeros(1, bool)
        returns.append(total)
    return float(np.mean(returns))


@torch.no_grad()
def open_loop_prediction(wm: WorldModel, batch: dict, context: int) -> torch.Tensor:
    """The model's images of sequences [B, T]: reconstructions of the first `context` steps (posterior), then
    predictions of the rest from the prior alone, driven by the recorded actions (the prior's mode at each step;
    no image is seen after `context`). Returns [B, T, 3, H, W] in [0, 1]."""
    B, T = batch["image"].shape[:2]
    embed = wm.encoder(batch["image"][:, :context].flatten(0, 1)).reshape(B, context, -1)
    deter, stoch, _, _ = wm.rssm.observe(embed, batch["prev_action"][:, :context], batch["is_first"][:, :context])
    feats = [torch.cat([deter, stoch], -1)]
    h, z = deter[:, -1], stoch[:, -1]
    for t in range(context, T):
        h, prior = wm.rssm.img_step(h, z, batch["prev_action"][:, t])
        z = F.one_hot(prior.argmax(-1), prior.shape[-1]).to(h.dtype).flatten(-2)
        feats.append(torch.cat([h, z], -1)[:, None])
    images = wm.decoder(torch.cat(feats, 1).flatten(0, 1)) + 0.5
    return images.clamp(0, 1).reshape(B, T, *batch["image"].shape[2:])


def write_videos(agent: Dreamer, replay: Replay, args: Args, folder: str, device: torch.device,
                 discrete: bool) -> None:
    """An evaluation episode, and open-loop predictions of 4 replayed sequences (5 observed steps, the rest
    imagined): rows = sequences, columns = truth | model | error."""
    from moviepy import ImageSequenceClip

    os.makedirs(folder, exist_ok=True)
    env = make_env(args.env_id, args.image_size, args.action_repeat, args.seed + 20_000)
    frames = []
    evaluate(agent, env, 1, args.seed + 20_000, device, discrete, frames)
    env.close()
    fps = max(1, 50 // args.action_repeat)
    ImageSequenceClip(frames, fps=fps).write_videofile(os.path.join(folder, "eval_episode.mp4"), logger=None)
    batch = replay.sample(4, min(50, replay.size), device)
    truth = batch["image"].float() / 255
    model = open_loop_prediction(agent.wm, batch, context=min(5, batch["image"].shape[1]))  # a short replay: all seen
    grid = torch.cat([truth, model, (model - truth).abs()], -1)  # [B, T, 3, H, 3W]
    grid = (grid.permute(1, 0, 3, 4, 2).flatten(1, 2) * 255).byte().cpu().numpy()  # [T, B H, 3W, 3]
    ImageSequenceClip(list(grid), fps=fps).write_videofile(os.path.join(folder, "open_loop.mp4"), logger=None)


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
    missing = [k for k in ["args", "agent", "optimizers", "counters", "rng"] if k not in ckpt]
    missing += [f"args.{f.name}" for f in fields(Args)  # run-control flags come from the command line anyway
                if f.name not in ckpt.get("args", {}) and f.name not in RUN_CONTROL_FIELDS]
    if missing:
        raise ConfigError(f"--resume {path} lacks {', '.join(missing)} (written by another version of {SCRIPT}.py?)")
    if ckpt["args"]["env_id"] != args.env_id:
        raise ConfigError(f"--resume {path} is a run on --env-id {ckpt['args']['env_id']}, not {args.env_id}; "
                          f"pass --env-id {ckpt['args']['env_id']}")
    saved = {f.name: ckpt["args"][f.name] for f in fields(Args) if f.name not in RUN_CONTROL_FIELDS}
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
        self.writer = SummaryWriter(run_dir, purge_step=None if resume_step is None else resume_step + 1)
        self.tty = sys.stdout.isatty()

    def scalars(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)

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
# Main loop: act, store, and every policy step make train_ratio / (batch_size x batch_length) updates
# ----------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    ckpt = None
    if args.resume:
        ckpt, args = load_checkpoint(args.resume, args)
    args = with_model_size(args)
    check_args(args)
    device = pick_device(args.device)
    if device.type == "cuda":  # CUDA graphs record and replay on the current device: make it this one
        torch.cuda.set_device(device)
    for wanted, module in [(args.capture_video, "moviepy"), (args.track, "wandb")]:
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--{'capture-video' if module == 'moviepy' else 'track'} needs {module}: "
                              f"pip install {module}")
    use_graph = args.cuda_graph and device.type == "cuda"
    if args.compile and args.amp and use_graph:  # seen on an H200 (torch 2.11): the recording fails
        raise ConfigError("--compile, --amp and the CUDA graph of the update do not combine; drop one of them "
                          "(--no-cuda-graph, or leave out --compile or --amp)")
    if args.compile and importlib.util.find_spec("triton") is None and device.type == "cuda":
        raise ConfigError("--compile on CUDA needs triton (it comes with the CUDA build of torch)")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    eval_env = make_env(args.env_id, args.image_size, args.action_repeat, args.seed + 10_000)  # checks the env id
    envs = gym.vector.SyncVectorEnv([lambda i=i: make_env(args.env_id, args.image_size, args.action_repeat,
                                                          args.seed + i) for i in range(args.num_envs)])
    discrete = isinstance(eval_env.action_space, gym.spaces.Discrete)
    act_dim = int(eval_env.action_space.n) if discrete else int(np.prod(eval_env.action_space.shape))

    if ckpt:  # continue in the checkpoint's own folder, wherever it was moved to
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        run_name = os.path.basename(run_dir)
    else:
        run_name = f"{args.env_id.replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir, suffix = os.path.join("runs", run_name), 1
        while os.path.exists(run_dir):  # two runs started in the same second never share a folder
            suffix += 1
            run_dir = os.path.join("runs", f"{run_name}-{suffix}")
        run_name = os.path.basename(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    logger = Logger(run_dir, run_name, args, ckpt["counters"]["env_steps"] if ckpt else None)

    agent = Dreamer(args, act_dim, discrete).to(device)
    optimizers = make_optimizers(agent, args, capturable=use_graph)
    replay = Replay(max(args.buffer_size // args.num_envs, args.batch_length), args.num_envs,
                    eval_env.observation_space.shape, act_dim)
    counters = {"env_steps": 0, "policy_steps": 0, "trained_steps": 0, "updates": 0, "episodes": 0, "elapsed": 0.0}
    if ckpt:
        agent.load_state_dict(ckpt["agent"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(ckpt["optimizers"][name])
        set_capturable(optimizers, use_graph)
        if "replay" in ckpt:
            replay.load_state_dict(ckpt["replay"])
        counters.update(ckpt["counters"])
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        print(f"resumed {run_name} at env step {counters['env_steps']} ({counters['updates']} updates, replay of "
              f"{replay.size * args.num_envs} steps) with the checkpoint's flags; the interrupted episodes restart; "
              f"from the command line only: {', '.join(RUN_CONTROL_FIELDS[1:])}")
    if args.compile:
        compile_rssm_steps(agent.wm.rssm)
    update = make_update(agent, optimizers, args, device)
    ckpt_path = os.path.join(run_dir, f"{SCRIPT}.pt")

    def checkpoint():
        state = {"script": SCRIPT, "args": asdict(args), "agent": agent.state_dict(),
                 "optimizers": {k: v.state_dict() for k, v in optimizers.items()}, "counters": dict(counters),
                 "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}}
        if args.save_replay:
            state["replay"] = replay.state_dict()
        save_checkpoint(ckpt_path, state)

    images, _ = envs.reset(seed=args.seed + counters["episodes"])
    num = args.num_envs
    prev_action, reward = torch.zeros(num, act_dim), np.zeros(num)
    is_first, is_terminal, resetting = np.ones(num, bool), np.zeros(num, bool), np.zeros(num, bool)
    episode_return, episode_length = np.zeros(num), np.zeros(num, int)
    policy = Policy(agent, num, device)
    updates_per_step = args.train_ratio / (args.batch_size * args.batch_length)
    # a run (or a resumed run whose checkpoint has no replay) first fills the replay with random actions
    prefill_end = counters["env_steps"] + args.learning_starts if replay.size == 0 else args.learning_starts
    last_checkpoint, last_eval, last_log = (counters["env_steps"],) * 3
    metrics, eval_return, train_returns = {}, float("nan"), []
    start = time.perf_counter()
    while counters["env_steps"] < args.total_timesteps:
        replay.add({"image": torch.as_tensor(images), "prev_action": prev_action, "reward": torch.as_tensor(reward),
                    "is_first": torch.as_tensor(is_first), "is_terminal": torch.as_tensor(is_terminal)})
        action = policy(images, prev_action, is_first, mode=False)
        if counters["env_steps"] < prefill_end:  # prefill with uniformly random actions
            action = (F.one_hot(torch.randint(act_dim, (num,)), act_dim).float() if discrete
                      else torch.rand(num, act_dim) * 2 - 1)
        # gymnasium's vector env resets an env on the step *after* its episode ended (its action is ignored)
        images, reward, terminated, truncated, _ = envs.step(env_action(action, discrete))
        stepped = ~resetting
        counters["env_steps"] += args.action_repeat * int(stepped.sum())
        counters["policy_steps"] += num
        episode_return += reward
        episode_length += args.action_repeat * stepped
        done = stepped & (terminated | truncated)
        for i in np.flatnonzero(done):
            train_returns.append(float(episode_return[i]))
            logger.scalars({"charts/episodic_return": episode_return[i], "charts/episodic_length": episode_length[i]},
                           counters["env_steps"])
            counters["episodes"] += 1
        episode_return[done | resetting], episode_length[done | resetting] = 0, 0
        # the next stored step: a_{t-1} and r_t that led to x_t; a reset step starts a new episode from zero
        is_first, is_terminal = resetting.copy(), stepped & terminated
        prev_action = torch.where(torch.as_tensor(resetting)[:, None], 0.0, action)
        reward = np.where(resetting, 0.0, reward)
        resetting = done

        if counters["env_steps"] >= prefill_end and replay.size >= args.batch_length:
            counters["trained_steps"] += num
            t0 = time.perf_counter()
            while counters["updates"] < counters["trained_steps"] * updates_per_step:
                metrics = update(replay.sample(args.batch_size, args.batch_length, device))
                counters["updates"] += 1
            metrics["time/update_s"] = time.perf_counter() - t0  # of this step's updates (graph: launch, mostly)
        step = counters["env_steps"]
        counters["elapsed"] += time.perf_counter() - start
        start = time.perf_counter()
        sps = step / max(counters["elapsed"], 1e-9)
        if step - last_log >= 1000 or step >= args.total_timesteps:
            logger.scalars({**metrics, "charts/SPS": sps, "charts/updates": counters["updates"],
                            "time/updates_per_s": counters["updates"] / max(counters["elapsed"], 1e-9)}, step)
            last_log = step
        if args.eval_episodes and (step - last_eval >= args.eval_every or step >= args.total_timesteps):
            eval_return = evaluate(agent, eval_env, args.eval_episodes, args.seed + 10_000, device, discrete)
            logger.scalars({"eval/return": eval_return}, step)
            last_eval = step
            start = time.perf_counter()  # evaluation time is not training time
        logger.progress(step, args.total_timesteps, sps, train_returns[-1] if train_returns else float("nan"))
        if args.save_model and (step - last_checkpoint >= args.checkpoint_every or step >= args.total_timesteps):
            checkpoint()
            last_checkpoint = step
    envs.close()
    eval_env.close()
    if args.capture_video:
        write_videos(agent, replay, args, os.path.join(run_dir, "videos"), device, discrete)
    logger.close()
    return {"run_dir": run_dir, "agent": agent, "replay": replay, "eval_return": eval_return,
            "train_returns": train_returns, **counters}


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ConfigError as err:
        sys.exit(f"error: {err}")
