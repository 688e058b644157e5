"""The embedded backend: contract, rewards, termination, frames, physics, solvability, bad input."""
import math

import pytest
import torch

import mapush_env as M
import mapush_task as T
import mapush_vmas as V
from mapush_env import make_env
from mapush_task import TASKS, Scene, observations, task_rewards

from mqe_reference import mqe_normals
from scripted_pusher import scripted_actions


def place(env, box_xy=(12.0, 0.0), box_yaw=0.0, target_xy=(15.0, 0.0), agent_xy=((10.0, 3.0), (10.0, -3.0)),
          agent_yaw=(0.0, 0.0)):
    """Put every env of `env` into one hand-built scene at rest (no velocities, no controller memory)."""
    E = env.num_envs
    zeros = torch.zeros(E, 2)
    env.box.state.pos = torch.tensor(box_xy).repeat(E, 1)
    env.box.state.rot = torch.full((E, 1), float(box_yaw))
    env.box.state.vel, env.box.state.ang_vel = zeros.clone(), zeros[:, :1].clone()
    for i, agent in enumerate(env.agents):
        agent.state.pos = torch.tensor(agent_xy[i]).repeat(E, 1)
        agent.state.rot = torch.full((E, 1), float(agent_yaw[i]))
        agent.state.vel, agent.state.ang_vel = zeros.clone(), zeros[:, :1].clone()
    env.target_xy = torch.tensor(target_xy).repeat(E, 1)
    env.v_ref = torch.zeros_like(env.v_ref)
    env.prev_dist = torch.linalg.vector_norm(env.box.state.pos - env.target_xy, dim=-1)
    env.step_count = torch.zeros_like(env.step_count)


def zero_actions(env):
    return torch.zeros(env.num_envs, env.num_agents, 3)


# -- contract --------------------------------------------------------------------------------------------------


def test_shapes_dtypes_device_and_info():
    env = make_env("vmas", num_envs=5, device="cpu", seed=0)
    assert (env.num_envs, env.num_agents, env.obs_dim, env.action_dim, env.episode_steps) == (5, 2, 8, 3, 1000)
    obs = env.reset()
    assert obs.shape == (5, 2, 8) and obs.dtype == torch.float32 and obs.device.type == "cpu"
    obs, reward, done, info = env.step(torch.randn(5, 2, 3))
    assert obs.shape == (5, 2, 8) and obs.dtype == torch.float32
    assert reward.shape == (5, 2) and reward.dtype == torch.float32
    assert done.shape == (5,) and done.dtype == torch.bool
    for key in ("success", "time_out", "exception"):
        assert info[key].shape == (5,) and info[key].dtype == torch.bool
    assert set(info["reward_terms"]) == set(T.REWARD_TERMS)
    assert all(v.shape == (5,) for v in info["reward_terms"].values())
    assert info["final_obs"].shape == (5, 2, 8)
    scene = env.scene()
    assert isinstance(scene, Scene) and isinstance(info["final_scene"], Scene)
    assert scene.agent_xy.shape == (5, 2, 2) and scene.agent_lin_vel.shape == (5, 2, 2)
    assert scene.box_yaw.shape == (5,) and scene.agent_ang_vel.shape == (5, 2)
    assert bool(((scene.agent_yaw >= 0) & (scene.agent_yaw < 2 * math.pi)).all())
    # per-agent rewards (no team sum inside the env); the logged terms count shared terms once per env and the
    # collision term once per pair, like MQE's reward_buffer, so every agent's share adds back up to the rewards
    t = info["reward_terms"]
    shared = t["distance_to_target"] + t["push"] + t["reach_target"] + t["exception"]
    assert torch.allclose(reward.sum(1), 2 * shared + t["approach"] + 2 * t["collision"] + t["ocb"], atol=1e-6)
    assert not torch.allclose(reward[:, 0], reward[:, 1])


def test_reset_distribution():
    env = make_env("vmas", num_envs=4000, seed=1)
    env.reset()
    s = env.scene()
    assert torch.allclose(s.box_xy, torch.tensor([12.0, 0.0]).expand(4000, 2))
    target_r = torch.linalg.vector_norm(s.target_xy - s.box_xy, dim=-1)
    agent_r = torch.linalg.vector_norm(s.agent_xy - s.box_xy.unsqueeze(1), dim=-1)
    assert target_r.min() >= 1.5 and target_r.max() <= 3.0 and abs(target_r.mean().item() - 2.25) < 0.03
    assert agent_r.min() >= 1.2 and agent_r.max() <= 1.3
    assert s.agent_lin_vel.abs().max() <= 0.1 * math.sqrt(2) + 1e-6 and s.agent_ang_vel.abs().max() <= 0.1
    # friction is drawn once per env and kept across episodes
    mu = env.box_mu.clone()
    assert mu.min() >= 0.30 and mu.max() <= 0.35 and mu.std() > 0.01
    env.reset()
    assert torch.equal(mu, env.box_mu)


