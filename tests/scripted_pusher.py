"""A hand-written two-agent pusher: walk around the box to the side opposite the target, then push toward it."""
import torch

from mapush_task import ACTION_SCALE, TASKS, rotate
from mapush_vmas import AGENT_DISC_RADIUS

BOX_SIZE = TASKS["cuboid"].parts[0].size[0]

LANE = BOX_SIZE / 2 * 2**0.5 + AGENT_DISC_RADIUS + 0.15  # clears the box's corners while walking around it
BEHIND = -(BOX_SIZE / 2 + AGENT_DISC_RADIUS + 0.2)


def scripted_actions(scene) -> torch.Tensor:
    """Actions [E, 2, 3] for the scene's two agents (world-frame plan, sent as body-frame commands)."""
    to_target = scene.target_xy - scene.box_xy
    u = to_target / torch.linalg.vector_norm(to_target, dim=-1, keepdim=True)  # [E, 2]
    w = torch.stack([-u[:, 1], u[:, 0]], dim=-1)
    rel = scene.agent_xy - scene.box_xy.unsqueeze(1)  # [E, 2, 2]
    a_u = (rel * u.unsqueeze(1)).sum(-1)
    a_w = (rel * w.unsqueeze(1)).sum(-1)
    # The agent further to the left (w > 0) takes the left lane, the other the right one.
    side = torch.where(a_w[:, :1] >= a_w[:, 1:], torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 1.0]))
    pushing = (a_u < -BOX_SIZE / 2) & (a_w.abs() < LANE - 0.3)  # behind the box: push toward the target
    behind = a_u < BEHIND  # behind the box but off to the side: close in on the face
    in_lane = a_w.abs() >= LANE - 0.1
    # Waypoints in the (u, w) frame: out to the lane, back along it, in behind the box, then forward.
    goal_u = torch.where(pushing, a_u + 0.5, torch.where(in_lane & ~behind, torch.full_like(a_u, BEHIND - 0.3), a_u))
    goal_w = torch.where(behind | pushing, side * 0.2, side * LANE)
    direction = torch.stack([goal_u - a_u, goal_w - a_w], dim=-1)
    direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp(min=1e-6)
    velocity = direction[..., :1] * u.unsqueeze(1) + direction[..., 1:] * w.unsqueeze(1)  # world frame, unit
    body = rotate(velocity, -scene.agent_yaw)
    actions = torch.zeros(*scene.agent_yaw.shape, 3)
    actions[..., :2] = body  # |command| = 0.5 m/s along the planned direction
    return actions / ACTION_SCALE * 0.5
