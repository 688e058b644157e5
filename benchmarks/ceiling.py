"""The highest eval success MAPush's calculator can report on the embedded tasks: spawn overlaps end episodes at once.

The task spawns the agents at random, and a pair closer than the collision distance (0.25 m; the T-block 0.27 m)
ends the episode as an exception on its first env step, whatever the policy does (MAPush: about 6 % of its episodes;
docs/embedded_task.md). The calculator counts each env's first episode, so on a given eval seed those envs can never
succeed. This script counts them: one decision of zero actions on `--eval-episodes` envs per eval seed, the envs
that ended (all of them by an exception), and the ceiling = 1 - ended / envs, averaged over the eval seeds as the
benchmarks average their success. A trained policy cannot do better; benchmarks/diagnose.py counts the same
first-decision collisions under a policy (one borderline env can differ: a policy may pull a pair apart in time).

    python benchmarks/ceiling.py                      # cuboid, T-block, cylinder on eval seeds 10000 and 10001
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import happo_mapush as H  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["cuboid", "tblock", "cylinder"])
    parser.add_argument("--eval-episodes", type=int, default=1024)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[10_000, 10_001])
    args = parser.parse_args()
    print("| task | " + " | ".join(f"ended at spawn, eval seed {s}" for s in args.eval_seeds) + " | ceiling |")
    print("|---|" + "---|" * len(args.eval_seeds) + "---|")
    for task in args.tasks:
        ended = []
        for seed in args.eval_seeds:
            env = H.policy_env(dict(env_backend="vmas", task=task, action_repeat=5), args.eval_episodes, "cpu", seed)
            obs = env.reset()
            _, _, done, info = env.step(torch.zeros(obs.shape[0], obs.shape[1], env.action_dim))
            assert bool((done == info["exception"]).all()), "only exceptions can end an episode on its first decision"
            ended.append(int(done.sum()))
        ceiling = 1.0 - sum(ended) / (len(ended) * args.eval_episodes)
        cells = " | ".join(f"{n} of {args.eval_episodes}" for n in ended)
        print(f"| {task} | {cells} | {100 * ceiling:.1f} % |")


if __name__ == "__main__":
    main()
