"""HAPPO (Heterogeneous-Agent PPO) with a centralized critic on MAPush's cuboid pushing task, in one file.

HARL's numerics (specs/happo_harl.md) with every documented critic fix as the default; `grep -n "Fix:"` lists them.
    python happo_mapush.py                                   # train on the embedded VMAS backend
    python happo_mapush.py --critic-input agent0-obs         # reproduce a documented bug (ablation)
    python happo_mapush.py --eval-checkpoint runs/RUN/checkpoint.pt
See README.md for every flag, logged metric and the results.
"""
# Isaac Gym must be imported before torch; it is absent on most machines and only the isaacgym backend needs it.
try:
    import isaacgym  # noqa: F401
except ImportError:
    pass

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import tyro
from torch import nn

from global_state import build_global_state, global_state_dim
from mapush_env import BACKENDS, DT, ActionRepeat, BackendUnavailable, make_env
from value_norm import ValueNorm


@dataclass
class Args:
    exp_name: str = "happo_mapush"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (torch and the env's reset distribution)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, train on CUDA when it is available"""
    track: bool = False
    """if toggled, also log to Weights and Biases"""
    wandb_project_name: str = "happo-mapush"
    """the W&B project name"""

    env_backend: str = "vmas"
    """the MAPush backend: `vmas` (embedded, any machine) or `isaacgym` (MAPush/MQE, CUDA, Python 3.8)"""
    num_envs: int = 512
    """the number of parallel envs"""
    num_steps: int = 20
    """the rollout length per env per iteration, in decisions (20 x 5 = 100 env steps; HARL's episode_length: 200)"""
    action_repeat: int = 5
    """each action is held for this many env steps of 0.02 s and their rewards summed (1: MAPush's 50 Hz decisions);
    `--num-steps`, `--gamma` and `--gae-lambda` count decisions"""
    random_episode_start: bool = True
    """if toggled, each env's first episode starts at a random step, so envs do not time out in lockstep"""
    total_timesteps: int = 20_000_000
    """total env steps (one step of one env counts once, whatever the number of agents)"""
    learning_rate: float = 5e-4
    """the actors' Adam learning rate"""
    critic_lr: float = 5e-4
    """the critic's Adam learning rate"""
    anneal_lr: bool = False
    """if toggled, both learning rates decay linearly to 0 over the run"""
    hidden_sizes: Tuple[int, ...] = (128, 128)
    """the actors' hidden layer sizes"""
    critic_hidden_sizes: Tuple[int, ...] = (256, 256)
    """the critic's hidden layer sizes (HARL: 128 128; the wider critic learns faster here, see README Results)"""
    ppo_epochs: int = 5
    """the number of epochs over the batch for each actor"""
    critic_epochs: int = 5
    """the number of epochs over the batch for the critic"""
    actor_num_minibatches: int = 5
    """the number of mini-batches per actor epoch (5 x 2,048 samples)"""
    critic_num_minibatches: int = 5
    """the number of mini-batches per critic epoch"""
    clip_coef: float = 0.2
    """the PPO clip range, also used to clip the value function (as HARL)"""
    clip_vloss: bool = True
    """if toggled, use the clipped value loss (max of clipped and unclipped Huber losses)"""
    input_norm: str = "layernorm"
    """how actors and critic normalize their input: `layernorm` per sample (HARL) or `running` per-feature statistics"""
    tanh_mean: bool = False
    """if toggled, the policy's mean is squashed by tanh into the env's action range (-1, 1)"""
    std_max: float = 0.5
    """the ceiling of the policy's std, std = std_max * sigmoid(logit) (HARL: 0.5); the initial std stays 0.3655"""
    obs_stack: int = 1
    """each actor sees its last `obs_stack` observations (HARL: 1); the 8-dim observation has no own velocity"""
    ent_coef: float = 0.01
    """the entropy bonus coefficient"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the GAE lambda"""
    max_grad_norm: float = 10.0
    """the gradient clipping norm (actors and critic)"""
    huber_delta: float = 10.0
    """the Huber loss delta of the value loss (in normalized-return units)"""
    team_reward: str = "sum"
    """how the critic's reward is formed from the per-agent rewards: `sum` (MAPush fork) or `mean`"""
    critic_input: str = "global-state"
    """what the critic sees: `global-state` (the fix) or `agent0-obs` (the documented bug)"""
    value_norm_update: str = "once"
    """when ValueNorm is updated: `once` per iteration on all returns (the fix) or `per-minibatch` (HARL upstream)"""
    sequential: bool = True
    """if toggled, HAPPO's sequential update with the factor; `--no-sequential` sets the factor to 1"""

    log_interval: int = 5
    """print a progress line every this many iterations (TensorBoard gets every iteration)"""
    save_interval: int = 50
    """save a checkpoint every this many iterations (and always at the end)"""
    resume: Optional[str] = None
    """continue a run from this checkpoint (the other flags must describe the same run)"""
    eval_checkpoint: Optional[str] = None
    """evaluate this checkpoint deterministically instead of training"""
    eval_episodes: int = 300
    """the number of envs for evaluation; each env's first episode counts (MAPush's calculator)"""

    # filled in at runtime
    batch_size: int = 0
    """the number of samples per iteration (num_envs * num_steps); each covers action_repeat env steps"""
    num_iterations: int = 0
    """the number of iterations (total_timesteps // (batch_size * action_repeat))"""


CHOICES = {"env_backend": BACKENDS, "team_reward": ("sum", "mean"), "critic_input": ("global-state", "agent0-obs"),
           "value_norm_update": ("once", "per-minibatch"), "input_norm": ("layernorm", "running")}
# Flags that must match the checkpoint when resuming: they change shapes, data or the meaning of the run.
RESUME_KEYS = ("env_backend", "num_envs", "num_steps", "hidden_sizes", "critic_hidden_sizes", "critic_input", "seed",
               "team_reward", "tanh_mean", "input_norm", "std_max", "obs_stack", "action_repeat")


INITIAL_STD = 0.5 / (1.0 + math.exp(-1.0))  # HARL: 0.5 * sigmoid(1), the policy std at the start


class UsageError(ValueError):
    """Bad flags, a missing or foreign checkpoint: reported without a traceback."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: Args) -> Args:
    for name, choices in CHOICES.items():
        if getattr(args, name) not in choices:
            raise UsageError(f"{flag(name)} must be one of {choices}, got {getattr(args, name)!r}")
    positive = ("num_envs", "num_steps", "action_repeat", "ppo_epochs", "critic_epochs", "actor_num_minibatches",
                "critic_num_minibatches", "log_interval", "save_interval", "eval_episodes", "obs_stack")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    if not args.std_max > INITIAL_STD:
        raise UsageError(f"--std-max must exceed the initial std {INITIAL_STD:.4f}, got {args.std_max}")
    args.batch_size = args.num_envs * args.num_steps
    args.num_iterations = args.total_timesteps // (args.batch_size * args.action_repeat)
    if args.eval_checkpoint is None and args.num_iterations < 1:
        raise UsageError(f"--total-timesteps {args.total_timesteps} is below one iteration (num_envs {args.num_envs}"
                         f" x num_steps {args.num_steps} x action_repeat {args.action_repeat} env steps)")
    for name in ("actor_num_minibatches", "critic_num_minibatches"):
        if args.batch_size % getattr(args, name):
            raise UsageError(f"{flag(name)} {getattr(args, name)} does not divide the batch "
                             f"of {args.batch_size} samples")
    return args


def args_dict(args: Args) -> dict:
    """The flags as saved in checkpoints (tuples as lists, so they survive `torch.load(weights_only=True)`)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()}


