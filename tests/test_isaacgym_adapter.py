"""The isaacgym backend against a fake of MQE (Isaac Gym cannot run here), written from MQE's source.

The fake has MQE's attribute names, shapes and frames: `root_states_npc` [E*2, 13] and `root_states` [E*A, 13] in
the world frame (position, xyzw quaternion, world-frame velocities), per-env different `env_origins`,
`obs_buf.base_pos` env-relative, `obs_buf.lin_vel` x2.0 and `ang_vel` x0.25 (body frame), this step's
`finished_buf` / `time_out_buf` / `exception_buf`, auto-reset inside `step` that ORs MQE's own (never set)
`value_exception_buf` into the reset, and the wrapper's `reward_buffer` of sums over envs. Where MQE is odd, the fake
is too: on a reset step `base_pos` and the root states hold the new episode while `base_rpy` and the velocities in
obs_buf still hold the old one (legged_robot.py fills them before the reset); the wrapper makes a tensor on "cuda"
(WRAPPER_DEVICE; the fixture sets "cpu" explicitly); its distance reward reads the raw box state, so a NaN box gives
NaN rewards. Its episodes are scripted: in env 0 the box reaches the target on step 3, in env 1 the episode times
out on step 5, in env 2 the agents collide on step 2 (envs 3, 4, ... repeat 0, 1, 2).
"""
import importlib.util
import math
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import happo_mapush as H
import mapush_isaacgym
from global_state import build_global_state
from mapush_env import make_env
from mapush_task import EPISODE_STEPS, BackendUnavailable, observations
from mapush_isaacgym import IsaacGymPushEnv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 4  # the fake's time-out fires when episode_length_buf > MAX_LEN
ORIGINS = ((1.0, 13.0, 0.0), (-7.5, 4.0, 0.5), (20.0, -3.0, 0.0))  # world position of each env's origin
BOX_YAW = (0.3, 1.0, 4.0)
TARGET_XY = ((13.25, 0.0), (12.0, 2.5), (10.0, 0.0))  # env-relative
# A third agent (the cylinder's task) stays far from the others.
AGENT_START = (((10.8, 0.3), (10.9, -0.5), (8.0, 4.0)), ((12.0, 1.3), (12.0, -1.3), (9.0, -4.0)),
               ((12.0, 1.3), (12.0, 0.8), (15.0, 3.5)))
AGENT_DRIFT = (((0.1, 0.0), (0.1, 0.0), (0.0, 0.05)), ((0.1, 0.0), (0.1, 0.0), (0.05, 0.0)),
               ((0.0, -0.1), (0.0, 0.1), (-0.05, 0.0)))  # m per step
AGENT_YAW = ((0.5, 2.0, 4.5), (3.0, 5.5, 0.2), (1.0, 6.0, 2.5))
AGENT_Z, BOX_Z, TARGET_Z = 0.3, 0.25, 0.1
TERMS = {"distance_to_target", "approach", "collision", "push", "ocb", "reach_target", "exception"}
ROLL, PITCH = 0.01, 0.02  # the agents' small body tilt
WRAPPER_DEVICE = ["cuda"]  # MQE's Go1PushMidWrapper: torch.tensor(..., device="cuda") in its __init__
REAL_CUDA_DEVICE = mapush_isaacgym.cuda_device


def quat_from_rpy(roll, pitch, yaw):
    cr, sr, cp, sp, cy, sy = (f(0.5 * a) for a in (roll, pitch, yaw) for f in (math.cos, math.sin))
    return [sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy,
            cr * cp * cy + sr * sp * sy]


def quat_rotate(q, v):
    """v rotated by the xyzw quaternion q (plain floats), as isaacgym.torch_utils.quat_rotate."""
    x, y, z, w = q
    t = [2 * (y * v[2] - z * v[1]), 2 * (z * v[0] - x * v[2]), 2 * (x * v[1] - y * v[0])]
    return [v[0] + w * t[0] + y * t[2] - z * t[1], v[1] + w * t[1] + z * t[0] - x * t[2],
            v[2] + w * t[2] + x * t[1] - y * t[0]]


def state(e, k, num_agents=2):
    """Env-relative physical state of env e (mod 3) at step k of an episode, in plain floats."""
    e = e % 3
    agents = [(x + k * dx, y + k * dy) for (x, y), (dx, dy) in zip(AGENT_START[e], AGENT_DRIFT[e])][:num_agents]
    return SimpleNamespace(
        box=(12.0 + 0.1 * k, 0.0), box_yaw=BOX_YAW[e], box_vel=(5.0 if k > 0 else 0.0, 0.0), target=TARGET_XY[e],
        agents=agents, yaw=tuple(yaw + 0.1 * k for yaw in AGENT_YAW[e][:num_agents]),  # turning, speeding up with k
        vel=[(0.2 + 0.1 * e + 0.05 * k, -0.1 * i) for i in range(num_agents)],  # body frame, m/s
        yaw_rate=[0.3 - 0.2 * i + 0.02 * k for i in range(num_agents)])


