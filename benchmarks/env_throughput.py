"""Env-only throughput of the embedded backend: steps/s with random actions (no policy, no learning).

    python benchmarks/env_throughput.py                      # 512 and 2048 envs, disc agents, CPU
    python benchmarks/env_throughput.py --agent-shape box    # the rectangular Go1 footprint (slower)
    python benchmarks/env_throughput.py --tasks cuboid tblock cylinder --num-envs 512
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mapush_env import make_env  # noqa: E402


def measure(num_envs: int, steps: int, device: str, agent_shape: str, task: str = "cuboid") -> float:
    env = make_env("vmas", num_envs=num_envs, device=device, seed=0, agent_shape=agent_shape, task=task)
    env.reset()
    gen = torch.Generator(device=env.device).manual_seed(0)
    shape = (num_envs, env.num_agents, env.action_dim)
    for _ in range(20):  # warm-up
        env.step(torch.randn(shape, generator=gen, device=env.device))
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        env.step(torch.randn(shape, generator=gen, device=env.device))
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    return num_envs * steps / (time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-envs", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--agent-shape", default="disc", choices=["disc", "box"])
    parser.add_argument("--tasks", nargs="+", default=["cuboid"], choices=["cuboid", "tblock", "cylinder"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"agent shape {args.agent_shape}")
    for task in args.tasks:
        for n in args.num_envs:
            sps = measure(n, args.steps, args.device, args.agent_shape, task)
            print(f"task={task:8s}  num_envs={n:6d}  env-steps/s={sps:10.0f}")
