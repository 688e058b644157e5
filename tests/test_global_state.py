"""The critic's global state: exact layout, the frame fix on MQE buffers, no target yaw, 3 agents, NaN handling."""
import math
from types import SimpleNamespace

import pytest
import torch

from global_state import build_global_state, global_state_dim
from mapush_isaacgym import quat_to_yaw, scene_from_mqe
from mapush_task import Scene


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


def test_full_layout_adds_the_object_velocity_and_yaws_as_cos_and_sin():
    scene = hand_scene()._replace(box_lin_vel=torch.tensor([[0.2, -0.4]]), box_ang_vel=torch.tensor([0.8]))
    state, nonfinite = build_global_state(scene, "global-state-full")
    c, s = math.cos, math.sin
    expected = torch.tensor([[12.0, 0.5, c(1.0), s(1.0), 0.4, -0.8, 0.2, 14.0, -1.0,
                              11.0, 1.5, c(0.5), s(0.5), 0.6, -0.2, 0.1,
                              10.5, -0.5, c(6.0), s(6.0), 0.0, 0.4, -0.05]])
    assert state.shape == (1, 23) and global_state_dim(2, "global-state-full") == 23 and nonfinite.item() == 0
    torch.testing.assert_close(state, expected)
    assert global_state_dim(3, "global-state-full") == 30
    # continuous across the wrap: a yaw just below 2 pi and one just above 0 give nearby states (raw: 2 pi apart)
    near = [build_global_state(scene._replace(box_yaw=torch.tensor([yaw])), layout)[0]
            for layout in ("global-state", "global-state-full") for yaw in (2 * math.pi - 1e-3, 1e-3)]
    assert (near[0] - near[1]).abs().max() > 6.0 and (near[2] - near[3]).abs().max() < 3e-3


def test_the_full_layout_needs_the_objects_velocity():
    with pytest.raises(ValueError, match="needs the object's velocity"):
        build_global_state(hand_scene(), "global-state-full")
    with pytest.raises(ValueError, match="unknown global-state layout 'global-state-vel'"):  # removed, not silent
        global_state_dim(2, "global-state-vel")


def test_an_unknown_layout_is_an_error_not_a_silent_17_dim_state():
    with pytest.raises(ValueError, match="unknown global-state layout 'global-state-ful'"):
        build_global_state(hand_scene(), "global-state-ful")


def test_both_backends_give_the_objects_velocity():
    import mapush_env as M

    env = M.make_env("vmas", num_envs=3, seed=0)
    env.reset()
    env.box.state.vel = torch.tensor([[0.1, 0.2]] * 3)
    env.box.state.ang_vel = torch.tensor([[0.5]] * 3)
    scene = env.scene()
    assert torch.equal(scene.box_lin_vel, env.box.state.vel) and torch.equal(scene.box_ang_vel, torch.full((3,), 0.5))
    _, _, _, info = env.step(torch.zeros(3, 2, 3))
    assert info["final_scene"].box_lin_vel.shape == (3, 2) and info["final_scene"].box_ang_vel.shape == (3,)
    wrapper = fake_mqe_wrapper(torch.zeros(1, 3))
    npc = wrapper.env.root_states_npc.reshape(1, 2, 13)
    npc[0, 0, 7:13] = torch.tensor([0.3, -0.2, 0.0, 0.0, 0.0, 0.7])
    mqe = scene_from_mqe(wrapper)
    torch.testing.assert_close(mqe.box_lin_vel, torch.tensor([[0.3, -0.2]]))
    torch.testing.assert_close(mqe.box_ang_vel, torch.tensor([0.7]))


def test_three_agents_give_23_dims():
    s = hand_scene()
    def with_copy_of_agent0(x):
        return torch.cat([x, x[:, :1]], 1)

    three = Scene(s.box_xy, s.box_yaw, s.target_xy, *(with_copy_of_agent0(x) for x in s[3:7]))
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


def tilted_quat(yaw, roll=0.01, pitch=0.02):
    """xyzw quaternions of roll, pitch, yaw [N] (the agents lean a little, as real ones do)."""
    cr, sr = math.cos(roll / 2), math.sin(roll / 2)
    cp, sp = math.cos(pitch / 2), math.sin(pitch / 2)
    cy, sy = torch.cos(yaw / 2), torch.sin(yaw / 2)
    return torch.stack([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy,
                        cr * cp * cy + sr * sp * sy], dim=-1)


def rotate_by(quat, v):
    """v [N, 3] rotated from the body frame into the world frame by the rotation matrix of quat [N, 4]."""
    x, y, z, w = quat.unbind(-1)
    matrix = torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)
    return (matrix @ v.unsqueeze(-1)).squeeze(-1)


def fake_mqe_wrapper(origins, target_yaw=0.0):
    """MQE's root-state buffers for the hand scene in E envs, world frame: NPC rows (box, target) and agent rows."""
    s = hand_scene()
    E, A = origins.shape[0], 2
    npc = torch.zeros(E, 2, 13)
    npc[:, 0, 0:2], npc[:, 0, 2] = s.box_xy.expand(E, 2) + origins[:, :2], 0.25
    npc[:, 0, 3:7] = yaw_quat(s.box_yaw.expand(E))
    npc[:, 1, 0:2], npc[:, 1, 2] = s.target_xy.expand(E, 2) + origins[:, :2], 0.1
    npc[:, 1, 3:7] = yaw_quat(torch.full((E,), target_yaw))
    agents = torch.zeros(E, A, 13)
    agents[..., 0:2] = s.agent_xy.expand(E, A, 2) + origins[:, None, :2]
    agents[..., 2] = 0.3
    quat = tilted_quat(s.agent_yaw.expand(E, A).reshape(-1))
    agents[..., 3:7] = quat.reshape(E, A, 4)
    body_lin = torch.cat([s.agent_lin_vel, torch.full((1, A, 1), 0.05)], -1).expand(E, A, 3).reshape(-1, 3)
    body_ang = torch.cat([torch.full((1, A, 2), 0.03), s.agent_ang_vel.unsqueeze(-1)], -1).expand(E, A, 3)
    agents[..., 7:10] = rotate_by(quat, body_lin).reshape(E, A, 3)
    agents[..., 10:13] = rotate_by(quat, body_ang.reshape(-1, 3)).reshape(E, A, 3)
    env = SimpleNamespace(num_envs=E, num_agents=A, env_origins=origins, root_states_npc=npc.reshape(E * 2, 13),
                          root_states=agents.reshape(E * A, 13))
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
    assert torch.allclose(scene.agent_lin_vel, hand_scene().agent_lin_vel, atol=1e-6)
    assert torch.allclose(scene.agent_ang_vel, hand_scene().agent_ang_vel, atol=1e-6)
    assert torch.allclose(scene.agent_yaw, hand_scene().agent_yaw, atol=1e-6)
    state, _ = build_global_state(scene)  # the state carries MQE's observation scales
    torch.testing.assert_close(state[0, 8:11], torch.tensor([0.6, -0.2, 0.1]), atol=1e-6, rtol=0)
    assert scene.box_yaw.item() == pytest.approx(1.0, abs=1e-6)


def test_the_full_layout_without_the_objects_velocity_is_a_clear_error():
    # an env whose Scene leaves the object's velocity out must not get a NoneType traceback from deep in the trainer
    with pytest.raises(ValueError, match="needs the object's velocity.*--critic-input global-state"):
        build_global_state(hand_scene()._replace(box_lin_vel=None, box_ang_vel=None), "global-state-full")
