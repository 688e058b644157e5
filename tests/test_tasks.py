"""MAPush's three mid-level tasks on the embedded backend: sizes, spawn distributions, the OCB polygons, termination,
the 3-agent reward terms, the T-block's rigid links, and each task through training, evaluation and resume."""
import math

import pytest
import torch

import happo_mapush as H
import mapush_env as M
import mapush_task as T
import mapush_vmas as V
from global_state import build_global_state
from lifecycle import UsageError
from mapush_env import make_env
from mapush_task import TASKS, task_rewards
from mqe_reference import mqe_normals


@pytest.mark.parametrize("task, agents", [("cuboid", 2), ("tblock", 2), ("cylinder", 3)])
def test_sizes_per_task(task, agents):
    env = make_env("vmas", num_envs=4, seed=0, task=task)
    obs = env.reset()
    assert (env.num_agents, env.obs_dim) == (agents, 2 + 3 * agents) and obs.shape == (4, agents, 2 + 3 * agents)
    state, _ = build_global_state(env.scene())
    assert state.shape == (4, 5 + 6 * agents)
    obs, reward, done, info = env.step(torch.zeros(4, agents, 3))
    assert reward.shape == (4, agents) and info["final_obs"].shape == obs.shape


@pytest.mark.parametrize("task", list(TASKS))
def test_spawn_distributions(task):
    env = make_env("vmas", num_envs=4000, seed=1, task=task)
    env.reset()
    scene, spec = env.scene(), TASKS[task]
    root = scene.box_xy
    assert torch.equal(root, torch.tensor([12.0, 0.0]).expand(4000, 2))  # every object spawns at (12, 0)
    ring = torch.linalg.vector_norm(scene.agent_xy - root.unsqueeze(1), dim=-1)
    low, high = spec.spawn_ring
    assert ring.min() >= low - 1e-5 and ring.max() <= high + 1e-5
    assert ring.min() < low + 0.01 and ring.max() > high - 0.01  # the whole ring is used
    bearing = torch.atan2(scene.agent_xy[..., 1] - root[:, 1:], scene.agent_xy[..., 0] - root[:, :1])
    assert abs(torch.cos(bearing).mean()) < 0.03 and abs(torch.sin(bearing).mean()) < 0.03  # uniform angle
    target = torch.linalg.vector_norm(scene.target_xy - root, dim=-1)
    assert target.min() >= 1.5 - 1e-5 and target.max() <= 3.0 + 1e-5 and target.max() > 2.99
    assert abs(torch.cos(scene.box_yaw).mean()) < 0.03 and abs(torch.sin(scene.box_yaw).mean()) < 0.03
    mu_low, mu_high = ((f + V.GROUND_FRICTION) / 2 for f in spec.friction_range)  # PhysX's average combine
    assert env.box_mu.min() >= mu_low - 1e-6 and env.box_mu.max() <= mu_high + 1e-6
    for part, entity in zip(spec.parts, env.parts):  # the links at their places around the root
        expected = root + T.rotate(torch.tensor(part.offset).expand(4000, 2), scene.box_yaw)
        torch.testing.assert_close(entity.state.pos, expected)


@pytest.mark.parametrize("task", ["tblock", "cylinder"])
def test_ocb_polygon_normals_like_mqe_on_a_lattice(task):
    vertices = TASKS[task].vertex_list
    grid = torch.arange(-100, 101, dtype=torch.float64) * 0.025  # -2.5 .. 2.5 m, every vertex coordinate on it
    gx, gy = torch.meshgrid(grid, grid, indexing="ij")
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.stack([gx.flatten(), gy.flatten()], 1).float(), torch.tensor(vertices),
                        torch.randn(4000, 2, generator=gen) * 1.5])
    got, expected = T.nearest_face_normal(points, vertices), mqe_normals(points, vertices)
    assert not (got != expected).any(1).any()
    # every edge is somebody's nearest, and its normal points inward (towards the polygon's centroid)
    centroid = torch.tensor(vertices).mean(0)
    assert len(torch.unique(got, dim=0)) == len(vertices)
    start = torch.tensor(vertices)
    middle = (start + torch.roll(start, -1, 0)) / 2
    inward = T.nearest_face_normal(middle + 0.01 * (middle - centroid), vertices)
    assert bool(((inward * (centroid - middle)).sum(1) > 0).all())


