"""MAPush's mid-level pushing tasks (`go1push_mid`: cuboid, T-block, cylinder) as MQE's wrapper defines them:
the `Scene` both backends report, the three tasks' records, observations, rewards and termination, and the action
contract. Pure torch and no simulator: both backends import this module, and it imports nothing from the project.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch

TWO_PI = 2.0 * math.pi


class Scene(NamedTuple):
    """Physical state of E envs with A agents, all tensors on the env's device (`env.scene()`)."""

    box_xy: torch.Tensor  # [E, 2] env-relative, m
    box_yaw: torch.Tensor  # [E] in [0, 2*pi)
    target_xy: torch.Tensor  # [E, 2] env-relative, m
    agent_xy: torch.Tensor  # [E, A, 2] env-relative, m
    agent_yaw: torch.Tensor  # [E, A] in [0, 2*pi)
    agent_lin_vel: torch.Tensor  # [E, A, 2] body frame (forward, left), m/s
    agent_ang_vel: torch.Tensor  # [E, A] yaw rate, rad/s
    box_lin_vel: Optional[torch.Tensor] = None  # [E, 2] env (= world) frame, m/s
    box_ang_vel: Optional[torch.Tensor] = None  # [E] yaw rate, rad/s


class BackendUnavailable(ImportError):
    """A backend's simulator is not installed; the message says what to install."""


# Constants of every task (MQE's go1_push_mid_config.py, the same in MAPush's three task/<object>/config.py).
DT = 0.02  # one policy step, s (PhysX 5 ms x decimation 4)
EPISODE_STEPS = 1000  # 20 s; the time-out fires when the step counter exceeds it, i.e. on step 1001
ACTION_SCALE = 0.5  # command = 0.5 * clip(action, -1, 1): (vx, vy) m/s and yaw rate rad/s, body frame
SUCCESS_RADIUS = 1.0  # planar object-target distance, m
BOX_Z, AGENT_Z = 0.25, 0.30  # constant heights for the 3D distances of the approach and collision terms, m
REWARD_SCALES = {  # the collision scale is the task's (Task.collision_scale)
    "target": 0.00325,
    "approach": 0.00075,
    "push": 0.0015,
    "ocb": 0.004,
    "reach_target": 10.0,
    "exception": -5.0,
}
REWARD_TERMS = ("distance_to_target", "approach", "collision", "push", "ocb", "reach_target", "exception")


class Part(NamedTuple):
    """One link of the pushed object's URDF, in the object's frame."""

    shape: str  # "box" or "disc" (MQE's cylinder, seen from above)
    size: Tuple[float, ...]  # box: (length along x, width along y); disc: (radius,), m
    mass: float  # kg
    izz: float  # kg m^2, the URDF's (what PhysX uses)
    offset: Tuple[float, float]  # from the object's root, the URDF's base link, m


class Task(NamedTuple):
    """One of MAPush's mid-level tasks: what its `task/<object>/config.py` and object URDF set (spec section 12)."""

    num_agents: int
    parts: Tuple[Part, ...]  # the first is the root: its pose is the object's pose in observations and rewards
    friction_range: Tuple[float, float]  # the object's friction coefficient, drawn once per env (domain_rand)
    spawn_ring: Tuple[float, float]  # the agents' distance from the object's root at reset, m (init_base_pos_range.r)
    collision_radius: float  # agent-agent distance that ends the episode as an exception, m
    collision_scale: float  # rewards.scales.collision_punishment_scale
    vertex_list: Tuple[Tuple[float, float], ...]  # the OCB polygon (asset.vertex_list), object frame, counter-clockwise


