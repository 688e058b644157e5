"""The trainer's math: GAE with ValueNorm and time-outs, the HAPPO factor, ValueNorm update timing, critic input."""
import copy

import pytest
import torch

import happo_mapush as H
import mapush_env as M
from mapush_env import make_env
from global_state import build_global_state, global_state_dim
from value_norm import ValueNorm


def make_args(**overrides):
    args = H.Args(num_envs=4, num_steps=8, total_timesteps=32, actor_num_minibatches=1, critic_num_minibatches=1,
                  action_repeat=1)
    for key, value in overrides.items():
        setattr(args, key, value)
    return H.check_args(args)


def test_gae_with_value_norm_termination_and_time_out():
    # ValueNorm with mean 1 and std 2: D(v) = 2 v + 1.
    vn = ValueNorm()
    vn.update(torch.tensor([[-1.0], [3.0]]))
    rewards = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    values = torch.tensor([[0.5], [1.0], [-0.5], [0.25]])  # normalized: D = 2, 3, 0, 1.5
    next_value = torch.tensor([1.5])  # D = 4 (the state after the last step; unused: that step ended)
    dones = torch.tensor([[0.0], [1.0], [0.0], [1.0]])  # step 1 terminates, step 3 times out
    truncated = torch.tensor([[0.0], [0.0], [0.0], [1.0]])
    final_values = torch.tensor([[0.0], [0.0], [0.0], [0.75]])  # value of the pre-reset state at step 3: D = 2.5
    adv, ret = H.compute_gae(rewards, values, next_value, dones, truncated, final_values, 0.9, 0.8, vn.denormalize)
    # by hand, gamma * lambda = 0.72:
    # t=3: 4 + 0.9 * 2.5 - 1.5 = 4.75                (bootstrap from the final state, no carry)
    # t=2: 3 + 0.9 * 1.5 - 0 = 4.35; + 0.72 * 4.75 = 7.77
    # t=1: 2 - 3 = -1                               (terminal)
    # t=0: 1 + 0.9 * 3 - 2 = 1.7; + 0.72 * -1 = 0.98
    assert torch.allclose(adv.flatten(), torch.tensor([0.98, -1.0, 7.77, 4.75]), atol=1e-4)
    assert torch.allclose(ret.flatten(), torch.tensor([2.98, 2.0, 7.77, 6.25]), atol=1e-4)
    # a time-out without bootstrapping (HARL on MAPush) would treat step 3 as terminal: 4 - 1.5 = 2.5
    adv_terminal, _ = H.compute_gae(rewards, values, next_value, dones, torch.zeros_like(truncated), final_values,
                                    0.9, 0.8, vn.denormalize)
    assert adv_terminal[3].item() == pytest.approx(2.5, abs=1e-4)


def test_gae_bootstraps_from_next_value_when_running():
    vn = ValueNorm()  # before any update D(v) = 0.1 v
    adv, ret = H.compute_gae(torch.tensor([[1.0]]), torch.tensor([[10.0]]), torch.tensor([20.0]),
                             torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.9, vn.denormalize)
    assert adv.item() == pytest.approx(1.0 + 0.5 * 2.0 - 1.0) and ret.item() == pytest.approx(2.0)


def actors_and_batch(num_agents=3, batch=96, seed=0):
    torch.manual_seed(seed)
    actors = [H.Actor(5, 2, (16,)) for _ in range(num_agents)]
    obs = torch.randn(batch, num_agents, 5)
    with torch.no_grad():
        dists = [a(obs[:, i]) for i, a in enumerate(actors)]
        actions = torch.stack([d.sample() for d in dists], dim=1)
        logprobs = torch.stack([d.log_prob(actions[:, i]).sum(-1) for i, d in enumerate(dists)], dim=1)
    advantages = torch.randn(batch)
    return actors, obs, actions, logprobs, advantages


