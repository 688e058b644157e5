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
from typing import Dict, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
import tyro
from torch import nn

from global_state import build_global_state, global_state_dim, sanitize
from lifecycle import Run, UsageError, check_args, load_checkpoint, shutdown
from mapush_env import BackendUnavailable, evaluate, make_env
from value_norm import ValueNorm


@dataclass
class Args:
    exp_name: str = "happo_mapush"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (the models; rank r's envs and action sampling use seed + r)"""
    cuda: bool = True
    """if toggled, train on CUDA when it is available (under torchrun: cuda:LOCAL_RANK)"""

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
    critic_input: Literal["global-state-full", "global-state", "agent0-obs"] = "global-state-full"
    """the critic's input: the global state with the object's velocity (default), the fix's 17 dims, or the bug"""
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

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes):
        super().__init__()
        self.trunk = mlp_trunk(obs_dim, hidden_sizes)
        self.mean = layer_init(nn.Linear(hidden_sizes[-1], action_dim), 0.01)
        self.std_logit = nn.Parameter(torch.ones(action_dim))

    def forward(self, obs: torch.Tensor) -> torch.distributions.Normal:
        # No argument checks: they cost time, and a non-finite loss stops the run at the end of its iteration.
        return torch.distributions.Normal(self.mean(self.trunk(obs)), 0.5 * torch.sigmoid(self.std_logit),
                                          validate_args=False)


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
    actors = [Actor(env.obs_dim, env.action_dim, args.hidden_sizes).to(device)
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


def happo_actor_update(actors, optimizers, obs, actions, logprobs, advantages, args: Args, generator=None):
    """The actors' update on flat batches: obs [B, A, obs_dim], actions [B, A, act_dim], logprobs [B, A] (joint over
    action dims, from the rollout), team advantages [B]. Returns ({agent id: {stat: value}}, {agent id: its factor}).

    HAPPO (Kuba et al., ICLR 2022; HARL's happo.py): the agents take turns in a fresh random order (from `generator`),
    each maximizing its clipped surrogate weighted by the factor, the product over the agents before it of their
    joint ratios new/old on every sample. Why the factor: each agent then improves the *joint* policy given what the
    agents before it already changed, so no turn can undo the ones before it (the monotonic improvement guarantee
    that simultaneous updates lack). Why the random order: no agent is always first (always against factor 1).
    `--no-sequential` keeps the factor at 1; `--share-actor` trains one actor on each agent's samples in turn; both
    together are MAPPO: one turn on every agent's samples (B x A per epoch)."""
    order = torch.randperm(obs.shape[1], generator=generator).tolist()
    turns = [sorted(order)] if args.share_actor and not args.sequential else [[agent] for agent in order]
    # HARL's EP advantage normalization: once over the whole batch, population std, not including the factor.
    advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-5)
    factor, stats, factors = torch.ones_like(advantages), {}, {}
    for position, agents in enumerate(turns):
        own = 0 if args.share_actor else agents[0]  # the network this turn trains
        actor, optimizer = actors[own], optimizers[own]
        turn_obs, turn_actions = obs[:, agents].flatten(0, 1), actions[:, agents].flatten(0, 1)  # [B * len(agents), .]
        old_logprob, size = logprobs[:, agents].flatten(), len(agents) * advantages.shape[0]
        turn_advantages, turn_factor = advantages.repeat_interleave(len(agents)), factor.repeat_interleave(len(agents))
        with torch.no_grad():  # the factor's ratio starts at the rollout's policy, or where a shared actor is now
            start_logprob = (actor(turn_obs).log_prob(turn_actions).sum(-1) if args.share_actor and args.sequential
                             else old_logprob)
        sums: Dict[str, torch.Tensor] = {}
        for _ in range(args.ppo_epochs):
            perm = torch.randperm(size, device=advantages.device)
            for start in range(0, size, size // args.actor_num_minibatches):
                idx = perm[start : start + size // args.actor_num_minibatches]
                policy = actor(turn_obs[idx])
                log_ratio = policy.log_prob(turn_actions[idx]).sum(-1) - old_logprob[idx]
                ratio = log_ratio.exp()  # joint ratio: product over action dims
                adv = turn_advantages[idx]
                surrogate = torch.min(ratio * adv, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * adv)
                policy_loss = -(turn_factor[idx] * surrogate).mean()
                entropy = policy.entropy().sum(-1).mean()
                optimizer.zero_grad()
                (policy_loss - args.ent_coef * entropy).backward()
                grad_norm = nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
                optimizer.step()
                with torch.no_grad():
                    step = {"policy_loss": policy_loss, "entropy": entropy, "ratio": ratio.mean(),
                            "clip_fraction": ((ratio - 1).abs() > args.clip_coef).float().mean(),
                            "approx_kl": ((ratio - 1) - log_ratio).mean(), "grad_norm": grad_norm}
                    sums = {name: sums.get(name, 0.0) + value for name, value in step.items()}
        turn_stats = {name: value / (args.ppo_epochs * args.actor_num_minibatches) for name, value in sums.items()}
        turn_stats.update(factor_mean=factor.mean(), factor_std=factor.std(), factor_min=factor.min(),
                          factor_max=factor.max(), update_position=torch.tensor(float(position)))
        for agent in agents:  # logged by agent id, not update position (HARL's bug)
            stats[agent], factors[agent] = turn_stats, factor
        if args.sequential:
            # The next agent's factor: this agent's joint ratio after its whole update, on the whole batch.
            with torch.no_grad():
                factor = factor * (actor(turn_obs).log_prob(turn_actions).sum(-1) - start_logprob).exp()
    return stats, factors


def critic_update(critic, optimizer, value_norm, critic_inputs, old_values, returns, args: Args):
    """Clipped Huber value loss in normalized space; returns (mean value loss, mean grad norm) as tensors."""
    batch_size, minibatch_size = returns.shape[0], returns.shape[0] // args.critic_num_minibatches
    if args.value_norm_update == "once":
        value_norm.update(returns)  # Fix: once per iteration on all returns, so the targets stay put in the epochs.
    sums = torch.zeros(2, device=returns.device)
    for _ in range(args.critic_epochs):
        perm = torch.randperm(batch_size, device=returns.device)
        for start in range(0, batch_size, minibatch_size):
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
            optimizer.zero_grad()
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            optimizer.step()
            sums += torch.stack([loss.detach(), grad_norm])
    return tuple(sums / (args.critic_epochs * args.critic_num_minibatches))


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
class Episodes:
    """What one rollout hands to the next: the current observation and each env's episode so far."""
    obs: torch.Tensor  # [E, A, obs_dim], non-finite entries zeroed
    ep_return: torch.Tensor  # [E], team reward summed
    ep_length: torch.Tensor  # [E], env steps


@torch.no_grad()
def rollout(args: Args, env, m: Models, buf: Storage, episodes: Episodes) -> Dict[str, torch.Tensor]:
    """`args.num_steps` decisions per env into `buf`, continuing `episodes` in place; returns summed statistics."""
    stats: Dict[str, torch.Tensor] = {}
    critic_input, _ = build_critic_input(args, episodes.obs, env.scene)
    for step in range(args.num_steps):
        buf.obs[step], buf.critic_inputs[step] = episodes.obs, critic_input
        buf.values[step] = m.critic(critic_input)
        for i in range(env.num_agents):
            policy = m.actors[0 if args.share_actor else i](episodes.obs[:, i])
            buf.actions[step, :, i] = action = policy.sample()
            buf.logprobs[step, :, i] = policy.log_prob(action).sum(-1)
        obs, reward, done, info = env.step(buf.actions[step])
        # Whatever reaches the trainer non-finite is zeroed and counted, never fed to the networks.
        (episodes.obs, bad_obs), (reward, bad_reward) = sanitize(obs), sanitize(reward)
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
        critic_input, bad_state = build_critic_input(args, episodes.obs, env.scene)
        episodes.ep_return += team_reward
        episodes.ep_length += info["env_steps"]
        step_stats = {  # the episodes that ended; entries zeroed by the trainer ("env": by the env itself)
            "episodes/count": done, "episodes/return": episodes.ep_return * done,
            "episodes/length": episodes.ep_length * done, "episodes/success": done & info["success"],
            "episodes/exception": done & info["exception"], "episodes/time_out": done & info["time_out"],
            "diagnostics/nonfinite_obs": bad_obs, "diagnostics/nonfinite_reward": bad_reward,
            "diagnostics/nonfinite_state": bad_state, "diagnostics/nonfinite_env": info["nonfinite_obs"].sum()
            + info.get("nonfinite_reward", bad_obs.new_zeros(())).sum(),
            **{f"rewards/{name}": value for name, value in info["reward_terms"].items()}}
        for name, value in step_stats.items():
            stats[name] = stats.get(name, 0) + value.sum()
        episodes.ep_return, episodes.ep_length = episodes.ep_return * ~done, episodes.ep_length * ~done
    buf.next_value = m.critic(critic_input)
    return stats


def update_stats(m: Models, buf: Storage, advantages, returns, actor_stats, value_loss, grad_norm) -> Dict:
    """This iteration's diagnostics by name, on the device (the run averages them over ranks)."""
    vn_mean, vn_var = m.value_norm.mean_var()
    stats = {  # explained variance = 1 - Var(advantages) / Var(returns), from the values GAE used
        "losses/explained_variance": 1.0 - advantages.var(unbiased=False) / returns.var(unbiased=False).clamp(min=1e-8),
        "losses/value_loss": value_loss, "losses/critic_grad_norm": grad_norm,
        "diagnostics/returns_mean": returns.mean(), "diagnostics/returns_std": returns.std(unbiased=False),
        "diagnostics/values_mean": (returns - advantages).mean(), "diagnostics/rewards_mean": buf.rewards.mean(),
        "diagnostics/advantages_std": advantages.std(unbiased=False), "diagnostics/value_norm_mean": vn_mean[0],
        "diagnostics/value_norm_std": vn_var[0].sqrt()}
    for agent, agent_stats in actor_stats.items():
        stats.update({f"agent{agent}/{name}": value for name, value in agent_stats.items()})
    return stats


# -- training --------------------------------------------------------------------------------------------------
def train(args: Args) -> str:
    """Train with `args`; returns the path of the final checkpoint (on rank 0; "" on the other ranks)."""
    with Run(args) as run:  # torchrun's process group, seeding, resume checks, the run folder, stop signals
        env = make_env(args.env_backend, args.num_envs, run.device, run.seed, args.task, args.action_repeat)
        m = build_models(args, env, run.device)
        actors, critic = [run.wrap(actor) for actor in m.actors], run.wrap(m.critic)  # DDP under torchrun
        zeros = torch.zeros(args.num_envs, device=run.device)
        episodes = Episodes(env.reset(), zeros, zeros.clone())
        if args.random_episode_start:
            env.randomize_episode_start()
        run.start(m, env, episodes)  # a resumed run's state goes into m, env and episodes
        episodes.obs = sanitize(episodes.obs)[0]  # fresh or restored, the networks never see a non-finite input
        buf = Storage.zeros(args.num_steps, env, m.critic_input_dim, run.device)
        for iteration in run.iterations():
            stats = rollout(args, env, m, buf, episodes)
            advantages, returns = compute_gae(buf.rewards, buf.values, buf.next_value, buf.dones, buf.truncated,
                                              buf.final_values, args.gamma, args.gae_lambda, m.value_norm.denormalize)
            actor_stats, _ = happo_actor_update(  # the actors in turn (HAPPO), then the critic
                actors, m.actor_optimizers, buf.obs.flatten(0, 1), buf.actions.flatten(0, 1),
                buf.logprobs.flatten(0, 1), advantages.flatten(), args, run.order_rng)
            value_loss, grad_norm = critic_update(
                critic, m.critic_optimizer, m.value_norm, buf.critic_inputs.flatten(0, 1), buf.values.flatten(),
                returns.flatten(), args)
            run.end_iteration(iteration, stats, update_stats(m, buf, advantages, returns, actor_stats, value_loss,
                                                             grad_norm))
    return run.path


# -- evaluation ------------------------------------------------------------------------------------------------
def policy_env(saved: dict, num_envs: int, device, seed: int):
    """The env a run's policies act in, as its flags describe it (a checkpoint's "args")."""
    return make_env(saved["env_backend"], num_envs, device, seed, saved["task"], saved["action_repeat"])


def trained_actors(checkpoint: dict, env, device="cpu") -> List[Actor]:
    """The actors of a loaded checkpoint: one per agent, or one shared."""
    hidden_sizes = checkpoint["args"]["hidden_sizes"]
    actors = [Actor(env.obs_dim, env.action_dim, hidden_sizes).to(device) for _ in checkpoint["actors"]]
    for actor, state in zip(actors, checkpoint["actors"]):
        actor.load_state_dict(state)
    return actors


def mean_actions(actors, obs: torch.Tensor) -> torch.Tensor:
    """The deterministic actions [E, A, act_dim] for observations [E, A, obs_dim] (a single actor: shared)."""
    return torch.stack([actors[i % len(actors)](obs[:, i]).mean for i in range(obs.shape[1])], dim=1)


def main() -> int:
    args, unknown = tyro.cli(Args, return_unknown_args=True)
    try:
        if unknown:
            raise UsageError(f"unrecognized flags: {' '.join(unknown)} (see --help)")
        check_args(args)
        if args.eval_checkpoint is None:
            path = train(args)
            if path:  # rank 0
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
