"""HAPPO (Heterogeneous-Agent PPO) with a centralized critic on MAPush's pushing tasks: HARL's numerics, every
documented critic fix a default (`grep -n "Fix:" *.py`), MAPPO one flag away. README.md explains flags and results.
    python happo_mapush.py                                      # train on the embedded VMAS cuboid task
    python happo_mapush.py --task cylinder --share-actor --no-sequential   # MAPPO, three agents and a cylinder
    python happo_mapush.py --eval-checkpoint runs/RUN/checkpoint_390.pt
    torchrun --standalone --nproc_per_node 2 happo_mapush.py    # one run over 2 processes (--num-envs per rank)
"""
# Isaac Gym must be imported before torch; it is absent on most machines and only the isaacgym backend needs it.
try:
    import isaacgym  # noqa: F401
except ImportError:
    pass

import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
import tyro
from torch import nn

from distributed import (NonFiniteLoss, agreed, all_mean, all_sum, broadcast, broadcast_module, gather,
                         init_distributed, mean_std, moments, rank, rank_seed, shared_randperm, shutdown,
                         sync_gradients, world_size)
from global_state import CosSinYaws, build_global_state, global_state_dim, sanitize
from lifecycle import (Progress, RunFolder, StopRequest, UsageError, args_dict, check_args, load_checkpoint, open_run,
                       report_stop, restore, resume_problem, save_checkpoint, snapshot)
from mapush_env import ActionRepeat, BackendUnavailable, evaluate, make_env
from value_norm import ValueNorm


@dataclass
class Args:
    exp_name: str = "happo_mapush"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (the models; rank r's envs and action sampling use seed + r)"""
    cuda: bool = True
    """if toggled, train on CUDA when it is available (under torchrun: cuda:LOCAL_RANK)"""
    track: bool = False
    """if toggled, also log to Weights and Biases"""
    wandb_project_name: str = "happo-mapush"
    """the W&B project name"""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """the torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on CPU)"""

    task: Literal["cuboid", "tblock", "cylinder"] = "cuboid"
    """MAPush's mid-level task: a 1.2 m box and a T-block with 2 agents, a 3 m cylinder with 3"""
    env_backend: Literal["vmas", "isaacgym"] = "vmas"
    """the MAPush backend: `vmas` (embedded, any machine) or `isaacgym` (MAPush/MQE, CUDA, Python 3.8)"""
    num_envs: int = 512
    """the number of parallel envs per process (under torchrun: per rank)"""
    num_steps: int = 20
    """the rollout length per env per iteration, in decisions (20 x 5 = 100 env steps; HARL's episode_length: 200)"""
    action_repeat: int = 5
    """each action is held for this many 0.02 s env steps, rewards summed (1: MAPush's 50 Hz); others count decisions"""
    random_episode_start: bool = True
    """if toggled, each env's first episode starts at a random step, so envs do not time out in lockstep"""
    total_timesteps: int = 20_000_000
    """total env steps of all ranks (one step of one env counts once, whatever the number of agents)"""
    learning_rate: float = 5e-4
    """the actors' Adam learning rate"""
    critic_lr: float = 5e-4
    """the critic's Adam learning rate"""
    anneal_lr: bool = False
    """if toggled, both learning rates decay linearly to 0 over the run"""
    hidden_sizes: Tuple[int, ...] = (128, 128)
    """the actors' hidden layer sizes"""
    critic_hidden_sizes: Tuple[int, ...] = (256, 256)
    """the critic's hidden layer sizes (HARL: 128 128; the wider critic learns faster here, see README)"""
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
    ent_coef: float = 0.02
    """the entropy bonus coefficient (HARL: 0.01; 0.02 learned faster in the sweep, see README)"""
    gamma: float = 0.99
    """the discount factor per decision"""
    gae_lambda: float = 0.95
    """the GAE lambda"""
    max_grad_norm: float = 10.0
    """the gradient clipping norm (actors and critic)"""
    huber_delta: float = 10.0
    """the Huber loss delta of the value loss (in normalized-return units)"""
    team_reward: Literal["sum", "mean"] = "sum"
    """how the critic's reward is formed from the per-agent rewards: `sum` (MAPush fork) or `mean`"""
    actor_input: Literal["obs", "obs-cos-sin"] = "obs"
    """the actors' input: MQE's observation, or with every relative yaw as its cos and sin (a trainer-side transform)"""
    critic_input: Literal["global-state", "global-state-vel", "global-state-full", "agent0-obs"] = "global-state-full"
    """global-state-full (the fix + object velocity, cos/sin yaws), global-state (the fix), -vel (+ velocity only)"""
    value_norm_update: Literal["once", "per-minibatch"] = "once"
    """when ValueNorm is updated: `once` per iteration on all returns (the fix) or `per-minibatch` (HARL upstream)"""
    sequential: bool = True
    """if toggled, HAPPO's sequential update with the factor; `--no-sequential` sets the factor to 1"""
    share_actor: bool = False
    """if toggled, one actor and one Adam for all agents (HARL's share_param); with `--no-sequential` that is MAPPO"""

    log_interval: int = 5
    """print a progress line every this many iterations (TensorBoard gets every iteration)"""
    save_interval: int = 50
    """save a checkpoint every this many iterations (and at the end, and on SIGINT/SIGTERM)"""
    resume: Optional[str] = None
    """continue from this checkpoint: a run's newest one continues that run, an older one starts a branch"""
    eval_checkpoint: Optional[str] = None
    """evaluate this checkpoint deterministically instead of training"""
    eval_episodes: int = 300
    """the number of envs for evaluation; each env's first episode counts (MAPush's calculator)"""


# -- networks (HARL's MLPBase and Gaussian actor) -------------------------------------------------------------------


def layer_init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, 0.0)
    return layer