def layer_init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, 0.0)
    return layer


class RunningNorm(nn.Module):
    """Per-feature running mean and variance of the inputs over all samples seen (Chan et al.'s parallel update),
    applied as (x - mean) / std, clipped to +-10. `update` runs once per iteration *after* the updates, so the
    log-probs and values stored during the rollout stay those of the networks that are updated against them."""

    def __init__(self, dim: int, epsilon: float = 1e-8, clip: float = 10.0):
        super().__init__()
        self.epsilon, self.clip = epsilon, clip
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.tensor(1e-4))  # the identity until the first update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / torch.sqrt(self.var + self.epsilon)).clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.mean.shape[0])
        n, batch_mean, batch_var = x.shape[0], x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total


def mlp_trunk(in_dim: int, hidden_sizes, input_norm: str = "layernorm") -> nn.Sequential:
    """HARL's MLPBase: per-sample LayerNorm of the input, then Linear -> ReLU -> LayerNorm per hidden layer.
    `input_norm="running"` replaces the input LayerNorm by per-feature running statistics (`RunningNorm`)."""
    layers: List[nn.Module] = [nn.LayerNorm(in_dim) if input_norm == "layernorm" else RunningNorm(in_dim)]
    for size in hidden_sizes:
        layers += [layer_init(nn.Linear(in_dim, size), nn.init.calculate_gain("relu")), nn.ReLU(), nn.LayerNorm(size)]
        in_dim = size
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Gaussian policy with a state-independent std = std_max * sigmoid(logit); HARL: std_max 0.5, logit initialised
    to 1. Another std_max keeps HARL's initial std, 0.5 * sigmoid(1).

    tanh_mean bounds the mean to the env's action range (-1, 1); HARL's mean is unbounded. With obs_stack k the input
    is the agent's last k observations, oldest first (`ObsHistory`)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes, tanh_mean: bool = False,
                 input_norm: str = "layernorm", std_max: float = 0.5, obs_stack: int = 1):
        super().__init__()
        self.obs_stack = obs_stack
        self.trunk = mlp_trunk(obs_dim * obs_stack, hidden_sizes, input_norm)
        self.mean = layer_init(nn.Linear(hidden_sizes[-1], action_dim), 0.01)
        start = INITIAL_STD / std_max  # sigmoid(logit) at the start: logit 1 for HARL's std_max 0.5
        self.std_logit = nn.Parameter(torch.full((action_dim,), math.log(start / (1.0 - start))))
        self.tanh_mean, self.std_max = tanh_mean, std_max

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean = self.mean(self.trunk(obs))
        if self.tanh_mean:
            mean = torch.tanh(mean)
        return torch.distributions.Normal(mean, self.std())

    def std(self) -> torch.Tensor:
        return self.std_max * torch.sigmoid(self.std_logit)


