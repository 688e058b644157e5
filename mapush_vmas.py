"""The embedded backend: MAPush's mid-level tasks on VMAS's rigid-body `World` (physics only).

Resets, observations, rewards and termination follow MQE's `Go1PushMidWrapper` (`mapush_task`); the surrogate
dynamics are in docs/embedded_task.md. `PushScenario` is the task as a VMAS scenario; `VmasPushEnv` adds this
project's contract (auto-reset, the final scene, an exact `state_dict`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from mapush_task import (ACTION_SCALE, DT, EPISODE_STEPS, TASKS, TWO_PI,
                         BackendUnavailable, Scene, check_actions, observations, rotate, task_rewards,
                         termination)

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
            raise ValueError(f"its env state has layout version {state.get('version')}, this embedded env's is "
                             f"{ENV_STATE_VERSION}; continue that run with the code it started with")
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
