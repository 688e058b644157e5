"""The centralized critic's input: a `Scene` (physical state of a batch of envs) -> the global state.

Layout for A agents (the heterogeneous-MAPush fork's construction; docs/critic_fixes.md tells its story):
    [box_x, box_y, box_yaw, target_x, target_y] + A x [x, y, yaw, vx*2.0, vy*2.0, yaw_rate*0.25]
Positions are env-relative (m), yaws in [0, 2*pi), velocities in the agent's body frame scaled like MQE's observations.
The target has no yaw (it never rotates). Every agent's critic sees this same state ("EP" state).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from mapush_env import TWO_PI, Scene

LIN_VEL_SCALE = 2.0  # MQE's normalization.obs_scales.lin_vel, applied to the global state as MQE applies it to obs
ANG_VEL_SCALE = 0.25  # MQE's normalization.obs_scales.ang_vel


def global_state_dim(num_agents: int) -> int:
    return 3 + 2 + 6 * num_agents


def sanitize(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace NaN/Inf by 0; return the clean tensor and how many entries were replaced (0-dim, on device)."""
    finite = torch.isfinite(x)
    return torch.where(finite, x, torch.zeros_like(x)), (~finite).sum()


def build_global_state(scene: Scene) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scene -> (global state [E, 3 + 2 + 6*A], number of non-finite entries zeroed)."""
    num_envs, num_agents = scene.agent_yaw.shape
    per_agent = torch.cat(
        [
            scene.agent_xy,
            scene.agent_yaw.unsqueeze(-1),
            scene.agent_lin_vel * LIN_VEL_SCALE,
            scene.agent_ang_vel.unsqueeze(-1) * ANG_VEL_SCALE,
        ],
        dim=-1,
    )  # [E, A, 6]
    state = torch.cat(
        [scene.box_xy, scene.box_yaw.unsqueeze(-1), scene.target_xy, per_agent.reshape(num_envs, 6 * num_agents)],
        dim=-1,
    )
    return sanitize(state)


def quat_to_yaw(quat_xyzw: torch.Tensor) -> torch.Tensor:
    """Yaw in [0, 2*pi) of (x, y, z, w) quaternions, as isaacgym.torch_utils.get_euler_xyz computes it."""
    x, y, z, w = quat_xyzw.unbind(-1)
    yaw = torch.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
    return torch.remainder(yaw, TWO_PI)


def quat_rotate_inverse(quat_xyzw: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """World-frame vectors v [..., 3] in the body frame of (x, y, z, w) quaternions (isaacgym.torch_utils'
    quat_rotate_inverse, which MQE uses for its base velocities)."""
    q, w = quat_xyzw[..., :3], quat_xyzw[..., 3:]
    return v * (2.0 * w * w - 1.0) - torch.cross(q, v, dim=-1) * w * 2.0 + q * (q * v).sum(-1, keepdim=True) * 2.0


def scene_from_mqe(wrapper: Any) -> Scene:
    """A Scene from MQE's root-state buffers (Isaac Gym backend), all world frame: `root_states_npc` [E*2, 13] (box,
    then target, per env) and `root_states` [E*A, 13] (the agents, env-major); rows are position, xyzw quaternion,
    linear and angular velocity.

    The agents come from `root_states`, not from `obs_buf`: on a step with an auto-reset MQE writes the new episode's
    root states but has filled `base_quat`, `base_lin_vel` and `base_ang_vel` (and so obs_buf's yaw and velocities)
    before the reset, so obs_buf mixes the new episode's positions with the old episode's yaw and velocities.
    """
    env = getattr(wrapper, "env", wrapper)
    num_envs, num_agents = env.num_envs, env.num_agents
    origins_xy = env.env_origins[:, :2]  # [E, 2] world position of each env's origin
    npc = env.root_states_npc.reshape(num_envs, -1, 13)
    # Fix: box and target come in the world frame; subtract env_origins so they share the agents' env-relative frame.
    box_xy = npc[:, 0, 0:2] - origins_xy
    target_xy = npc[:, 1, 0:2] - origins_xy
    box_yaw = quat_to_yaw(npc[:, 0, 3:7])
    agents = env.root_states.reshape(num_envs, num_agents, 13)
    agent_xy = agents[..., 0:2] - origins_xy.unsqueeze(1)
    quat = agents[..., 3:7]
    # Fix: include the agents' body-frame velocities (MQE's base_lin_vel / base_ang_vel, unscaled).
    lin_vel = quat_rotate_inverse(quat, agents[..., 7:10])[..., 0:2]
    ang_vel = quat_rotate_inverse(quat, agents[..., 10:13])[..., 2]
    return Scene(box_xy, box_yaw, target_xy, agent_xy, quat_to_yaw(quat), lin_vel, ang_vel)
