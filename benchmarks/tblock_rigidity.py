"""How rigid the embedded T-block stays: the largest drift of its links from their rigid places within one step.

The T-block is two VMAS boxes (the URDF's bar and stem) that `VmasPushEnv._make_rigid` puts back into one rigid
pose after every physics step, keeping their total momentum. Between those projections, within one 0.02 s step,
contacts push the links apart a little; `env.rigid_error` is that drift. This script drives the T-block as training
does (a checkpoint's stochastic policy with its action repeat, or random actions without one) and prints the drift's
largest value and percentiles over all envs and env steps.

    python benchmarks/tblock_rigidity.py runs/RUN/checkpoint_390.pt      # a trained T-block policy
    python benchmarks/tblock_rigidity.py                                  # uniform random actions in [-1, 1]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import happo_mapush as H  # noqa: E402
from mapush_env import make_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a T-block run's checkpoint (default: random actions)")
    parser.add_argument("--envs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2000, help="env steps (0.02 s each)")
    parser.add_argument("--seed", type=int, default=10_000)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    env = make_env("vmas", num_envs=args.envs, seed=args.seed, task="tblock")
    obs, actors, hold = env.reset(), None, 1
    if args.checkpoint:
        checkpoint = H.load_checkpoint(args.checkpoint, "cpu")
        if checkpoint["args"]["task"] != "tblock":
            raise SystemExit(f"error: {args.checkpoint} is a {checkpoint['args']['task']} run, not a T-block one")
        actors, hold = H.trained_actors(checkpoint, env), checkpoint["args"]["action_repeat"]
    errors, pushing = [], []
    with torch.no_grad():
        for step in range(args.steps):
            if step % hold == 0:  # a new decision, held for `hold` steps as in training
                if actors is None:
                    actions = torch.rand(args.envs, env.num_agents, 3) * 2 - 1
                else:
                    actions = torch.stack([actors[i % len(actors)].dist(obs[:, i]).sample()
                                           for i in range(env.num_agents)], dim=1)
            obs, _, _, info = env.step(actions)
            errors.append(env.rigid_error.clone())
            pushing.append(info["reward_terms"]["push"] > 0)
    errors, pushing = torch.stack(errors).flatten(), torch.stack(pushing).flatten()
    q = torch.quantile(errors, torch.tensor([0.5, 0.99, 0.999]))
    source = args.checkpoint or "random actions"
    print(f"T-block link drift within one step, {args.envs} envs x {args.steps} env steps, {source}: largest "
          f"{1000 * errors.max():.2f} mm; median {1000 * q[0]:.3f} mm, 99th percentile {1000 * q[1]:.3f} mm, "
          f"99.9th {1000 * q[2]:.3f} mm; while the object moves faster than 0.1 m/s ({100 * pushing.float().mean():.0f} "
          f"% of steps): largest {1000 * errors[pushing].max():.2f} mm" if pushing.any() else "")


if __name__ == "__main__":
    main()
