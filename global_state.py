"""The centralized critic's input: a `Scene` (physical state of a batch of envs) -> the global state.

Layout for A agents (DESIGN.md, spec section 8 of `mapush_go1push_mid.md`):
    [box_x, box_y, box_yaw, target_x, target_y] + A x [x, y, yaw, vx*2.0, vy*2.0, yaw_rate*0.25]
Positions are env-relative (m), yaws in [0, 2*pi), velocities in the agent's body frame scaled like MQE's observations.
The target has no yaw (it never rotates). Every agent's critic sees this same state ("EP" state).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from mapush_env import TWO_PI, Scene

LIN_VEL_SCALE = 2.0  # MQE's normalization.obs_scales.lin_vel
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


def scene_from_mqe(wrapper: Any) -> Scene:
    """Extract a Scene from MQE's Go1PushMidWrapper buffers (Isaac Gym backend).

    `root_states_npc` [E*2, 13] is world frame (box rows, then target rows, per env); `obs_buf.base_pos`,
    `base_rpy`, `lin_vel`, `ang_vel` are [E*A, 3], positions already env-relative, velocities body frame and
    pre-multiplied by MQE's observation scales.
    """
    env = getattr(wrapper, "env", wrapper)
    num_envs = env.num_envs
    num_agents = env.num_agents
    origins_xy = env.env_origins[:, :2]  # [E, 2] world position of each env's origin
    npc = env.root_states_npc.reshape(num_envs, -1, 13)
    # Fix: box and target come in the world frame; subtract env_origins so they share the agents' env-relative frame.
    box_xy = npc[:, 0, 0:2] - origins_xy
    target_xy = npc[:, 1, 0:2] - origins_xy
    box_yaw = quat_to_yaw(npc[:, 0, 3:7])
    obs_buf = env.obs_buf
    agent_xy = obs_buf.base_pos.reshape(num_envs, num_agents, 3)[..., 0:2]
    agent_yaw = torch.remainder(obs_buf.base_rpy.reshape(num_envs, num_agents, 3)[..., 2], TWO_PI)
    # Fix: include the agents' body-frame velocities; undo MQE's obs scales, build_global_state reapplies them.
    lin_vel = obs_buf.lin_vel.reshape(num_envs, num_agents, 3)[..., 0:2] / LIN_VEL_SCALE
    ang_vel = obs_buf.ang_vel.reshape(num_envs, num_agents, 3)[..., 2] / ANG_VEL_SCALE
    return Scene(box_xy, box_yaw, target_xy, agent_xy, agent_yaw, lin_vel, ang_vel)
