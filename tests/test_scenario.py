"""The embedded task as a VMAS scenario: `vmas.make_env(PushScenario(), ...)`, driven the way VMAS users and TorchRL's
VmasEnv drive it (a list of per-agent actions, `reset_at(i)` for each done env in ascending order), equals this
project's `VmasPushEnv` bit for bit: observations, per-agent rewards, done flags and their reasons, across successes,
collisions, time-outs and the resets that follow."""
import pytest
import torch

import mapush_task
import mapush_vmas
from mapush_task import TASKS
from mapush_vmas import PushScenario, VmasPushEnv

vmas = pytest.importorskip("vmas")

E, STEPS = 12, 40


def force_episode_ends(scenarios, step: int) -> None:
    """The same edits on every scenario, so that episodes end in each way within a few steps: env 0 starts near its
    target (a success), env 1's first two agents overlap (a collision), envs 2, 3 and 5 are about to time out
    (several resets in one step); later, env 4's target jumps next to the box."""
    for s in scenarios:
        if step == 0:
            s.target_xy = s.target_xy.clone()
            s.target_xy[0] = s.box.state.pos[0] + torch.tensor([0.5, 0.0])
            pos = s.agents[1].state.pos.clone()
            pos[1] = s.agents[0].state.pos[1] + torch.tensor([0.05, 0.0])
            s.agents[1].state.pos = pos
            s.step_count = s.step_count.clone()
            s.step_count[[2, 3, 5]] = mapush_task.EPISODE_STEPS - 3
        if step == 20:
            s.target_xy = s.target_xy.clone()
            s.target_xy[4] = s.box.state.pos[4] + torch.tensor([0.0, -0.7])


def observed(env) -> torch.Tensor:
    """A VMAS env's current observations, stacked as ours: [E, A, obs_dim]."""
    return torch.stack(env.get_from_scenario(True, False, False, False)[0], dim=1)


@pytest.mark.parametrize("task", list(TASKS))
def test_vmas_make_env_equals_the_trainers_env_bitwise(task):
    ours = VmasPushEnv(E, seed=3, task=task)
    theirs = vmas.make_env(PushScenario(), num_envs=E, device="cpu", seed=3, continuous_actions=True,
                           clamp_actions=True, task=task)
    A = ours.num_agents
    assert theirs.n_agents == A and theirs.scenario.box_mu is not None
    obs = ours.reset()
    assert torch.equal(theirs.scenario.box_mu, ours.box_mu)
    assert torch.equal(observed(theirs), obs)
    actions = torch.Generator().manual_seed(7)
    reasons = torch.zeros(3, dtype=torch.long)  # successes, collisions, time-outs seen
    resets_in_one_step = 0
    for step in range(STEPS):
        force_episode_ends([ours, theirs.scenario], step)
        if step == 0:  # the edited states are observed alike
            assert torch.equal(observed(theirs),
                               ours._observe())
        a = 1.3 * (2 * torch.rand(E, A, 3, generator=actions) - 1)  # beyond [-1, 1]: both clip
        obs, reward, done, info = ours.step(a)
        v_obs, v_reward, v_done, v_info = theirs.step([a[:, i] for i in range(A)])
        assert torch.equal(torch.stack(v_obs, dim=1), info["final_obs"])
        assert torch.equal(torch.stack(v_reward, dim=1), reward)
        assert torch.equal(v_done, done)
        for key in ("success", "exception", "time_out"):
            assert all(torch.equal(v_info[i][key], info[key]) for i in range(A)), key
        reasons += torch.stack([info["success"].sum(), info["exception"].sum(), info["time_out"].sum()])
        ended = done.nonzero()[:, 0].tolist()
        resets_in_one_step = max(resets_in_one_step, len(ended))
        for i in ended:  # as a VMAS user or TorchRL's VmasEnv resets: one env at a time, in ascending order
            theirs.reset_at(i)
        assert not theirs.get_from_scenario(False, False, False, True)[0].any()  # a reset env is not done
        assert torch.equal(observed(theirs), obs)
        assert torch.equal(theirs.scenario.step_count, ours.step_count)
    assert (reasons > 0).all(), f"successes, collisions, time-outs: {reasons.tolist()}"
    assert resets_in_one_step >= 3


def test_one_batched_reset_draws_what_single_resets_in_env_order_draw():
    batched, single = VmasPushEnv(6, seed=5), VmasPushEnv(6, seed=5)
    batched.reset(), single.reset()
    mask = torch.tensor([False, True, False, True, True, False])
    batched._reset_envs(mask)
    for i in (1, 3, 4):
        single.reset_world_at(i)
    for a, b in zip(batched.scene(), single.scene()):
        assert torch.equal(a, b)
    assert torch.equal(batched.rng.get_state(), single.rng.get_state())
    untouched = VmasPushEnv(6, seed=5)
    untouched.reset()
    for a, b in zip(batched.scene(), untouched.scene()):  # the envs outside the mask keep their state
        assert torch.equal(a[~mask], b[~mask])


def test_friction_is_drawn_at_the_first_reset_only():
    env = vmas.make_env(PushScenario(), num_envs=4, seed=0, task="cylinder", clamp_actions=True)
    mu = env.scenario.box_mu.clone()
    env.reset_at(2)
    env.reset()
    assert torch.equal(env.scenario.box_mu, mu)
    low, high = TASKS["cylinder"].friction_range
    assert ((mu >= (low + mapush_vmas.GROUND_FRICTION) / 2) & (mu <= (high + mapush_vmas.GROUND_FRICTION) / 2)).all()
    again = vmas.make_env(PushScenario(), num_envs=4, seed=0, task="cylinder", clamp_actions=True)
    assert torch.equal(again.scenario.box_mu, mu)  # VMAS's seed decides it


def test_an_env_state_from_before_the_reset_rows_is_refused():
    env = VmasPushEnv(2, seed=0)
    env.reset()
    state = env.state_dict()
    del state["version"]
    with pytest.raises(ValueError, match="layout version None, this embedded env's is 2"):
        env.load_state_dict(state)