def test_done_auto_reset_and_final_obs():
    env = make_env("vmas", num_envs=3, seed=0)
    env.reset()
    # env 0 about to succeed, env 1 running, env 2 with overlapping agents (exception)
    place(env, box_xy=(12.0, 0.0), target_xy=(12.5, 0.0))
    env.target_xy[1] = torch.tensor([16.0, 0.0])
    env.target_xy[2] = torch.tensor([16.0, 0.0])
    env.prev_dist = torch.linalg.vector_norm(env.box.state.pos - env.target_xy, dim=-1)
    env.agents[1].state.pos = env.agents[1].state.pos.clone()
    env.agents[1].state.pos[2] = env.agents[0].state.pos[2] + torch.tensor([0.05, 0.0])
    obs, _, done, info = env.step(zero_actions(env))
    assert done.tolist() == [True, False, True]
    assert info["success"].tolist() == [True, False, False]
    assert info["exception"].tolist() == [False, False, True]
    assert not info["time_out"].any()
    f = info["final_scene"]
    # final_obs is the observation of the pre-reset state
    expected = observations(f.box_xy, f.box_yaw, f.target_xy, f.agent_xy, f.agent_yaw)
    assert torch.allclose(info["final_obs"], expected)
    assert torch.allclose(f.target_xy[0], torch.tensor([12.5, 0.0]))
    # the running env is untouched; done envs start a new episode whose observation is returned
    assert torch.equal(info["final_obs"][1], obs[1])
    assert not torch.allclose(info["final_obs"][0], obs[0])
    assert env.step_count.tolist() == [0, 1, 0]
    new = env.scene()
    assert torch.allclose(obs, observations(new.box_xy, new.box_yaw, new.target_xy, new.agent_xy, new.agent_yaw))
    assert not torch.allclose(new.target_xy[0], torch.tensor([12.5, 0.0]))


def test_same_seed_same_trajectory_different_seed_differs():
    def rollout(seed):
        env = make_env("vmas", num_envs=8, seed=seed)
        out = [env.reset()]
        gen = torch.Generator().manual_seed(123)
        for _ in range(30):
            obs, reward, done, _ = env.step(torch.randn(8, 2, 3, generator=gen))
            out += [obs, reward, done.float().unsqueeze(-1)]
        return out

    a, b, c = rollout(7), rollout(7), rollout(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0])


def test_state_dict_round_trip_continues_identically():
    env = make_env("vmas", num_envs=4, seed=3)
    env.reset()
    for _ in range(5):
        env.step(torch.randn(4, 2, 3))
    state = env.state_dict()
    actions = torch.randn(4, 2, 3)
    expected = env.step(actions)
    other = make_env("vmas", num_envs=4, seed=3)
    other.reset()
    other.load_state_dict(state)
    got = other.step(actions)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


# -- rewards -----------------------------------------------------------------------------------------------------


def rewards_for(box_xy=(12.0, 0.0), box_yaw=0.0, box_vel=(0.0, 0.0), target_xy=(15.0, 0.0),
                agent_xy=((10.0, 3.0), (10.0, -3.0)), prev_dist=None, success=False, exception=False, nonfinite=0):
    box = torch.tensor([box_xy])
    target = torch.tensor([target_xy])
    prev = torch.linalg.vector_norm(box - target, dim=-1) if prev_dist is None else torch.tensor([prev_dist])
    return task_rewards(box, torch.tensor([box_yaw]), torch.tensor([box_vel]), target, torch.tensor([agent_xy]),
                        prev, torch.tensor([success]), torch.tensor([exception]), torch.tensor([nonfinite]),
                        TASKS["cuboid"])


def test_distance_term():
    _, terms = rewards_for(box_xy=(12.0, 0.0), target_xy=(13.9, 0.0), prev_dist=2.0)
    # 0.00325 * 100 * (2 * (2.0 - 1.9) - 0.01 * 1.9) = 0.325 * 0.181
    assert terms["distance_to_target"].item() == pytest.approx(0.058825, abs=1e-6)
    _, terms = rewards_for(target_xy=(14.0, 0.0))  # standing still at 2 m costs 0.0065 per step
    assert terms["distance_to_target"].item() == pytest.approx(-0.0065, abs=1e-7)