TASKS = {
    "cuboid": Task(2, (Part("box", (1.2, 1.2), 4.0, 0.25, (0.0, 0.0)),), (0.5, 0.6), (1.2, 1.3), 0.25, -0.0025,
                   ((-0.6, -0.6), (0.6, -0.6), (0.6, 0.6), (-0.6, 0.6))),
    # SuperSmallTblock.urdf: a bar and a stem under a fixed joint; the OCB polygon is a trapezoid, not the T's outline
    "tblock": Task(2, (Part("box", (1.0, 0.5), 2.0, 0.01, (0.0, 0.0)), Part("box", (0.5, 0.5), 1.0, 0.01, (0.0, 0.5))),
                   (0.6, 0.7), (1.2, 1.3), 0.27, -0.0025, ((-0.5, -0.25), (0.5, -0.25), (0.25, 0.75), (-0.25, 0.75))),
    # BigCylinder.urdf (radius 1.5 m); the OCB polygon is a hexagon
    "cylinder": Task(3, (Part("disc", (1.5,), 10.0, 0.0417, (0.0, 0.0)),), (0.3, 0.4), (2.0, 2.5), 0.25, -0.0015,
                     ((-0.75, -1.30), (0.75, -1.30), (1.5, 0.0), (0.75, 1.30), (-0.75, 1.30), (-1.5, 0.0))),
}

def check_actions(env, actions) -> None:
    """The contract's actions: a float32 tensor [E, A, 3] on the env's device (ValueError naming the shape if not)."""
    expected = (env.num_envs, env.num_agents, env.action_dim)
    if not isinstance(actions, torch.Tensor):
        raise ValueError(f"actions must be a torch.Tensor of shape {expected}, got {type(actions).__name__}")
    if tuple(actions.shape) != expected or actions.dtype != torch.float32 or actions.device != env.device:
        raise ValueError(f"actions must be float32 of shape {expected} on {env.device}, "
                         f"got {actions.dtype} of shape {tuple(actions.shape)} on {actions.device}")


