"""How rigid the embedded T-block stays: the largest drift of its links from their rigid places within one step.

The T-block is two VMAS boxes (the URDF's bar and stem) that `_make_rigid` puts back into one rigid pose after
every physics substep, keeping their total momentum. Between those projections, within one 10 ms substep, contacts
push the links apart a little; `env.rigid_error` is that drift (the largest over a step's substeps). This script
drives the T-block as training does (a checkpoint's stochastic policy with its action repeat), with random actions,
or with both agents charging the T's centre at full speed (they squeeze its links between them), and prints the
drift's largest value and percentiles over all envs and env steps, and the T's largest yaw rate.

    python benchmarks/tblock_rigidity.py runs/RUN/checkpoint_390.pt      # a trained T-block policy
    python benchmarks/tblock_rigidity.py                                  # uniform random actions in [-1, 1]
    python benchmarks/tblock_rigidity.py --charge                         # both agents charge the centre
    python benchmarks/tblock_rigidity.py --charge --against /tmp/before   # another checkout's env (git worktree)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import happo_mapush as H  # noqa: E402
import mapush_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a T-block run's checkpoint (default: random actions)")
    parser.add_argument("--envs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2000, help="env steps (0.02 s each)")
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--charge", action="store_true", help="both agents run at the T's centre (plus noise)")
    parser.add_argument("--against", help="another checkout: measure its mapush_env.py instead")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    module = mapush_env
    if args.against:
        spec = importlib.util.spec_from_file_location("mapush_env_against", os.path.join(args.against, "mapush_env.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    env = module.make_env("vmas", num_envs=args.envs, seed=args.seed, task="tblock")
    obs, actors, hold = env.reset(), None, 1
    if args.checkpoint:
        checkpoint = H.load_checkpoint(args.checkpoint, "cpu")
        if checkpoint["args"]["task"] != "tblock":
            raise SystemExit(f"error: {args.checkpoint} is a {checkpoint['args']['task']} run, not a T-block one")
        actors, hold = H.trained_actors(checkpoint, env), checkpoint["args"]["action_repeat"]
    errors, pushing, spin = [], [], 0.0
    with torch.no_grad():
        for step in range(args.steps):
            if step % hold == 0:  # a new decision, held for `hold` steps as in training
                if args.charge:  # full speed (command 2 > 1 is clipped) at the centre, noise 0.3, no turning
                    s = env.scene()
                    to_box = s.box_xy.unsqueeze(1) - s.agent_xy
                    forward = mapush_env.rotate(to_box / torch.linalg.vector_norm(to_box, dim=-1, keepdim=True),
                                                -s.agent_yaw)
                    actions = torch.cat([2.0 * forward, torch.zeros(args.envs, env.num_agents, 1)], -1)
                    actions = actions + 0.3 * torch.randn(args.envs, env.num_agents, 3)
                elif actors is None:
                    actions = torch.rand(args.envs, env.num_agents, 3) * 2 - 1
                else:
                    actions = torch.stack([actors[i % len(actors)].dist(obs[:, i]).sample()
                                           for i in range(env.num_agents)], dim=1)
            obs, _, _, info = env.step(actions)
            errors.append(env.rigid_error.clone())
            spin = max(spin, float(env.box.state.ang_vel.abs().max()))
            pushing.append(info["reward_terms"]["push"] > 0)
    errors, pushing = torch.stack(errors).flatten(), torch.stack(pushing).flatten()
    q = torch.quantile(errors, torch.tensor([0.5, 0.99, 0.999]))
    source = args.checkpoint or ("both agents charging" if args.charge else "random actions")
    source += f" (env of {args.against})" if args.against else ""
    line = (f"T-block link drift, {args.envs} envs x {args.steps} env steps, {source}: largest "
            f"{1000 * errors.max():.2f} mm; median {1000 * q[0]:.3f} mm, 99th percentile {1000 * q[1]:.3f} mm, "
            f"99.9th {1000 * q[2]:.3f} mm; largest yaw rate {spin:.1f} rad/s")
    if pushing.any():
        line += (f"; while the object moves faster than 0.1 m/s ({100 * pushing.float().mean():.0f} % of steps): "
                 f"largest {1000 * errors[pushing].max():.2f} mm")
    print(line)

if __name__ == "__main__":
    main()
