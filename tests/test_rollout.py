"""The trainer's rollout against a scripted env whose every number is known: the team reward it stores, which ends
it bootstraps (time-outs only) and from which state (the one before the auto-reset), the episode sums, and the
logged explained variance."""
import math

import pytest
import torch

import happo_mapush as H
from global_state import build_global_state
from mapush_task import Scene

E, A, T, HOLD = 3, 2, 4, 5  # envs, agents, decisions, env steps per decision
AGENT_WEIGHTS = torch.tensor([1.0, 10.0])  # agent a's reward is (step + 1) * (env + 1) * weight[a]
# (decision, env) -> the flags it ends with; every other step runs on.
ENDS = {(1, 0): dict(time_out=True),  # a plain time-out: the only one to bootstrap
        (2, 1): dict(time_out=True, success=True),  # a success on the time-out step: terminal
        (3, 2): dict(time_out=True, exception=True),  # an exception on the time-out step: terminal
        (3, 0): dict(success=True)}


def scene_of(tags: torch.Tensor) -> Scene:
    """A distinct, valid scene per tag [E] (positions, yaws in [0, 2 pi), velocities all depend on it)."""
    t = tags.unsqueeze(-1)
    agents = torch.arange(1, A + 1, dtype=torch.float32)
    return Scene(box_xy=torch.cat([0.1 * t, -0.2 * t], -1), box_yaw=torch.remainder(0.3 * tags, 2 * math.pi),
                 target_xy=torch.cat([1.0 + 0.05 * t, 2.0 - 0.01 * t], -1),
                 agent_xy=torch.stack([0.07 * t * agents, -0.03 * t * agents], -1),
                 agent_yaw=torch.remainder(0.2 * t * agents, 2 * math.pi),
                 agent_lin_vel=torch.stack([0.01 * t * agents, 0.02 * t + agents], -1), agent_ang_vel=0.05 * t * agents,
                 box_lin_vel=torch.cat([0.03 * t, -0.04 * t], -1), box_ang_vel=0.06 * tags)


class ScriptedEnv:
    """The env contract with scripted rewards and ends; each env's state is a tag that every step raises by one and a
    reset moves by 1000, so the state before an auto-reset (`final_scene`) and after it (`scene()`) differ."""

    num_envs, num_agents, obs_dim, action_dim, episode_steps = E, A, 2 + 3 * A, 3, 1000

    def __init__(self):
        self.tags, self.decision = torch.arange(E, dtype=torch.float32), 0

    def observe(self, tags):
        return tags.view(E, 1, 1) * 0.01 + torch.arange(A * self.obs_dim, dtype=torch.float32).view(1, A, -1) * 0.1

    def scene(self) -> Scene:
        return scene_of(self.tags)

    def step(self, actions):
        k, self.decision = self.decision, self.decision + 1
        flags = {name: torch.zeros(E, dtype=torch.bool) for name in ("success", "time_out", "exception")}
        for (step, env), ended in ENDS.items():
            for name, value in ended.items():
                flags[name][env] = value if step == k else flags[name][env]
        done = flags["success"] | flags["time_out"] | flags["exception"]
        final_tags = self.tags + 1
        reward = (k + 1) * torch.arange(1, E + 1, dtype=torch.float32).unsqueeze(1) * AGENT_WEIGHTS  # [E, A]
        self.tags = torch.where(done, final_tags + 1000, final_tags)
        info = {**flags, "final_scene": scene_of(final_tags), "final_obs": self.observe(final_tags),
                "reward_terms": {"push": reward.sum(1)}, "nonfinite_obs": torch.zeros(E, dtype=torch.long),
                "env_steps": torch.full((E,), HOLD, dtype=torch.long)}
        return self.observe(self.tags), reward, done, info


LAYOUT = H.Args().critic_input  # the trainer's default global-state layout


def args_for(**overrides):
    return H.check_args(H.Args(num_envs=E, num_steps=T, total_timesteps=E * T * HOLD, action_repeat=HOLD,
                               actor_num_minibatches=1, critic_num_minibatches=1, hidden_sizes=(8,),
                               critic_hidden_sizes=(8,), **overrides))


def run_rollout(**overrides):
    torch.manual_seed(0)
    args, env = args_for(**overrides), ScriptedEnv()
    m = H.build_models(args, env, torch.device("cpu"))
    buf = H.Storage.zeros(T, env, m.critic_input_dim, "cpu")
    carry = H.Episodes(env.observe(env.tags), torch.zeros(E), torch.zeros(E))
    stats = H.rollout(args, env, m, buf, carry)
    return m, buf, carry, stats


def team_rewards() -> torch.Tensor:
    """[T, E] by hand: the sum over agents of (k + 1)(e + 1) w_a = 11 (k + 1)(e + 1)."""
    return 11.0 * torch.arange(1, T + 1).view(T, 1).float() * torch.arange(1, E + 1).view(1, E).float()


