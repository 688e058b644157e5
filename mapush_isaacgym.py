"""The `isaacgym` backend: MAPush's real `go1push_mid` (MQE on Isaac Gym) behind `make_env`'s contract.

Imported only when `--env-backend isaacgym` is chosen (`mapush_env.make_env`); it needs Python 3.8, Isaac Gym
Preview 4, a CUDA GPU and a MAPush checkout (docs/isaacgym.md has the recipe).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any, Dict, Optional

import torch

from mapush_task import EPISODE_STEPS, TASKS, TWO_PI, BackendUnavailable, Scene, check_actions

ISAACGYM_HELP = (
    "the isaacgym backend needs Isaac Gym Preview 4 and MAPush (MQE), and importing them failed ({err}). "
    "Install both in a Python 3.8 environment: Isaac Gym Preview 4 from NVIDIA (`pip install -e isaacgym/python`) "
    "and a MAPush checkout (`pip install -e .` in its root), then run from the MAPush root or set MAPUSH_ROOT "
    "(docs/isaacgym.md has the recipe). The default `--env-backend vmas` needs none of this."
)
# MQE's `reward_buffer` names -> this project's reward-term names (those of the vmas backend).
MQE_REWARD_TERMS = {"distance_to_target_reward": "distance_to_target", "approach_to_box_reward": "approach",
                    "collision_punishment": "collision", "push_reward": "push", "ocb_reward": "ocb",
                    "reach_target_reward": "reach_target", "exception_punishment": "exception"}
MQE_NOT_REWARD_SUMS = ("step_count", "gating_factor")  # a step counter and (fork) a sum of per-step means
# The fork's summing wrapper (alexei-erm/heterogeneous-MAPush) gives every agent the team sum and has this
# attribute; its per-agent wrapper (individualized_rewards only) and upstream MAPush return per-agent rewards.
FORK_TEAM_SUM_ATTRIBUTE = "shared_gated_rewards"


def cuda_device(device) -> torch.device:
    """The device the backend runs on. MQE's wrapper makes some tensors on "cuda", the current GPU: anything else is a
    one-line error, and a `cuda:N` becomes the current device before MQE is built."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailable(
            f"the isaacgym backend runs on CUDA only (MQE's Go1PushMidWrapper creates its tensors on \"cuda\"), got "
            f"device {device}{'' if torch.cuda.is_available() else ' and a torch without CUDA'}: drop --no-cuda, "
            f"install a CUDA build of torch, or use --env-backend vmas")
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


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
    box_vel = npc[:, 0, 7:13]  # world frame: the box's velocity and yaw rate (it stays flat on the ground)
    return Scene(box_xy, box_yaw, target_xy, agent_xy, quat_to_yaw(quat), lin_vel, ang_vel, box_vel[:, 0:2],
                 box_vel[:, 5])


MAPUSH_TASK_DIRS = {"cuboid": "cuboid", "tblock": "Tblock", "cylinder": "cylinder"}  # MAPush's task/<object>/


