"""HAPPO or MAPPO on MAPush: the same script, only the update mechanism differs between the arms.

Arms (flags appended to every run's, so they win):
- `happo`: the default (a separate actor per agent, sequential updates weighted by the factor);
- `happo_simultaneous`: `--no-sequential` (separate actors, all updated against factor 1);
- `happo_shared`: `--share-actor` (one actor, HARL's share_param, still updated agent by agent with the factor);
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
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Experiment, add_experiment_arguments  # noqa: E402

ARMS = {"happo": [], "happo_simultaneous": ["--no-sequential"], "happo_shared": ["--share-actor"],
        "mappo": ["--share-actor", "--no-sequential"]}
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
    add_experiment_arguments(parser, at=[10, 20], seeds=[1, 2, 3, 4, 5])
    args = parser.parse_args()
    experiment = Experiment(args, "compare", ENV_STEPS_PER_ITERATION)
    runs = [(seed, task, arm) for seed in args.seeds for task in args.tasks for arm in args.arms]
    experiment.train([(f"{task}_{arm}", seed, ["--task", task] + ARMS[arm]) for seed, task, arm in runs])
    # a run not trained yet has no rows: the table covers what exists
    rows = [row for seed, task, arm in runs
            for row in experiment.evaluate(f"{task}_{arm}", seed, dict(task=task, arm=arm))]
    experiment.write(rows, lambda every_row: report(every_row, args))


def report(rows, args) -> str:
    from stats import table

    parts = [f"Eval success, MAPush's calculator on {args.eval_episodes} envs x {len(args.eval_seeds)} eval seeds; "
             "IQM [95 % CI], min-max (n seeds), rliable.\n"]
    tasks, arms = list(dict.fromkeys(r["task"] for r in rows)), list(dict.fromkeys(r["arm"] for r in rows))
    for task in tasks:
        mine = [{k: str(v) for k, v in r.items()} for r in rows if r["task"] == task]
        if mine:
            baseline = "happo" if any(r["arm"] == "happo" for r in mine) else ""
            parts += [f"\n### {task}\n\n", table(mine, "arm", "eval_success", baseline)]
    parts.append("\nTime per iteration (s): training wall-clock (TensorBoard event times, median over seeds; "
                 "runs side by side) and the actor + critic update alone (one thread, a random batch):\n\n"
                 "| task | arm | training | update |\n|---|---|---|---|\n")
    for task in tasks:
        for arm in arms:
            walls = [r["wall_clock_s_per_iteration"] for r in rows if r["task"] == task and r["arm"] == arm]
            if walls:
                parts.append(f"| {task} | {arm} | {statistics.median(walls):.2f} | "
                             f"{update_seconds(task, arm):.2f} |\n")
    return "".join(parts)


if __name__ == "__main__":
    main()