def test_approach_and_collision_terms():
    # agent 0 at 1 m from the box centre (3D: sqrt(1 + 0.05^2)), agent 1 at 2 m; agents 2.2360680 m apart
    reward, terms = rewards_for(agent_xy=((11.0, 0.0), (12.0, 2.0)), target_xy=(12.0, -3.0))
    a0 = -0.00075 * (math.sqrt(1.0 + 0.0025) + 0.5) ** 2
    a1 = -0.00075 * (math.sqrt(4.0 + 0.0025) + 0.5) ** 2
    assert a0 == pytest.approx(-0.00169031, abs=1e-7)
    assert terms["approach"].item() == pytest.approx(a0 + a1, abs=1e-7)
    c = -0.0025 / (0.02 + math.sqrt(5.0) / 3.0)
    assert terms["collision"].item() == pytest.approx(c, abs=1e-7)  # once per pair in the log
    # per agent: both agents get the pair term; the rest is shared (distance) or per agent (ocb)
    dist_term = 0.325 * (-0.01 * 3.0)
    ocb0 = 0.0  # agent 0 beside the left face, target below: normal (1, 0) . (0, -1)
    ocb1 = 0.004  # agent 1 above the top face: inward normal (0, -1) . (0, -1)
    assert reward[0, 0].item() == pytest.approx(dist_term + a0 + c + ocb0, abs=1e-6)
    assert reward[0, 1].item() == pytest.approx(dist_term + a1 + c + ocb1, abs=1e-6)


def test_pairwise_collision_three_agents():
    agents = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    box, target = torch.tensor([[5.0, 5.0]]), torch.tensor([[8.0, 5.0]])
    reward, terms = task_rewards(box, torch.zeros(1), torch.zeros(1, 2), target, agents,
                                 torch.tensor([3.0]), torch.tensor([False]), torch.tensor([False]), torch.tensor([0]),
                                 TASKS["cuboid"])
    c = lambda d: -0.0025 / (0.02 + d / 3.0)  # noqa: E731
    assert terms["collision"].item() == pytest.approx(c(1.0) + c(2.0) + c(math.sqrt(5.0)), abs=1e-7)


def test_push_threshold_and_shared_bonuses():
    _, terms = rewards_for(box_vel=(0.06, 0.08))  # 0.1 m/s: not above the threshold
    assert terms["push"].item() == 0.0
    reward_slow, _ = rewards_for(box_vel=(0.0, 0.0))
    reward, terms = rewards_for(box_vel=(0.0, 0.101))
    assert terms["push"].item() == pytest.approx(0.0015)
    assert torch.allclose(reward - reward_slow, torch.full((1, 2), 0.0015))
    reward_ok, _ = rewards_for()
    reward, terms = rewards_for(success=True)
    assert torch.allclose(reward - reward_ok, torch.full((1, 2), 10.0))
    reward, terms = rewards_for(exception=True)
    assert torch.allclose(reward - reward_ok, torch.full((1, 2), -5.0))
    reward, terms = rewards_for(exception=True, nonfinite=3)
    assert torch.allclose(reward - reward_ok, torch.full((1, 2), -10.0))


@pytest.mark.parametrize(
    "agent_rel, expected",
    [
        ((-1.0, 0.0), 0.004),  # left face, the pushing side for a target at +x
        ((1.0, 0.0), -0.004),  # right face, between box and target
        ((0.0, 1.0), 0.0),  # top face: normal (0, -1) is orthogonal to the target direction
        ((0.0, -1.0), 0.0),  # bottom face
        ((-0.7, 0.3), 0.004),  # close to the left face, off centre
    ],
)
def test_ocb_nearest_face_normal(agent_rel, expected):
    _, terms = rewards_for(box_xy=(12.0, 0.0), target_xy=(14.0, 0.0),
                           agent_xy=((12.0 + agent_rel[0], agent_rel[1]), (12.0, -9.0)))
    other = 0.0  # agent 1 far below the bottom face: normal (0, 1) . (1, 0)
    assert terms["ocb"].item() == pytest.approx(expected + other, abs=1e-6)