def update_order(stats) -> list:
    """The agent order `happo_actor_update` drew, read back from each agent's logged update position."""
    return sorted(stats, key=lambda agent: stats[agent]["update_position"])


def test_factor_is_product_of_previous_agents_ratios_after_their_updates():
    actors, obs, actions, logprobs, advantages = actors_and_batch()
    optimizers = [torch.optim.Adam(a.parameters(), lr=3e-2, eps=1e-5) for a in actors]
    args = make_args(ppo_epochs=3, actor_num_minibatches=2)
    torch.manual_seed(3)
    expected_order = torch.randperm(3).tolist()  # the update draws its order first, from the global generator
    torch.manual_seed(3)
    stats, factors = H.happo_actor_update(actors, optimizers, obs, actions, logprobs, advantages, args)
    first, second, third = order = update_order(stats)
    assert order == expected_order and [stats[i]["update_position"] for i in order] == [0.0, 1.0, 2.0]
    with torch.no_grad():  # each actor's joint ratio with its final (post-update) parameters
        ratio = {i: (actors[i](obs[:, i]).log_prob(actions[:, i]).sum(-1) - logprobs[:, i]).exp()
                 for i in range(3)}
    assert (ratio[first] - 1).abs().max() > 1e-2 and (ratio[second] - 1).abs().max() > 1e-2  # the updates acted
    assert torch.equal(factors[first], torch.ones(96))  # the first agent in the order
    assert torch.allclose(factors[second], ratio[first], rtol=1e-5)
    assert torch.allclose(factors[third], ratio[first] * ratio[second], rtol=1e-5)
    assert not factors[third].requires_grad


def test_the_order_is_fresh_every_call():
    actors, obs, actions, logprobs, advantages = actors_and_batch(num_agents=4)
    optimizers = [torch.optim.SGD(a.parameters(), lr=0.0) for a in actors]
    orders = {tuple(update_order(H.happo_actor_update(actors, optimizers, obs, actions, logprobs, advantages,
                                                       make_args(ppo_epochs=1))[0])) for _ in range(12)}
    assert len(orders) > 1


def test_factor_changes_the_update():
    # The second agent trains against a factor that is not 1, so its result differs from a simultaneous update.
    results = []
    for sequential in (True, False):
        actors, obs, actions, logprobs, advantages = actors_and_batch()
        optimizers = [torch.optim.Adam(a.parameters(), lr=3e-2, eps=1e-5) for a in actors]
        torch.manual_seed(1)
        stats, factors = H.happo_actor_update(actors, optimizers, obs, actions, logprobs, advantages,
                                              make_args(sequential=sequential))
        second = update_order(stats)[1]
        results.append((factors, second, copy.deepcopy(actors[second].state_dict())))
    (seq_factors, second, seq_params), (sim_factors, sim_second, sim_params) = results
    assert second == sim_second  # the same seed draws the same order
    assert all(torch.equal(f, torch.ones(96)) for f in sim_factors.values())
    assert not torch.allclose(seq_factors[second], torch.ones(96))
    assert not torch.allclose(seq_params["mean.weight"], sim_params["mean.weight"])


def test_actor_loss_matches_hand_computed_clipped_objective():
    actors, obs, actions, logprobs, advantages = actors_and_batch(num_agents=1, batch=4)
    actor = actors[0]
    # Make the stored log-probs differ so that both clip branches occur.
    old = logprobs[:, 0] + torch.tensor([0.5, -0.5, 0.05, 0.0])
    adv = torch.tensor([1.0, 1.0, -2.0, 0.5])
    with torch.no_grad():
        new = actor(obs[:, 0]).log_prob(actions[:, 0]).sum(-1)
        r = (new - old).exp()
    norm_adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-5)
    expected = -torch.min(r * norm_adv, r.clamp(0.8, 1.2) * norm_adv).mean()
    opt = torch.optim.SGD(actor.parameters(), lr=0.0)  # the loss is logged before the (no-op) step
    stats, _ = H.happo_actor_update([actor], [opt], obs, actions, old.unsqueeze(1), adv,
                                    make_args(ppo_epochs=1, ent_coef=0.0))
    assert stats[0]["policy_loss"] == pytest.approx(expected.item(), abs=1e-6)
    assert stats[0]["ratio"] == pytest.approx(r.mean().item(), abs=1e-6)
    assert stats[0]["clip_fraction"] == pytest.approx(((r - 1).abs() > 0.2).float().mean().item())


