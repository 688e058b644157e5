"""MAPush's mid-level pushing tasks (`go1push_mid`: cuboid, T-block, cylinder) behind one contract, and the embedded
VMAS backend.

The contract of both backends (README, "Code tour"): `make_env`, `Scene`, `ActionRepeat`, `evaluate`.
- `vmas` (default, this file): a planar re-creation on VMAS's rigid-body `World` (physics only). Resets,
  observations, rewards and termination follow MQE's `Go1PushMidWrapper`; docs/embedded_task.md has the physics.
- `isaacgym` (`mapush_isaacgym.py`, imported only when chosen): a thin adapter over MQE's `make_mqe_env`.

    env = make_env("vmas", num_envs=512, device="cpu", seed=0, task="cuboid")
    obs = env.reset()                               # [E, A, 2 + 3A]
    obs, reward, done, info = env.step(actions)     # actions [E, A, 3]; reward [E, A] per agent; done [E]
"""
from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional, Tuple

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


BACKENDS = ("vmas", "isaacgym")


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

# Surrogate dynamics (docs/embedded_task.md; the friction and controller values are our estimates).
GROUND_FRICTION = 0.1  # the terrain's coefficient; PhysX averages it with the object's
GRAVITY = 9.81
AGENT_MASS = 11.31  # Go1, kg
AGENT_FOOTPRINT = (0.66, 0.29)  # Go1 planar footprint, m
AGENT_DISC_RADIUS = math.sqrt(AGENT_FOOTPRINT[0] * AGENT_FOOTPRINT[1] / math.pi)  # same area as the footprint
TAU_LIN, TAU_YAW = 0.25, 0.20  # first-order lag of the locomotion controller's reference velocity, s
TAU_TRACK = 0.05  # how stiffly the body follows that reference (a P controller on velocity), s
MAX_DRIVE_FORCE = 50.0  # traction limit of the legs, N (~0.55 x 111 N)
MAX_DRIVE_TORQUE = 20.0  # N m
MAX_SPEED = 1.0  # PhysX max_depenetration_velocity: overlapping spawns separate at <= 1 m/s
CONTACT_STIFFNESS = 1e4  # penalty contact, N/m (5 mm penetration at the full drive force)


def make_env(backend: str = "vmas", num_envs: int = 512, device="cpu", seed: int = 0, task: str = "cuboid",
             **options):
    """Build `task` on `backend` with `num_envs` parallel envs on `device`; see the module docstring."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available tasks: {', '.join(TASKS)}")
    if backend == "vmas":
        return VmasPushEnv(num_envs=num_envs, device=device, seed=seed, task=task, **options)
    if backend == "isaacgym":  # imported here: it needs Isaac Gym and MQE, which only this backend uses
        from mapush_isaacgym import IsaacGymPushEnv

        return IsaacGymPushEnv(num_envs=num_envs, device=device, seed=seed, task=task, **options)
    raise ValueError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")


def check_actions(env, actions) -> None:
    """The contract's actions: a float32 tensor [E, A, 3] on the env's device (ValueError naming the shape if not)."""
    expected = (env.num_envs, env.num_agents, env.action_dim)
    if not isinstance(actions, torch.Tensor):
        raise ValueError(f"actions must be a torch.Tensor of shape {expected}, got {type(actions).__name__}")
    if tuple(actions.shape) != expected or actions.dtype != torch.float32 or actions.device != env.device:
        raise ValueError(f"actions must be float32 of shape {expected} on {env.device}, "
                         f"got {actions.dtype} of shape {tuple(actions.shape)} on {actions.device}")


def _pick(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per env (mask [E]), `new` where the mask holds, else `old`; any trailing dims."""
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