def test_ocb_corner_tie_goes_to_lower_edge_index():
    # Beyond corner V0 = (-0.6, -0.6): equidistant to edge 0 (bottom, normal (0, 1)) and edge 3 (left, normal (1, 0)).
    # Edge 0 wins, so with the target straight "up" the term is +0.004 (edge 3 would give 0).
    # Agent 1 sits above the top face (normal (0, -1): -0.004), so the sum is 0 with edge 0 and -0.004 with edge 3.
    for rel in ((-1.0, -1.0), (-0.9, -0.7), (-0.7, -0.9)):
        _, terms = rewards_for(box_xy=(0.0, 0.0), target_xy=(0.0, 2.0), agent_xy=(rel, (0.0, 9.0)))
        assert terms["ocb"].item() == pytest.approx(0.0, abs=1e-6)
    # Beyond V2 = (0.6, 0.6): edges 1 (right, normal (-1, 0)) and 2 (top, normal (0, -1)) tie -> edge 1.
    _, terms = rewards_for(box_xy=(0.0, 0.0), target_xy=(-2.0, 0.0), agent_xy=((1.0, 1.0), (0.0, -9.0)))
    assert terms["ocb"].item() == pytest.approx(0.004, abs=1e-6)


CUBOID = TASKS["cuboid"].vertex_list


def mqe_face_normals(points: torch.Tensor) -> torch.Tensor:
    """The reference: MQE's calc_normal_vector_for_obc_reward on box-frame points [N, 2], edge by edge."""
    return mqe_normals(points, CUBOID)