def critic_batch(batch=64):
    torch.manual_seed(0)
    critic = H.Critic(17, (16,))
    inputs = torch.randn(batch, 17)
    with torch.no_grad():
        old_values = critic(inputs)
    returns = torch.randn(batch) * 3 + 2
    return critic, inputs, old_values, returns


@pytest.mark.parametrize("mode, epochs, minibatches, expected", [("once", 5, 1, 1), ("once", 3, 4, 1),
                                                                  ("per-minibatch", 3, 4, 12),
                                                                  ("per-minibatch", 5, 1, 5)])
def test_value_norm_update_count(mode, epochs, minibatches, expected):
    critic, inputs, old_values, returns = critic_batch()
    vn = ValueNorm()
    args = make_args(value_norm_update=mode, critic_epochs=epochs, critic_num_minibatches=minibatches)
    H.critic_update(critic, torch.optim.Adam(critic.parameters(), lr=1e-3), vn, inputs, old_values, returns, args)
    assert int(vn.num_updates) == expected


def test_value_norm_once_is_updated_on_all_returns_before_the_critic_epochs():
    critic, inputs, old_values, returns = critic_batch()
    vn = ValueNorm()
    H.critic_update(critic, torch.optim.Adam(critic.parameters(), lr=1e-3), vn, inputs, old_values, returns,
                    make_args())
    assert vn.mean_var()[0].item() == pytest.approx(returns.mean().item(), rel=1e-4)


def test_clipped_huber_value_loss_by_hand():
    critic, inputs, old_values, returns = critic_batch(batch=4)
    vn = ValueNorm()
    with torch.no_grad():
        v = critic(inputs)
    opt = torch.optim.SGD(critic.parameters(), lr=0.0)
    old = v + torch.tensor([0.5, -0.5, 0.1, 0.0])  # pretend the rollout predicted these
    loss, _ = H.critic_update(critic, opt, vn, inputs, old, returns, make_args(critic_epochs=1, huber_delta=1.0))
    mean, var = vn.mean_var()
    y = (returns - mean) / var.sqrt()

    def huber(e):
        return torch.where(e.abs() <= 1.0, 0.5 * e * e, e.abs() - 0.5)

    v_clip = old + (v - old).clamp(-0.2, 0.2)
    expected = torch.max(huber(y - v), huber(y - v_clip)).mean()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    loss_unclipped, _ = H.critic_update(critic, opt, ValueNorm(), inputs, old, returns,
                                        make_args(critic_epochs=1, huber_delta=1.0, clip_vloss=False))
    assert loss_unclipped == pytest.approx(huber(y - v).mean().item(), rel=1e-5)


@pytest.mark.parametrize("critic_input, width", [("global-state", 17), ("global-state-full", 23), ("agent0-obs", 8)])
def test_critic_input_width(critic_input, width):
    args = make_args(critic_input=critic_input)
    env = make_env("vmas", num_envs=4, seed=0)
    obs = env.reset()
    models = H.build_models(args, env, torch.device("cpu"))
    assert models.critic_input_dim == width and models.critic.trunk[0].normalized_shape == (width,)
    x, nonfinite = H.build_critic_input(args, obs, env.scene)
    assert x.shape == (4, width) and nonfinite.item() == 0
    if critic_input == "agent0-obs":
        assert torch.equal(x, obs[:, 0])
    else:  # the global state of the env's current scene, which agent 0's observation is not part of
        assert torch.equal(x, build_global_state(env.scene(), critic_input)[0])