class ActionRepeat:
    """Each action is held for `k` env steps (0.02 s each) and the k rewards are summed: one transition per k steps.

    The env runs unchanged at 50 Hz; only the policy decides less often. An env whose episode ends at substep j < k
    returns that step's flags, final observation and final scene, and the rewards up to and including it; it spends
    the remaining k - 1 - j substeps of its new episode at a zero command (standing), and returns the observation
    after them. info["env_steps"] [E] counts the env steps that belong to the returned transition (k unless the
    episode ended early). Any other attribute is the wrapped env's. k = 1 is the env itself plus info["env_steps"].
    """

    def __init__(self, env, k: int):
        if k < 1:
            raise ValueError(f"the action repeat must be >= 1, got {k}")
        self.env, self.k = env, k

    def __getattr__(self, name):  # only called for names the wrapper lacks
        if name == "env":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.env, name)

    def step(self, actions: torch.Tensor):
        obs, reward, done, info = self.env.step(actions)
        info = dict(info)
        env_steps = torch.ones(done.shape, dtype=torch.long, device=done.device)
        for _ in range(self.k - 1):
            live = ~done  # the transition's episode is still running before this substep
            obs, step_reward, step_done, step_info = self.env.step(actions * live.view(-1, 1, 1))
            reward = reward + step_reward * live.unsqueeze(1)
            env_steps += live
            done = done | step_done
            for key in ("success", "time_out", "exception"):
                info[key] = _pick(live, step_info[key], info[key])
            if "final_obs" in info:
                info["final_obs"] = _pick(live, step_info["final_obs"], info["final_obs"])
                info["final_scene"] = type(info["final_scene"])(
                    *(_pick(live, new, old) for new, old in zip(step_info["final_scene"], info["final_scene"])))
            info["reward_terms"] = {name: value + step_info["reward_terms"][name]
                                    for name, value in info["reward_terms"].items()}
            for key in ("nonfinite_obs", "nonfinite_reward"):
                if key in info:
                    info[key] = info[key] + step_info[key]
        info["env_steps"] = env_steps
        return obs, reward, done, info


@torch.no_grad()
def evaluate(policy: Callable[[torch.Tensor], torch.Tensor], env) -> Tuple[float, float]:
    """MAPush's success-rate calculator: `policy` maps observations [E, A, obs_dim] to actions [E, A, 3]; each env's
    first episode counts, failures take 20 s. Returns (success rate, mean completion time in s)."""
    obs = env.reset()
    finished = torch.zeros(env.num_envs, dtype=torch.bool, device=env.device)
    success = torch.zeros_like(finished)
    completion = torch.full((env.num_envs,), env.episode_steps * DT, device=env.device)
    elapsed = torch.zeros(env.num_envs, device=env.device)  # env steps of each env's first episode so far
    for _ in range(env.episode_steps + 1):  # every decision takes at least one env step
        obs, _, done, info = env.step(policy(torch.where(torch.isfinite(obs), obs, torch.zeros_like(obs))))
        elapsed = elapsed + info.get("env_steps", 1)  # > 1 under ActionRepeat
        first = done & ~finished
        completion = torch.where(first & info["success"], elapsed * DT, completion)
        success |= first & info["success"]
        finished |= done
        if bool(finished.all()):
            break
    return success.float().mean().item(), completion.mean().item()


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


try:  # the embedded backend's physics engine; the contract and the formulas above work without it
    from vmas.simulator.scenario import BaseScenario
except ImportError:  # PushScenario.make_world then raises BackendUnavailable
    BaseScenario = object

ENV_STATE_VERSION = 2  # VmasPushEnv.state_dict's layout; 2: per-env reset rows, the friction drawn at the first reset