class ObsHistory:
    """Every agent's last k observations, oldest first: the actors' input. The commands pass a 0.25 s lag and the
    observation holds no own velocity, so one frame does not tell an agent how it is moving (MAPush's MAPPO uses a
    recurrent policy for this). When an episode ends its env's history restarts as k copies of the first observation.
    k = 1 is the observation itself."""

    def __init__(self, k: int, obs: torch.Tensor):
        self.k = k
        self.frames = obs.unsqueeze(2).repeat(1, 1, k, 1)  # [E, A, k, obs_dim]

    @property
    def obs(self) -> torch.Tensor:
        return self.frames.flatten(2)  # [E, A, k * obs_dim]

    def push(self, obs: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            self.frames = obs.unsqueeze(2)
        else:
            shifted = torch.cat([self.frames[:, :, 1:], obs.unsqueeze(2)], dim=2)
            self.frames = torch.where(done.view(-1, 1, 1, 1), obs.unsqueeze(2).expand_as(shifted), shifted)
        return self.obs


class Critic(nn.Module):
    """V(s) in ValueNorm's normalized space."""

    def __init__(self, in_dim: int, hidden_sizes, input_norm: str = "layernorm"):
        super().__init__()
        self.trunk = mlp_trunk(in_dim, hidden_sizes, input_norm)
        self.head = layer_init(nn.Linear(hidden_sizes[-1], 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).squeeze(-1)


def compute_gae(rewards, values, next_value, dones, truncated, final_values, gamma, gae_lambda, denormalize):
    """GAE over [T, E] tensors; returns (advantages, returns), both in raw (denormalized) reward units.

    values, next_value [E] and final_values are normalized critic outputs; `denormalize` maps them to raw units.
    dones[t]: the episode ended at step t (no bootstrap from the reset state that follows); truncated[t]: it ended by
    time-out, so bootstrap from final_values[t], the critic's value of the state before the auto-reset.
    """
    num_steps = rewards.shape[0]
    raw_values = denormalize(torch.cat([values, next_value.unsqueeze(0)]))  # [T + 1, E]
    raw_final = denormalize(final_values) * truncated
    not_done = 1.0 - dones
    advantages = torch.zeros_like(rewards)
    gae = torch.zeros_like(rewards[0])
    for t in reversed(range(num_steps)):
        delta = rewards[t] + gamma * (raw_values[t + 1] * not_done[t] + raw_final[t]) - raw_values[t]
        gae = delta + gamma * gae_lambda * not_done[t] * gae
        advantages[t] = gae
    return advantages, advantages + raw_values[:-1]


def happo_actor_update(actors, optimizers, obs, actions, logprobs, advantages, order, args: Args):
    """Sequential HAPPO update of every actor, in `order`, on flat batches.

    obs [B, A, obs_dim], actions [B, A, act_dim], logprobs [B, A] (joint, from the rollout), advantages [B].
    Returns per-agent stats and the factor each agent trained with ({agent id: [B]}).
    """
    batch_size = advantages.shape[0]
    minibatch_size = batch_size // args.actor_num_minibatches
    # EP advantage normalization: once over the whole batch, population std, not including the factor.
    advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-5)
    factor = torch.ones(batch_size, device=advantages.device)
    stats: Dict[int, Dict[str, float]] = {}
    factors_used: Dict[int, torch.Tensor] = {}
    for position, agent in enumerate(order):
        actor, optimizer = actors[agent], optimizers[agent]
        agent_obs, agent_actions, old_logprob = obs[:, agent], actions[:, agent], logprobs[:, agent]
        factors_used[agent] = factor
        sums = torch.zeros(6, device=advantages.device)
        for _ in range(args.ppo_epochs):
            perm = torch.randperm(batch_size, device=advantages.device)
            for start in range(0, batch_size - minibatch_size + 1, minibatch_size):
                idx = perm[start : start + minibatch_size]
                dist = actor.dist(agent_obs[idx])
                log_ratio = dist.log_prob(agent_actions[idx]).sum(-1) - old_logprob[idx]
                ratio = log_ratio.exp()  # joint ratio: product over action dims
                adv = advantages[idx]
                surrogate = torch.min(ratio * adv, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * adv)
                policy_loss = -(factor[idx] * surrogate).mean()
                entropy = dist.entropy().sum(-1).mean()
                loss = policy_loss - args.ent_coef * entropy
                check_finite(loss, f"agent {agent} policy loss")
                optimizer.zero_grad()
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
                optimizer.step()
                with torch.no_grad():
                    clip_frac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                    sums += torch.stack([policy_loss, entropy, ratio.mean(), clip_frac, approx_kl, grad_norm])
        means = (sums / (args.ppo_epochs * args.actor_num_minibatches)).tolist()
        stats[agent] = dict(zip(("policy_loss", "entropy", "ratio", "clip_fraction", "approx_kl", "grad_norm"), means))
        stats[agent]["update_position"] = float(position)
        if args.sequential:
            # The next agent's factor: this agent's joint ratio after its whole update, on the whole batch.
            with torch.no_grad():
                new_logprob = actor.dist(agent_obs).log_prob(agent_actions).sum(-1)
                factor = factor * (new_logprob - old_logprob).exp()
    return stats, factors_used


def critic_update(critic, optimizer, value_norm, critic_inputs, old_values, returns, args: Args):
    """Clipped Huber value loss in normalized space; returns (mean value loss, mean grad norm)."""
    batch_size = returns.shape[0]
    minibatch_size = batch_size // args.critic_num_minibatches
    if args.value_norm_update == "once":
        value_norm.update(returns)  # Fix: one update per iteration on all returns, so targets stay put across epochs.
    sums = torch.zeros(2, device=returns.device)
    for _ in range(args.critic_epochs):
        perm = torch.randperm(batch_size, device=returns.device)
        for start in range(0, batch_size - minibatch_size + 1, minibatch_size):
            idx = perm[start : start + minibatch_size]
            if args.value_norm_update == "per-minibatch":
                value_norm.update(returns[idx])
            target = value_norm.normalize(returns[idx])
            values = critic(critic_inputs[idx])
            loss = F.huber_loss(values, target, reduction="none", delta=args.huber_delta)
            if args.clip_vloss:
                clipped = old_values[idx] + (values - old_values[idx]).clamp(-args.clip_coef, args.clip_coef)
                loss = torch.max(loss, F.huber_loss(clipped, target, reduction="none", delta=args.huber_delta))
            loss = loss.mean()
            check_finite(loss, "critic value loss")
            optimizer.zero_grad()
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            optimizer.step()
            sums += torch.stack([loss.detach(), grad_norm])
    value_loss, grad_norm = (sums / (args.critic_epochs * args.critic_num_minibatches)).tolist()
    return value_loss, grad_norm


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(loss: torch.Tensor, term: str) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLoss(term)


def critic_input(args: Args, obs: torch.Tensor, scene_fn) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the critic sees for one step; returns (input [E, D], non-finite entries zeroed).

    `scene_fn()` gives the Scene; it is only called for the global state (agent 0's view needs none).
    """
    if args.critic_input == "agent0-obs":
        return obs[:, 0], torch.zeros((), dtype=torch.long, device=obs.device)
    # Fix: the critic sees the global state (env-relative frame, with velocities), not agent 0's local view.
    return build_global_state(scene_fn())


def mean_actions(actors, obs: torch.Tensor) -> torch.Tensor:
    """The actors' deterministic actions [E, A, act_dim] for the actor inputs obs [E, A, D]."""
    return torch.stack([actor.dist(obs[:, i]).mean for i, actor in enumerate(actors)], dim=1)


@torch.no_grad()
def evaluate(actors, env) -> Tuple[float, float]:
    """MAPush's calculator: mean actions; each env's first episode counts; failures take 20 s.

    Returns (success rate, mean completion time in s).
    """
    history = ObsHistory(actors[0].obs_stack, env.reset())
    finished = torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)
    success = torch.zeros_like(finished)
    completion = torch.full((env.num_envs,), env.episode_steps * DT, device=env.device)
    elapsed = torch.zeros(env.num_envs, device=env.device)  # env steps of each env's first episode so far
    for _ in range(env.episode_steps + 1):  # every decision takes at least one env step
        obs, _, done, info = env.step(mean_actions(actors, history.obs))
        history.push(obs, done)
        elapsed = elapsed + info.get("env_steps", 1)  # > 1 under ActionRepeat
        first = done & ~finished
        completion = torch.where(first & info["success"], elapsed * DT, completion)
        success |= first & info["success"]
        finished |= done
        if bool(finished.all()):
            break
    return success.float().mean().item(), completion.mean().item()


def load_checkpoint(path: str, device) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise UsageError(f"corrupt or unreadable checkpoint {path}: {err}") from err
    required = {"actors", "critic", "actor_optimizers", "critic_optimizer", "value_norm", "iteration", "global_step",
                "args", "rng", "env", "run_name"}
    if not isinstance(checkpoint, dict) or not required <= set(checkpoint):
        raise UsageError(f"corrupt checkpoint {path}: not a happo_mapush checkpoint "
                         f"(missing {sorted(required - set(checkpoint)) if isinstance(checkpoint, dict) else 'all'})")
    return checkpoint


def make_actor(env, saved: dict) -> Actor:
    """An actor as described by a run's flags (checkpoints from before a flag existed get its old behaviour)."""
    return Actor(env.obs_dim, env.action_dim, saved["hidden_sizes"], saved.get("tanh_mean", False),
                 saved.get("input_norm", "layernorm"), saved.get("std_max", 0.5), saved.get("obs_stack", 1))


def trained_actors(checkpoint: dict, env, device="cpu") -> List[Actor]:
    """The actors of a loaded checkpoint, rebuilt as its run's flags describe them."""
    actors = [make_actor(env, checkpoint["args"]).to(device) for _ in range(env.num_agents)]
    for actor, state in zip(actors, checkpoint["actors"]):
        actor.load_state_dict(state)
    return actors


def policy_env(saved: dict, num_envs: int, device, seed: int) -> ActionRepeat:
    """The env a run's policies act in, as its flags describe it (`args_dict` or a checkpoint's "args")."""
    return ActionRepeat(make_env(saved["env_backend"], num_envs=num_envs, device=device, seed=seed),
                        saved.get("action_repeat", 1))


def build_models(args: Args, env, device):
    state_dim = global_state_dim(env.num_agents) if args.critic_input == "global-state" else env.obs_dim
    actors = [make_actor(env, args_dict(args)).to(device) for _ in range(env.num_agents)]
    critic = Critic(state_dim, args.critic_hidden_sizes, args.input_norm).to(device)
    # HARL: Adam with eps 1e-5 and no weight decay, one optimizer per actor (no parameter sharing).
    actor_optimizers = [torch.optim.Adam(a.parameters(), lr=args.learning_rate, eps=1e-5) for a in actors]
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5)
    return actors, critic, actor_optimizers, critic_optimizer