def place(env, box_yaw, agent_xy):
    """A hand-built scene at rest: object root at (12, 0) with yaw, target at (14, 0), agents at agent_xy."""
    E = env.num_envs
    for part, entity in zip(env.task.parts, env.parts):
        xy = torch.tensor([12.0, 0.0]) + T.rotate(torch.tensor(part.offset), torch.tensor(box_yaw))
        entity.state.pos = xy.expand(E, 2).clone()
        entity.state.rot = torch.full((E, 1), float(box_yaw))
        entity.state.vel, entity.state.ang_vel = torch.zeros(E, 2), torch.zeros(E, 1)
    for i, agent in enumerate(env.agents):
        agent.state.pos = torch.tensor(agent_xy[i]).expand(E, 2).clone()
        agent.state.vel, agent.state.rot, agent.state.ang_vel = torch.zeros(E, 2), torch.zeros(E, 1), torch.zeros(E, 1)
    env.target_xy = torch.tensor([14.0, 0.0]).expand(E, 2).clone()
    env.v_ref, env.step_count = torch.zeros_like(env.v_ref), torch.zeros_like(env.step_count)
    env.prev_dist = torch.full((E,), 2.0)


@pytest.mark.parametrize("task", list(TASKS))
def test_collision_distance_per_task(task):
    # Two overlapping agents, far from the object, separate within one step; the episode ends as an exception iff
    # their distance after the step is below the task's threshold (MQE: 0.27 m for the T-block, else 0.25 m).
    env = make_env("vmas", num_envs=6, seed=0, task=task)
    env.reset()
    agents = [(5.0, 5.0 + 3.0 * i) for i in range(env.num_agents)]
    place(env, 0.0, agents)
    env.agents[1].state.pos = torch.tensor([[5.0 + gap, 5.0] for gap in (0.19, 0.2, 0.21, 0.22, 0.24, 0.3)])
    _, _, done, info = env.step(torch.zeros(6, env.num_agents, 3))
    distance = torch.linalg.vector_norm(info["final_scene"].agent_xy[:, 0] - info["final_scene"].agent_xy[:, 1], dim=-1)
    assert torch.equal(info["exception"], distance < TASKS[task].collision_radius)
    assert torch.equal(done, info["exception"])
    assert bool(((distance >= 0.25) & (distance < 0.27)).any())  # a case where the T-block and the others differ
    assert TASKS[task].collision_radius == (0.27 if task == "tblock" else 0.25)


def mqe_rewards_three_agents(box_xy, target_xy, agents, box_yaw, task):
    """MQE's wrapper loops (go1_push_mid_wrapper.py) for the approach, collision and OCB terms, per agent."""
    reward = [0.0] * len(agents)
    for i, (x, y) in enumerate(agents):
        d = math.sqrt((box_xy[0] - x) ** 2 + (box_xy[1] - y) ** 2 + (T.BOX_Z - T.AGENT_Z) ** 2)
        reward[i] += -((d + 0.5) ** 2) * 0.00075
    for i in range(len(agents)):
        for j in range(i + 1, len(agents)):
            d = math.dist(agents[i], agents[j])
            reward[i] += (1 / (0.02 + d / 3)) * task.collision_scale
            reward[j] += (1 / (0.02 + d / 3)) * task.collision_scale
    u = [(target_xy[0] - box_xy[0]), (target_xy[1] - box_xy[1])]
    norm = math.hypot(*u)
    c, s = math.cos(box_yaw), math.sin(box_yaw)
    for i, (x, y) in enumerate(agents):
        q = torch.tensor([[c * (x - box_xy[0]) + s * (y - box_xy[1]), -s * (x - box_xy[0]) + c * (y - box_xy[1])]])
        n = mqe_normals(q, task.vertex_list)[0].tolist()
        world = (c * n[0] - s * n[1], s * n[0] + c * n[1])
        reward[i] += (world[0] * u[0] + world[1] * u[1]) / norm * 0.004
    return reward