def test_networks_follow_harl_initialisation():
    actor = H.Actor(8, 3, (128, 128))
    dist = actor(torch.randn(5, 8))
    assert torch.allclose(dist.stddev, torch.full((5, 3), 0.5 * torch.sigmoid(torch.tensor(1.0)).item()))
    assert dist.entropy().sum(-1).mean().item() == pytest.approx(1.2376, abs=1e-4)
    assert dist.mean.abs().max() < 0.1  # mean head gain 0.01
    layers = [m for m in actor.trunk]
    assert isinstance(layers[0], torch.nn.LayerNorm)  # input feature normalization
    assert [type(m).__name__ for m in layers[1:4]] == ["Linear", "ReLU", "LayerNorm"]
    assert torch.count_nonzero(layers[1].bias) == 0


@pytest.mark.parametrize("overrides, message", [
    (dict(total_timesteps=31), "below one iteration"),
    (dict(action_repeat=5), "below one iteration"),
    (dict(action_repeat=0), "action-repeat"),
    (dict(actor_num_minibatches=3), "does not divide"),
    (dict(critic_num_minibatches=7), "does not divide"),
    (dict(critic_input="agent1-obs"), "critic-input"),
    (dict(team_reward="max"), "team-reward"),
    (dict(value_norm_update="never"), "value-norm-update"),
    (dict(env_backend="mujoco"), "env-backend"),
    (dict(num_envs=0), "num-envs"),
])
def test_inconsistent_flags_are_rejected(overrides, message):
    args = H.Args(num_envs=4, num_steps=8, total_timesteps=32, actor_num_minibatches=1, critic_num_minibatches=1,
                  action_repeat=1)
    for key, value in overrides.items():
        setattr(args, key, value)
    with pytest.raises(ValueError, match=message):
        H.check_args(args)


def test_action_repeat_counts_env_steps_resumes_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = H.Args(num_envs=8, num_steps=16, total_timesteps=8 * 16 * 2 * 2 + 100, hidden_sizes=(16,),
                  critic_hidden_sizes=(16,), actor_num_minibatches=2, critic_num_minibatches=2, action_repeat=2,
                  random_episode_start=False, save_interval=1, cuda=False)
    path = H.train(H.check_args(args))
    state = H.load_checkpoint(path, "cpu")
    assert state["iteration"] == 2 and state["global_step"] == 8 * 16 * 2 * 2  # 128 samples of 2 env steps each
    # an episode's length counts env steps, not decisions: envs whose first episode still runs are at 64
    steps, length = state["ranks"][0]["env"]["step_count"], state["ranks"][0]["episode"]["length"]
    running = steps == 64
    assert running.sum() >= 4 and bool((length[running] == 64).all())

    mismatch = copy.copy(args)
    mismatch.action_repeat, mismatch.resume = 3, path
    with pytest.raises(H.UsageError, match="--action-repeat 3 \\(saved 2\\)"):
        H.train(H.check_args(mismatch))
    eval_env = H.policy_env(state["args"], 4, "cpu", 0)
    assert eval_env.k == 2
    actors = H.trained_actors(state, eval_env)
    success, completion = M.evaluate(lambda obs: H.mean_actions(actors, obs), eval_env)
    assert 0.0 <= success <= 1.0 and 0.0 < completion <= 20.0


# -- --share-actor: one actor for all agents (HAPPO with shared parameters, and MAPPO) -------------------------------


def test_shared_actor_is_one_network_and_one_optimizer_for_every_agent():
    env = make_env("vmas", num_envs=4, seed=0, task="cylinder")
    models = H.build_models(make_args(share_actor=True), env, torch.device("cpu"))
    assert len(models.actors) == 1 and len(models.actor_optimizers) == 1
    assert models.actor_optimizers[0].param_groups[0]["params"] == list(models.actors[0].parameters())
    obs = env.reset()
    obs[:, 1] = obs[:, 0]  # two agents that see the same act the same, through the same parameters
    actions = H.mean_actions(models.actors, obs)
    assert actions.shape == (4, 3, 3) and torch.equal(actions[:, 0], actions[:, 1])
    assert not torch.equal(actions[:, 0], actions[:, 2])


