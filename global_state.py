"""The centralized critic's input: a `Scene` (physical state of a batch of envs) -> the global state.

`global-state`, the documented fix, for A agents (the heterogeneous-MAPush fork's construction; docs/critic_fixes.md):
    [box_x, box_y, box_yaw, target_x, target_y] + A x [x, y, yaw, vx*2.0, vy*2.0, yaw_rate*0.25]
Positions are env-relative (m), yaws in [0, 2*pi), velocities in the agent's body frame scaled like MQE's observations.
The target has no yaw (it never rotates). Every agent's critic sees this same state ("EP" state).

`global-state-full`, the trainer's default (docs/results.md has the measurement): the object's velocity and yaw rate
too (the push reward depends on its speed, and it slides on after contact), and every yaw as (cos, sin), continuous
where the raw angle jumps at 0 = 2*pi:
    [box_x, box_y, cos, sin, box_vx*2.0, box_vy*2.0, box_yaw_rate*0.25, target_x, target_y]
    + A x [x, y, cos, sin, vx*2.0, vy*2.0, yaw_rate*0.25]
The object's velocity is in the env frame (its axes are the world's). The Isaac Gym adapter builds its Scene from
MQE's buffers (`mapush_isaacgym.scene_from_mqe`).
"""
from __future__ import annotations

from typing import Tuple

import torch

from mapush_task import Scene

LIN_VEL_SCALE = 2.0  # MQE's normalization.obs_scales.lin_vel, applied to the global state as MQE applies it to obs
ANG_VEL_SCALE = 0.25  # MQE's normalization.obs_scales.ang_vel
LAYOUTS = ("global-state", "global-state-full")


def global_state_dim(num_agents: int, layout: str = "global-state") -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown global-state layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return {"global-state": 5 + 6 * num_agents, "global-state-full": 9 + 7 * num_agents}[layout]


def sanitize(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace NaN/Inf by 0; return the clean tensor and how many entries were replaced (0-dim, on device)."""
    finite = torch.isfinite(x)
    return torch.where(finite, x, torch.zeros_like(x)), (~finite).sum()


def build_global_state(scene: Scene, layout: str = "global-state") -> Tuple[torch.Tensor, torch.Tensor]:
    """Scene -> (global state [E, global_state_dim(A, layout)], number of non-finite entries zeroed)."""
    num_envs, num_agents = scene.agent_yaw.shape
    global_state_dim(num_agents, layout)  # an unknown layout is an error, never a silent 17-dim state
    full = layout == "global-state-full"  # yaws as (cos, sin)

    def angle(yaw):  # [..., 1] raw, or [..., 2] as (cos, sin)
        return torch.stack([torch.cos(yaw), torch.sin(yaw)], dim=-1) if full else yaw.unsqueeze(-1)

    per_agent = torch.cat(
        [
            scene.agent_xy,
            angle(scene.agent_yaw),
            scene.agent_lin_vel * LIN_VEL_SCALE,
            scene.agent_ang_vel.unsqueeze(-1) * ANG_VEL_SCALE,
        ],
        dim=-1,
    )  # [E, A, 6] or [E, A, 7]
    box = [scene.box_xy, angle(scene.box_yaw)]
    if full:  # the object's velocity
        if scene.box_lin_vel is None or scene.box_ang_vel is None:
            raise ValueError(f"--critic-input {layout} needs the object's velocity: the env's Scene has no "
                             "box_lin_vel / box_ang_vel (use --critic-input global-state)")
        box += [scene.box_lin_vel * LIN_VEL_SCALE, scene.box_ang_vel.unsqueeze(-1) * ANG_VEL_SCALE]
    state = torch.cat(box + [scene.target_xy, per_agent.reshape(num_envs, -1)], dim=-1)
    return sanitize(state)