def rotate(xy: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Rotate planar vectors [..., 2] by yaw [...] (counter-clockwise)."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    x, y = xy[..., 0], xy[..., 1]
    return torch.stack([c * x - s * y, s * x + c * y], dim=-1)


def observations(box_xy, box_yaw, target_xy, agent_xy, agent_yaw) -> torch.Tensor:
    """MQE's per-agent observation [E, A, 2 + 3A] in each agent's heading frame (as MQE's wrapper)."""
    num_agents = agent_xy.shape[1]
    to_ego = -agent_yaw  # [E, A]
    parts = [
        rotate(target_xy.unsqueeze(1) - agent_xy, to_ego),
        rotate(box_xy.unsqueeze(1) - agent_xy, to_ego),
        torch.remainder(box_yaw.unsqueeze(1) - agent_yaw, TWO_PI).unsqueeze(-1),
    ]
    for shift in range(1, num_agents):  # agent k sees agent (k - shift) mod A, as torch.roll does in MQE
        other_xy = torch.roll(agent_xy, shift, dims=1)
        other_yaw = torch.roll(agent_yaw, shift, dims=1)
        parts.append(rotate(other_xy - agent_xy, to_ego))
        parts.append(torch.remainder(other_yaw - agent_yaw, TWO_PI).unsqueeze(-1))
    return torch.cat(parts, dim=-1)


def nearest_face_normal(q: torch.Tensor, vertex_list) -> torch.Tensor:
    """Inward normal [..., 2] (object frame) of the OCB polygon's edge nearest to the object-frame points q [..., 2].

    As MQE's `calc_normal_vector_for_obc_reward` (`go1_push_mid_wrapper.py`): the polygon is the task's counter-
    clockwise `vertex_list`, edge k runs from vertex k to vertex k + 1, and its inward normal is its unit direction
    turned left. Each edge's distance is the smallest of three candidates: the perpendicular distance while the foot
    of the perpendicular lies on the edge, and the plain distances to its two vertices. The two edges sharing a
    corner compute that corner's distance with the same operations, so past a corner they tie bitwise and the lower
    edge index wins (first minimum).
    """
    start = q.new_tensor(vertex_list)  # [V, 2]
    edge = torch.roll(start, -1, dims=0) - start  # [V, 2]
    unit = edge / torch.linalg.vector_norm(edge, dim=-1, keepdim=True)
    to_start = q.unsqueeze(-2) - start  # [..., V, 2]
    to_end = torch.roll(to_start, -1, dims=-2)  # q - the edge's end vertex: the next edge's `to_start`, same bits
    on_edge = ((to_start * edge).sum(-1) >= 0) & ((to_end * edge).sum(-1) <= 0)
    perpendicular = (to_start[..., 0] * unit[:, 1] - to_start[..., 1] * unit[:, 0]).abs()
    candidates = torch.stack([torch.where(on_edge, perpendicular, torch.full_like(perpendicular, math.inf)),
                              torch.linalg.vector_norm(to_start, dim=-1), torch.linalg.vector_norm(to_end, dim=-1)])
    nearest = torch.argmin(candidates.amin(0), dim=-1)  # first minimum on ties
    return torch.stack([-unit[:, 1], unit[:, 0]], dim=-1)[nearest]


def termination(box_target_dist, agent_xy, step_count, collision_radius: float):
    """(success, exception, time_out), bool [E] each, from the post-physics state (as MQE).

    box_target_dist [E] is the planar object-target distance, agent_xy [E, A, 2], step_count [E]; an exception is
    any pair of agents closer than `collision_radius`.
    """
    success = box_target_dist < SUCCESS_RADIUS
    num_agents = agent_xy.shape[1]
    pair_dist = torch.cdist(agent_xy, agent_xy) + torch.eye(num_agents, device=agent_xy.device) * 1e6  # skip i == j
    exception = (pair_dist < collision_radius).flatten(1).any(1)
    return success, exception, step_count > EPISODE_STEPS


def task_rewards(
    box_xy, box_yaw, box_vel, target_xy, agent_xy, prev_dist, success, exception, nonfinite, task: Task
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-agent rewards [E, A] (no team sum) and each term summed over agents [E] (MQE's seven terms): the shared
    terms go to every agent, the approach and OCB terms are each agent's, and each pair of agents' collision term
    goes to both of them (MQE's loops over i < j)."""
    num_envs, num_agents, _ = agent_xy.shape
    s = REWARD_SCALES
    dist = torch.linalg.vector_norm(box_xy - target_xy, dim=-1)
    shared = {
        "distance_to_target": s["target"] * 100.0 * (2.0 * (prev_dist - dist) - 0.01 * dist),
        "push": s["push"] * (torch.linalg.vector_norm(box_vel, dim=-1) > 0.1).float(),
        "reach_target": s["reach_target"] * success.float(),
        "exception": s["exception"] * (exception.float() + (nonfinite > 0).float()),
    }
    dz = BOX_Z - AGENT_Z
    box_dist = torch.sqrt(((box_xy.unsqueeze(1) - agent_xy) ** 2).sum(-1) + dz * dz)  # [E, A]
    approach = -s["approach"] * (box_dist + 0.5) ** 2
    pair_dist = torch.cdist(agent_xy, agent_xy)  # [E, A, A]; agents share one height
    pair_term = task.collision_scale / (0.02 + pair_dist / 3.0)
    pair_term = pair_term * (1.0 - torch.eye(num_agents, device=agent_xy.device))
    collision = pair_term.sum(-1)  # each pair counts for both agents
    to_target = target_xy - box_xy
    u = to_target / torch.linalg.vector_norm(to_target, dim=-1, keepdim=True)
    q = rotate(agent_xy - box_xy.unsqueeze(1), -box_yaw.unsqueeze(1))
    normal = rotate(nearest_face_normal(q, task.vertex_list), box_yaw.unsqueeze(1))
    ocb = s["ocb"] * (normal * u.unsqueeze(1)).sum(-1)
    reward = sum(shared.values()).unsqueeze(1) + approach + collision + ocb
    terms = {name: value for name, value in shared.items()}
    terms["approach"] = approach.sum(1)
    terms["collision"] = collision.sum(1) / 2.0  # once per pair
    terms["ocb"] = ocb.sum(1)
    return reward, {name: terms[name] for name in REWARD_TERMS}
