"""The critic's global state: exact layout, the frame fix on MQE buffers, no target yaw, 3 agents, NaN handling."""
import math
from types import SimpleNamespace

import pytest
import torch

from global_state import build_global_state, global_state_dim, quat_to_yaw, scene_from_mqe
from mapush_env import Scene


def hand_scene():
    return Scene(
        box_xy=torch.tensor([[12.0, 0.5]]),
        box_yaw=torch.tensor([1.0]),
        target_xy=torch.tensor([[14.0, -1.0]]),
        agent_xy=torch.tensor([[[11.0, 1.5], [10.5, -0.5]]]),
        agent_yaw=torch.tensor([[0.5, 6.0]]),
        agent_lin_vel=torch.tensor([[[0.3, -0.1], [0.0, 0.2]]]),
        agent_ang_vel=torch.tensor([[0.4, -0.2]]),
    )


def test_exact_vector_for_hand_built_scene():
    state, nonfinite = build_global_state(hand_scene())
    expected = torch.tensor([[12.0, 0.5, 1.0, 14.0, -1.0,
                              11.0, 1.5, 0.5, 0.6, -0.2, 0.1,
                              10.5, -0.5, 6.0, 0.0, 0.4, -0.05]])
    assert state.shape == (1, 17) and global_state_dim(2) == 17
    assert torch.allclose(state, expected)
    assert nonfinite.item() == 0


def test_three_agents_give_23_dims():
    s = hand_scene()
    def with_copy_of_agent0(x):
        return torch.cat([x, x[:, :1]], 1)

    three = Scene(s.box_xy, s.box_yaw, s.target_xy, *(with_copy_of_agent0(x) for x in s[3:]))
    state, _ = build_global_state(three)
    assert state.shape == (1, 23) and global_state_dim(3) == 23
    assert torch.allclose(state[:, 17:], state[:, 5:11])


def test_nan_and_inf_are_zeroed_and_counted():
    s = hand_scene()
    s = s._replace(box_xy=torch.tensor([[float("nan"), 0.5]]), agent_ang_vel=torch.tensor([[float("inf"), -0.2]]))
    state, nonfinite = build_global_state(s)
    assert nonfinite.item() == 2
    assert state[0, 0].item() == 0.0 and state[0, 10].item() == 0.0 and torch.isfinite(state).all()


def yaw_quat(yaw):
    return torch.stack([torch.zeros_like(yaw), torch.zeros_like(yaw), torch.sin(yaw / 2), torch.cos(yaw / 2)], -1)


def test_quat_to_yaw_range():
    yaws = torch.tensor([0.0, 1.0, 3.0, -1.0, -3.0])
    assert torch.allclose(quat_to_yaw(yaw_quat(yaws)), torch.remainder(yaws, 2 * math.pi), atol=1e-6)


def fake_mqe_wrapper(origins, target_yaw=0.0):
    """MQE's buffers for the hand scene in 3 envs: world-frame NPC root states, env-relative agent observations."""
    s = hand_scene()
    E, A = origins.shape[0], 2
    box_world = s.box_xy.expand(E, 2) + origins[:, :2]
    target_world = s.target_xy.expand(E, 2) + origins[:, :2]
    npc = torch.zeros(E, 2, 13)
    npc[:, 0, 0:2], npc[:, 0, 2] = box_world, 0.25
    npc[:, 0, 3:7] = yaw_quat(s.box_yaw.expand(E))
    npc[:, 1, 0:2], npc[:, 1, 2] = target_world, 0.1
    npc[:, 1, 3:7] = yaw_quat(torch.full((E,), target_yaw))
    base_pos = torch.cat([s.agent_xy, torch.full((1, A, 1), 0.3)], -1).expand(E, A, 3)
    base_rpy = torch.zeros(E, A, 3)
    base_rpy[..., 2] = s.agent_yaw
    lin_vel = torch.zeros(E, A, 3)
    lin_vel[..., :2] = s.agent_lin_vel * 2.0
    ang_vel = torch.zeros(E, A, 3)
    ang_vel[..., 2] = s.agent_ang_vel * 0.25
    obs_buf = SimpleNamespace(base_pos=base_pos.reshape(E * A, 3), base_rpy=base_rpy.reshape(E * A, 3),
                              lin_vel=lin_vel.reshape(E * A, 3), ang_vel=ang_vel.reshape(E * A, 3))
    env = SimpleNamespace(num_envs=E, num_agents=A, env_origins=origins, root_states_npc=npc.reshape(E * 2, 13),
                          obs_buf=obs_buf)
    return SimpleNamespace(env=env)


def test_mqe_scene_does_not_depend_on_env_origins():
    expected, _ = build_global_state(hand_scene())
    origins = torch.tensor([[1.0, 13.0, 0.0], [-40.0, 7.5, 0.0], [250.0, -90.0, 0.0]])
    state, _ = build_global_state(scene_from_mqe(fake_mqe_wrapper(origins)))
    # a world-frame box/target (the documented bug) would put each env's origin into the state and fail here
    assert torch.allclose(state, expected.expand(3, 17), atol=1e-5)


def test_target_yaw_is_not_in_the_state():
    origins = torch.zeros(2, 3)
    a, _ = build_global_state(scene_from_mqe(fake_mqe_wrapper(origins, target_yaw=0.0)))
    b, _ = build_global_state(scene_from_mqe(fake_mqe_wrapper(origins, target_yaw=2.0)))
    assert torch.equal(a, b) and a.shape == (2, 17)


def test_mqe_velocities_are_body_frame_with_obs_scales():
    scene = scene_from_mqe(fake_mqe_wrapper(torch.zeros(1, 3)))
    assert torch.allclose(scene.agent_lin_vel, hand_scene().agent_lin_vel)
    assert torch.allclose(scene.agent_ang_vel, hand_scene().agent_ang_vel)
    assert scene.box_yaw.item() == pytest.approx(1.0, abs=1e-6)
