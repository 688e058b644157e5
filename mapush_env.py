"""The env front door: `make_env` builds a MAPush task on a backend, `evaluate` is MAPush's success calculator.

- `vmas` (default, `mapush_vmas.py`): a planar re-creation on VMAS's rigid-body `World`; docs/embedded_task.md.
- `isaacgym` (`mapush_isaacgym.py`, imported only when chosen): a thin adapter over MQE's `make_mqe_env`.
The tasks themselves (Scene, observations, rewards, termination) are `mapush_task.py`, which both backends import.

    env = make_env("vmas", num_envs=512, device="cpu", seed=0, task="cuboid", action_repeat=5)
    obs = env.reset()                               # [E, A, 2 + 3A]
    obs, reward, done, info = env.step(actions)     # actions [E, A, 3]; reward [E, A] per agent; done [E]
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from mapush_task import DT, TASKS, BackendUnavailable  # noqa: F401 (BackendUnavailable: the front door's error)
from mapush_vmas import VmasPushEnv

BACKENDS = ("vmas", "isaacgym")


def make_env(backend: str = "vmas", num_envs: int = 512, device="cpu", seed: int = 0, task: str = "cuboid",
             action_repeat: Optional[int] = None, **options):
    """Build `task` on `backend` with `num_envs` parallel envs on `device`; see the module docstring. With
    `action_repeat` k, the env is wrapped in `ActionRepeat(env, k)` (also for k = 1, which adds info["env_steps"])."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available tasks: {', '.join(TASKS)}")
    if backend == "vmas":
        env = VmasPushEnv(num_envs=num_envs, device=device, seed=seed, task=task, **options)
    elif backend == "isaacgym":  # imported here: it needs Isaac Gym and MQE, which only this backend uses
        from mapush_isaacgym import IsaacGymPushEnv

        env = IsaacGymPushEnv(num_envs=num_envs, device=device, seed=seed, task=task, **options)
    else:
        raise ValueError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    return env if action_repeat is None else ActionRepeat(env, action_repeat)


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
