"""Env-only throughput of the embedded backend: steps/s with random actions (no policy, no learning). Every env's
step counter starts at a random point of its episode (as the trainer's --random-episode-start), so the time-outs and
their resets are spread over the steps as in training.

    python benchmarks/env_throughput.py                      # 512 and 2048 envs, disc agents, CPU
    python benchmarks/env_throughput.py --agent-shape box    # the rectangular Go1 footprint (slower)
    python benchmarks/env_throughput.py --tasks cuboid tblock cylinder --num-envs 512
    git worktree add /tmp/before <commit>                    # side by side with another checkout, and the task
    python benchmarks/env_throughput.py --against /tmp/before --vmas-make-env --rounds 3   # through vmas.make_env

`--cpu-time` divides by the process's CPU time instead of the wall-clock: on a machine busy with other work (and one
torch thread) it leaves out the time spent waiting for a core.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mapush_env  # noqa: E402


def load_env_module(checkout: str):
    """`mapush_env.py` of another checkout, imported under its own name."""
    spec = importlib.util.spec_from_file_location("mapush_env_against", os.path.join(checkout, "mapush_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def measure(num_envs: int, steps: int, device: str, agent_shape: str, task: str = "cuboid", module=mapush_env) -> float:
    env = module.make_env("vmas", num_envs=num_envs, device=device, seed=0, agent_shape=agent_shape, task=task)
    env.reset()
    env.randomize_episode_start()
    gen = torch.Generator(device=env.device).manual_seed(0)
    shape = (num_envs, env.num_agents, env.action_dim)
    for _ in range(20):  # warm-up
        env.step(torch.randn(shape, generator=gen, device=env.device))
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    start = CLOCK()
    for _ in range(steps):
        env.step(torch.randn(shape, generator=gen, device=env.device))
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    return num_envs * steps / (CLOCK() - start)


def measure_vmas(num_envs: int, steps: int, device: str, agent_shape: str, task: str = "cuboid") -> float:
    """The same through `vmas.make_env(PushScenario())`; each done env is reset by `reset_at`, as TorchRL does."""
    import vmas

    env = vmas.make_env(mapush_env.PushScenario(), num_envs=num_envs, device=device, seed=0, clamp_actions=True,
                        task=task, agent_shape=agent_shape)
    scenario = env.scenario
    scenario.step_count = torch.randint(0, mapush_env.EPISODE_STEPS, (num_envs,), device=scenario.device)
    gen = torch.Generator(device=scenario.device).manual_seed(0)
    shape = (num_envs, scenario.action_dim)

    def step():
        _, _, done, _ = env.step([torch.randn(shape, generator=gen, device=scenario.device).clamp(-1, 1)
                                  for _ in scenario.agents])
        for i in done.nonzero()[:, 0].tolist():
            env.reset_at(i, return_observations=False)

    for _ in range(20):
        step()
    start = CLOCK()
    for _ in range(steps):
        step()
    return num_envs * steps / (CLOCK() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-envs", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--agent-shape", default="disc", choices=["disc", "box"])
    parser.add_argument("--tasks", nargs="+", default=["cuboid"], choices=["cuboid", "tblock", "cylinder"])
    parser.add_argument("--against", help="another checkout (e.g. a git worktree of an earlier commit): its "
                        "VmasPushEnv is measured in the same rounds")
    parser.add_argument("--vmas-make-env", action="store_true", help="also measure through vmas.make_env")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the variants this many times; medians")
    parser.add_argument("--cpu-time", action="store_true", help="env steps per second of this process's CPU time")
    args = parser.parse_args()
    if args.cpu_time:
        CLOCK = time.process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"agent shape {args.agent_shape}, {'per CPU second' if args.cpu_time else 'per wall-clock second'}")
    variants = {"VmasPushEnv": lambda *a: measure(*a)}
    if args.against:
        against = load_env_module(args.against)
        variants[f"VmasPushEnv of {args.against}"] = lambda *a: measure(*a, module=against)
    if args.vmas_make_env:
        variants["vmas.make_env + reset_at"] = measure_vmas
    for task in args.tasks:
        for n in args.num_envs:
            rates = {name: [] for name in variants}
            for _ in range(args.rounds):  # interleaved, so the machine's load falls on every variant alike
                for name, run in variants.items():
                    rates[name].append(run(n, args.steps, args.device, args.agent_shape, task))
            for name, values in rates.items():
                spread = f" ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""
                print(f"task={task:8s}  num_envs={n:6d}  {name:40s} env-steps/s={statistics.median(values):10.0f}"
                      f"{spread}", flush=True)
