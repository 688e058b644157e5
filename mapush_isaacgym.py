"""The `isaacgym` backend: MAPush's real `go1push_mid` (MQE on Isaac Gym) behind the contract of `mapush_env`.

Imported only when `--env-backend isaacgym` is chosen (`mapush_env.make_env`); it needs Python 3.8, Isaac Gym
Preview 4, a CUDA GPU and a MAPush checkout (docs/isaacgym.md has the recipe).
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Optional

import torch

from global_state import scene_from_mqe
from mapush_env import EPISODE_STEPS, BackendUnavailable, Scene, check_actions

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
# Attributes only the fork's wrapper has (alexei-erm/heterogeneous-MAPush, spec 5.9); that wrapper also sums the
# per-agent rewards and gives every agent the team sum (spec 5.8).
FORK_WRAPPER_ATTRIBUTES = ("individualized_rewards", "shared_gated_rewards")


class IsaacGymPushEnv:
    """`go1push_mid` on Isaac Gym: a thin adapter over MQE's `make_mqe_env` with the contract of DESIGN.md.

    - Team reward: the contract's rewards are per agent and the trainer forms the team reward, so it must not get a
      reward that is already a team sum. Upstream MAPush's wrapper returns per-agent rewards (passed through); the
      fork's wrapper returns the team sum to every agent, so the adapter returns equal shares, sum / num_agents, and
      the trainer's `--team-reward sum` gives back the team sum (exactly for 2 agents). `wrapper_team_reward=None`
      detects the fork by its fork-only attributes `individualized_rewards` / `shared_gated_rewards`; pass True or
      False for a wrapper that sums without them or has them without summing.
    - Working directory: MQE loads its assets, locomotion policy and actuator net by paths relative to the MAPush
      root, all during construction. Given `mapush_root` (default: $MAPUSH_ROOT), the adapter imports MQE and builds
      the env there, then returns to the caller's directory (so `runs/` lands where the user started); without it
      the process must already run from the MAPush root.
    - No final observation (MQE has none): time-outs are terminal for the trainer. No state_dict: resuming a run
      restarts the simulator's episodes.
    - info["reward_terms"]: MQE keeps only running sums over all envs (`reward_buffer`). The adapter reads and zeroes
      them every step, so each term's sum over envs is this step's exact sum; each env's entry holds that sum / E
      (MQE keeps no per-env values). info["nonfinite_obs"]: 1 for an env whose observation MQE found NaN/Inf and
      zeroed (its `value_exception_buf`), else 0.
    """

    def __init__(self, num_envs: int, device="cuda:0", seed: int = 0, mapush_root: Optional[str] = None,
                 wrapper_team_reward: Optional[bool] = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        root = mapush_root if mapush_root is not None else os.environ.get("MAPUSH_ROOT")
        cwd = os.getcwd()
        if root:
            os.chdir(root)
        try:  # import inside the MAPush root too: MQE's helpers put cwd-relative folders on sys.path at import
            self.wrapper = self._make_wrapper(num_envs, seed)
        finally:
            os.chdir(cwd)
        self.base_env = getattr(self.wrapper, "env", self.wrapper)  # MQE's Go1Object: flags and state buffers
        self.num_envs, self.num_agents = int(self.base_env.num_envs), int(self.base_env.num_agents)
        self.obs_dim, self.action_dim, self.episode_steps = 2 + 3 * self.num_agents, 3, EPISODE_STEPS
        if wrapper_team_reward is None:
            wrapper_team_reward = any(hasattr(self.wrapper, name) for name in FORK_WRAPPER_ATTRIBUTES)
        self.wrapper_team_reward = bool(wrapper_team_reward)

    def _make_wrapper(self, num_envs: int, seed: int):
        try:
            import isaacgym  # noqa: F401  (a real process must import it before torch: happo_mapush.py does)
            from isaacgym import gymapi
            from mqe.envs.utils import custom_cfg, make_mqe_env
        except ImportError as err:
            raise BackendUnavailable(ISAACGYM_HELP.format(err=err)) from None
        on_gpu = self.device.type == "cuda"
        # The fields MQE's make_env reads, set as HARL's MAPushEnv sets them (spec 9.1).
        args = argparse.Namespace(
            num_envs=num_envs, seed=seed, record_video=False, headless=True, physics_engine=gymapi.SIM_PHYSX,
            sim_device=str(self.device), sim_device_type=self.device.type, compute_device_id=self.device.index or 0,
            rl_device=str(self.device), device=self.device.type, use_gpu=on_gpu, use_gpu_pipeline=on_gpu,
            subscenes=0, num_threads=0)
        wrapper, _ = make_mqe_env("go1push_mid", args, custom_cfg(args))
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
        reward = reward.float()
        if self.wrapper_team_reward:
            reward = reward / self.num_agents  # equal shares of the wrapper's team sum: the trainer must not sum twice
        nonfinite = getattr(self.wrapper, "value_exception_buf", None)
        info = {  # this step's flags, set before MQE's auto-reset (spec 6.3); copied, MQE reuses its buffers
            "success": self.base_env.finished_buf.to(torch.bool, copy=True),
            "time_out": self.base_env.time_out_buf.to(torch.bool, copy=True),
            "exception": self.base_env.exception_buf.to(torch.bool, copy=True),
            "reward_terms": self._reward_terms(),
            "nonfinite_obs": (torch.zeros(self.num_envs, dtype=torch.long, device=self.device) if nonfinite is None
                              else nonfinite.long()),
        }
        return obs.float(), reward, done.to(torch.bool, copy=True), info

    def _reward_terms(self) -> Dict[str, torch.Tensor]:
        buffer = getattr(self.wrapper, "reward_buffer", None)
        if not isinstance(buffer, dict):
            return {}
        names = [name for name in buffer if name not in MQE_NOT_REWARD_SUMS]
        # MQE keeps tensors or floats there; stacking on the device avoids a host round trip per term and step
        sums = torch.stack([torch.as_tensor(buffer[name], dtype=torch.float32, device=self.device).reshape(())
                            for name in names]) if names else torch.zeros(0, device=self.device)
        for name in names:
            buffer[name] = 0  # MQE only ever adds to it; only OpenRL's logger reads it, and that resets it too
        shares = (sums / self.num_envs).unsqueeze(1).expand(-1, self.num_envs)
        return {MQE_REWARD_TERMS.get(name, name): shares[i] for i, name in enumerate(names)}