def test_face_normal_ties_like_mqe_on_a_dense_lattice():
    grid = torch.arange(-80, 81, dtype=torch.float64) * 0.025  # -2 .. 2 m, includes +-0.6 and 0 exactly
    gx, gy = torch.meshgrid(grid, grid, indexing="ij")
    lattice = torch.stack([gx.flatten(), gy.flatten()], dim=1).float()
    t = torch.linspace(-2.0, 2.0, 401)
    diagonals = torch.cat([torch.stack([t, t], 1), torch.stack([t, -t], 1)])
    edge_lines = torch.cat([torch.stack([torch.full_like(t, s), t], 1) for s in (-0.6, 0.6)]
                           + [torch.stack([t, torch.full_like(t, s)], 1) for s in (-0.6, 0.6)])
    vertices = torch.tensor([[-0.6, -0.6], [0.6, -0.6], [0.6, 0.6], [-0.6, 0.6]])
    gen = torch.Generator().manual_seed(0)
    corner = (0.6 + 1.4 * torch.rand(4000, 2, generator=gen)) * (torch.randint(0, 2, (4000, 2), generator=gen) * 2 - 1)
    known = torch.tensor([[-1.5, -1.5], [0.7, 0.8], [-0.8, 0.7]])  # picked the other edge before the fix
    points = torch.cat([lattice, diagonals, edge_lines, vertices, corner, known])
    in_corner = (points.abs() > 0.6).all(1)
    assert int(in_corner.sum()) > 8000  # the tie region is well covered
    got, expected = T.nearest_face_normal(points, CUBOID), mqe_face_normals(points)
    mismatched = (got != expected).any(1)
    assert not mismatched.any(), points[mismatched][:5].tolist()
    # past a corner the lower edge index wins: V0 -> edge 0, V2 -> edge 1, V3 -> edge 2
    assert got[-3:].tolist() == [[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]
    # the batch shape is kept: [E, A, 2] points as the rewards pass them
    torch.testing.assert_close(T.nearest_face_normal(points[:12].view(6, 2, 2), CUBOID).flatten(0, 1), got[:12])


def test_ocb_rotated_box():
    # Box turned by 90 degrees: the box-frame top face now points to world -x.
    _, terms = rewards_for(box_xy=(0.0, 0.0), box_yaw=math.pi / 2, target_xy=(2.0, 0.0),
                           agent_xy=((-1.0, 0.1), (0.1, -9.0)))
    assert terms["ocb"].item() == pytest.approx(0.004, abs=1e-6)


def test_step_rewards_match_constructed_scene():
    env = make_env("vmas", num_envs=2, seed=0)
    env.reset()
    place(env, box_xy=(12.0, 0.0), target_xy=(14.0, 0.0), agent_xy=((10.5, 0.0), (12.0, 2.0)))
    _, reward, done, info = env.step(zero_actions(env))
    assert not done.any()
    a0 = -0.00075 * (math.sqrt(1.5**2 + 0.0025) + 0.5) ** 2
    a1 = -0.00075 * (math.sqrt(2.0**2 + 0.0025) + 0.5) ** 2
    c = -0.0025 / (0.02 + 2.5 / 3.0)
    d = 0.325 * (-0.01 * 2.0)
    expected = torch.tensor([d + a0 + c + 0.004, d + a1 + c + 0.0])
    assert torch.allclose(reward, expected.expand(2, 2), atol=1e-6)


# -- termination -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset, success", [(0.999, True), (1.001, False)])
def test_success_radius(offset, success):
    env = make_env("vmas", num_envs=1, seed=0)
    env.reset()
    place(env, box_xy=(12.0, 0.0), target_xy=(12.0 + offset * 0.6, offset * 0.8))
    _, reward, done, info = env.step(zero_actions(env))
    assert info["success"].item() is success and done.item() is success
    assert (info["reward_terms"]["reach_target"].item() == 10.0) is success


@pytest.mark.parametrize("gap, collided", [(0.249, True), (0.251, False)])
def test_collision_radius(gap, collided):
    # Agents' bases gap metres apart (any direction); three agents: only the close pair matters.
    agents = torch.tensor([[[10.0, 3.0], [10.0 + gap * 0.8, 3.0 + gap * 0.6], [5.0, 5.0]]])
    _, exception, _ = T.termination(torch.tensor([7.0]), agents, torch.tensor([1]), 0.25)
    assert exception.item() is collided


@pytest.mark.parametrize("start, collided", [(0.20, True), (0.30, False)])
def test_collision_through_the_physics(start, collided):
    # Overlapping discs separate at <= 1 m/s each, so a spawn 0.20 m apart is still inside 0.25 m after one step
    # (0.20 + 2 x 0.02) and ends the episode, one at 0.30 m does not.
    env = make_env("vmas", num_envs=1, seed=0)
    env.reset()
    place(env, agent_xy=((10.0, 3.0), (10.0 + start, 3.0)))
    _, reward, done, info = env.step(zero_actions(env))
    assert info["exception"].item() is collided and done.item() is collided
    assert (info["reward_terms"]["exception"].item() == -5.0) is collided


def test_termination_edges():
    agents = torch.tensor([[[0.0, 0.0], [3.0, 0.0]]]).repeat(4, 1, 1)
    dist = torch.tensor([0.999, 1.001, 0.992, 2.0])
    success, exception, time_out = T.termination(dist, agents, torch.tensor([1000, 1001, 1, 0]), 0.25)
    assert success.tolist() == [True, False, True, False]
    assert time_out.tolist() == [False, True, False, False]  # the step counter must exceed 1000
    assert not exception.any()


def test_time_out_on_step_1001():
    env = make_env("vmas", num_envs=2, seed=0)
    env.reset()
    place(env)
    for step in range(1, 1001):
        _, _, done, info = env.step(zero_actions(env))
        assert not done.any(), f"done at step {step}"
    _, _, done, info = env.step(zero_actions(env))
    assert done.all() and info["time_out"].all() and not info["success"].any() and not info["exception"].any()
    assert (env.step_count == 0).all()


def test_random_episode_start_desynchronizes_time_outs_only():
    env = make_env("vmas", num_envs=4000, seed=3)
    obs = env.reset()
    before = env.state_dict()
    env.randomize_episode_start()
    counts = env.step_count.clone()
    assert counts.min() >= 0 and counts.max() <= T.EPISODE_STEPS - 1
    assert counts.unique().numel() > 900  # spread over the episode, not one shared phase
    assert abs(counts.float().mean().item() - (T.EPISODE_STEPS - 1) / 2) < 20
    torch.testing.assert_close(env._observe(), obs)  # the scene itself is untouched
    for name, tensors in before["bodies"].items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, env.state_dict()["bodies"][name])), name
    again = make_env("vmas", num_envs=4000, seed=3)
    again.reset()
    again.randomize_episode_start()
    assert torch.equal(again.step_count, counts)  # drawn from the env's seeded generator

    small = make_env("vmas", num_envs=3, seed=0)
    small.reset()
    place(small)
    small.step_count = torch.tensor([0, 990, 1000])  # as if drawn: time-outs on steps 1001, 11 and 1
    first_done, first_was_time_out = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool)
    for step in range(1, 1002):
        _, _, done, info = small.step(zero_actions(small))
        new = done & (first_done == 0)
        first_done[new] = step
        first_was_time_out |= new & info["time_out"]
    assert first_done.tolist() == [1001, 11, 1] and first_was_time_out.all()