def test_three_agent_reward_terms_as_mqe_counts_them():
    task = TASKS["cylinder"]
    box, target, yaw = (12.0, 0.0), (14.5, 1.0), 0.7
    agents = [(9.8, 0.4), (12.3, 2.1), (13.9, -1.2)]
    reward, terms = task_rewards(torch.tensor([box]), torch.tensor([yaw]), torch.zeros(1, 2), torch.tensor([target]),
                                 torch.tensor([agents]), torch.tensor([math.dist(box, target)]), torch.tensor([False]),
                                 torch.tensor([False]), torch.tensor([0]), task)
    distance = 0.325 * (-0.01 * math.dist(box, target))  # the shared term, the same for every agent
    expected = [r + distance for r in mqe_rewards_three_agents(box, target, agents, yaw, task)]
    assert reward[0].tolist() == pytest.approx(expected, abs=1e-6)
    pairs = [(0, 1), (0, 2), (1, 2)]
    collision = sum(task.collision_scale / (0.02 + math.dist(agents[i], agents[j]) / 3) for i, j in pairs)
    assert terms["collision"].item() == pytest.approx(collision, abs=1e-7)  # once per pair, as MQE's reward_buffer
    assert task.collision_scale == -0.0015  # the cylinder's, not the cuboid's -0.0025


def test_the_t_blocks_links_add_up_their_impulses_as_one_rigid_body():
    # Links of 2 and 1 kg at (0, 0) and (0, 0.5): centre of mass (0, 1/6), composite izz 0.01 + 0.01 + 2/36 + 1/9.
    env = make_env("vmas", num_envs=1, seed=0, task="tblock")
    env.reset()
    bar, stem = env.parts
    assert bar.mass == stem.mass == 3.0  # within a step each link responds as the whole object
    assert env.rigid_izz == pytest.approx(0.02 + 2 / 36 + 1 / 9)
    bar.state.pos, stem.state.pos = torch.tensor([[12.0, 0.0]]), torch.tensor([[12.0, 0.5]])
    for link in (bar, stem):
        link.state.rot, link.state.vel, link.state.ang_vel = torch.zeros(1, 1), torch.zeros(1, 2), torch.zeros(1, 1)
    before = env._rigid_state()
    # What one (sub)step of contacts left: the bar pushed along +x, the stem along -y and turned about its own centre.
    bar.state.vel, stem.state.vel, stem.state.ang_vel = torch.tensor([[0.3, 0.0]]), torch.tensor([[0.0, -0.6]]), \
        torch.tensor([[0.5]])
    bar.state.pos, stem.state.pos = bar.state.pos + 0.003, stem.state.pos - 0.004  # where they drifted meanwhile
    env._make_rigid(before, T.DT)
    # By hand: impulses 3 x (0.3, 0) and 3 x (0, -0.6) -> centre-of-mass velocity (0.3, -0.6); about the centre of
    # mass the bar's (at (0, -1/6)) turns +0.15, the stem's spin 0.18667 x 0.5 = 0.09333 -> omega = 0.24333 / 0.18667.
    omega = (0.15 + env.rigid_izz * 0.5) / env.rigid_izz
    assert bar.state.ang_vel.item() == pytest.approx(omega, rel=1e-5)
    assert stem.state.ang_vel.item() == bar.state.ang_vel.item()
    com = torch.tensor([12.0, 1 / 6]) + torch.tensor([0.3, -0.6]) * T.DT
    yaw = omega * T.DT
    assert bar.state.rot.item() == pytest.approx(yaw, rel=1e-5)
    torch.testing.assert_close(bar.state.pos[0], com + T.rotate(torch.tensor([0.0, -1 / 6]), torch.tensor(yaw)))
    torch.testing.assert_close(stem.state.pos[0], com + T.rotate(torch.tensor([0.0, 1 / 3]), torch.tensor(yaw)))
    com_vel = (2 * bar.state.vel + stem.state.vel) / 3
    torch.testing.assert_close(com_vel[0], torch.tensor([0.3, -0.6]))
    assert float(env.rigid_error.max()) > 0.003  # the drift it removed was measured


