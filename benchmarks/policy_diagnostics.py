"""What a policy does, and what the reward pays for doing it.

With a checkpoint: rolls out its deterministic policy (the mean action, as the calculator does) on `--envs` envs for
`--steps` steps and prints, per agent and action dim (vx, vy, yaw rate), the mean action, the share of steps where the
mean lies outside the env's [-1, 1] clip range, and the policy's std; then the mean agent-box distance, agent
separation and box-target distance over time (envs counted until their first episode ends), and how the first
episodes ended: success, exception (agents closer than 0.25 m; how many on the first decision, i.e. spawned
overlapping), time-out (with the box-target distance it was left at).

With `--reference-policies`: the team return over `--steps` steps (undiscounted and at gamma 0.99) of three
hand-written policies on the same envs: the scripted pusher of the tests, agents fleeing each other at full speed,
and agents standing still. Shows whether the reward itself prefers pushing.

    python benchmarks/policy_diagnostics.py runs/RUN/checkpoint_390.pt
    python benchmarks/policy_diagnostics.py --reference-policies
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import happo_mapush as H  # noqa: E402
from mapush_env import make_env, rotate  # noqa: E402
from scripted_pusher import scripted_actions  # noqa: E402

DIMS = ("vx", "vy", "yaw rate")
MARKS = (1, 50, 100, 200, 300, 500, 1000)  # env steps at which the report prints a row (the first decision past each)


def checkpoint_report(path: str, envs: int, steps: int, seed: int) -> None:
    checkpoint = H.load_checkpoint(path, "cpu")
    env = H.policy_env(checkpoint["args"], envs, "cpu", seed)  # a decision holds its action for env.k env steps
    actors = H.trained_actors(checkpoint, env)
    obs, means, alive = env.reset(), [], torch.ones(envs, dtype=torch.bool)
    outcome = {key: torch.zeros(envs, dtype=torch.bool) for key in ("success", "exception", "time_out")}
    first_decision = torch.zeros(envs, dtype=torch.bool)  # first episodes that ended within the first decision
    left_at = torch.zeros(envs)  # box-target distance when the first episode ended
    print(f"{path} (iteration {checkpoint['iteration']}, {checkpoint['global_step']} env steps)")
    print("step | envs in their first episode | agent-box distance (m) | agent separation (m) | box-target (m)")
    for step in range(env.k, steps + 1, env.k):
        with torch.no_grad():
            mean = H.mean_actions(actors, obs)
        means.append(mean[alive])
        obs, _, done, info = env.step(mean)
        ended = done & alive
        for key in outcome:
            outcome[key] |= ended & info[key]
        first_decision |= ended & (step == env.k)
        final = info["final_scene"]  # the pre-reset scene of envs that just ended
        left_at = torch.where(ended, torch.linalg.vector_norm(final.box_xy - final.target_xy, dim=-1), left_at)
        scene = env.scene()
        if any(step - env.k < mark <= step for mark in MARKS) and alive.any():
            box_dist = torch.linalg.vector_norm(scene.agent_xy - scene.box_xy.unsqueeze(1), dim=-1)[alive].mean()
            separation = torch.linalg.vector_norm(scene.agent_xy[:, 0] - scene.agent_xy[:, 1], dim=-1)[alive].mean()
            target = torch.linalg.vector_norm(scene.box_xy - scene.target_xy, dim=-1)[alive].mean()
            print(f"{step} | {int(alive.sum())} | {box_dist:.2f} | {separation:.2f} | {target:.2f}")
        alive &= ~done
    means = torch.cat(means)  # [samples, agents, 3]
    print("agent | dim | mean action | share of |mean| > 1 | std")
    for i, actor in enumerate(actors):
        std = actor.std().tolist()  # honours the run's --std-max
        for d, name in enumerate(DIMS):
            m = means[:, i, d]
            print(f"{i} | {name} | {m.mean():+.2f} | {(m.abs() > 1).float().mean():.2f} | {std[d]:.3f}")
    exception = outcome["exception"] & ~outcome["success"]  # exclusive, in the calculator's order
    time_out = outcome["time_out"] & ~outcome["success"] & ~outcome["exception"]
    print(f"first episodes of {envs} envs: {int(outcome['success'].sum())} success, {int(exception.sum())} exception "
          f"({int((exception & first_decision).sum())} within the first decision), "
          f"{int(time_out.sum())} time-out, {int(alive.sum())} still running after {steps} steps")
    if time_out.any():
        at = left_at[time_out]
        print(f"box-target distance at time-out (m): min {at.min():.2f}, quartiles "
              f"{', '.join(f'{q:.2f}' for q in torch.quantile(at, torch.tensor([0.25, 0.5, 0.75])).tolist())}, "
              f"max {at.max():.2f}; {int((at < 1.5).sum())} of them within 1.5 m (success: 1.0 m)")


def flee(scene) -> torch.Tensor:
    away = scene.agent_xy - scene.agent_xy.flip(1)
    away = away / torch.linalg.vector_norm(away, dim=-1, keepdim=True).clamp(min=1e-6)
    actions = torch.zeros(*scene.agent_yaw.shape, 3)
    actions[..., :2] = rotate(away, -scene.agent_yaw)  # full speed, body frame
    return actions


def still(scene) -> torch.Tensor:
    return torch.zeros(*scene.agent_yaw.shape, 3)


def reference_report(envs: int, steps: int, seed: int) -> None:
    print(f"team return per env over {steps} steps (first episode only), {envs} envs")
    print("policy | return | discounted return (gamma 0.99) | success | per env-step: approach, OCB, distance")
    for name, policy in (("scripted pusher", scripted_actions), ("flee", flee), ("stand still", still)):
        env = make_env("vmas", num_envs=envs, device="cpu", seed=seed)
        env.reset()
        alive = torch.ones(envs, dtype=torch.bool)
        ret, disc, success = torch.zeros(envs), torch.zeros(envs), torch.zeros(envs, dtype=torch.bool)
        terms, env_steps = {"approach": 0.0, "ocb": 0.0, "distance_to_target": 0.0}, 0
        for t in range(steps):
            _, reward, done, info = env.step(policy(env.scene()))
            team = reward.sum(1) * alive
            ret += team
            disc += 0.99**t * team
            success |= info["success"] & alive
            for term in terms:  # as MQE's reward_buffer: per-agent terms summed over agents, per env-step
                terms[term] += float((info["reward_terms"][term] * alive).sum())
            env_steps += int(alive.sum())
            alive &= ~done
        per_step = ", ".join(f"{terms[term] / env_steps:+.4f}" for term in terms)
        print(f"{name} | {ret.mean():.3f} | {disc.mean():.3f} | {success.float().mean():.3f} | {per_step}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--reference-policies", action="store_true")
    parser.add_argument("--envs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    if not args.checkpoint and not args.reference_policies:
        parser.error("give a checkpoint, --reference-policies, or both")
    if args.checkpoint:
        checkpoint_report(args.checkpoint, args.envs, args.steps, args.seed)
    if args.reference_policies:
        reference_report(args.envs, args.steps, args.seed)


if __name__ == "__main__":
    main()