def train(args: Args) -> str:
    """Train with `args`; returns the path of the final checkpoint."""
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.manual_seed(args.seed)
    env = policy_env(args_dict(args), args.num_envs, device, args.seed)
    actors, critic, actor_optimizers, critic_optimizer = build_models(args, env, device)
    value_norm = ValueNorm(device=device)
    num_envs, num_agents, num_steps = args.num_envs, env.num_agents, args.num_steps

    start_iteration, global_step = 1, 0
    run_name = f"mapush_{args.env_backend}__{args.exp_name}__{args.seed}__{int(time.time())}"
    next_obs = env.reset()
    if args.random_episode_start:
        env.randomize_episode_start()
    ep_return = torch.zeros(num_envs, device=device)
    ep_length = torch.zeros(num_envs, device=device)
    history_frames = None
    if args.resume is not None:
        checkpoint = load_checkpoint(args.resume, device)
        saved, current = checkpoint["args"], args_dict(args)
        mismatched = [f"{flag(k)} {current[k]} (saved {saved[k]})" for k in RESUME_KEYS
                      if saved[k] != current[k]]
        if mismatched:
            raise UsageError("--resume: these flags differ from the checkpoint's run: " + ", ".join(mismatched))
        for actor, optimizer, a_state, o_state in zip(actors, actor_optimizers, checkpoint["actors"],
                                                      checkpoint["actor_optimizers"]):
            actor.load_state_dict(a_state)
            optimizer.load_state_dict(o_state)
        critic.load_state_dict(checkpoint["critic"])
        critic_optimizer.load_state_dict(checkpoint["critic_optimizer"])
        value_norm.load_state_dict(checkpoint["value_norm"])
        start_iteration, global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
        run_name = checkpoint["run_name"]
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu())
        if checkpoint["env"] is not None and hasattr(env, "load_state_dict"):
            next_obs = env.load_state_dict(checkpoint["env"])
            ep_return, ep_length = checkpoint["episode"]["return"], checkpoint["episode"]["length"]
            history_frames = checkpoint["episode"].get("obs_history")
    history = ObsHistory(args.obs_stack, next_obs)
    if history_frames is not None:
        history.frames = history_frames

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        try:
            import wandb
        except ImportError:
            raise UsageError("--track logs to Weights and Biases: pip install wandb") from None
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=asdict(args), name=run_name,
                   save_code=True, resume="allow")
    run_dir = os.path.join("runs", run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in
                                                                           asdict(args).items()))

    # Rollout storage, time-major like HARL's buffers.
    state_dim = critic.trunk[1].in_features
    obs_buf = torch.zeros(num_steps, num_envs, num_agents, env.obs_dim * args.obs_stack, device=device)
    actions_buf = torch.zeros(num_steps, num_envs, num_agents, env.action_dim, device=device)
    logprobs_buf = torch.zeros(num_steps, num_envs, num_agents, device=device)  # joint over action dims
    critic_inputs = torch.zeros(num_steps, num_envs, state_dim, device=device)
    values_buf = torch.zeros(num_steps, num_envs, device=device)  # normalized
    final_values = torch.zeros(num_steps, num_envs, device=device)  # normalized, at time-outs only
    rewards_buf = torch.zeros(num_steps, num_envs, device=device)  # team reward
    dones_buf = torch.zeros(num_steps, num_envs, device=device)
    truncated_buf = torch.zeros(num_steps, num_envs, device=device)
    next_input, nonfinite_state = critic_input(args, next_obs, env.scene)

    def snapshot(iteration: int) -> dict:
        """Everything needed to continue the run exactly, cloned so later updates do not change it."""
        return copy.deepcopy({
            "actors": [a.state_dict() for a in actors], "critic": critic.state_dict(),
            "actor_optimizers": [o.state_dict() for o in actor_optimizers],
            "critic_optimizer": critic_optimizer.state_dict(), "value_norm": value_norm.state_dict(),
            "iteration": iteration, "global_step": global_step, "run_name": run_name,
            "args": args_dict(args),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
            "env": env.state_dict() if hasattr(env, "state_dict") else None,
            "episode": {"return": ep_return, "length": ep_length, "obs_history": history.frames},
        })

    def save(state: dict, name: str) -> str:
        path = os.path.join(run_dir, name)
        torch.save(state, path)
        return path

    last_good = snapshot(start_iteration - 1)
    checkpoint_path = ""
    start_time, start_step = time.time(), global_step
    interval_episodes = torch.zeros(2)  # episodes ended and successes since the last progress line
    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            for optimizer in actor_optimizers:
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate
            critic_optimizer.param_groups[0]["lr"] = frac * args.critic_lr

        episode_sums = torch.zeros(6, device=device)  # return, length, count, success, exception, time-out
        term_sums: Dict[str, torch.Tensor] = {}
        nonfinite_obs = torch.zeros((), device=device)
        with torch.no_grad():
            for step in range(num_steps):
                obs_buf[step] = history.obs
                critic_inputs[step] = next_input
                values_buf[step] = critic(next_input)
                for i, actor in enumerate(actors):
                    dist = actor.dist(obs_buf[step, :, i])
                    action = dist.sample()
                    actions_buf[step, :, i] = action
                    logprobs_buf[step, :, i] = dist.log_prob(action).sum(-1)
                next_obs, reward, done, info = env.step(actions_buf[step])
                history.push(next_obs, done)
                global_step += num_envs * args.action_repeat
                # Fix: the critic's reward is the team reward, formed explicitly, not agent 0's column.
                team_reward = reward.sum(1) if args.team_reward == "sum" else reward.mean(1)
                rewards_buf[step] = team_reward
                dones_buf[step] = done.float()
                truncated = info["time_out"] & ~info["success"] & ~info["exception"]
                if "final_scene" in info and bool(truncated.any()):
                    # A time-out is not a failure: bootstrap from the state the env had before its auto-reset.
                    truncated_buf[step] = truncated.float()
                    final_input, _ = critic_input(args, info["final_obs"], lambda: info["final_scene"])
                    final_values[step] = critic(final_input) * truncated
                else:
                    truncated_buf[step] = 0.0
                    final_values[step] = 0.0
                next_input, nonfinite = critic_input(args, next_obs, env.scene)
                nonfinite_state = nonfinite_state + nonfinite
                nonfinite_obs = nonfinite_obs + info["nonfinite_obs"].sum()
                ep_return += team_reward
                ep_length += info["env_steps"]
                episode_sums += torch.stack([(ep_return * done).sum(), (ep_length * done).sum(), done.sum(),
                                             (done & info["success"]).sum(), (done & info["exception"]).sum(),
                                             (done & info["time_out"]).sum()]).float()
                ep_return = ep_return * ~done
                ep_length = ep_length * ~done
                for name, value in info["reward_terms"].items():
                    term_sums[name] = term_sums.get(name, 0.0) + value.sum()
            next_value = critic(next_input)

        advantages, returns = compute_gae(rewards_buf, values_buf, next_value, dones_buf, truncated_buf, final_values,
                                          args.gamma, args.gae_lambda, value_norm.denormalize)

        # HAPPO: a fresh random agent order every iteration; each actor trains against the factor of those before it.
        order = torch.randperm(num_agents).tolist()
        try:
            actor_stats, factors = happo_actor_update(
                actors, actor_optimizers, obs_buf.flatten(0, 1), actions_buf.flatten(0, 1),
                logprobs_buf.flatten(0, 1), advantages.flatten(), order, args)
            value_loss, critic_grad_norm = critic_update(critic, critic_optimizer, value_norm,
                                                         critic_inputs.flatten(0, 1), values_buf.flatten(),
                                                         returns.flatten(), args)
        except NonFiniteLoss as err:
            path = save(last_good, f"checkpoint_{last_good['iteration']}.pt")
            writer.close()
            raise SystemExit(f"non-finite {err} at iteration {iteration}; stopped. The last good checkpoint "
                             f"(iteration {last_good['iteration']}) is {path}") from None
        if args.input_norm == "running":  # after the updates: they compared against the rollout's own statistics
            for i, actor in enumerate(actors):
                actor.trunk[0].update(obs_buf[:, :, i])
            critic.trunk[0].update(critic_inputs)

        # Logging: everything is reduced on the device, then fetched once.
        with torch.no_grad():
            raw_values = value_norm.denormalize(values_buf)
            vn_mean, vn_var = value_norm.mean_var()
            reduced = {
                "losses/explained_variance": 1.0 - (returns - raw_values).var() / returns.var().clamp(min=1e-8),
                "diagnostics/returns_mean": returns.mean(), "diagnostics/returns_std": returns.std(),
                "diagnostics/rewards_mean": rewards_buf.mean(), "diagnostics/values_mean": raw_values.mean(),
                "diagnostics/advantages_mean": advantages.mean(), "diagnostics/advantages_std": advantages.std(),
                "diagnostics/value_norm_mean": vn_mean[0], "diagnostics/value_norm_std": vn_var[0].sqrt(),
                "diagnostics/nonfinite_obs": nonfinite_obs.float(),
                "diagnostics/nonfinite_state": nonfinite_state.float(),
            }
            scalars = dict(zip(reduced, torch.stack(list(reduced.values())).tolist()))
        sps = int((global_step - start_step) / (time.time() - start_time))
        ep = episode_sums.tolist()
        scalars.update({
            "charts/SPS": sps, "charts/learning_rate": actor_optimizers[0].param_groups[0]["lr"],
            "charts/critic_learning_rate": critic_optimizer.param_groups[0]["lr"],
            "losses/value_loss": value_loss, "losses/critic_grad_norm": critic_grad_norm,
        })
        if ep[2] > 0:
            scalars.update({"charts/episodic_return": ep[0] / ep[2], "charts/episodic_length": ep[1] / ep[2],
                            "charts/success_rate": ep[3] / ep[2], "charts/exception_rate": ep[4] / ep[2],
                            "charts/time_out_rate": ep[5] / ep[2], "charts/episodes": ep[2]})
        if term_sums:
            for name, value in zip(term_sums, torch.stack(list(term_sums.values())).tolist()):
                scalars[f"rewards/{name}"] = value / (num_steps * num_envs * args.action_repeat)  # per env step
        for agent, agent_stats in actor_stats.items():
            f = factors[agent]
            agent_stats.update(zip(("factor_mean", "factor_std", "factor_min", "factor_max"),
                                   torch.stack([f.mean(), f.std(), f.min(), f.max()]).tolist()))
            for key, value in agent_stats.items():
                scalars[f"agent{agent}/{key}"] = value  # keyed by agent id, not by update position (HARL's bug)
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step)
        interval_episodes += torch.tensor([ep[2], ep[3]])
        if iteration % args.log_interval == 0 or iteration == args.num_iterations:
            count, successes = interval_episodes.tolist()
            success = f"{successes / count:.3f} of {int(count)} episodes" if count > 0 else "n/a (no episode ended)"
            print(f"iter {iteration}/{args.num_iterations} step {global_step} SPS {sps} success {success} "
                  f"value_loss {value_loss:.4f} explained_var {scalars['losses/explained_variance']:.3f}", flush=True)
            interval_episodes.zero_()

        last_good = snapshot(iteration)
        if iteration % args.save_interval == 0 or iteration == args.num_iterations:
            checkpoint_path = save(last_good, f"checkpoint_{iteration}.pt")
    writer.close()
    return checkpoint_path


def run_evaluation(args: Args) -> Tuple[float, float]:
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    checkpoint = load_checkpoint(args.eval_checkpoint, device)
    saved = checkpoint["args"]
    env = policy_env(saved, args.eval_episodes, device, args.seed)
    return evaluate(trained_actors(checkpoint, env, device), env)


if __name__ == "__main__":
    try:
        args = check_args(tyro.cli(Args))
        if args.eval_checkpoint is not None:
            success_rate, completion = run_evaluation(args)
            print(f"eval {args.eval_checkpoint}: success rate {success_rate:.3f} over {args.eval_episodes} episodes, "
                  f"mean completion time {completion:.2f} s (failures count as 20 s)")
        else:
            print(f"checkpoint: {train(args)}")
    except (UsageError, FileNotFoundError, BackendUnavailable) as err:  # bad flags, files or installs: no traceback
        raise SystemExit(f"error: {err}") from None