def test_spawn_collision_rate():
    env = make_env("vmas", num_envs=20000, seed=5)
    env.reset()
    s = env.scene()
    spawn_gap = torch.linalg.vector_norm(s.agent_xy[:, 0] - s.agent_xy[:, 1], dim=-1)
    rate = (spawn_gap < 0.25).float().mean().item()
    assert 0.053 <= rate <= 0.073, rate
    # those spawns end the episode as an exception on the first step unless depenetration separates them in time
    _, _, done, info = env.step(torch.zeros(20000, 2, 3))
    first_step = info["exception"].float().mean().item()
    assert (spawn_gap < 0.21).float().mean().item() - 0.002 <= first_step <= rate + 0.002


def test_nonfinite_observation_is_zeroed_counted_and_punished():
    env = make_env("vmas", num_envs=2, seed=0)
    env.reset()
    place(env)
    env.target_xy = env.target_xy.clone()
    env.target_xy[1, 0] = float("nan")
    env.prev_dist = torch.zeros(2)
    obs, reward, done, info = env.step(zero_actions(env))
    # the target's x and y in both agents' frames were NaN: 4 entries, zeroed
    assert info["nonfinite_obs"].tolist() == [0, 4]
    assert torch.isfinite(obs).all() and (obs[1, :, 0:2] == 0).all() and (obs[1, :, 2:4] != 0).all()
    assert info["reward_terms"]["exception"].tolist() == [0.0, -5.0]
    assert not done[1]  # punished, not reset, as MQE does


# -- frames ----------------------------------------------------------------------------------------------------


def test_observations_invariant_to_rigid_motion():
    gen = torch.Generator().manual_seed(0)
    E, A = 64, 3
    box, target = torch.rand(E, 2, generator=gen) * 20, torch.rand(E, 2, generator=gen) * 20
    agents = torch.rand(E, A, 2, generator=gen) * 20
    box_yaw, agent_yaw = torch.rand(E, generator=gen) * 6.28, torch.rand(E, A, generator=gen) * 6.28
    obs = observations(box, box_yaw, target, agents, agent_yaw)
    assert obs.shape == (E, A, 2 + 3 * A)
    phi = torch.rand(E, generator=gen) * 6.28
    shift = torch.rand(E, 2, generator=gen) * 10 - 5
    tf = lambda p: T.rotate(p, phi.view(E, *([1] * (p.dim() - 2)))) + shift.view(E, *([1] * (p.dim() - 2)), 2)  # noqa
    moved = observations(tf(box), torch.remainder(box_yaw + phi, 2 * math.pi), tf(target), tf(agents),
                         torch.remainder(agent_yaw + phi.unsqueeze(1), 2 * math.pi))
    pos_idx = [0, 1, 2, 3] + [5 + 3 * k + j for k in range(A - 1) for j in (0, 1)]
    yaw_idx = [4] + [7 + 3 * k for k in range(A - 1)]
    assert torch.allclose(obs[..., pos_idx], moved[..., pos_idx], atol=1e-4)
    yaw_diff = torch.remainder(obs[..., yaw_idx] - moved[..., yaw_idx] + math.pi, 2 * math.pi) - math.pi
    assert yaw_diff.abs().max() < 1e-4


def test_env_observation_invariant_to_rigid_motion():
    env = make_env("vmas", num_envs=1, seed=0)
    env.reset()
    scene_a = dict(box_xy=(12.0, 0.0), box_yaw=0.3, target_xy=(13.0, 2.0), agent_xy=((10.7, 0.2), (12.4, -1.3)),
                   agent_yaw=(1.0, 4.0))
    place(env, **scene_a)
    obs_a = env._observe()
    phi, shift = 2.0, torch.tensor([-3.0, 5.0])
    move = lambda p: tuple((T.rotate(torch.tensor(p), torch.tensor(phi)) + shift).tolist())  # noqa: E731
    place(env, box_xy=move(scene_a["box_xy"]), box_yaw=0.3 + phi, target_xy=move(scene_a["target_xy"]),
          agent_xy=tuple(move(p) for p in scene_a["agent_xy"]), agent_yaw=tuple(y + phi for y in scene_a["agent_yaw"]))
    assert torch.allclose(obs_a, env._observe(), atol=1e-4)


def test_observation_layout():
    # agent 0 at the origin facing +y; box 1 m ahead, target 2 m ahead, agent 1 at its right, facing the same way
    obs = observations(torch.tensor([[0.0, 1.0]]), torch.tensor([math.pi / 2 + 0.5]), torch.tensor([[0.0, 2.0]]),
                       torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]), torch.tensor([[math.pi / 2, math.pi / 2]]))
    expected0 = torch.tensor([2.0, 0.0, 1.0, 0.0, 0.5, 0.0, -1.0, 0.0])
    assert torch.allclose(obs[0, 0], expected0, atol=1e-6)
    expected1 = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.0])
    assert torch.allclose(obs[0, 1], expected1, atol=1e-6)