class FakeGo1Object:
    """MQE's Go1Object as the wrapper, the adapter and `scene_from_mqe` see it."""

    def __init__(self, num_envs, origins, num_agents=2):
        self.num_envs, self.num_agents, self.num_npcs, self.device = num_envs, num_agents, 2, "cpu"
        A = num_agents
        self.env_origins = torch.tensor([origins[e % 3] for e in range(num_envs)]) + torch.tensor(
            [[100.0 * (e // 3), 0.0, 0.0] for e in range(num_envs)])
        self.episode_length_buf = torch.zeros(num_envs, dtype=torch.long)
        self.root_states_npc = torch.zeros(num_envs * 2, 13)
        self.root_states = torch.zeros(num_envs * A, 13)  # the agents, env-major
        self.obs_buf = SimpleNamespace(base_pos=torch.zeros(num_envs * A, 3), base_rpy=torch.zeros(num_envs * A, 3),
                                       lin_vel=torch.zeros(num_envs * A, 3), ang_vel=torch.zeros(num_envs * A, 3))
        self.value_exception_buf = torch.zeros(num_envs, dtype=torch.bool)  # MQE sets it nowhere; ORed into resets
        self.received = []  # actions as Go1.step receives them, [E*A, 3]
        self.poison_env = None  # an env whose box position is NaN until it is reset
        self._write_state()

    def _write_state(self, roots_only=False):
        """The state of every env at its episode step; with roots_only, what MQE's reset rewrites: the root states
        and obs_buf.base_pos (a view of them), not the yaw and velocities obs_buf got before the reset."""
        for e in range(self.num_envs):
            s, origin = state(e, int(self.episode_length_buf[e]), self.num_agents), self.env_origins[e].tolist()
            half = 0.5 * s.box_yaw
            box = [s.box[0] + origin[0], s.box[1] + origin[1], BOX_Z + origin[2], 0.0, 0.0, math.sin(half),
                   math.cos(half), s.box_vel[0], s.box_vel[1], 0.0, 0.0, 0.0, 0.0]
            target = [s.target[0] + origin[0], s.target[1] + origin[1], TARGET_Z + origin[2], 0, 0, 0, 1] + [0.0] * 6
            self.root_states_npc[2 * e] = torch.tensor(box)
            self.root_states_npc[2 * e + 1] = torch.tensor(target)
            if e == self.poison_env:
                self.root_states_npc[2 * e, 0] = float("nan")
            for i in range(self.num_agents):
                q = quat_from_rpy(ROLL, PITCH, s.yaw[i])
                row = self.num_agents * e + i
                lin, ang = [s.vel[i][0], s.vel[i][1], 0.05], [0.01, 0.02, s.yaw_rate[i]]  # body frame
                pos = [s.agents[i][0] + origin[0], s.agents[i][1] + origin[1], AGENT_Z + origin[2]]
                self.root_states[row] = torch.tensor(pos + q + quat_rotate(q, lin) + quat_rotate(q, ang))
                self.obs_buf.base_pos[row] = torch.tensor([s.agents[i][0], s.agents[i][1], AGENT_Z])
                if not roots_only:
                    self.obs_buf.base_rpy[row] = torch.tensor([ROLL, PITCH, s.yaw[i]])
                    self.obs_buf.lin_vel[row] = 2.0 * torch.tensor(lin)
                    self.obs_buf.ang_vel[row] = 0.25 * torch.tensor(ang)

    def reset(self):
        self.episode_length_buf.zero_()
        self._write_state()
        return self.obs_buf

    def step(self, actions):
        self.received.append(actions.clone())
        self.episode_length_buf += 1
        self._write_state()
        npc = self.root_states_npc.reshape(self.num_envs, 2, 13)
        self.finished_buf = torch.linalg.vector_norm(npc[:, 0, :2] - npc[:, 1, :2], dim=-1) < 1.0
        pos = self.obs_buf.base_pos.reshape(self.num_envs, self.num_agents, 3)
        pairs = torch.cdist(pos, pos) + torch.eye(self.num_agents) * 1e6  # every pair of agents, as MQE
        self.exception_buf = (pairs < 0.25).flatten(1).any(1)
        self.time_out_buf = self.episode_length_buf > MAX_LEN
        self.reset_buf = self.finished_buf | self.exception_buf | self.time_out_buf | self.value_exception_buf
        self.episode_length_buf[self.reset_buf] = 0  # auto-reset: a new episode, a fresh (finite) box
        if self.poison_env is not None and bool(self.reset_buf[self.poison_env]):
            self.poison_env = None
        self._write_state(roots_only=True)
        return self.obs_buf, torch.zeros(self.num_envs * self.num_agents), self.reset_buf, {}


class FakeUpstreamWrapper:
    """Upstream MAPush's Go1PushMidWrapper: per-agent rewards; attributes fall through to the env (gym.Wrapper)."""

    def __init__(self, env):
        self.env = env
        self.action_scale = torch.tensor([[[0.5, 0.5, 0.5]]], device=WRAPPER_DEVICE[0])  # MQE hard-codes "cuda"
        self.reward_buffer = {"distance_to_target_reward": 0, "exception_punishment": 0, "approach_to_box_reward": 0,
                              "collision_punishment": 0, "reach_target_reward": 0, "push_reward": 0, "ocb_reward": 0,
                              "step_count": 0}
        self.last_box_state = None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.env, name)

    def _observe(self):
        env = self.env
        npc = env.root_states_npc.reshape(env.num_envs, 2, 13)
        yaw = 2.0 * torch.atan2(npc[:, 0, 5], npc[:, 0, 6])
        A = env.num_agents
        return observations(npc[:, 0, :2] - env.env_origins[:, :2], torch.remainder(yaw, 2 * math.pi),
                            npc[:, 1, :2] - env.env_origins[:, :2], env.obs_buf.base_pos.reshape(-1, A, 3)[..., :2],
                            env.obs_buf.base_rpy.reshape(-1, A, 3)[..., 2])

    def reset(self):
        self.env.reset()
        self.last_box_state = None
        return self._observe()

    def step(self, action):
        self.last_raw_action = action.clone()
        action = torch.clip(action, -1.0, 1.0)
        _, _, termination, info = self.env.step((action * 0.5).reshape(-1, 3))
        obs = self._observe()
        self.value_exception_buf = (~torch.isfinite(obs)).any(2).any(1)
        obs[~torch.isfinite(obs)] = 0
        return obs, self._rewards(), termination, info

    def _rewards(self):
        """MQE's reward terms that the scripted episodes exercise, with MQE's reward_buffer bookkeeping."""
        env, buf = self.env, self.reward_buffer
        npc = env.root_states_npc.reshape(env.num_envs, 2, 13)
        box_state, target_state = npc[:, 0], npc[:, 1]
        box_pos = box_state[:, :3] - env.env_origins
        box_pos[~torch.isfinite(box_pos)] = 0  # MQE zeroes NaN in these copies, not in box_state
        base_pos = env.obs_buf.base_pos.reshape(env.num_envs, env.num_agents, 3)
        reward = torch.zeros(env.num_envs, env.num_agents)
        buf["step_count"] += 1
        reward[env.finished_buf, :] += 10.0
        buf["reach_target_reward"] += 10.0 * env.finished_buf.sum().item()
        reward[env.exception_buf, :] += -5.0
        reward[self.value_exception_buf, :] += -5.0
        buf["exception_punishment"] += -5.0 * (env.exception_buf.sum().item() + self.value_exception_buf.sum().item())
        if self.last_box_state is None:
            self.last_box_state = box_state.clone()
        past = torch.linalg.vector_norm(self.last_box_state[:, :2] - target_state[:, :2], dim=-1)
        dist = torch.linalg.vector_norm(box_state[:, :2] - target_state[:, :2], dim=-1)
        distance_reward = 0.00325 * 100 * (2 * (past - dist) - 0.01 * dist)
        reward += distance_reward.unsqueeze(1)
        buf["distance_to_target_reward"] += torch.sum(distance_reward).cpu()
        logger = []
        for i in range(env.num_agents):
            approach = -((torch.linalg.vector_norm(box_pos - base_pos[:, i], dim=-1) + 0.5) ** 2) * 0.00075
            reward[:, i] += approach
            logger.append(torch.sum(approach).cpu())
        buf["approach_to_box_reward"] += np.sum(np.array(logger))
        push = 0.0015 * (torch.linalg.vector_norm(box_state[:, 7:9], dim=-1) > 0.1).float()
        reward += push.unsqueeze(1)
        buf["push_reward"] += torch.sum(push).cpu()
        self.last_box_state = box_state.clone()
        return reward


class FakeOldForkWrapper(FakeUpstreamWrapper):
    """The fork's per-agent wrapper: `individualized_rewards` without the team-sum attribute, per-agent rewards."""

    def __init__(self, env):
        super().__init__(env)
        self.individualized_rewards = False


class FakeForkWrapper(FakeUpstreamWrapper):
    """The fork's current wrapper: fork-only attributes and extra buffer keys; every agent gets the team sum."""

    def __init__(self, env):
        super().__init__(env)
        self.individualized_rewards, self.shared_gated_rewards = False, False
        self.reward_buffer.update(goal_push_bonus=0, gating_factor=0)

    def _rewards(self):
        self.reward_buffer["gating_factor"] += 0.5  # a mean per step, not a reward sum
        return super()._rewards().sum(dim=1, keepdim=True).expand(-1, self.env.num_agents)


def write_task_configs(root, agents=None):
    """MAPush's task/<object>/config.py files as the adapter reads them: a Go1PushMidCfg class per task."""
    for task, folder in mapush_isaacgym.MAPUSH_TASK_DIRS.items():
        os.makedirs(os.path.join(root, "task", folder), exist_ok=True)
        with open(os.path.join(root, "task", folder, "config.py"), "w") as f:
            num_agents = (agents or {}).get(task, 3 if task == "cylinder" else 2)
            f.write(f"class Go1PushMidCfg:\n    name = {folder!r}\n\n    class env:\n        num_envs = 10\n"
                    f"        num_agents = {num_agents}\n        record_video = False\n")


@pytest.fixture
def fake_mqe(monkeypatch, tmp_path_factory):
    """Make fake `isaacgym` and `mqe` importable; returns a handle to pick the wrapper and see the calls."""
    gymapi = types.ModuleType("isaacgym.gymapi")
    gymapi.SIM_FLEX, gymapi.SIM_PHYSX = 0, 1
    isaacgym = types.ModuleType("isaacgym")
    isaacgym.gymapi = gymapi
    handle = SimpleNamespace(wrapper_class=FakeUpstreamWrapper, origins=ORIGINS, calls=[])

    def make_mqe_env(env_name, args=None, custom_cfg=None):
        cfg = SimpleNamespace(env=SimpleNamespace(num_envs=None, record_video=None, num_agents=2))  # the installed
        if callable(custom_cfg):  # MQE: env_dict["config"] = custom_cfg(env_dict["config"])
            cfg = custom_cfg(cfg)
        wrapper = handle.wrapper_class(FakeGo1Object(cfg.env.num_envs, handle.origins, cfg.env.num_agents))
        handle.calls.append(SimpleNamespace(env_name=env_name, args=args, cfg=cfg, cwd=os.getcwd(), wrapper=wrapper))
        return wrapper, cfg

    def custom_cfg(args):
        def fn(cfg):
            cfg.env.num_envs, cfg.env.record_video = args.num_envs, args.record_video
            return cfg
        return fn

    utils = types.ModuleType("mqe.envs.utils")
    utils.make_mqe_env, utils.custom_cfg = make_mqe_env, custom_cfg
    modules = {"isaacgym": isaacgym, "isaacgym.gymapi": gymapi, "mqe": types.ModuleType("mqe"),
               "mqe.envs": types.ModuleType("mqe.envs"), "mqe.envs.utils": utils}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    handle.root = tmp_path_factory.mktemp("MAPush")
    write_task_configs(handle.root)
    monkeypatch.setenv("MAPUSH_ROOT", str(handle.root))
    # On this CPU machine: the wrapper's "cuda" tensor and the adapter's CUDA-only check are set aside, explicitly
    # (test_cpu_device_is_refused_in_one_line_naming_cuda tests the check itself).
    monkeypatch.setattr(sys.modules[__name__], "WRAPPER_DEVICE", ["cpu"])
    monkeypatch.setattr(mapush_isaacgym, "cuda_device", torch.device)
    return handle


def zero_actions(num_envs=3):
    return torch.zeros(num_envs, 2, 3)


def expected_scene(ks):
    """Hand-built Scene fields (env-relative) for envs 0..len(ks)-1 at episode steps ks."""
    states = [state(e, k) for e, k in enumerate(ks)]
    return dict(
        box_xy=torch.tensor([s.box for s in states]), box_yaw=torch.tensor([s.box_yaw for s in states]),
        target_xy=torch.tensor([s.target for s in states]), agent_xy=torch.tensor([s.agents for s in states]),
        agent_yaw=torch.tensor([s.yaw for s in states]), agent_lin_vel=torch.tensor([s.vel for s in states]),
        agent_ang_vel=torch.tensor([s.yaw_rate for s in states]))


def expected_global_state(ks):
    rows = []
    for e, k in enumerate(ks):
        s = state(e, k)
        row = [s.box[0], s.box[1], s.box_yaw, s.target[0], s.target[1]]
        for i in range(2):
            row += [s.agents[i][0], s.agents[i][1], s.yaw[i], 2.0 * s.vel[i][0], 2.0 * s.vel[i][1],
                    0.25 * s.yaw_rate[i]]
        rows.append(row)
    return torch.tensor(rows)


def test_construction_passes_mqe_its_arguments(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu", seed=7)
    (call,) = fake_mqe.calls
    assert call.env_name == "go1push_mid"
    args = call.args
    assert (args.num_envs, args.seed, args.record_video, args.headless) == (3, 7, False, True)
    assert (args.sim_device, args.sim_device_type, args.rl_device, args.compute_device_id) == ("cpu", "cpu", "cpu", 0)
    assert args.physics_engine == 1 and (args.use_gpu, args.use_gpu_pipeline) == (False, False)
    assert (args.subscenes, args.num_threads) == (0, 0)
    assert (call.cfg.env.num_envs, call.cfg.env.record_video) == (3, False)  # custom_cfg(args) was applied
    assert (env.num_envs, env.num_agents, env.obs_dim, env.action_dim, env.episode_steps) == (3, 2, 8, 3, 1000)
    assert env.device == torch.device("cpu")
    assert not hasattr(env, "state_dict") and not hasattr(env, "load_state_dict")


def test_sim_device_defaults_to_cuda0(fake_mqe):
    env = IsaacGymPushEnv(num_envs=3)
    args = fake_mqe.calls[0].args
    assert (args.sim_device, args.sim_device_type, args.rl_device, args.device) == ("cuda:0", "cuda", "cuda:0", "cuda")
    assert (args.use_gpu, args.use_gpu_pipeline, args.compute_device_id) == (True, True, 0)
    assert env.device == torch.device("cuda:0")


def test_builds_in_mapush_root_and_restores_cwd(fake_mqe, tmp_path, monkeypatch):
    start, root, other = tmp_path / "start", tmp_path / "MAPush", tmp_path / "from_env"
    for path in (start, root, other):
        path.mkdir()
        write_task_configs(path)
    monkeypatch.chdir(start)
    monkeypatch.delenv("MAPUSH_ROOT")  # no root given: the current directory must be the MAPush root
    make_env("isaacgym", num_envs=3, device="cpu")
    make_env("isaacgym", num_envs=3, device="cpu", mapush_root=str(root))
    monkeypatch.setenv("MAPUSH_ROOT", str(other))
    make_env("isaacgym", num_envs=3, device="cpu")
    make_env("isaacgym", num_envs=3, device="cpu", mapush_root=str(root))  # the option wins over the variable
    assert [os.path.realpath(c.cwd) for c in fake_mqe.calls] == [os.path.realpath(p) for p in (start, root, other,
                                                                                               root)]
    assert os.path.realpath(os.getcwd()) == os.path.realpath(start)


def test_scene_and_global_state_are_env_relative(fake_mqe):
    scenes = []
    for origins in (ORIGINS, ((0.0, 0.0, 0.0),) * 3):
        fake_mqe.origins = origins
        env = make_env("isaacgym", num_envs=3, device="cpu")
        env.reset()
        env.step(zero_actions())
        scenes.append(env.scene())
    assert not torch.equal(torch.tensor(ORIGINS)[0], torch.tensor(ORIGINS)[1])
    for scene in scenes:
        for name, value in expected_scene([1, 1, 1]).items():
            torch.testing.assert_close(getattr(scene, name), value, msg=name)
        state_, nonfinite = build_global_state(scene)
        torch.testing.assert_close(state_, expected_global_state([1, 1, 1]))
        assert int(nonfinite) == 0


def test_step_shapes_dtypes_and_raw_actions(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    obs = env.reset()
    assert obs.shape == (3, 2, 8) and obs.dtype == torch.float32 and obs.device == torch.device("cpu")
    actions = torch.full((3, 2, 3), 3.0)
    actions[1, 0] = torch.tensor([-2.0, 0.4, -0.6])
    obs, reward, done, info = env.step(actions)
    assert obs.shape == (3, 2, 8) and obs.dtype == torch.float32
    assert reward.shape == (3, 2) and reward.dtype == torch.float32
    assert done.shape == (3,) and done.dtype == torch.bool
    assert set(info) == {"success", "time_out", "exception", "reward_terms", "nonfinite_obs",
                         "nonfinite_reward"}  # no final_obs/scene
    for key in ("success", "time_out", "exception"):
        assert info[key].shape == (3,) and info[key].dtype == torch.bool
    assert torch.equal(info["nonfinite_obs"], torch.zeros(3, dtype=torch.long))
    assert torch.equal(info["nonfinite_reward"], torch.zeros(3, dtype=torch.long))
    # The adapter hands MQE the raw policy actions; MQE's wrapper clips and scales them itself.
    assert torch.equal(env.wrapper.last_raw_action, actions)
    sent = env.wrapper.env.received[-1].reshape(3, 2, 3)
    assert torch.equal(sent[0, 0], torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(sent[1, 0], torch.tensor([-0.5, 0.2, -0.3]))
    s = expected_scene([1, 1, 1])
    torch.testing.assert_close(obs, observations(s["box_xy"], s["box_yaw"], s["target_xy"], s["agent_xy"],
                                                 s["agent_yaw"]))


def test_done_flags_reasons_and_auto_reset(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.reset()
    F, T = False, True
    # step: (done, success, time_out, exception, episode step of each env after the step's auto-reset)
    script = {1: ([F, F, F], [F, F, F], [F, F, F], [F, F, F], [1, 1, 1]),
              2: ([F, F, T], [F, F, F], [F, F, F], [F, F, T], [2, 2, 0]),
              3: ([T, F, F], [T, F, F], [F, F, F], [F, F, F], [0, 3, 1]),
              4: ([F, F, T], [F, F, F], [F, F, F], [F, F, T], [1, 4, 0]),
              5: ([F, T, F], [F, F, F], [F, T, F], [F, F, F], [2, 0, 1])}
    for step, (done_, success, time_out, exception, ks) in script.items():
        _, _, done, info = env.step(zero_actions())
        assert done.tolist() == done_, step
        assert info["success"].tolist() == success, step
        assert info["time_out"].tolist() == time_out, step
        assert info["exception"].tolist() == exception, step
        scene = env.scene()  # after a done, the new episode's state
        for name, value in expected_scene(ks).items():
            torch.testing.assert_close(getattr(scene, name), value, msg=f"step {step} {name}")


def test_random_episode_start_sets_mqe_episode_length_buf(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.reset()
    torch.manual_seed(0)
    expected = torch.randint(0, EPISODE_STEPS, (3,))
    torch.manual_seed(0)
    env.randomize_episode_start()
    buf = env.base_env.episode_length_buf
    assert buf.dtype == torch.long and torch.equal(buf, expected)
    drawn = buf.clone()
    assert drawn.min() >= 0 and drawn.max() < EPISODE_STEPS and drawn.unique().numel() == 3
    _, _, _, info = env.step(zero_actions())
    # MQE's own time-out rule now sees the drawn counters: an env times out once its counter passes MAX_LEN
    assert info["time_out"].tolist() == (drawn + 1 > MAX_LEN).tolist()


def test_flags_are_copies(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.reset()
    env.step(zero_actions())
    _, _, done, info = env.step(zero_actions())
    env.wrapper.env.exception_buf.fill_(True)  # MQE may reuse its buffers in place: what was returned must not change
    env.wrapper.env.reset_buf.fill_(True)
    assert info["exception"].tolist() == [False, False, True] and done.tolist() == [False, False, True]


def test_action_validation(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.reset()
    with pytest.raises(ValueError, match=r"\(3, 2, 3\)"):
        env.step(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match=r"float32 of shape \(3, 2, 3\)"):
        env.step(torch.zeros(3, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"torch.Tensor of shape \(3, 2, 3\)"):
        env.step(np.zeros((3, 2, 3), dtype=np.float32))
    assert env.wrapper.env.received == []  # nothing reached MQE


def per_agent_rewards_step1():
    """Hand-computed per-agent rewards of the first step after reset (no flags; no distance progress yet)."""
    rows = []
    for e in range(3):
        s = state(e, 1)
        dist = math.hypot(s.box[0] - s.target[0], s.box[1] - s.target[1])
        row = []
        for ax, ay in s.agents:
            approach = -0.00075 * (math.sqrt((s.box[0] - ax) ** 2 + (s.box[1] - ay) ** 2 + (BOX_Z - AGENT_Z) ** 2)
                                   + 0.5) ** 2
            row.append(0.325 * (-0.01 * dist) + approach + 0.0015)
        rows.append(row)
    return torch.tensor(rows)


def test_upstream_per_agent_rewards_pass_through(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    assert env.wrapper_team_reward is False
    env.reset()
    _, reward, _, _ = env.step(zero_actions())
    expected = per_agent_rewards_step1()
    assert not torch.allclose(expected[:, 0], expected[:, 1])  # the agents' rewards differ: a sum would show
    torch.testing.assert_close(reward, expected)


def test_fork_team_reward_is_not_summed_twice(fake_mqe):
    fake_mqe.wrapper_class = FakeForkWrapper
    env = make_env("isaacgym", num_envs=3, device="cpu")
    assert env.wrapper_team_reward is True  # detected by the fork-only attribute
    env.reset()
    fake_mqe.wrapper_class = FakeUpstreamWrapper
    upstream = make_env("isaacgym", num_envs=3, device="cpu")
    upstream.reset()
    for _ in range(3):  # through a success and an exception
        _, reward, _, _ = env.step(zero_actions())
        _, per_agent, _, _ = upstream.step(zero_actions())
        team = per_agent.sum(1)
        assert torch.equal(reward[:, 0], reward[:, 1])
        torch.testing.assert_close(reward[:, 0], team / 2)
        assert torch.equal(reward.sum(1), team / 2 + team / 2)  # the trainer's sum is the team sum, not 2x
        torch.testing.assert_close(reward.sum(1), team)


def test_team_reward_rule_can_be_overridden(fake_mqe):
    fake_mqe.wrapper_class = FakeForkWrapper
    fork = make_env("isaacgym", num_envs=3, device="cpu", wrapper_team_reward=False)
    fake_mqe.wrapper_class = FakeUpstreamWrapper
    upstream = make_env("isaacgym", num_envs=3, device="cpu", wrapper_team_reward=True)
    assert (fork.wrapper_team_reward, upstream.wrapper_team_reward) == (False, True)
    fork.reset()
    upstream.reset()
    _, fork_reward, _, _ = fork.step(zero_actions())
    _, halves, _, _ = upstream.step(zero_actions())
    team = per_agent_rewards_step1().sum(1)
    torch.testing.assert_close(fork_reward, team.unsqueeze(1).expand(3, 2))  # passed through as given
    torch.testing.assert_close(halves, per_agent_rewards_step1() / 2)


def test_reward_terms_are_this_steps_sums_over_envs(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.wrapper.reward_buffer["push_reward"] = 123.0  # stale sums from before reset() are dropped
    env.reset()
    approach1 = sum(per_agent_rewards_step1()[e, i].item() - 0.325 * (-0.01 * math.hypot(
        state(e, 1).box[0] - state(e, 1).target[0], state(e, 1).box[1] - state(e, 1).target[1])) - 0.0015
        for e in range(3) for i in range(2))
    # per step: (reach_target, exception, push) sums over envs; env 2 resets on step 2, env 0 on step 3
    expected = {1: (0.0, 0.0, 3 * 0.0015), 2: (0.0, -5.0, 2 * 0.0015), 3: (10.0, 0.0, 2 * 0.0015)}
    for step, (reach, exception, push) in expected.items():
        _, _, _, info = env.step(zero_actions())
        terms = info["reward_terms"]
        assert set(terms) == TERMS
        for name, value in terms.items():
            assert value.shape == (3,) and value.dtype == torch.float32
            assert torch.equal(value, value[:1].expand(3)), name  # each env holds the mean over envs
        sums = {name: value.sum().item() for name, value in terms.items()}
        assert sums["reach_target"] == pytest.approx(reach, abs=1e-6)
        assert sums["exception"] == pytest.approx(exception, abs=1e-6)
        assert sums["push"] == pytest.approx(push, abs=1e-7)
        assert sums["collision"] == 0.0 and sums["ocb"] == 0.0
        if step == 1:
            assert sums["approach"] == pytest.approx(approach1, rel=1e-5)
            dist = [math.hypot(state(e, 1).box[0] - state(e, 1).target[0], state(e, 1).box[1] - state(e, 1).target[1])
                    for e in range(3)]
            assert sums["distance_to_target"] == pytest.approx(sum(-0.00325 * d for d in dist), rel=1e-5)


def test_fork_reward_terms_keep_extra_sums_and_drop_non_sums(fake_mqe):
    fake_mqe.wrapper_class = FakeForkWrapper
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.reset()
    _, _, _, info = env.step(zero_actions())
    assert set(info["reward_terms"]) == TERMS | {"goal_push_bonus"}  # no step_count, no gating_factor


def test_nonfinite_observations_are_flagged(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.reset()
    env.wrapper.env.poison_env = 1
    obs, _, _, info = env.step(zero_actions())
    assert info["nonfinite_obs"].tolist() == [0, 1, 0]
    assert bool(torch.isfinite(obs).all())


def test_trainer_runs_two_iterations_on_the_isaacgym_code_path(fake_mqe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = H.check_args(H.Args(env_backend="isaacgym", num_envs=3, num_steps=8, action_repeat=1,
                               total_timesteps=2 * 3 * 8, actor_num_minibatches=2, critic_num_minibatches=2,
                               random_episode_start=False, hidden_sizes=(16,), critic_hidden_sizes=(16,), cuda=False,
                               save_interval=100))
    path = H.train(args)  # (the scripted episodes below need every env to start at step 0)
    assert os.path.basename(path) == "checkpoint_2.pt" and path.startswith("runs" + os.sep)
    checkpoint = torch.load(path, weights_only=True)
    assert (checkpoint["iteration"], checkpoint["global_step"]) == (2, 48)
    assert checkpoint["ranks"][0]["env"] is None  # MQE's simulator state is not saved
    assert checkpoint["args"]["env_backend"] == "isaacgym"
    (call,) = fake_mqe.calls  # one simulator per process, as Isaac Gym allows
    assert len(call.wrapper.env.received) == 16
    # Scripted episodes: iteration 1 (steps 1-8) ends 2 successes, 1 time-out, 4 exceptions; iteration 2 (steps
    # 9-16) 3, 2 and 4. The trainer counts them from info and logs the reward terms per env-step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(path), size_guidance={"scalars": 0})
    acc.Reload()
    logged = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert logged["charts/episodes"] == [7.0, 9.0]
    assert logged["charts/success_rate"] == pytest.approx([2 / 7, 3 / 9])
    assert logged["charts/time_out_rate"] == pytest.approx([1 / 7, 2 / 9])
    assert logged["charts/exception_rate"] == pytest.approx([4 / 7, 4 / 9])
    assert logged["rewards/reach_target"] == pytest.approx([20 / 24, 30 / 24])
    assert logged["rewards/exception"] == pytest.approx([-20 / 24, -20 / 24])


@pytest.mark.parametrize("missing", ["isaacgym", "mqe"])
def test_missing_isaacgym_or_mapush_is_reported(fake_mqe, monkeypatch, tmp_path, missing):
    for name in [name for name in sys.modules if name == missing or name.startswith(missing + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it fails, as when it is not installed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackendUnavailable) as err:
        make_env("isaacgym", num_envs=3, device="cpu", mapush_root=str(ROOT))
    message = str(err.value)
    for needle in ("Isaac Gym Preview 4", "Python 3.8", "MAPush", "pip install -e", "--env-backend vmas"):
        assert needle in message
    assert isinstance(err.value, ImportError)
    assert os.path.realpath(os.getcwd()) == os.path.realpath(tmp_path)  # the cwd is restored on failure too


def test_trainer_without_isaacgym_exits_with_the_message(tmp_path):
    if importlib.util.find_spec("isaacgym") and importlib.util.find_spec("mqe"):
        pytest.skip("Isaac Gym and MQE are installed here")
    env = {k: v for k, v in os.environ.items() if k != "MAPUSH_ROOT"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "happo_mapush.py"), "--env-backend", "isaacgym",
                             "--num-envs", "2", "--num-steps", "2", "--total-timesteps", "20", "--no-cuda",
                             "--actor-num-minibatches", "1", "--critic-num-minibatches", "1"],
                            cwd=tmp_path, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error: the isaacgym backend needs Isaac Gym Preview 4" in result.stderr
    for needle in ("Python 3.8", "MAPush", "--env-backend vmas"):
        assert needle in result.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_scene_on_a_reset_step_is_the_new_episodes_root_state(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.reset()
    env.step(zero_actions())
    _, _, done, _ = env.step(zero_actions())  # step 2: env 2's agents collide, MQE resets it
    assert done.tolist() == [False, False, True]
    stale_yaw = env.base_env.obs_buf.base_rpy.reshape(3, 2, 3)[2, :, 2]
    new = state(2, 0)
    torch.testing.assert_close(stale_yaw, torch.tensor(state(2, 2).yaw))  # MQE's obs_buf: the old episode's yaw
    scene = env.scene()
    torch.testing.assert_close(scene.agent_yaw[2], torch.tensor(new.yaw), atol=1e-5, rtol=0)
    torch.testing.assert_close(scene.agent_lin_vel[2], torch.tensor(new.vel), atol=1e-5, rtol=0)
    torch.testing.assert_close(scene.agent_ang_vel[2], torch.tensor(new.yaw_rate), atol=1e-5, rtol=0)
    torch.testing.assert_close(scene.agent_xy[2], torch.tensor(new.agents), atol=1e-5, rtol=0)


def test_a_nonfinite_box_state_ends_that_episode_as_an_exception(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.reset()
    env.step(zero_actions())
    env.base_env.poison_env = 1  # a PhysX blow-up: env 1's box position turns NaN
    _, reward, done, info = env.step(zero_actions())  # step 2
    assert bool(torch.isfinite(reward).all()) and torch.equal(reward[1], torch.zeros(2))
    assert info["nonfinite_reward"].tolist() == [0, 2, 0] and info["nonfinite_obs"].tolist() == [0, 1, 0]
    assert not done[1] and env.base_env.value_exception_buf.tolist() == [False, True, False]
    _, reward, done, info = env.step(zero_actions())  # step 3: MQE's own reset path picks it up
    assert done.tolist() == [True, True, False] and info["exception"].tolist() == [False, True, False]
    assert torch.equal(reward[1], torch.full((2,), -5.0)) and bool(torch.isfinite(reward).all())
    assert not env.base_env.value_exception_buf.any()  # cleared once the reset happened
    torch.testing.assert_close(env.scene().box_xy[1], torch.tensor(state(1, 0).box))
    _, reward, done, info = env.step(zero_actions())
    assert bool(torch.isfinite(reward).all()) and info["nonfinite_reward"].sum() == 0 and not done[1]


def test_training_goes_on_through_nonfinite_box_states(fake_mqe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_step, steps = FakeGo1Object.step, []

    def blowing_up(self, actions):
        steps.append(1)
        if len(steps) in (3, 11, 20):
            self.poison_env = len(steps) % 3
        return real_step(self, actions)

    monkeypatch.setattr(FakeGo1Object, "step", blowing_up)
    args = H.check_args(H.Args(env_backend="isaacgym", num_envs=3, num_steps=8, action_repeat=1,
                               total_timesteps=4 * 3 * 8, actor_num_minibatches=2, critic_num_minibatches=2,
                               random_episode_start=False, hidden_sizes=(16,), critic_hidden_sizes=(16,), cuda=False))
    path = H.train(args)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["iteration"] == 4 and all(torch.isfinite(t).all() for t in checkpoint["critic"].values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(path), size_guidance={"scalars": 0})
    acc.Reload()
    logged = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert sum(logged["diagnostics/nonfinite_env"]) >= 3 * (2 + 1)  # 2 rewards and 1 observation per blow-up
    assert logged["diagnostics/nonfinite_reward"] == [0.0] * 4  # the adapter already zeroed them
    assert all(math.isfinite(v) for values in logged.values() for v in values)


def test_cpu_device_is_refused_in_one_line_naming_cuda(fake_mqe, monkeypatch, capsys):
    monkeypatch.setattr(mapush_isaacgym, "cuda_device", REAL_CUDA_DEVICE)  # the check itself, not bypassed
    with pytest.raises(BackendUnavailable) as err:
        make_env("isaacgym", num_envs=3, device="cpu")
    message = str(err.value)
    assert "CUDA only" in message and "got device cpu" in message and "\n" not in message
    assert fake_mqe.calls == []  # refused before MQE was built
    monkeypatch.setattr(sys, "argv", ["happo_mapush.py", "--env-backend", "isaacgym", "--no-cuda", "--num-envs", "3",
                                      "--num-steps", "8", "--actor-num-minibatches", "1",
                                      "--critic-num-minibatches", "1"])
    assert H.main() == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: the isaacgym backend runs on CUDA only") and stderr.count("\n") == 1
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="a torch without CUDA"):
            REAL_CUDA_DEVICE("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CPU-only torch MQE's own failure is an assertion")
def test_without_the_check_the_wrapper_fails_on_cpu(fake_mqe, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "WRAPPER_DEVICE", ["cuda"])  # MQE as it is
    with pytest.raises((AssertionError, RuntimeError)):
        make_env("isaacgym", num_envs=3, device="cpu")


def test_older_fork_per_agent_rewards_are_not_halved(fake_mqe, capsys):
    fake_mqe.wrapper_class = FakeOldForkWrapper
    env = make_env("isaacgym", num_envs=3, device="cpu")
    assert env.wrapper_team_reward is False and "per-agent rewards, passed through" in capsys.readouterr().out
    env.reset()
    _, reward, _, _ = env.step(zero_actions())
    torch.testing.assert_close(reward, per_agent_rewards_step1())
    fake_mqe.wrapper_class = FakeForkWrapper
    make_env("isaacgym", num_envs=3, device="cpu")
    assert "the team sum to every agent; each agent gets sum / 2" in capsys.readouterr().out


def test_a_detected_reward_mode_that_the_first_step_contradicts_is_an_error(fake_mqe):
    class SumsWithoutTheAttribute(FakeUpstreamWrapper):
        def _rewards(self):
            return super()._rewards().sum(dim=1, keepdim=True).expand(-1, 2)

    fake_mqe.wrapper_class = SumsWithoutTheAttribute
    env = make_env("isaacgym", num_envs=3, device="cpu")
    env.reset()
    with pytest.raises(BackendUnavailable, match="wrapper_team_reward=True"):
        env.step(zero_actions())
    env = make_env("isaacgym", num_envs=3, device="cpu", wrapper_team_reward=True)  # an explicit choice is trusted
    env.reset()
    env.step(zero_actions())


@pytest.mark.parametrize("task, folder, agents", [("cuboid", "cuboid", 2), ("tblock", "Tblock", 2),
                                                  ("cylinder", "cylinder", 3)])
def test_the_task_selects_mapushs_own_task_config(fake_mqe, task, folder, agents):
    env = make_env("isaacgym", num_envs=3, device="cpu", task=task)
    config = fake_mqe.calls[-1].cfg  # what MQE built the env from: the class of task/<folder>/config.py
    assert config.name == folder and config.env.num_envs == 3 and config.env.record_video is False
    assert (env.num_agents, env.obs_dim) == (agents, 2 + 3 * agents)
    with open(os.path.join(fake_mqe.root, "task", folder, "config.py")) as f:
        assert "num_envs = 10" in f.read()  # MAPush's file is read, never written


def test_three_agents_scene_and_global_state_from_mqes_buffers(fake_mqe):
    env = make_env("isaacgym", num_envs=3, device="cpu", task="cylinder")
    obs = env.reset()
    assert obs.shape == (3, 3, 11)
    obs, reward, done, info = env.step(torch.zeros(3, 3, 3))
    assert reward.shape == (3, 3) and done.tolist() == [False, False, False]
    states = [state(e, 1, num_agents=3) for e in range(3)]
    scene = env.scene()
    torch.testing.assert_close(scene.agent_xy, torch.tensor([s.agents for s in states]))
    torch.testing.assert_close(scene.agent_yaw, torch.remainder(torch.tensor([s.yaw for s in states]), 2 * math.pi))
    torch.testing.assert_close(scene.agent_lin_vel, torch.tensor([s.vel for s in states]), atol=1e-5, rtol=1e-5)
    rows = []
    for s in states:
        row = [s.box[0], s.box[1], s.box_yaw, s.target[0], s.target[1]]
        for i in range(3):
            row += [s.agents[i][0], s.agents[i][1], s.yaw[i], 2.0 * s.vel[i][0], 2.0 * s.vel[i][1],
                    0.25 * s.yaw_rate[i]]
        rows.append(row)
    global_state, _ = build_global_state(scene)
    assert global_state.shape == (3, 23)
    torch.testing.assert_close(global_state, torch.tensor(rows), atol=1e-5, rtol=1e-5)


def test_a_task_config_that_disagrees_with_the_task_or_is_missing_is_one_line(fake_mqe, tmp_path):
    write_task_configs(tmp_path, agents={"cylinder": 2})  # an edited checkout
    with pytest.raises(BackendUnavailable, match="built 2 agents, the cylinder task has 3"):
        make_env("isaacgym", num_envs=3, device="cpu", task="cylinder", mapush_root=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackendUnavailable, match="no task/Tblock/config.py in .*: run from the MAPush root"):
        make_env("isaacgym", num_envs=3, device="cpu", task="tblock", mapush_root=str(empty))