def test_the_stored_reward_is_the_team_sum_not_agent_0s_column():
    _, buf, _, _ = run_rollout()
    assert torch.equal(buf.rewards, team_rewards())
    _, buf_mean, _, _ = run_rollout(team_reward="mean")
    assert torch.equal(buf_mean.rewards, team_rewards() / A)


def test_only_a_plain_time_out_is_truncated():
    _, buf, _, _ = run_rollout()
    expected_dones, expected_truncated = torch.zeros(T, E), torch.zeros(T, E)
    for step, env in ENDS:
        expected_dones[step, env] = 1.0
    expected_truncated[1, 0] = 1.0  # not (2, 1): success; not (3, 2): exception, on their time-out steps
    assert torch.equal(buf.dones, expected_dones) and torch.equal(buf.truncated, expected_truncated)


def test_a_time_out_bootstraps_from_the_state_before_the_reset():
    m, buf, _, _ = run_rollout()
    with torch.no_grad():
        before = m.critic(build_global_state(scene_of(torch.tensor([2.0, 3.0, 4.0])), LAYOUT)[0])  # env 0, 2 steps
        after = m.critic(build_global_state(scene_of(torch.tensor([1002.0, 3.0, 4.0])), LAYOUT)[0])  # new episode
    assert buf.final_values[1, 0].item() == before[0].item() and abs(before[0] - after[0]) > 1e-3
    mask = torch.ones(T, E, dtype=torch.bool)
    mask[1, 0] = False
    assert bool((buf.final_values[mask] == 0).all())


def test_the_critic_sees_the_post_reset_state_of_the_next_decision():
    m, buf, _, _ = run_rollout()
    tags = torch.arange(E, dtype=torch.float32)
    for k in range(T):
        assert torch.equal(buf.critic_inputs[k], build_global_state(scene_of(tags), LAYOUT)[0])
        done = torch.tensor([(k, e) in ENDS for e in range(E)])
        tags = torch.where(done, tags + 1001, tags + 1)
    with torch.no_grad():  # the bootstrap value after the last decision is the critic's on the state after it
        assert torch.equal(buf.next_value, m.critic(build_global_state(scene_of(tags), LAYOUT)[0]))


def test_episode_sums_and_counts():
    _, _, carry, stats = run_rollout()
    team = team_rewards()
    # env 0: episode over decisions 0-1, then 2-3; env 1: 0-2; env 2: 0-3. Each decision is 5 env steps.
    returns = team[0:2, 0].sum() + team[2:4, 0].sum() + team[0:3, 1].sum() + team[0:4, 2].sum()
    assert stats["episodes/count"].item() == 4 and stats["episodes/return"].item() == returns.item()
    assert stats["episodes/length"].item() == HOLD * (2 + 2 + 3 + 4)
    assert stats["episodes/success"].item() == 2 and stats["episodes/exception"].item() == 1
    assert stats["episodes/time_out"].item() == 3  # time-out flags, whatever else ended the episode
    assert stats["rewards/push"].item() == team.sum().item()
    assert torch.equal(carry.ep_return, torch.tensor([0.0, team[3, 1].item(), 0.0]))  # env 1's new episode
    assert torch.equal(carry.ep_length, torch.tensor([0.0, HOLD, 0.0]))


def test_explained_variance_is_one_minus_var_advantages_over_var_returns():
    args, env = args_for(), ScriptedEnv()
    m = H.build_models(args, env, torch.device("cpu"))
    buf = H.Storage.zeros(T, env, m.critic_input_dim, "cpu")
    m.value_norm.update(torch.tensor([[5.0], [-7.0]]))  # a normalizer far from the values GAE used
    advantages, returns = torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([3.0, 1.0, 5.0, 3.0])
    scalars = H.update_stats(m, buf, advantages, returns, {}, torch.tensor(0.0), torch.tensor(0.0))
    # Var(advantages) = 1.5 - 0.25 = 1.25, Var(returns) = 11 - 9 = 2 (population): 1 - 1.25 / 2 = 0.375;
    # the values GAE used are returns - advantages = 2, 2, 3, 3.
    assert scalars["losses/explained_variance"] == pytest.approx(0.375, abs=1e-6)
    assert scalars["diagnostics/values_mean"] == pytest.approx(2.5, abs=1e-6)


def test_every_revert_of_benchmarks_revert_fixes_still_applies():
    # The script puts each documented bug back and runs the README's tests (about 2 minutes, not part of the
    # suite); here only that each fix's code is still where the script looks for it, exactly once.
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from revert_fixes import REVERTS, ROOT

    for name, (path, fixed, buggy, tests, _) in REVERTS.items():
        with open(os.path.join(ROOT, path)) as f:
            assert f.read().count(fixed) == 1, name
        assert all(os.path.isfile(os.path.join(ROOT, test.split("::")[0])) for test in tests), name
