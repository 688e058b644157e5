"""One HAPPO iteration through HARL's own code and through happo_mapush.py, from the same weights and the same batch.

HARL's side uses its own classes: `HAPPO` (each agent's StochasticPolicy, Adam and mini-batch update), `VCritic`
(VNet, clipped Huber value loss), `ValueNorm`, and the `OnPolicyActorBuffer` / `OnPolicyCriticBufferEP` buffers (GAE,
mini-batch generators). Their runner, `OnPolicyHARunner.train`, needs a whole env to be built, so its ~20 lines that
chain the agents (random order, factor = product of the previous agents' joint ratios, critic last) are repeated
here, as in HARL. Only the modules on that path are imported: HARL's package `__init__` files import every env it
supports (SMAC, MuJoCo, football...), so the packages are registered empty and each module is loaded from its file.

Both sides start from HARL's initial weights (copied into ours), draw the agent order and every mini-batch
permutation from torch's global generator seeded alike, and train on the same random batch with episode ends. The
script prints the largest absolute difference per network and per statistic and exits 1 above --tolerance.

    git clone https://github.com/PKU-MARL/HARL /tmp/HARL
    python benchmarks/harl_check.py --harl-dir /tmp/HARL            # HARL upstream: ValueNorm per mini-batch
    python benchmarks/harl_check.py --harl-dir /tmp/HARL --value-norm-update once   # the fix: once, before the epochs

HARL needs numpy and torch only on this path; PyYAML, gym, absl and the envs are not needed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import happo_mapush as H  # noqa: E402

HARL_PACKAGES = ("harl", "harl.algorithms", "harl.algorithms.actors", "harl.algorithms.critics", "harl.common",
                 "harl.common.buffers", "harl.envs", "harl.models", "harl.models.base", "harl.models.policy_models",
                 "harl.models.value_function_models", "harl.utils")


class Box:
    """What HARL reads of a gym Box space: its class name and shape."""

    def __init__(self, dim: int):
        self.shape = (dim,)


def import_harl(harl_dir: str) -> types.SimpleNamespace:
    if not os.path.isfile(os.path.join(harl_dir, "harl", "algorithms", "actors", "happo.py")):
        raise SystemExit(f"error: {harl_dir} is not a HARL checkout (no harl/algorithms/actors/happo.py); "
                         f"git clone https://github.com/PKU-MARL/HARL")
    for name in HARL_PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(harl_dir, *name.split("."))]
        sys.modules[name] = package

    def load(module: str, name: str):
        return getattr(importlib.import_module(module), name)

    return types.SimpleNamespace(
        HAPPO=load("harl.algorithms.actors.happo", "HAPPO"),
        VCritic=load("harl.algorithms.critics.v_critic", "VCritic"),
        ValueNorm=load("harl.common.valuenorm", "ValueNorm"),
        ActorBuffer=load("harl.common.buffers.on_policy_actor_buffer", "OnPolicyActorBuffer"),
        CriticBuffer=load("harl.common.buffers.on_policy_critic_buffer_ep", "OnPolicyCriticBufferEP"))


def harl_config(args: H.Args, num_steps: int, num_envs: int, hidden_sizes) -> dict:
    """HARL's happo.yaml model and algorithm settings, with this project's values where they are flags."""
    return dict(
        hidden_sizes=list(hidden_sizes), activation_func="relu", use_feature_normalization=True,
        initialization_method="orthogonal_", gain=0.01, use_naive_recurrent_policy=False, use_recurrent_policy=False,
        recurrent_n=1, data_chunk_length=10, std_x_coef=1, std_y_coef=0.5, lr=args.learning_rate,
        critic_lr=args.critic_lr, opti_eps=1e-5, weight_decay=0, ppo_epoch=args.ppo_epochs,
        critic_epoch=args.critic_epochs, actor_num_mini_batch=args.actor_num_minibatches,
        critic_num_mini_batch=args.critic_num_minibatches, clip_param=args.clip_coef,
        entropy_coef=args.ent_coef, value_loss_coef=1, use_max_grad_norm=True, max_grad_norm=args.max_grad_norm,
        use_clipped_value_loss=args.clip_vloss, use_huber_loss=True, huber_delta=args.huber_delta,
        use_policy_active_masks=True, action_aggregation="prod", gamma=args.gamma, gae_lambda=args.gae_lambda,
        use_gae=True, use_proper_time_limits=True, episode_length=num_steps, n_rollout_threads=num_envs)


def ours_name(harl_name: str) -> str:
    """HARL's parameter names -> ours: MLPBase's feature_norm and mlp.fc.k are our trunk.0 and trunk.(k+1)."""
    for prefix, replacement in (("base.feature_norm.", "trunk.0."), ("act.action_out.fc_mean.", "mean."),
                                ("v_out.", "head.")):
        if harl_name.startswith(prefix):
            return replacement + harl_name[len(prefix):]
    if harl_name == "act.action_out.log_std":
        return "std_logit"
    index, rest = harl_name[len("base.mlp.fc."):].split(".", 1)
    return f"trunk.{int(index) + 1}.{rest}"


def copy_into_ours(harl_module: torch.nn.Module, ours: torch.nn.Module) -> None:
    state = {ours_name(name): tensor for name, tensor in harl_module.state_dict().items()}
    ours.load_state_dict(state)  # strict: every parameter named on both sides


def max_difference(harl_module: torch.nn.Module, ours: torch.nn.Module) -> float:
    mine = ours.state_dict()
    return max((tensor - mine[ours_name(name)]).abs().max().item() for name, tensor in harl_module.state_dict().items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harl-dir", required=True, help="a checkout of github.com/PKU-MARL/HARL")
    parser.add_argument("--value-norm-update", choices=["per-minibatch", "once"], default="per-minibatch",
                        help="per-minibatch: HARL upstream; once: the fix, emulated on HARL's side by one update "
                             "before its critic epochs and none inside them")
    parser.add_argument("--num-agents", type=int, default=2)
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    cli = parser.parse_args()
    harl = import_harl(os.path.abspath(cli.harl_dir))
    T, E, A, obs_dim, act_dim = cli.num_steps, cli.num_envs, cli.num_agents, 2 + 3 * cli.num_agents, 3
    state_dim = 5 + 6 * A
    # HARL's MAPush critic sees the documented 17-dim state (5 + 6A); the input layout does not change the update
    args = H.check_args(H.Args(num_envs=E, num_steps=T, total_timesteps=E * T * 5, critic_input="global-state",
                               value_norm_update=cli.value_norm_update))
    actor_cfg = harl_config(args, T, E, args.hidden_sizes)
    critic_cfg = harl_config(args, T, E, args.critic_hidden_sizes)

    # HARL's networks, and ours with the same weights.
    torch.manual_seed(cli.seed)
    harl_actors = [harl.HAPPO(actor_cfg, Box(obs_dim), Box(act_dim)) for _ in range(A)]
    harl_critic = harl.VCritic(critic_cfg, Box(state_dim))
    harl_norm = harl.ValueNorm(1)
    env = types.SimpleNamespace(num_agents=A, obs_dim=obs_dim, action_dim=act_dim)
    m = H.build_models(args, env, torch.device("cpu"))
    for harl_actor, actor in zip(harl_actors, m.actors):
        copy_into_ours(harl_actor.actor, actor)
    copy_into_ours(harl_critic.critic, m.critic)

    # A batch: observations and states, actions sampled from the policies, values, rewards, episode ends.
    generator = torch.Generator().manual_seed(cli.seed + 1)
    obs = torch.randn(T + 1, E, A, obs_dim, generator=generator)
    states = torch.randn(T + 1, E, state_dim, generator=generator) * 3.0
    rewards = torch.randn(T, E, generator=generator) * 0.5 + 0.1
    dones = (torch.rand(T, E, generator=generator) < 0.05).float()
    earlier_returns = torch.randn(3, E, generator=generator) * 4.0 + 1.0  # a normalizer with some history
    for batch in earlier_returns:
        harl_norm.update(batch.reshape(-1, 1))
        m.value_norm.update(batch.reshape(-1, 1))
    with torch.no_grad():
        actions, logprobs_per_dim = [], []
        for i, harl_actor in enumerate(harl_actors):
            dist = harl_actor.actor.act.action_out(harl_actor.actor.base(obs[:T, :, i]))
            sample = dist.sample()
            actions.append(sample)
            logprobs_per_dim.append(dist.log_probs(sample))
        actions, logprobs_per_dim = torch.stack(actions, 2), torch.stack(logprobs_per_dim, 2)  # [T, E, A, act_dim]
        values = harl_critic.critic(states, torch.zeros(1), torch.ones(1))[0].squeeze(-1)  # [T + 1, E], normalized

    # HARL: its buffers, GAE, then the HA runner's train().
    actor_buffers = [harl.ActorBuffer(actor_cfg, Box(obs_dim), Box(act_dim)) for _ in range(A)]
    for i, buffer in enumerate(actor_buffers):
        buffer.obs[:] = obs[:, :, i].numpy()
        buffer.actions[:] = actions[:, :, i].numpy()
        buffer.action_log_probs[:] = logprobs_per_dim[:, :, i].numpy()
        buffer.masks[1:] = (1.0 - dones).unsqueeze(-1).numpy()
    critic_buffer = harl.CriticBuffer(critic_cfg, Box(state_dim))
    critic_buffer.share_obs[:] = states.numpy()
    critic_buffer.value_preds[:T] = values[:T].unsqueeze(-1).numpy()
    critic_buffer.rewards[:] = rewards.unsqueeze(-1).numpy()
    critic_buffer.masks[1:] = (1.0 - dones).unsqueeze(-1).numpy()
    critic_buffer.compute_returns(values[T].unsqueeze(-1).numpy(), harl_norm)
    harl_advantages = critic_buffer.returns[:-1] - harl_norm.denormalize(critic_buffer.value_preds[:-1])

    torch.manual_seed(cli.seed + 2)
    factor = np.ones((T, E, 1), dtype=np.float32)
    for agent in list(torch.randperm(A).numpy()):  # OnPolicyHARunner.train, without its logging
        buffer, actor = actor_buffers[agent], harl_actors[agent]
        buffer.update_factor(factor)
        flat = (buffer.obs[:-1].reshape(T * E, -1), buffer.rnn_states[0:1].reshape(-1, *buffer.rnn_states.shape[2:]),
                buffer.actions.reshape(T * E, -1), buffer.masks[:-1].reshape(T * E, 1), None,
                buffer.active_masks[:-1].reshape(T * E, 1))
        old_logprob, _, _ = actor.evaluate_actions(*flat)
        actor.train(buffer, harl_advantages.copy(), "EP")
        new_logprob, _, _ = actor.evaluate_actions(*flat)
        factor = factor * torch.prod(torch.exp(new_logprob - old_logprob), dim=-1).reshape(T, E, 1).detach().numpy()
    if cli.value_norm_update == "once":  # the fix: one update on all returns, then the epochs leave it alone
        harl_norm.update(critic_buffer.returns[:-1].reshape(-1, 1))
        frozen = types.SimpleNamespace(update=lambda x: None, normalize=harl_norm.normalize)
        harl_critic.train(critic_buffer, frozen)
    else:
        harl_critic.train(critic_buffer, harl_norm)

    # Ours: GAE, then the HAPPO actor update and the critic update of happo_mapush.train().
    advantages, returns = H.compute_gae(rewards, values[:T], values[T], dones, torch.zeros(T, E), torch.zeros(T, E),
                                        args.gamma, args.gae_lambda, m.value_norm.denormalize)
    torch.manual_seed(cli.seed + 2)
    H.happo_actor_update(m.actors, m.actor_optimizers, obs[:T].flatten(0, 1), actions.flatten(0, 1),
                         logprobs_per_dim.sum(-1).flatten(0, 1), advantages.flatten(), args)
    H.critic_update(m.critic, m.critic_optimizer, m.value_norm, states[:T].flatten(0, 1), values[:T].flatten(),
                    returns.flatten(), args)

    rows = {"GAE advantages": np.abs(harl_advantages.squeeze(-1) - advantages.numpy()).max()}
    rows.update({f"actor {i}": max_difference(harl_actors[i].actor, m.actors[i]) for i in range(A)})
    rows["critic"] = max_difference(harl_critic.critic, m.critic)
    harl_mean, harl_var = harl_norm.running_mean_var()
    our_mean, our_var = m.value_norm.mean_var()
    rows["ValueNorm mean"] = (harl_mean - our_mean).abs().max().item()
    rows["ValueNorm variance"] = (harl_var - our_var).abs().max().item()
    print(f"HARL {cli.harl_dir} against happo_mapush.py: one iteration, {A} agents, {T} x {E} samples, ValueNorm "
          f"{cli.value_norm_update}; the largest absolute difference after it:")
    for name, value in rows.items():
        print(f"  {name:<20} {value:.3g}{'' if value else ' (bit-identical)'}")
    worst = max(rows.values())
    print(f"{'PASS' if worst <= cli.tolerance else 'FAIL'}: largest {worst:.3g}, tolerance {cli.tolerance:g}")
    return 0 if worst <= cli.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