def task_config_class(task: str):
    """`Go1PushMidCfg` of MAPush's `task/<object>/config.py` in the current directory (the MAPush root), loaded
    without touching MAPush's files: its `train.sh` copies that file over MQE's go1_push_mid_config.py instead, so
    the installed config is whichever task was trained last."""
    path = os.path.join("task", MAPUSH_TASK_DIRS[task], "config.py")
    if not os.path.isfile(path):
        raise BackendUnavailable(f"no {path} in {os.getcwd()}: run from the MAPush root or set MAPUSH_ROOT")
    spec = importlib.util.spec_from_file_location(f"mapush_task_{task}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Go1PushMidCfg


class IsaacGymPushEnv:
    """`go1push_mid` on Isaac Gym: a thin adapter over MQE's `make_mqe_env` with `make_env`'s contract.

    - Team reward: the contract's rewards are per agent and the trainer forms the team reward, so it must not get a
      reward that is already a team sum. Upstream MAPush's wrapper returns per-agent rewards (passed through); the
      fork's summing wrapper returns the team sum to every agent, so the adapter returns equal shares, sum / A, and
      the trainer's `--team-reward sum` gives back the team sum. `wrapper_team_reward=None` detects the summing
      wrapper by its `shared_gated_rewards` attribute and checks the first step's rewards against that (a team sum
      is the same for every agent in every env); pass True or False to override. The choice is printed.
    - Non-finite rewards: MQE zeroes a non-finite observation but its distance reward reads the raw box state, so a
      PhysX blow-up makes that env's rewards NaN, and MQE never resets it (its `value_exception_buf` is never set).
      The adapter zeroes such rewards (info["nonfinite_reward"] counts the entries) and sets the env's
      `value_exception_buf`, so MQE resets it on the next step; that step ends the episode as an exception, with
      MQE's exception punishment for every agent.
    - Scene: from MQE's root states, which hold the new episode after an auto-reset (`scene_from_mqe`).
      The agents' own observations keep MQE's quirk: on a reset step they mix the new positions with the old yaw.
    - Working directory: MQE loads its locomotion policy and actuator net by cwd-relative paths (go1_config.py) and
      its helpers put cwd-relative folders on sys.path when imported. Given `mapush_root` (default: $MAPUSH_ROOT),
      the adapter imports MQE and builds the env there, then returns to the caller's directory (so `runs/` lands
      where the user started); without it the process must run from the MAPush root.
    - No final observation (MQE has none): time-outs are terminal for the trainer. No state_dict: resuming a run
      restarts the simulator's episodes.
    - info["reward_terms"]: MQE keeps only running sums over all envs (`reward_buffer`). The adapter reads and zeroes
      them every step, so each term's sum over envs is this step's exact sum; each env's entry holds that sum / E
      (MQE keeps no per-env values). info["nonfinite_obs"]: 1 for an env whose observation MQE zeroed, else 0.
    """

    def __init__(self, num_envs: int, device="cuda:0", seed: int = 0, task: str = "cuboid",
                 mapush_root: Optional[str] = None, wrapper_team_reward: Optional[bool] = None):
        root = mapush_root if mapush_root is not None else os.environ.get("MAPUSH_ROOT")
        cwd = os.getcwd()
        if root:
            os.chdir(root)
        try:  # import inside the MAPush root too: MQE's helpers put cwd-relative folders on sys.path at import
            self.wrapper = self._make_wrapper(num_envs, seed, device, task)
        finally:
            os.chdir(cwd)
        self.base_env = getattr(self.wrapper, "env", self.wrapper)  # MQE's Go1Object: flags and state buffers
        self.num_envs, self.num_agents = int(self.base_env.num_envs), int(self.base_env.num_agents)
        if self.num_agents != TASKS[task].num_agents:
            raise BackendUnavailable(
                f"MAPush's task/{MAPUSH_TASK_DIRS[task]}/config.py built {self.num_agents} agents, the {task} task "
                f"has {TASKS[task].num_agents}: is that MAPush checkout's file edited?")
        self.obs_dim, self.action_dim, self.episode_steps = 2 + 3 * self.num_agents, 3, EPISODE_STEPS
        self.detected = wrapper_team_reward is None
        self.wrapper_team_reward = (hasattr(self.wrapper, FORK_TEAM_SUM_ATTRIBUTE) if self.detected
                                    else bool(wrapper_team_reward))
        how = f"{'detected' if self.detected else 'set'}: {FORK_TEAM_SUM_ATTRIBUTE} is " + (
            "there" if hasattr(self.wrapper, FORK_TEAM_SUM_ATTRIBUTE) else "absent")
        mode = (f"the team sum to every agent; each agent gets sum / {self.num_agents}" if self.wrapper_team_reward
                else "per-agent rewards, passed through")
        print(f"isaacgym: the wrapper returns {mode} ({how})", flush=True)
        self.exception_scale = float(getattr(self.wrapper, "exception_punishment_scale", -5.0))
        self.poisoned = torch.zeros_like(self.base_env.value_exception_buf)  # MQE resets these on the next step
        self.first_step = True

    def _make_wrapper(self, num_envs: int, seed: int, device, task: str):
        try:
            import isaacgym  # noqa: F401  (a real process must import it before torch: happo_mapush.py does)
            from isaacgym import gymapi
            from mqe.envs.utils import custom_cfg, make_mqe_env
        except ImportError as err:
            raise BackendUnavailable(ISAACGYM_HELP.format(err=err)) from None
        self.device = cuda_device(device)
        on_gpu = self.device.type == "cuda"
        # The fields MQE's make_env reads, set as HARL's MAPush env sets them.
        args = argparse.Namespace(
            num_envs=num_envs, seed=seed, record_video=False, headless=True, physics_engine=gymapi.SIM_PHYSX,
            sim_device=str(self.device), sim_device_type=self.device.type, compute_device_id=self.device.index or 0,
            rl_device=str(self.device), device=self.device.type, use_gpu=on_gpu, use_gpu_pipeline=on_gpu,
            subscenes=0, num_threads=0)
        task_config = task_config_class(task)
        set_size = custom_cfg(args)  # MQE's own: the number of envs, no video

        def config(default):  # MQE's `custom_cfg` hook: the task's config class replaces the installed one
            return set_size(task_config)

        wrapper, _ = make_mqe_env("go1push_mid", args, config)
        return wrapper

    def scene(self) -> Scene:
        return scene_from_mqe(self.wrapper)

    def reset(self) -> torch.Tensor:
        obs = self.wrapper.reset()
        self._reward_terms()  # drop anything accumulated before, so the first step's terms are that step's
        return obs.float()

    def randomize_episode_start(self) -> None:
        """As `VmasPushEnv.randomize_episode_start`, on MQE's `episode_length_buf` (torch's global generator)."""
        buf = self.base_env.episode_length_buf
        buf[:] = torch.randint(0, EPISODE_STEPS, buf.shape, device=buf.device).to(buf.dtype)

    def step(self, actions: torch.Tensor):
        check_actions(self, actions)
        obs, reward, done, _ = self.wrapper.step(actions)  # MQE clips to [-1, 1] and scales by 0.5 itself
        reward, done = reward.float(), done.to(torch.bool, copy=True)
        if self.first_step:
            self._check_team_sum(reward)
        if self.wrapper_team_reward:
            reward = reward / self.num_agents  # equal shares of the wrapper's team sum: the trainer must not sum twice
        finite = torch.isfinite(reward)
        nonfinite_reward = (~finite).sum(1)
        broken = nonfinite_reward > 0
        # An env whose rewards went non-finite ends as an exception: now if MQE resets it anyway, else on the next
        # step, when MQE's reset_buf picks up the value_exception_buf set here (MQE never clears it: the adapter does).
        ended = done & (self.poisoned | broken)
        reward = torch.where(ended.unsqueeze(1), torch.full_like(reward, self.exception_scale),
                             torch.where(finite, reward, torch.zeros_like(reward)))
        self.base_env.value_exception_buf[ended] = False
        self.poisoned = (self.poisoned | broken) & ~done
        self.base_env.value_exception_buf[self.poisoned] = True
        flagged = getattr(self.wrapper, "value_exception_buf", None)
        info = {  # this step's flags, set before MQE's auto-reset; copied, MQE reuses its buffers
            "success": self.base_env.finished_buf.to(torch.bool, copy=True),
            "time_out": self.base_env.time_out_buf.to(torch.bool, copy=True),
            "exception": self.base_env.exception_buf.to(torch.bool, copy=True) | ended,
            "reward_terms": self._reward_terms(),
            "nonfinite_obs": (torch.zeros(self.num_envs, dtype=torch.long, device=self.device) if flagged is None
                              else flagged.long()),
            "nonfinite_reward": nonfinite_reward,
        }
        return obs.float(), reward, done, info

    def _check_team_sum(self, reward: torch.Tensor) -> None:
        """A detected reward mode must match the first step: a team sum is the same for every agent in every env."""
        self.first_step = False
        finite = torch.isfinite(reward).all(1)
        same = bool((reward[finite] == reward[finite][:, :1]).all()) and bool(finite.any())
        if self.detected and same != self.wrapper_team_reward:
            raise BackendUnavailable(
                f"the wrapper's first rewards are {'the same' if same else 'different'} for every agent, but its "
                f"attributes say {'a team sum' if self.wrapper_team_reward else 'per-agent rewards'}; pass "
                f"wrapper_team_reward={same} to make_env if that is right")

    def _reward_terms(self) -> Dict[str, torch.Tensor]:
        buffer = getattr(self.wrapper, "reward_buffer", None)
        if not isinstance(buffer, dict):
            return {}
        names = [name for name in buffer if name not in MQE_NOT_REWARD_SUMS]
        # MQE keeps tensors or floats there; stacking on the device avoids a host round trip per term and step
        sums = torch.stack([torch.as_tensor(buffer[name], dtype=torch.float32, device=self.device).reshape(())
                            for name in names]) if names else torch.zeros(0, device=self.device)
        sums = torch.where(torch.isfinite(sums), sums, torch.zeros_like(sums))  # a NaN env poisons MQE's sums
        for name in names:
            buffer[name] = 0  # MQE only ever adds to it; only OpenRL's logger reads it, and that resets it too
        shares = (sums / self.num_envs).unsqueeze(1).expand(-1, self.num_envs)
        return {MQE_REWARD_TERMS.get(name, name): shares[i] for i, name in enumerate(names)}