# -- physics plausibility ------------------------------------------------------------------------------------------


def test_free_box_stops_within_0_3_s():
    env = make_env("vmas", num_envs=1, seed=0)
    env.reset()
    place(env, agent_xy=((5.0, 5.0), (5.0, -5.0)))
    env.box.state.vel = torch.tensor([[0.5, 0.0]])
    for _ in range(15):  # 0.3 s
        env.step(zero_actions(env))
    assert env.box.state.vel.norm().item() == 0.0
    assert 0.02 < env.box.state.pos[0, 0].item() - 12.0 < 0.08


def push_run(lateral_offset: float, seconds: float):
    env = make_env("vmas", num_envs=1, seed=0)
    env.reset()
    place(env, box_xy=(12.0, 0.0), target_xy=(30.0, 0.0),
          agent_xy=((12.0 - 0.6 - V.AGENT_DISC_RADIUS - 0.02, lateral_offset), (0.0, 10.0)))
    actions = zero_actions(env)
    actions[0, 0, 0] = 1.0
    history = []
    for _ in range(int(round(seconds / T.DT))):
        env.step(actions)
        history.append((env.box.state.pos[0].clone(), env.box.state.rot[0, 0].item()))
    return history


def test_head_on_push_moves_box_steadily():
    history = push_run(0.0, 4.0)
    x = torch.stack([p for p, _ in history])[:, 0]
    speed = (x[-1] - x[99]).item() / 2.0  # mean speed between t = 2 s and 4 s
    assert 0.2 <= speed <= 0.5, speed
    assert abs(history[-1][1]) < 0.01  # no turning


def test_off_centre_push_turns_box():
    history = push_run(0.45, 3.0)
    assert abs(math.degrees(history[-1][1])) > 10.0


def test_agent_velocity_step_response():
    env = make_env("vmas", num_envs=1, seed=0)
    env.reset()
    place(env, agent_xy=((0.0, 0.0), (0.0, 10.0)), agent_yaw=(0.7, 0.0))
    actions = zero_actions(env)
    actions[0, 0] = torch.tensor([1.0, 0.0, 1.0])
    for step in range(1, 50):
        env.step(actions)
        vx = env.scene().agent_lin_vel[0, 0, 0].item()
        if vx >= 0.63 * 0.5:
            break
    assert 0.15 <= step * T.DT <= 0.35, step * T.DT
    for _ in range(100):
        env.step(actions)
    s = env.scene()
    assert s.agent_lin_vel[0, 0, 0].item() == pytest.approx(0.5, abs=0.01)
    assert s.agent_lin_vel[0, 0, 1].item() == pytest.approx(0.0, abs=0.02)  # body frame while turning
    assert s.agent_ang_vel[0, 0].item() == pytest.approx(0.5, abs=0.01)


def test_actions_are_clipped_and_scaled():
    env = make_env("vmas", num_envs=1, seed=0)
    env.reset()
    place(env, agent_xy=((0.0, 0.0), (0.0, 10.0)))
    actions = zero_actions(env)
    actions[0, 0, 1] = 7.0  # clipped to 1 -> 0.5 m/s sideways
    for _ in range(150):
        env.step(actions)
    assert env.scene().agent_lin_vel[0, 0, 1].item() == pytest.approx(0.5, abs=0.01)


def test_contacts_stay_stable_when_agents_squeeze_the_box():
    # Both agents drive into the box centre at full command for 6 s (a stiff contact with the box's small yaw
    # inertia blew up with one 20 ms substep: box speeds of 47 m/s). Contact may bounce, but must not add energy.
    E = 512
    env = make_env("vmas", num_envs=E, seed=0)
    env.reset()
    gen = torch.Generator().manual_seed(0)
    max_speed = max_spin = 0.0
    for _ in range(300):
        s = env.scene()
        towards = T.rotate(s.box_xy.unsqueeze(1) - s.agent_xy, -s.agent_yaw)
        spin = torch.randn(E, 2, 1, generator=gen)
        actions = torch.cat([2.0 * towards / towards.norm(dim=-1, keepdim=True), spin], -1)
        env.step(actions)
        max_speed = max(max_speed, env.box.state.vel.norm(dim=-1).max().item())
        max_spin = max(max_spin, env.box.state.ang_vel.abs().max().item())
    assert max_speed < 2.0 and max_spin < 10.0, (max_speed, max_spin)