def test_a_free_t_block_keeps_its_rigid_motion():
    # No friction and no contact: the linear and angular momentum stay, the links stay at their places.
    env = make_env("vmas", num_envs=2, seed=0, task="tblock")
    env.reset()
    place(env, 0.4, [(0.0, 20.0 + 3 * i) for i in range(env.num_agents)])
    for link in env.parts:
        link.linear_friction, link._angular_friction = 0.0, 0.0  # VMAS has no setter for the angular one
    com_vel, omega = torch.tensor([0.2, -0.1]), 0.7
    state = env._rigid_state()
    for link, offset in zip(env.parts, T.rotate(env.part_offsets, torch.tensor(0.4))):
        link.state.vel = (com_vel + omega * torch.stack([-offset[1], offset[0]])).expand(2, 2).clone()
        link.state.ang_vel = torch.full((2, 1), omega)
    for _ in range(50):
        env.step(torch.zeros(2, env.num_agents, 3))
    com, yaw, vel, spin, _, _ = env._rigid_state()
    torch.testing.assert_close(vel, com_vel.expand(2, 2))
    torch.testing.assert_close(spin, torch.full((2, 1), omega))
    torch.testing.assert_close(yaw, torch.full((2, 1), 0.4 + 50 * omega * T.DT))
    # float32 positions near x = 12 m: each of the 100 substeps' additions rounds by up to half an ulp (4.8e-7 m)
    torch.testing.assert_close(com, (state[0] + 50 * T.DT * com_vel).expand(2, 2), rtol=0, atol=1e-4)
    # a link moves straight within a substep, the body along an arc: the links drift by w^2 r dt^2 / 2 (0.01 mm)
    assert float(env.rigid_error.max()) < 1e-4


def test_a_t_block_charged_by_both_agents_stays_rigid_and_calm():
    # Both agents run at the object's centre at full speed (plus noise): they squeeze its links between them. Made
    # rigid once per 0.02 s step, the links oscillated with a growing amplitude here (drifts of 0.89 m, the T spinning
    # at 127 rad/s); made rigid after every substep, the largest drift is 26 mm and the yaw rate 3.3 rad/s.
    env = make_env("vmas", num_envs=64, seed=0, task="tblock")
    env.reset()
    noise = torch.Generator().manual_seed(0)
    drift, spin = 0.0, 0.0
    for _ in range(200):
        s = env.scene()
        to_box = s.box_xy.unsqueeze(1) - s.agent_xy
        forward = T.rotate(to_box / torch.linalg.vector_norm(to_box, dim=-1, keepdim=True), -s.agent_yaw)
        actions = torch.cat([2.0 * forward, torch.zeros(64, 2, 1)], -1) + 0.3 * torch.randn(64, 2, 3, generator=noise)
        env.step(actions)
        drift, spin = max(drift, float(env.rigid_error.max())), max(spin, float(env.box.state.ang_vel.abs().max()))
    assert drift < 0.05 and spin < 10.0, (drift, spin)


@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_trains_evaluates_and_refuses_a_resume_with_another_task(tmp_path, monkeypatch, task):
    monkeypatch.chdir(tmp_path)
    args = H.check_args(H.Args(task=task, num_envs=8, num_steps=10, total_timesteps=8 * 10 * 5 * 2, hidden_sizes=(16,),
                               critic_hidden_sizes=(16,), cuda=False, random_episode_start=False))
    path = H.train(args)
    checkpoint = H.load_checkpoint(path, "cpu")
    assert checkpoint["iteration"] == 2 and checkpoint["args"]["task"] == task
    env = H.policy_env(checkpoint["args"], 6, "cpu", 0)
    assert env.num_agents == TASKS[task].num_agents and env.env.task_name == task
    actors = H.trained_actors(checkpoint, env)
    success, completion = M.evaluate(lambda obs: H.mean_actions(actors, obs), env)
    assert 0.0 <= success <= 1.0 and 0.0 < completion <= 20.0
    other = "cylinder" if task != "cylinder" else "cuboid"
    with pytest.raises(UsageError, match=f"--task {other} \\(saved {task}\\)"):
        H.train(H.check_args(H.Args(**{**vars(args), "task": other, "resume": path, "total_timesteps": 1200})))


def test_an_unknown_task_is_the_clis_choice_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["happo_mapush.py", "--task", "sphere"])
    with pytest.raises(SystemExit) as exit_info:
        H.main()
    assert exit_info.value.code == 2 and "sphere" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="unknown task 'sphere'; available tasks: cuboid, tblock, cylinder"):
        make_env("vmas", num_envs=1, task="sphere")
