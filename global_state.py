"""The centralized critic's input: a `Scene` (physical state of a batch of envs) -> the global state.

Layout for A agents (the heterogeneous-MAPush fork's construction; docs/critic_fixes.md tells its story):
    [box_x, box_y, box_yaw, target_x, target_y] + A x [x, y, yaw, vx*2.0, vy*2.0, yaw_rate*0.25]
Positions are env-relative (m), yaws in [0, 2*pi), velocities in the agent's body frame scaled like MQE's observations.
The target has no yaw (it never rotates). Every agent's critic sees this same state ("EP" state). The Isaac Gym adapter builds its Scene from MQE's
buffers (`mapush_isaacgym.scene_from_mqe`).
"""
from __future__ import annotations

from typing import Tuple

import torch

from mapush_env import Scene

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
