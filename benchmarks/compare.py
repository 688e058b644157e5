"""HAPPO or MAPPO on MAPush: the same script, only the update mechanism differs between the arms.

Arms (flags appended to every run's, so they win):
- `happo`: the default (a separate actor per agent, sequential updates weighted by the factor);
- `happo_simultaneous`: `--no-sequential` (separate actors, all updated against factor 1);
- `mappo`: `--share-actor --no-sequential` (one actor for all agents, one PPO update on all agents' samples, as
  MAPush's OpenRL PPO, which adds no agent id to the observation either).
Every (seed, task, arm) run trains side by side with the others, `--parallel` at a time with one torch thread each,
interleaved seed by seed, so the machine's speed that hour falls on all arms alike. The checkpoints at `--at` million
env steps are evaluated with MAPush's calculator on `--eval-episodes` envs for each of `--eval-seeds`. Output, in a
new benchmarks/results/compare_<time> unless `--out` names an earlier one (then finished runs are kept and unfinished
ones continue from their newest checkpoint, so a table can span sessions): `compare.csv`, and `compare.md` with
IQM [95 % CI], min-max and P(happo > arm) per task and checkpoint (rliable, benchmarks/stats.py), the training
wall-clock per iteration, and the update time per iteration (both actor and critic updates, timed here on one thread).

    python benchmarks/compare.py --tasks cuboid cylinder --seeds 1 2 3 4 5
    python benchmarks/compare.py --out benchmarks/results/compare_20261202-040000 --tasks cuboid cylinder \\
        --seeds 1 2 3 4 5                                   # continue it in a later session
    python benchmarks/compare.py --out ... --skip-training  # the tables only
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from functools import reduce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import checkpoints, evaluate_checkpoint, fresh_folder, run_all, run_dir, training_seconds  # noqa: E402

ARMS = {"happo": [], "happo_simultaneous": ["--no-sequential"], "mappo": ["--share-actor", "--no-sequential"]}
ENV_STEPS_PER_ITERATION = 512 * 20 * 5  # the default's num_envs x num_steps x action_repeat


def update_seconds(task: str, arm: str, repeats: int = 3) -> float:
    """Seconds of one iteration's actor and critic updates at the default sizes, on a random batch, one thread."""
    import torch

    import happo_mapush as H
    from mapush_env import make_env

    torch.set_num_threads(1)
    args = H.check_args(H.tyro.cli(H.Args, args=ARMS[arm] + ["--task", task]))
    env = make_env("vmas", num_envs=1, task=task)
    m = H.build_models(args, env, torch.device("cpu"))
    B, A = args.num_envs * args.num_steps, env.num_agents
    obs, actions = torch.randn(B, A, env.obs_dim), torch.randn(B, A, env.action_dim)
    logprobs, advantages = torch.randn(B, A) - 3.0, torch.randn(B)
    inputs, values, returns = torch.randn(B, m.critic_input_dim), torch.randn(B), torch.randn(B)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        H.happo_actor_update(m.actors, m.actor_optimizers, obs, actions, logprobs, advantages, args)
        H.critic_update(m.critic, m.critic_optimizer, m.value_norm, inputs, values, returns, args)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["cuboid", "cylinder"], choices=["cuboid", "tblock", "cylinder"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--at", type=float, nargs="+", default=[10, 20], help="evaluate at these M env steps")
    parser.add_argument("--eval-episodes", type=int, default=1024)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[10_000, 10_001])
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", help="output folder (default: a new benchmarks/results/compare_<time>)")
    parser.add_argument("--skip-training", action="store_true", help="only evaluate the runs already in --out")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="after `--`: flags for every run")
    args = parser.parse_args()
    if args.skip_training and not args.out:
        parser.error("--skip-training reads an earlier comparison: name its folder with --out")
    out = args.out or fresh_folder("compare")
    iterations = [int(m * 1e6 // ENV_STEPS_PER_ITERATION) for m in args.at]  # the checkpoints at or below --at
    common = [f for f in args.trainer_flags if f != "--"]
    common += ["--total-timesteps", str(max(iterations) * ENV_STEPS_PER_ITERATION), "--save-interval",
               str(reduce(math.gcd, iterations))]
    runs = [(seed, task, arm) for seed in args.seeds for task in args.tasks for arm in args.arms]
    if not args.skip_training:
        jobs = [(out, f"{task}_{arm}", seed, common + ["--task", task] + ARMS[arm]) for seed, task, arm in runs
                if not finished(out, f"{task}_{arm}", seed, max(iterations))]
        run_all(jobs, args.parallel, args.threads)

    rows = []
    for seed, task, arm in runs:
        try:
            directory = run_dir(out, f"{task}_{arm}", seed)
        except FileNotFoundError:
            continue  # not trained yet: the table covers what exists
        saved = dict(checkpoints(directory))
        per_iteration = training_seconds(directory) / max(saved) if saved else math.nan
        for iteration in (i for i in iterations if i in saved):
            evals = [evaluate_checkpoint(saved[iteration], args.eval_episodes, s) for s in args.eval_seeds]
            rows.append(dict(task=task, arm=arm, seed=seed, iteration=iteration, env_steps=evals[0][2],
                             eval_success=round(statistics.mean(e[0] for e in evals), 4),
                             eval_completion_s=round(statistics.mean(e[1] for e in evals), 3),
                             wall_clock_s_per_iteration=round(per_iteration, 3)))
            print(rows[-1], flush=True)
    if not rows:
        raise SystemExit(f"error: no evaluated checkpoint under {out}")
    with open(os.path.join(out, "compare.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(report(rows, args))
    print(open(os.path.join(out, "compare.md")).read())
    print(f"wrote {out}/compare.csv and compare.md")


def finished(out: str, exp_name: str, seed: int, last: int) -> bool:
    try:
        return last in dict(checkpoints(run_dir(out, exp_name, seed)))
    except FileNotFoundError:
        return False


def report(rows, args) -> str:
    from stats import table

    parts = [f"Eval success, MAPush's calculator on {args.eval_episodes} envs x {len(args.eval_seeds)} eval seeds; "
             "IQM [95 % CI], min-max (n seeds), rliable.\n"]
    for task in args.tasks:
        mine = [{k: str(v) for k, v in r.items()} for r in rows if r["task"] == task]
        if mine:
            baseline = "happo" if any(r["arm"] == "happo" for r in mine) else ""
            parts += [f"\n### {task}\n\n", table(mine, "arm", "eval_success", baseline)]
    parts.append("\nTime per iteration (s): training wall-clock (TensorBoard event times, median over seeds; "
                 "runs side by side) and the actor + critic update alone (one thread, a random batch):\n\n"
                 "| task | arm | training | update |\n|---|---|---|---|\n")
    for task in args.tasks:
        for arm in args.arms:
            walls = [r["wall_clock_s_per_iteration"] for r in rows if r["task"] == task and r["arm"] == arm]
            if walls:
                parts.append(f"| {task} | {arm} | {statistics.median(walls):.2f} | "
                             f"{update_seconds(task, arm):.2f} |\n")
    return "".join(parts)


if __name__ == "__main__":
    main()