def test_mappo_takes_the_gradient_of_the_mean_surrogate_over_all_agents_samples():
    actors, obs, actions, logprobs, advantages = actors_and_batch(num_agents=3, batch=8)
    actor = actors[0]
    logprobs = logprobs + torch.linspace(-0.4, 0.4, 24).view(8, 3)  # ratios on both sides of the clip range
    reference = copy.deepcopy(actor)
    # By hand: every agent's samples through the one actor, the surrogate's mean over all 8 x 3 of them, the entropy.
    norm_adv = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-5)
    policy = reference(obs.flatten(0, 1))  # sample-major: (b, agent)
    ratio = (policy.log_prob(actions.flatten(0, 1)).sum(-1) - logprobs.flatten()).exp()
    adv = norm_adv.repeat_interleave(3)
    assert ((ratio - 1).abs() > 0.2).any() and ((ratio - 1).abs() < 0.2).any()
    loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean() - 0.02 * policy.entropy().sum(-1).mean()
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    optimizer = torch.optim.SGD(actor.parameters(), lr=1.0)  # one step of lr 1: the parameters move by -gradient
    before = [p.detach().clone() for p in actor.parameters()]
    stats, factors = H.happo_actor_update([actor], [optimizer], obs, actions, logprobs, advantages,
                                          make_args(share_actor=True, sequential=False, ppo_epochs=1,
                                                    ent_coef=0.02, max_grad_norm=1e9))
    for p, p0, g in zip(actor.parameters(), before, grads):
        torch.testing.assert_close(p0 - p.detach(), g, rtol=1e-5, atol=1e-7)
    assert all(s["update_position"] == 0.0 for s in stats.values()) and len(stats) == 3  # one turn, every agent
    assert all(torch.equal(f, torch.ones(8)) for f in factors.values())


def test_shared_happo_factor_is_the_first_agents_joint_ratio_under_the_shared_actor():
    actors, obs, actions, logprobs, advantages = actors_and_batch(num_agents=3, batch=64)
    actor = actors[0]
    with torch.no_grad():  # the rollout's log-probs under the one shared actor
        logprobs = torch.stack([actor(obs[:, i]).log_prob(actions[:, i]).sum(-1) for i in range(3)], dim=1)
    torch.manual_seed(5)
    stats, factors = H.happo_actor_update([actor], [torch.optim.Adam(actor.parameters(), lr=3e-2, eps=1e-5)], obs,
                                          actions, logprobs, advantages, make_args(share_actor=True, ppo_epochs=2))
    first, second, _ = update_order(stats)
    assert torch.equal(factors[first], torch.ones(64))
    # Replay the first turn alone: the same seed, the same draws, stopped after the first agent.
    replay, _, _, _, _ = actors_and_batch(num_agents=3, batch=64)
    torch.manual_seed(5)
    H.happo_actor_update([replay[0]], [torch.optim.Adam(replay[0].parameters(), lr=3e-2, eps=1e-5)],
                         obs[:, [first]], actions[:, [first]], logprobs[:, [first]], advantages,
                         make_args(share_actor=True, ppo_epochs=2))
    with torch.no_grad():
        ratio = (replay[0](obs[:, first]).log_prob(actions[:, first]).sum(-1) - logprobs[:, first]).exp()
    assert (ratio - 1).abs().max() > 1e-2
    torch.testing.assert_close(factors[second], ratio, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flag, value", [("actor_input", "obs-cos-sin"), ("critic_input", "global-state-vel"),
                                         ("std_max", 1.0)])