class PushScenario(BaseScenario):
    """The task as a VMAS scenario: one source of truth for the embedded backend's physics, resets, observations,
    rewards and termination, loadable by VMAS's own tools and those built on them (TorchRL's VmasEnv, BenchMARL):

        env = vmas.make_env(PushScenario(), num_envs=512, seed=0, task="cuboid", clamp_actions=True)

    VMAS semantics: actions are a list of A tensors [E, 3] in [-1, 1] (MQE's action scale and the locomotion
    controller's lag are applied in `process_action`), `reward(agent)` is that agent's reward [E], `done()` [E], and
    `info(agent)` has the env's success, time_out and exception flags [E]. Nothing resets inside: VMAS's `reset_at(i)`
    (or TorchRL's auto-reset, which calls it per done env) does. `VmasPushEnv` below is this scenario with this
    project's contract (auto-reset, final scene, exact resume) on top.

    Random numbers: each env's reset draws one row of 3 + 6A uniforms (box yaw; target radius and angle; the agents'
    ring radii, ring angles, yaws, spawn velocities and yaw rates) from `rng` (default: torch's global generator,
    which `vmas.make_env(seed=...)` seeds); the first reset draws every env's object friction before its rows. A reset
    of n envs at once draws its n rows in env order, so on the CPU it consumes the generator exactly as n single-env
    resets in ascending order do (torch's CPU `rand` fills a tensor element by element).
    """

    rng: Optional[torch.Generator] = None

    def make_world(self, batch_dim: int, device, task: str = "cuboid", agent_shape: str = "disc", substeps: int = 2):
        try:
            from vmas.simulator.core import Agent, Box, Landmark, Sphere, World
            from vmas.simulator.dynamics.holonomic_with_rot import HolonomicWithRotation
        except ImportError as err:
            raise BackendUnavailable(f"the vmas backend needs VMAS: pip install -r requirements.txt ({err})") from None
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; available tasks: {', '.join(TASKS)}")
        if agent_shape not in ("disc", "box"):
            raise ValueError(f"agent_shape must be 'disc' or 'box', got {agent_shape!r}")
        self.task_name, self.task = task, TASKS[task]
        self.num_envs, self.num_agents = batch_dim, self.task.num_agents
        self.obs_dim, self.action_dim, self.episode_steps = 2 + 3 * self.num_agents, 3, EPISODE_STEPS
        self.device = torch.device(device)
        single = len(self.task.parts) == 1
        # A compound object is made rigid after every physics substep (`_make_rigid`), so VMAS steps one substep at
        # a time for it (the world's `step` below runs them); done once per 0.02 s step, the projection let a link
        # squeezed between two agents oscillate with a growing amplitude.
        world = World(batch_dim, self.device, dt=DT if single else DT / substeps, substeps=substeps if single else 1,
                      drag=0.0, collision_force=CONTACT_STIFFNESS)
        # The rigid body the links make (constants; `_make_rigid`): mass, centre of mass and links in the root's frame.
        masses = torch.tensor([p.mass for p in self.task.parts], device=self.device)
        offsets = torch.tensor([p.offset for p in self.task.parts], device=self.device)  # [P, 2]
        self.part_masses, com = masses, (masses.unsqueeze(-1) * offsets).sum(0) / masses.sum()
        self.part_offsets = offsets - com  # from the centre of mass, root frame
        self.rigid_izz = sum(p.izz for p in self.task.parts) + float((masses * (self.part_offsets ** 2).sum(-1)).sum())
        self.rigid_error = torch.zeros(batch_dim, device=self.device)  # how far the links drifted apart in a step
        self.parts, self.friction_scales = [], []  # the object's links (the first, "box", is its root)
        for i, part in enumerate(self.task.parts):
            # A link of a compound object moves within a step as the whole object would (its mass and yaw inertia);
            # `_make_rigid` then adds up the links' impulses. Each link's ground friction stays its own share.
            mass, izz = (part.mass, part.izz) if single else (float(masses.sum()), self.rigid_izz)
            shape = Box(*part.size) if part.shape == "box" else Sphere(part.size[0])
            # VMAS derives Izz from a uniform solid; PhysX uses the URDF's. (A shape subclass would drop out of VMAS's
            # collidable shape pairs, so the instance gets the override.)
            shape.moment_of_inertia = lambda _, izz=izz: izz
            # PhysX's contacts with the ground lie at a box's corners and a disc's rim: spin friction acts there.
            arm = math.hypot(part.size[0] / 2, part.size[1] / 2) if part.shape == "box" else part.size[0]
            # VMAS friction: the linear coefficient is a deceleration (force / mass), the angular one a torque / Izz.
            self.friction_scales.append((GRAVITY * part.mass / mass, GRAVITY * part.mass * arm / izz))
            entity = Landmark("box" if i == 0 else f"box_part{i}", shape=shape, movable=True, rotatable=True,
                              mass=mass, linear_friction=torch.zeros(batch_dim, 1, device=self.device),
                              angular_friction=torch.zeros(batch_dim, 1, device=self.device),
                              collision_filter=lambda other: other not in self.parts)  # links never collide
            world.add_landmark(entity)
            self.parts.append(entity)
        self.box = self.parts[0]
        self.box_mu: Optional[torch.Tensor] = None  # [E, 1], drawn at the first reset, kept across episodes
        self.agents = []
        for i in range(self.num_agents):
            shape = Sphere(AGENT_DISC_RADIUS) if agent_shape == "disc" else Box(*AGENT_FOOTPRINT)
            # The action VMAS hands to the dynamics is the drive (force x, force y, torque) that `process_action`
            # computes from the command; u_range bounds the command as MQE clips it.
            agent = Agent(f"go1_{i}", shape=shape, mass=AGENT_MASS, max_f=MAX_DRIVE_FORCE, max_t=MAX_DRIVE_TORQUE,
                          max_speed=MAX_SPEED, u_range=1.0, dynamics=HolonomicWithRotation())
            world.add_agent(agent)
            self.agents.append(agent)
        self.agent_inertia = self.agents[0].moment_of_inertia
        zeros = torch.zeros(batch_dim, 2, device=self.device)
        for entity in world.entities:
            entity.state.pos, entity.state.vel = zeros.clone(), zeros.clone()
            entity.state.rot, entity.state.ang_vel = zeros[:, :1].clone(), zeros[:, :1].clone()
        self.target_xy = zeros.clone()
        self.v_ref = torch.zeros(batch_dim, self.num_agents, 3, device=self.device)  # controller's lagged command
        self.step_count = torch.zeros(batch_dim, dtype=torch.long, device=self.device)
        self.prev_dist = torch.zeros(batch_dim, device=self.device)
        self.lag = torch.tensor([1 - math.exp(-DT / TAU_LIN)] * 2 + [1 - math.exp(-DT / TAU_YAW)], device=self.device)
        self.outcome: Dict[str, torch.Tensor] = {}  # the last step's results (`post_step`)
        if not single:
            substep = world.step

            def step():  # VMAS's Environment and VmasPushEnv both call it once per 0.02 s step
                drift = torch.zeros_like(self.rigid_error)
                for _ in range(substeps):
                    before = self._rigid_state()
                    substep()
                    self._make_rigid(before, world.dt)
                    drift = torch.maximum(drift, self.rigid_error)
                self.rigid_error = drift

            world.step = step
        return world

    # -- state access -------------------------------------------------------------------------------------------
    def _agents_state(self):
        xy = torch.stack([a.state.pos for a in self.agents], dim=1)  # [E, A, 2]
        yaw = torch.remainder(torch.cat([a.state.rot for a in self.agents], dim=1), TWO_PI)  # [E, A]
        vel = torch.stack([a.state.vel for a in self.agents], dim=1)  # [E, A, 2] world frame
        ang_vel = torch.cat([a.state.ang_vel for a in self.agents], dim=1)  # [E, A]
        return xy, yaw, vel, ang_vel

    def _box_state(self):
        return self.box.state.pos, torch.remainder(self.box.state.rot[:, 0], TWO_PI)

    def scene(self) -> Scene:
        xy, yaw, vel, ang_vel = self._agents_state()
        box_xy, box_yaw = self._box_state()
        return Scene(box_xy, box_yaw, self.target_xy, xy, yaw, rotate(vel, -yaw), ang_vel, self.box.state.vel,
                     self.box.state.ang_vel[:, 0])

    def _observe(self) -> torch.Tensor:
        xy, yaw, _, _ = self._agents_state()
        box_xy, box_yaw = self._box_state()
        obs = observations(box_xy, box_yaw, self.target_xy, xy, yaw)
        return torch.where(torch.isfinite(obs), obs, torch.zeros_like(obs))

    # -- reset ------------------------------------------------------------------------------------------------
    def reset_world_at(self, env_index: Optional[int] = None) -> None:
        mask = torch.full((self.num_envs,), env_index is None, dtype=torch.bool, device=self.device)
        if self.box_mu is None:  # the first reset, after `vmas.make_env(seed=...)` seeded the generator
            self._draw_friction()
        if env_index is not None:
            mask[env_index] = True
        self._reset_envs(mask)

    def _draw_friction(self) -> None:
        """The object's friction coefficient per env (MQE's domain_rand, drawn once per env): PhysX averages the
        object's with the ground's."""
        low, high = self.task.friction_range
        low, high = (low + GROUND_FRICTION) / 2, (high + GROUND_FRICTION) / 2
        self._set_friction(low + (high - low) * torch.rand((self.num_envs, 1), generator=self.rng, device=self.device))

    def _set_friction(self, mu: torch.Tensor) -> None:
        self.box_mu = mu
        for entity, (linear, angular) in zip(self.parts, self.friction_scales):
            entity.linear_friction = mu * linear
            entity._angular_friction = mu * angular  # VMAS has no setter for this one

    def _reset_envs(self, mask: torch.Tensor) -> None:
        """Resample the envs where mask [E] is True (MQE's reset distributions); the others keep their state."""
        E, A = self.num_envs, self.num_agents
        m1, m2 = mask.unsqueeze(-1), mask.view(E, 1, 1)
        rows = torch.zeros(E, 3 + 6 * A, device=self.device)  # one row of uniforms per resetting env, in env order
        index = mask.nonzero()[:, 0]
        rows[index] = torch.rand((len(index), rows.shape[1]), generator=self.rng, device=self.device)
        u = torch.split(rows, [1, 1, 1, A, A, A, 2 * A, A], dim=1)

        def uniform(column, low, high):
            return low + (high - low) * column

        box_xy = torch.tensor([12.0, 0.0], device=self.device).expand(E, 2)
        box_yaw = uniform(u[0], -0.01, TWO_PI)  # [E, 1]
        radius, angle = uniform(u[1], 1.5, 3.0), uniform(u[2], 0.0, TWO_PI)
        target_xy = box_xy + radius * torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
        radius = uniform(u[3], *self.task.spawn_ring).unsqueeze(-1)  # [E, A, 1]
        angle = uniform(u[4], -0.01, TWO_PI).unsqueeze(-1)
        agent_xy = box_xy.unsqueeze(1) + radius * torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
        agent_yaw = uniform(u[5], -0.01, TWO_PI)  # [E, A]
        agent_vel = uniform(u[6], -0.1, 0.1).view(E, A, 2)  # root velocity, world frame
        agent_ang_vel = uniform(u[7], -0.1, 0.1)
        zeros = torch.zeros(E, 2, device=self.device)
        for part, entity in zip(self.task.parts, self.parts):  # the links at rest around the root
            offset = rotate(box_xy.new_tensor(part.offset).expand(E, 2), box_yaw[:, 0])
            entity.state.pos = torch.where(m1, box_xy + offset, entity.state.pos)
            entity.state.vel = torch.where(m1, zeros, entity.state.vel)
            entity.state.rot = torch.where(m1, box_yaw, entity.state.rot)
            entity.state.ang_vel = torch.where(m1, zeros[:, :1], entity.state.ang_vel)
        for i, agent in enumerate(self.agents):
            agent.state.pos = torch.where(m1, agent_xy[:, i], agent.state.pos)
            agent.state.vel = torch.where(m1, agent_vel[:, i], agent.state.vel)
            agent.state.rot = torch.where(m1, agent_yaw[:, i : i + 1], agent.state.rot)
            agent.state.ang_vel = torch.where(m1, agent_ang_vel[:, i : i + 1], agent.state.ang_vel)
        # The controller starts from the spawn velocity, expressed in the body frame.
        v_ref = torch.cat([rotate(agent_vel, -agent_yaw), agent_ang_vel.unsqueeze(-1)], dim=-1)
        self.v_ref = torch.where(m2, v_ref, self.v_ref)
        self.target_xy = torch.where(m1, target_xy, self.target_xy)
        self.step_count = torch.where(mask, torch.zeros_like(self.step_count), self.step_count)
        # No spurious distance reward on the first step of an episode (MQE compares against the old episode).
        self.prev_dist = torch.where(mask, torch.linalg.vector_norm(box_xy - target_xy, dim=-1), self.prev_dist)
        # A reset env is not done (VMAS's callers, TorchRL's VmasEnv among them, read the flags after `reset_at`).
        if not self.outcome:
            self.outcome = {"reward": torch.zeros(E, A, device=self.device)}
        no = torch.zeros(E, dtype=torch.bool, device=self.device)
        for key in ("success", "time_out", "exception", "done"):
            self.outcome[key] = self.outcome.get(key, no) & ~mask

    # -- step -------------------------------------------------------------------------------------------------
    def drive(self, actions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The Go1s' locomotion controller for actions [E, A, 3]: the lagged body-frame command, tracked by a P
        controller on velocity. Returns the force [E, A, 2] (world frame) and torque [E, A] (VMAS caps both)."""
        command = ACTION_SCALE * actions.clamp(-1.0, 1.0)  # [E, A, 3] body-frame (vx, vy, yaw rate)
        self.v_ref = self.v_ref + self.lag * (command - self.v_ref)
        _, yaw, vel, ang_vel = self._agents_state()
        force = AGENT_MASS * (rotate(self.v_ref[..., :2], yaw) - vel) / TAU_TRACK
        torque = self.agent_inertia * (self.v_ref[..., 2] - ang_vel) / TAU_TRACK
        return force, torque

    def process_action(self, agent) -> None:
        # VMAS sets every agent's action before processing any, so the first agent's call drives them all.
        if agent is self.agents[0]:
            force, torque = self.drive(torch.stack([a.action.u for a in self.agents], dim=1))
            for i, a in enumerate(self.agents):
                a.action.u = torch.cat([force[:, i], torque[:, i : i + 1]], dim=-1)

    def post_step(self) -> None:
        """After the physics: the step's observations, rewards and termination, kept in `outcome` (as MQE's wrapper
        computes them from the post-physics state)."""
        self.step_count += 1
        scene = self.scene()
        box_xy, box_yaw, agent_xy = scene.box_xy, scene.box_yaw, scene.agent_xy
        raw_obs = observations(box_xy, box_yaw, self.target_xy, agent_xy, scene.agent_yaw)
        finite = torch.isfinite(raw_obs)
        nonfinite = (~finite).flatten(1).sum(1)  # [E] entries zeroed; such an env is punished, not reset (as MQE)
        dist = torch.linalg.vector_norm(box_xy - self.target_xy, dim=-1)
        success, exception, time_out = termination(dist, agent_xy, self.step_count, self.task.collision_radius)
        reward, terms = task_rewards(box_xy, box_yaw, self.box.state.vel, self.target_xy, agent_xy, self.prev_dist,
                                     success, exception, nonfinite, self.task)
        self.prev_dist = dist
        self.outcome = {
            "obs": torch.where(finite, raw_obs, torch.zeros_like(raw_obs)), "reward": reward, "reward_terms": terms,
            "success": success, "time_out": time_out, "exception": exception,
            "done": success | exception | time_out, "nonfinite_obs": nonfinite, "scene": scene,
        }

    def observation(self, agent) -> torch.Tensor:
        return self._observe()[:, self.agents.index(agent)]  # from the state: also right after a reset_at

    def reward(self, agent) -> torch.Tensor:
        return self.outcome["reward"][:, self.agents.index(agent)]

    def done(self) -> torch.Tensor:
        return self.outcome["done"]

    def info(self, agent) -> Dict[str, torch.Tensor]:
        return {key: self.outcome[key] for key in ("success", "time_out", "exception")}

    def _rigid_state(self):
        """The object's rigid motion at the start of a step: centre of mass, yaw, their rates, the links' velocities."""
        mass = self.part_masses.view(1, -1, 1)
        pos = torch.stack([e.state.pos for e in self.parts], dim=1)  # [E, P, 2]
        vel = torch.stack([e.state.vel for e in self.parts], dim=1)
        return ((mass * pos).sum(1) / mass.sum(), self.box.state.rot, (mass * vel).sum(1) / mass.sum(),
                self.box.state.ang_vel, vel, torch.cat([e.state.ang_vel for e in self.parts], dim=1))

    def _make_rigid(self, before, dt: float) -> None:
        """Move the object's links as one rigid body. VMAS has no compound shapes and its joints are springs, so each
        link is simulated for one physics substep (`dt` s) with the whole object's mass and yaw inertia, as if it
        alone were the object; the impulses the links received (forces at their centres plus torques about them) then
        add up to the object's change of momentum and of angular momentum about its centre of mass, and the links are
        put back at their rigid places for the new motion (semi-implicit, as VMAS integrates). `rigid_error` [E] is
        how far a link had drifted from that place during the substep (docs/embedded_task.md)."""
        com, yaw, com_vel, omega, vel_before, spin_before = before
        pos = torch.stack([e.state.pos for e in self.parts], dim=1)  # [E, P, 2]
        vel = torch.stack([e.state.vel for e in self.parts], dim=1)
        spin = torch.cat([e.state.ang_vel for e in self.parts], dim=1)  # [E, P]
        total_mass = float(self.part_masses.sum())
        impulse = total_mass * (vel - vel_before)  # [E, P, 2] each link was simulated with the whole mass
        arm = rotate(self.part_offsets, yaw)  # [E, P, 2] from the centre of mass, before the step
        turn = self.rigid_izz * (spin - spin_before) + arm[..., 0] * impulse[..., 1] - arm[..., 1] * impulse[..., 0]
        com_vel = com_vel + impulse.sum(1) / total_mass
        omega = omega + turn.sum(1, keepdim=True) / self.rigid_izz  # [E, 1]
        com, yaw = com + com_vel * dt, yaw + omega * dt
        arm = rotate(self.part_offsets, yaw)
        rigid = com.unsqueeze(1) + arm
        self.rigid_error = torch.linalg.vector_norm(pos - rigid, dim=-1).amax(1)
        for i, entity in enumerate(self.parts):
            entity.state.pos, entity.state.rot = rigid[:, i], yaw.clone()
            entity.state.vel = com_vel + omega * torch.stack([-arm[:, i, 1], arm[:, i, 0]], dim=-1)
            entity.state.ang_vel = omega.clone()


class VmasPushEnv(PushScenario):
    """`go1push_mid` on VMAS physics with this project's contract: the scenario above, stepped without VMAS's
    `Environment` (every agent driven at once), with auto-reset, the final scene and an exact `state_dict`."""

    def __init__(self, num_envs: int, device="cpu", seed: int = 0, task: str = "cuboid", agent_shape: str = "disc",
                 substeps: int = 2):
        super().__init__()
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(seed)
        self.env_make_world(num_envs, device, task=task, agent_shape=agent_shape, substeps=substeps)

    def state_dict(self) -> dict:
        """The full dynamic state (for exact resumption)."""
        bodies = {e.name: [e.state.pos, e.state.vel, e.state.rot, e.state.ang_vel] for e in self.world.entities}
        return {"version": ENV_STATE_VERSION, "bodies": bodies, "box_mu": self.box_mu, "target_xy": self.target_xy,
                "v_ref": self.v_ref, "step_count": self.step_count, "prev_dist": self.prev_dist,
                "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> torch.Tensor:
        """Restore a `state_dict()`; returns the current observation."""
        if state.get("version") != ENV_STATE_VERSION:
            raise ValueError("its env state was saved before commit f5e0968 changed the embedded env's random "
                             "stream; continue that run with the commit it started with")
        for entity in self.world.entities:
            pos, vel, rot, ang_vel = (x.to(self.device) for x in state["bodies"][entity.name])
            entity.state.pos, entity.state.vel, entity.state.rot, entity.state.ang_vel = pos, vel, rot, ang_vel
        for name in ("target_xy", "v_ref", "step_count", "prev_dist"):
            setattr(self, name, state[name].to(self.device))
        self.rng.set_state(state["rng"].cpu())
        self._set_friction(state["box_mu"].to(self.device))
        return self._observe()

    def reset(self) -> torch.Tensor:
        self.reset_world_at(None)
        return self._observe()

    def randomize_episode_start(self) -> None:
        """Draw every env's step counter from {0, ..., EPISODE_STEPS - 1}, so the first episodes time out at
        different steps and the envs stop moving in lockstep; the scene is unchanged."""
        self.step_count = torch.randint(0, EPISODE_STEPS, (self.num_envs,), generator=self.rng, device=self.device)

    def step(self, actions: torch.Tensor):
        check_actions(self, actions)
        force, torque = self.drive(actions)
        for i, agent in enumerate(self.agents):
            agent.state.force = force[:, i]
            agent.state.torque = torque[:, i : i + 1]
        self.world.step()
        self.post_step()
        out = dict(self.outcome)  # the step's results, before a reset clears the flags of the envs it resets
        info = {key: out[key] for key in ("success", "time_out", "exception", "reward_terms", "nonfinite_obs")}
        info.update(final_obs=out["obs"], final_scene=out["scene"])
        obs, done = out["obs"], out["done"]
        if bool(done.any()):
            self._reset_envs(done)
            obs = self._observe()
        return obs, out["reward"], done, info