# -- solvability -----------------------------------------------------------------------------------------------


def test_scripted_pusher_solves_the_task():
    E = 256
    env = make_env("vmas", num_envs=E, seed=0)
    env.reset()
    finished = torch.zeros(E, dtype=torch.bool)
    success = torch.zeros(E, dtype=torch.bool)
    for _ in range(env.episode_steps + 1):
        _, _, done, info = env.step(scripted_actions(env.scene()))
        success |= done & ~finished & info["success"]
        finished |= done
        if finished.all():
            break
    assert finished.all()
    assert success.float().mean().item() >= 0.8


# -- bad input -----------------------------------------------------------------------------------------------------


def test_bad_actions_raise_value_error_naming_expected_shape():
    env = make_env("vmas", num_envs=3, seed=0)
    env.reset()
    bad = [torch.zeros(3, 2), torch.zeros(3, 2, 3, dtype=torch.float64), torch.zeros(2, 2, 3), [[0.0] * 3] * 2]
    for actions in bad:
        with pytest.raises(ValueError, match=r"\(3, 2, 3\)"):
            env.step(actions)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"\(3, 2, 3\)"):
            env.step(torch.zeros(3, 2, 3, device="cuda"))


def test_bad_backend_and_sizes():
    with pytest.raises(ValueError, match="vmas, isaacgym"):
        make_env("mujoco", num_envs=2)
    with pytest.raises(ValueError, match="num_envs"):
        make_env("vmas", num_envs=0)


# -- action repeat -----------------------------------------------------------------------------------------------


def test_action_repeat_sums_rewards_until_the_episode_ends_then_stands():
    """k = 3: env 0 runs all three substeps; env 1 times out at the second, then stands in its new episode."""
    wrapped, plain = M.ActionRepeat(make_env("vmas", num_envs=2, seed=4), 3), make_env("vmas", num_envs=2, seed=4)
    for env in (wrapped.env, plain):
        env.reset()
        env.step_count = torch.tensor([0, T.EPISODE_STEPS - 1])  # env 1's counter passes 1000 at its 2nd step
    actions = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(0))
    obs, reward, done, info = wrapped.step(actions)

    _, r1, d1, i1 = plain.step(actions)
    _, r2, d2, i2 = plain.step(actions)
    o3, r3, _, i3 = plain.step(actions * torch.tensor([1.0, 0.0]).view(2, 1, 1))  # env 1: zero command
    assert d1.tolist() == [False, False] and d2.tolist() == [False, True]
    torch.testing.assert_close(obs, o3, rtol=0, atol=0)  # the observation after all three substeps
    torch.testing.assert_close(reward[0], r1[0] + r2[0] + r3[0])
    torch.testing.assert_close(reward[1], r1[1] + r2[1])  # nothing from the new episode
    assert done.tolist() == [False, True] and info["env_steps"].tolist() == [3, 2]
    assert info["time_out"].tolist() == [False, True] and not info["success"].any()
    # the final state is that of the step the episode ended (env 1) or of the last substep (env 0)
    torch.testing.assert_close(info["final_obs"][1], i2["final_obs"][1], rtol=0, atol=0)
    torch.testing.assert_close(info["final_obs"][0], i3["final_obs"][0], rtol=0, atol=0)
    for got, step2, step3 in zip(info["final_scene"], i2["final_scene"], i3["final_scene"]):
        torch.testing.assert_close(got[1], step2[1], rtol=0, atol=0)
        torch.testing.assert_close(got[0], step3[0], rtol=0, atol=0)
    # logged reward terms cover every env step taken
    for name, value in info["reward_terms"].items():
        each = [i["reward_terms"][name] for i in (i1, i2, i3)]
        torch.testing.assert_close(value, each[0] + each[1] + each[2])
    assert plain.step_count.tolist() == wrapped.step_count.tolist() == [3, 1]  # attributes are read through


def test_action_repeat_of_one_is_the_env_and_bad_k_is_rejected():
    wrapped, plain = M.ActionRepeat(make_env("vmas", num_envs=3, seed=5), 1), make_env("vmas", num_envs=3, seed=5)
    wrapped.reset(), plain.reset()
    actions = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(1))
    got, expected = wrapped.step(actions), plain.step(actions)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], expected[:3]))
    assert got[3]["env_steps"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="action repeat must be >= 1"):
        M.ActionRepeat(plain, 0)