def mlp_trunk(in_dim: int, hidden_sizes) -> nn.Sequential:
    """HARL's MLPBase: per-sample LayerNorm of the input, then Linear -> ReLU -> LayerNorm per hidden layer."""
    layers: List[nn.Module] = [nn.LayerNorm(in_dim)]
    for size in hidden_sizes:
        layers += [layer_init(nn.Linear(in_dim, size), nn.init.calculate_gain("relu")), nn.ReLU(), nn.LayerNorm(size)]
        in_dim = size
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Gaussian policy with a state-independent std = 0.5 * sigmoid(logit), the logit initialised to 1 (HARL)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes, actor_input: str = "obs"):
        super().__init__()
        features = [CosSinYaws(obs_dim)] if actor_input == "obs-cos-sin" else []  # an input transform, or none
        self.trunk = nn.Sequential(*features, *mlp_trunk(features[0].out_dim if features else obs_dim, hidden_sizes))
        self.mean = layer_init(nn.Linear(hidden_sizes[-1], action_dim), 0.01)
        self.std_logit = nn.Parameter(torch.ones(action_dim))

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mean(self.trunk(obs)), 0.5 * torch.sigmoid(self.std_logit))


class Critic(nn.Module):
    """V(s) in ValueNorm's normalized space."""

    def __init__(self, in_dim: int, hidden_sizes):
        super().__init__()
        self.trunk = mlp_trunk(in_dim, hidden_sizes)
        self.head = layer_init(nn.Linear(hidden_sizes[-1], 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).squeeze(-1)


def build_critic_input(args: Args, obs: torch.Tensor, scene_fn) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the critic sees for one step: (input [E, D], non-finite entries zeroed); `scene_fn()` gives the Scene."""
    if args.critic_input == "agent0-obs":
        return obs[:, 0], torch.zeros((), dtype=torch.long, device=obs.device)
    # Fix: the critic sees the global state (env-relative frame, with velocities), not agent 0's local view.
    return build_global_state(scene_fn(), args.critic_input)


@dataclass
class Models:
    actors: List[Actor]  # one per agent (HARL's default), or one for all with --share-actor
    actor_optimizers: List[torch.optim.Optimizer]
    critic: Critic
    critic_optimizer: torch.optim.Optimizer
    value_norm: ValueNorm
    critic_input_dim: int  # global_state_dim(A), or obs_dim with --critic-input agent0-obs


def build_models(args: Args, env, device) -> Models:
    actors = [Actor(env.obs_dim, env.action_dim, args.hidden_sizes, args.actor_input).to(device)
              for _ in range(1 if args.share_actor else env.num_agents)]  # one per agent, or one shared
    critic_input_dim = env.obs_dim if args.critic_input == "agent0-obs" else global_state_dim(env.num_agents,
                                                                                              args.critic_input)
    critic = Critic(critic_input_dim, args.critic_hidden_sizes).to(device)
    # HARL: Adam with eps 1e-5 and no weight decay, one optimizer per actor network.
    return Models(actors, [torch.optim.Adam(a.parameters(), lr=args.learning_rate, eps=1e-5) for a in actors], critic,
                  torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=1e-5), ValueNorm(device=device),
                  critic_input_dim)


# -- the algorithm: GAE, the sequential HAPPO actor update, the critic update --------------------------------------


def compute_gae(rewards, values, next_value, dones, truncated, final_values, gamma, gae_lambda, denormalize):
    """GAE over [T, E] tensors -> (advantages, returns) in raw reward units. values, next_value [E] and final_values
    are normalized (`denormalize` maps them to raw units). dones[t]: the episode ended at step t (no bootstrap from the
    reset state that follows); truncated[t]: by time-out, so bootstrap from final_values[t], the pre-reset state."""
    raw_values = denormalize(torch.cat([values, next_value.unsqueeze(0)]))  # [T + 1, E]
    raw_final = denormalize(final_values) * truncated
    not_done = 1.0 - dones
    advantages = torch.zeros_like(rewards)
    gae = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * (raw_values[t + 1] * not_done[t] + raw_final[t]) - raw_values[t]
        gae = delta + gamma * gae_lambda * not_done[t] * gae
        advantages[t] = gae
    return advantages, advantages + raw_values[:-1]


def happo_actor_update(actors, optimizers, obs, actions, logprobs, advantages, args: Args):
    """The actors' update on flat batches: obs [B, A, obs_dim], actions [B, A, act_dim], logprobs [B, A] (joint over
    action dims, from the rollout) and the team advantages [B]. Returns ({agent id: {stat: value}}, {agent id: the
    factor it trained with, [B]}).

    HAPPO (Kuba et al., ICLR 2022; HARL's on_policy_ha_runner.train and happo.py), the default: the agents take turns
    in a fresh random order, each maximizing its clipped surrogate weighted by the factor, the product over the agents
    before it of their joint ratios new/old on every sample. Why the factor: each agent then improves the *joint*
    policy given what the agents before it already changed, so no turn can undo the ones before it (the monotonic
    improvement guarantee that simultaneous updates lack). Why the random order: no agent is always first (always
    against factor 1) or always last. The other modes differ in `turns`, `own` and `first_logprob`:
    - `--no-sequential`: the factor stays 1 (simultaneous, independent updates);
    - `--share-actor`: one actor for all agents (HARL's share_param); each turn updates it on that agent's samples;
    - `--share-actor --no-sequential` is MAPPO: one turn on all agents' samples together (B x A per epoch).
    In one process the distributed helpers reduce to plain torch: `shared_randperm(n)` is `torch.randperm(n)`,
    `mean_std(x)` is `(x.mean(), x.std(unbiased=False))`, `sync_gradients` only checks that the loss is finite.
    """
    batch_size, num_agents = advantages.shape[0], obs.shape[1]
    order = shared_randperm(num_agents, "cpu").tolist()  # the same order on every rank
    turns = [list(range(num_agents))] if args.share_actor and not args.sequential else [[agent] for agent in order]
    # EP advantage normalization: once over the whole batch (of all ranks), population std, not including the factor.
    mean, std = mean_std(advantages)
    advantages = (advantages - mean) / (std + 1e-5)
    factor = torch.ones(batch_size, device=advantages.device)
    stats, factors_used = {}, {}  # agent id -> {stat: value}; agent id -> the factor it trained with, [B]
    for position, agents in enumerate(turns):
        own = 0 if args.share_actor else agents[0]  # the network this turn trains
        actor, optimizer = actors[own], optimizers[own]
        turn_obs, turn_actions = obs[:, agents].flatten(0, 1), actions[:, agents].flatten(0, 1)  # [B * len(agents), .]
        old_logprob = logprobs[:, agents].flatten()
        turn_advantages, turn_factor = advantages.repeat_interleave(len(agents)), factor.repeat_interleave(len(agents))
        size = turn_advantages.shape[0]
        first_logprob = old_logprob  # the factor's ratio starts at the rollout's policy, or where a shared actor is now
        if args.share_actor and args.sequential:
            first_logprob = actor.dist(turn_obs).log_prob(turn_actions).sum(-1).detach()
        sums = dict.fromkeys(("policy_loss", "entropy", "ratio", "clip_fraction", "approx_kl", "grad_norm"),
                             torch.zeros((), device=advantages.device))
        for _ in range(args.ppo_epochs):
            perm = shared_randperm(size, advantages.device)
            for start in range(0, size, size // args.actor_num_minibatches):
                idx = perm[start : start + size // args.actor_num_minibatches]
                policy = actor.dist(turn_obs[idx])
                log_ratio = policy.log_prob(turn_actions[idx]).sum(-1) - old_logprob[idx]
                ratio = log_ratio.exp()  # joint ratio: product over action dims
                adv = turn_advantages[idx]
                surrogate = torch.min(ratio * adv, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * adv)
                policy_loss = -(turn_factor[idx] * surrogate).mean()
                entropy = policy.entropy().sum(-1).mean()
                loss = policy_loss - args.ent_coef * entropy
                optimizer.zero_grad()
                loss.backward()
                sync_gradients(actor, loss, f"agent {agents} policy loss")  # averaged over ranks
                grad_norm = nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
                optimizer.step()
                with torch.no_grad():
                    step_stats = {"policy_loss": policy_loss, "entropy": entropy, "ratio": ratio.mean(),
                                  "clip_fraction": ((ratio - 1.0).abs() > args.clip_coef).float().mean(),
                                  "approx_kl": ((ratio - 1) - log_ratio).mean(), "grad_norm": grad_norm}
                    sums = {name: sums[name] + value for name, value in step_stats.items()}
        means = {name: value / (args.ppo_epochs * args.actor_num_minibatches) for name, value in sums.items()}
        means.update(factor_mean=factor.mean(), factor_std=factor.std(), factor_min=factor.min(),
                     factor_max=factor.max())
        values = torch.stack([value.float() for value in means.values()]).tolist()  # one transfer
        for agent in agents:  # logged by agent id, not update position (HARL's bug)
            stats[agent] = {**dict(zip(means, values)), "update_position": float(position)}
            factors_used[agent] = factor
        if args.sequential:
            # The next agent's factor: this agent's joint ratio after its whole update, on the whole batch.
            with torch.no_grad():
                new_logprob = actor.dist(turn_obs).log_prob(turn_actions).sum(-1)
                factor = factor * (new_logprob - first_logprob).exp()
    return stats, factors_used


def critic_update(critic, optimizer, value_norm, critic_inputs, old_values, returns, args: Args):
    """Clipped Huber value loss in normalized space; returns (mean value loss, mean grad norm)."""
    batch_size, minibatch_size = returns.shape[0], returns.shape[0] // args.critic_num_minibatches
    if args.value_norm_update == "once":
        value_norm.update_moments(*moments(returns))  # Fix: once per iteration on all returns: the targets stay put.
    sums = torch.zeros(2, device=returns.device)
    for _ in range(args.critic_epochs):
        perm = shared_randperm(batch_size, returns.device)
        for start in range(0, batch_size, minibatch_size):
            idx = perm[start : start + minibatch_size]
            if args.value_norm_update == "per-minibatch":
                value_norm.update_moments(*moments(returns[idx]))
            target = value_norm.normalize(returns[idx])
            values = critic(critic_inputs[idx])
            loss = F.huber_loss(values, target, reduction="none", delta=args.huber_delta)
            if args.clip_vloss:
                clipped = old_values[idx] + (values - old_values[idx]).clamp(-args.clip_coef, args.clip_coef)
                loss = torch.max(loss, F.huber_loss(clipped, target, reduction="none", delta=args.huber_delta))
            loss = loss.mean()
            optimizer.zero_grad()
            loss.backward()
            sync_gradients(critic, loss, "critic value loss")
            grad_norm = nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            optimizer.step()
            sums += torch.stack([loss.detach(), grad_norm])
    return tuple((sums / (args.critic_epochs * args.critic_num_minibatches)).tolist())


# -- rollout ---------------------------------------------------------------------------------------------------


@dataclass
class Storage:
    """One rollout, time-major like HARL's buffers (T decisions x E envs x A agents)."""
    obs: torch.Tensor  # [T, E, A, obs_dim]
    actions: torch.Tensor  # [T, E, A, action_dim], the unclipped samples
    logprobs: torch.Tensor  # [T, E, A], joint over the action dims
    critic_inputs: torch.Tensor  # [T, E, critic_input_dim]
    values: torch.Tensor  # [T, E], normalized
    final_values: torch.Tensor  # [T, E], normalized value of the pre-reset state, where a time-out is bootstrapped
    rewards: torch.Tensor  # [T, E], the team reward
    dones: torch.Tensor  # [T, E]
    truncated: torch.Tensor  # [T, E], 1 where a time-out (only) ended the episode and the env gave its final state
    next_value: torch.Tensor  # [E], normalized value of the state after the last decision

    @classmethod
    def zeros(cls, num_steps: int, env, critic_input_dim: int, device) -> "Storage":
        T, E, A = num_steps, env.num_envs, env.num_agents
        return cls(*(torch.zeros(shape, device=device) for shape in (
            (T, E, A, env.obs_dim), (T, E, A, env.action_dim), (T, E, A), (T, E, critic_input_dim), *[(T, E)] * 5,
            (E,))))


@dataclass
class Carry:
    """What one rollout hands to the next: the current observation and critic input, each env's episode so far."""
    obs: torch.Tensor  # [E, A, obs_dim], non-finite entries zeroed
    critic_input: torch.Tensor  # [E, critic_input_dim]
    ep_return: torch.Tensor  # [E], team reward summed
    ep_length: torch.Tensor  # [E], env steps


@torch.no_grad()
def rollout(args: Args, env, m: Models, buf: Storage, carry: Carry, stop: StopRequest) -> Optional[Dict[str, Any]]:
    """One rollout of `args.num_steps` decisions per env into `buf`, continuing from `carry` (updated in place).
    Returns the rollout's statistics by name (sums, on the device), or None when a stop is requested: the rollout is
    abandoned, and the last consistent state is the previous iteration's."""
    stats: Dict[str, Any] = {}  # name -> sum over the rollout, on the device
    for step in range(args.num_steps):
        if agreed(stop.signum):  # every rank stops at the same step
            return None
        buf.obs[step], buf.critic_inputs[step] = carry.obs, carry.critic_input
        buf.values[step] = m.critic(carry.critic_input)
        for i in range(env.num_agents):
            policy = m.actors[0 if args.share_actor else i].dist(carry.obs[:, i])
            buf.actions[step, :, i] = action = policy.sample()
            buf.logprobs[step, :, i] = policy.log_prob(action).sum(-1)
        obs, reward, done, info = env.step(buf.actions[step])
        # Whatever reaches the trainer non-finite is zeroed and counted, never fed to the networks.
        (carry.obs, bad_obs), (reward, bad_reward) = sanitize(obs), sanitize(reward)
        # Fix: the critic's reward is the team reward, formed explicitly, not agent 0's column.
        team_reward = reward.sum(1) if args.team_reward == "sum" else reward.mean(1)
        buf.rewards[step], buf.dones[step] = team_reward, done.float()
        # Only a time-out is not a failure: a success or an exception on the same step is terminal.
        truncated = info["time_out"] & ~info["success"] & ~info["exception"]
        buf.truncated[step] = buf.final_values[step] = 0.0
        if "final_scene" in info and bool(truncated.any()):
            # Bootstrap from the state the env had before its auto-reset, not from the new episode's first state.
            buf.truncated[step] = truncated.float()
            final_input, _ = build_critic_input(args, sanitize(info["final_obs"])[0], lambda: info["final_scene"])
            buf.final_values[step] = m.critic(final_input) * truncated
        carry.critic_input, bad_state = build_critic_input(args, carry.obs, env.scene)
        carry.ep_return += team_reward
        carry.ep_length += info["env_steps"]
        step_stats = {  # the episodes that ended; entries zeroed by the trainer ("env": by the env itself)
            "episodes/count": done, "episodes/return": carry.ep_return * done,
            "episodes/length": carry.ep_length * done, "episodes/success": done & info["success"],
            "episodes/exception": done & info["exception"], "episodes/time_out": done & info["time_out"],
            "diagnostics/nonfinite_obs": bad_obs, "diagnostics/nonfinite_reward": bad_reward,
            "diagnostics/nonfinite_state": bad_state, "diagnostics/nonfinite_env": info["nonfinite_obs"].sum()
            + info.get("nonfinite_reward", bad_obs.new_zeros(())).sum(),
            **{f"rewards/{name}": value for name, value in info["reward_terms"].items()}}
        for name, value in step_stats.items():
            stats[name] = stats.get(name, 0) + value.sum()
        carry.ep_return, carry.ep_length = carry.ep_return * ~done, carry.ep_length * ~done
    buf.next_value = m.critic(carry.critic_input)
    return stats


def iteration_scalars(args: Args, m: Models, stats: dict, buf: Storage, advantages, returns, actor_stats: dict,
                      value_loss: float, critic_grad_norm: float) -> Dict[str, float]:
    """This iteration's scalars: counts and reward terms summed over ranks, the rest averaged; two transfers."""
    # Explained variance = 1 - Var(advantages) / Var(returns), from the values GAE used (returns - advantages).
    (returns_mean, returns_std), advantages_std = mean_std(returns), mean_std(advantages)[1]
    vn_mean, vn_var = m.value_norm.mean_var()
    means = {"losses/explained_variance": 1.0 - advantages_std**2 / (returns_std**2).clamp(min=1e-8),
             "losses/value_loss": value_loss, "losses/critic_grad_norm": critic_grad_norm,
             "diagnostics/returns_mean": returns_mean, "diagnostics/returns_std": returns_std,
             "diagnostics/values_mean": (returns - advantages).mean(), "diagnostics/rewards_mean": buf.rewards.mean(),
             "diagnostics/advantages_std": advantages_std, "diagnostics/value_norm_mean": vn_mean[0],
             "diagnostics/value_norm_std": vn_var[0].sqrt(),
             "charts/learning_rate": m.actor_optimizers[0].param_groups[0]["lr"],
             "charts/critic_learning_rate": m.critic_optimizer.param_groups[0]["lr"]}
    for agent, agent_stats in actor_stats.items():  # factor min and max: the mean over ranks of each rank's extreme
        means.update({f"agent{agent}/{key}": value for key, value in agent_stats.items()})
    scalars = {}
    for group, reduce in ((stats, all_sum), (means, all_mean)):
        values = torch.stack([torch.as_tensor(v, device=returns.device).float().reshape(()) for v in group.values()])
        scalars.update(zip(group, reduce(values).tolist()))
    ended = {name[len("episodes/"):]: scalars.pop(name) for name in list(scalars) if name.startswith("episodes/")}
    if ended["count"] > 0:  # episode lengths in env steps
        scalars.update({"charts/episodes": ended["count"], "charts/episodic_return": ended["return"] / ended["count"],
                        "charts/episodic_length": ended["length"] / ended["count"],
                        "charts/success_rate": ended["success"] / ended["count"],
                        "charts/exception_rate": ended["exception"] / ended["count"],
                        "charts/time_out_rate": ended["time_out"] / ended["count"]})
    for name in [k for k in scalars if k.startswith("rewards/")]:  # per env step of one env
        scalars[name] /= args.num_steps * args.num_envs * args.action_repeat * world_size()
    return scalars


# -- training --------------------------------------------------------------------------------------------------


@dataclass
class Run:  # everything a run holds between iterations
    env: ActionRepeat
    m: Models
    buf: Storage
    carry: Carry
    num_iterations: int
    per_iteration: int  # env steps of all ranks per iteration
    start_iteration: int = 1
    global_step: int = 0
    folder: Optional[RunFolder] = None  # rank 0: the run folder (locked), its writer, whether it continues a run


def start_run(args: Args) -> Run:
    """Everything a run needs before its first iteration: processes, envs, models, storage, the checkpoint it resumes
    from and its run folder (rank 0)."""
    device = init_distributed(args.cuda, args.dist_backend)
    per_iteration = args.num_envs * args.num_steps * args.action_repeat * world_size()  # env steps of all ranks
    num_iterations = args.total_timesteps // per_iteration  # >= 1: check_args
    checkpoint = None
    if args.resume is not None:  # rank 0 reads the file; every rank gets it, or the same error
        checkpoint = broadcast(resume_problem(args.resume, args_dict(args), world_size(), num_iterations)
                               if rank() == 0 else None)
        if isinstance(checkpoint, str):
            raise UsageError(checkpoint)
    # Envs and action sampling are seeded per rank; every rank starts from rank 0's weights.
    torch.manual_seed(rank_seed(args.seed))
    env = policy_env(args_dict(args), args.num_envs, device, rank_seed(args.seed))
    m = build_models(args, env, device)
    for model in m.actors + [m.critic]:
        broadcast_module(model)
    obs, ep_return = env.reset(), torch.zeros(args.num_envs, device=device)
    ep_length = torch.zeros(args.num_envs, device=device)
    if args.random_episode_start:
        env.randomize_episode_start()
    run = Run(env, m, Storage.zeros(args.num_steps, env, m.critic_input_dim, device), None, num_iterations,
              per_iteration)
    if checkpoint is not None:
        restored = restore(m, checkpoint, rank(), env)
        if restored is not None:  # the env's own state (vmas); MQE restarts its episodes
            obs, ep_return, ep_length = restored
        run.start_iteration, run.global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
    obs = sanitize(obs)[0]
    run.carry = Carry(obs, build_critic_input(args, obs, env.scene)[0], ep_return, ep_length)
    # Rank 0 opens (and locks) the run folder, TensorBoard (W&B) and prints the start-up line; a refusal stops all.
    opened = open_run({**args_dict(args), "world_size": world_size()}, checkpoint, run.global_step, num_iterations,
                      device) if rank() == 0 else None
    problem = broadcast(opened if isinstance(opened, str) else None)
    if problem is not None:
        raise UsageError(problem)
    run.folder = opened
    return run


def train(args: Args) -> str:
    """Train with `args`; returns the path of the final checkpoint (on rank 0; "" on the other ranks)."""
    run = start_run(args)
    env, m, buf, carry, global_step, folder = run.env, run.m, run.buf, run.carry, run.global_step, run.folder

    def save(state: dict) -> str:  # every rank calls it: rank 0 writes every rank's own part (RNG, envs)
        ranks = gather(state["local"])
        return save_checkpoint(state, ranks, folder.path) if folder is not None else ""

    def take_snapshot(iteration: int) -> dict:
        return snapshot(m, iteration, global_step, args_dict(args), env, carry.ep_return, carry.ep_length)

    stop, progress = StopRequest(), Progress(args.log_interval, run.num_iterations, run.start_iteration, global_step)
    last_good = take_snapshot(run.start_iteration - 1)
    path = args.resume if folder is not None and folder.continuing else ""
    try:
        for iteration in range(run.start_iteration, run.num_iterations + 1):
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / run.num_iterations
                for optimizer in m.actor_optimizers:
                    optimizer.param_groups[0]["lr"] = frac * args.learning_rate
                m.critic_optimizer.param_groups[0]["lr"] = frac * args.critic_lr
            stats = rollout(args, env, m, buf, carry, stop)
            if stats is None:  # stopped: the last consistent state is the previous iteration's
                break
            global_step += run.per_iteration
            advantages, returns = compute_gae(buf.rewards, buf.values, buf.next_value, buf.dones, buf.truncated,
                                              buf.final_values, args.gamma, args.gae_lambda, m.value_norm.denormalize)
            try:  # the actors in turn (HAPPO), then the critic
                actor_stats, _ = happo_actor_update(
                    m.actors, m.actor_optimizers, buf.obs.flatten(0, 1), buf.actions.flatten(0, 1),
                    buf.logprobs.flatten(0, 1), advantages.flatten(), args)
                value_loss, grad_norm = critic_update(m.critic, m.critic_optimizer, m.value_norm,
                                                      buf.critic_inputs.flatten(0, 1), buf.values.flatten(),
                                                      returns.flatten(), args)
            except NonFiniteLoss as err:  # raised on every rank at the same step
                path = save(last_good)
                raise SystemExit(f"non-finite {err} at iteration {iteration}; stopped. The last good checkpoint "
                                 f"(iteration {last_good['iteration']}) is {path}" if rank() == 0 else 1) from None
            scalars = iteration_scalars(args, m, stats, buf, advantages, returns, actor_stats, value_loss, grad_norm)
            scalars["charts/SPS"] = progress.sps(global_step)
            if folder is not None:  # rank 0
                for key, value in scalars.items():
                    folder.writer.add_scalar(key, value, global_step)
                progress.line(iteration, global_step, scalars)
            last_good = take_snapshot(iteration)
            if iteration % args.save_interval == 0 or iteration == run.num_iterations:
                path = save(last_good)
            if agreed(stop.signum):
                break
        signum = agreed(stop.signum)
        if signum and last_good["iteration"] < run.num_iterations:  # SIGINT/SIGTERM: save the last consistent state
            path = save(last_good)
            if folder is not None:
                report_stop(signum, path, last_good["iteration"], run.num_iterations,
                            {**args_dict(args), "resume": path}, args_dict(Args()), world_size())
            raise SystemExit(128 + signum)
    finally:
        stop.restore()
        if folder is not None:
            folder.close()  # the writer, then the lock
    return path


def mean_actions(actors, obs: torch.Tensor) -> torch.Tensor:
    """The deterministic actions [E, A, act_dim] for observations [E, A, obs_dim] (a single actor: shared)."""
    return torch.stack([actors[i % len(actors)].dist(obs[:, i]).mean for i in range(obs.shape[1])], dim=1)


def trained_actors(checkpoint: dict, env, device="cpu") -> List[Actor]:
    """The actors of a loaded checkpoint, rebuilt as its run's flags describe them."""
    saved = checkpoint["args"]
    actors = [Actor(env.obs_dim, env.action_dim, saved["hidden_sizes"], saved["actor_input"]).to(device)
              for _ in checkpoint["actors"]]  # one per agent, or one shared
    for actor, state in zip(actors, checkpoint["actors"]):
        actor.load_state_dict(state)
    return actors


def policy_env(saved: dict, num_envs: int, device, seed: int) -> ActionRepeat:
    """The env a run's policies act in, as its flags describe it (`args_dict` or a checkpoint's "args")."""
    return ActionRepeat(make_env(saved["env_backend"], num_envs=num_envs, device=device, seed=seed,
                                 task=saved["task"]), saved["action_repeat"])


def main() -> int:
    args, unknown = tyro.cli(Args, return_unknown_args=True)
    try:
        if unknown:
            raise UsageError(f"unrecognized flags: {' '.join(unknown)} (see --help)")
        check_args(args)
        if args.eval_checkpoint is None:
            path = train(args)
            if rank() == 0:
                print(f"checkpoint: {path}")
        elif int(os.environ.get("RANK", "0")) == 0:  # under torchrun one process evaluates
            device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
            checkpoint = load_checkpoint(args.eval_checkpoint, device)
            env = policy_env(checkpoint["args"], args.eval_episodes, device, args.seed)
            actors = trained_actors(checkpoint, env, device)
            success_rate, completion = evaluate(lambda obs: mean_actions(actors, obs), env)
            print(f"eval {args.eval_checkpoint}: success rate {success_rate:.3f} over {args.eval_episodes} episodes, "
                  f"mean completion time {completion:.2f} s (failures count as 20 s)")
    except (UsageError, BackendUnavailable) as err:  # bad flags, files or installs: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the signal handlers are installed: nothing trained yet
        print("interrupted before training started: nothing to save", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