def test_a_checkpoint_of_a_removed_experiment_is_refused_in_one_line(tmp_path, monkeypatch, flag, value):
    # the removed flags' checkpoints cannot be rebuilt by this code: refused, pointing to where the code is
    monkeypatch.chdir(tmp_path)
    args = H.check_args(H.Args(num_envs=8, num_steps=10, total_timesteps=400, hidden_sizes=(16,),
                               critic_hidden_sizes=(16,), cuda=False))
    path = H.train(args)
    state = torch.load(path, weights_only=True)
    state["args"][flag] = value
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(H.UsageError, match=f"uses --{flag.replace('_', '-')} {value}, an experiment this code no "
                                           "longer has; docs/results.md .Removed experiments. names the commit"):
        H.load_checkpoint(str(tmp_path / "old.pt"), "cpu")
    state["args"][flag] = {"actor_input": "obs", "critic_input": "global-state-full", "std_max": 0.5}[flag]
    torch.save(state, tmp_path / "fine.pt")
    assert H.load_checkpoint(str(tmp_path / "fine.pt"), "cpu")["iteration"] == 1  # the value the code still has


def test_shared_happo_later_factors_start_from_the_shared_actor_at_the_turns_start():
    # With one shared actor, turn k's ratio must start from the actor as turn k found it (moved by the turns before),
    # not from the rollout's log-probs (HARL's runner recomputes it before each turn).
    actors, obs, actions, logprobs, advantages = actors_and_batch(num_agents=3, batch=64)
    actor, full_batch = actors[0], []
    real_forward = actor.forward

    def recording_forward(x):  # full-batch passes: each turn's start and end (mini-batches are half the batch)
        policy = real_forward(x)
        if x.shape[0] == 64:
            full_batch.append(policy)
        return policy

    actor.forward = recording_forward
    with torch.no_grad():
        logprobs = torch.stack([real_forward(obs[:, i]).log_prob(actions[:, i]).sum(-1) for i in range(3)], dim=1)
    torch.manual_seed(5)
    stats, factors = H.happo_actor_update([actor], [torch.optim.Adam(actor.parameters(), lr=3e-2, eps=1e-5)], obs,
                                          actions, logprobs, advantages,
                                          make_args(share_actor=True, ppo_epochs=2, actor_num_minibatches=2))
    first, second, third = update_order(stats)
    assert len(full_batch) == 6  # start and end of each of the three turns
    start2 = full_batch[2].log_prob(actions[:, second]).sum(-1).detach()
    end2 = full_batch[3].log_prob(actions[:, second]).sum(-1).detach()
    assert (start2 - logprobs[:, second]).abs().max() > 1e-3  # the first turn moved the shared actor
    torch.testing.assert_close(factors[third], factors[second] * (end2 - start2).exp(), rtol=1e-5, atol=1e-6)


def test_the_default_critic_sees_the_objects_velocity():
    # the default global state carries the object's velocity and yaw rate (global-state-full); setting the default
    # back to the 17-dim state fails here
    args, env = make_args(), make_env("vmas", num_envs=4, seed=0)
    obs = env.reset()
    models = H.build_models(args, env, torch.device("cpu"))
    assert models.critic_input_dim == global_state_dim(2, "global-state-full") == 23
    scene = env.scene()
    moving = scene._replace(box_lin_vel=scene.box_lin_vel + 0.5, box_ang_vel=scene.box_ang_vel + 1.0)
    still = H.build_critic_input(args, obs, lambda: scene)[0]
    pushed = H.build_critic_input(args, obs, lambda: moving)[0]
    # box velocity (entries 4, 5) scaled by 2.0, yaw rate (6) by 0.25
    assert torch.allclose(pushed[:, 4:7] - still[:, 4:7], torch.tensor([[1.0, 1.0, 0.25]]).expand(4, 3), atol=1e-6)
    assert torch.equal(pushed[:, :4], still[:, :4]) and torch.equal(pushed[:, 7:], still[:, 7:])
