"""Which default reaches the success goal on every seed: a sweep of candidate defaults, arms run side by side.

Trains every arm (the default plus one changed setting each) for every seed, `--parallel` runs at a time with one
torch thread each, interleaved seed by seed so that the machine's speed that hour falls on all arms alike. Evaluates
the checkpoints nearest below `--at` million env steps with MAPush's calculator on `--eval-episodes` envs for each
of `--eval-seeds` (averaged), and writes `sweep.csv` and a markdown table (`sweep.md`) into the output folder: a new
time-stamped folder under benchmarks/results/ unless `--out` names one (then finished runs are not trained again, and
unfinished ones continue from their newest checkpoint).

    python benchmarks/sweep.py --arms ent_coef_0.01 gae_lambda_0.98 actor_256x256 ppo_epochs_10 ent_coef_0.02 \
        --seeds 1 2 3 -- --ent-coef 0.01                  # the screen of docs/results.md
    python benchmarks/sweep.py --arms ent_coef_0.02 --seeds 4 5 6 7 8    # its confirmation on fresh seeds
    python benchmarks/sweep.py --out benchmarks/results/sweep_20261201-220000 --skip-training   # tables only
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
from functools import reduce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import checkpoints, evaluate_checkpoint, fresh_folder, run_all, run_dir, training_seconds  # noqa: E402

# Each arm changes one setting of the default (flags appended after the common flags, so they win). The sweep of
# docs/results.md ran while the default entropy coefficient was 0.01: rerun it with `-- --ent-coef 0.01`.
ARMS = {
    "default": [],
    "ent_coef_0.01": ["--ent-coef", "0.01"],
    "gae_lambda_0.98": ["--gae-lambda", "0.98"],
    "actor_256x256": ["--hidden-sizes", "256", "256"],
    "ppo_epochs_10": ["--ppo-epochs", "10"],
    "ent_coef_0.02": ["--ent-coef", "0.02"],
    "value_norm_per_minibatch": ["--value-norm-update", "per-minibatch"],
    "critic_lr_1e-4": ["--critic-lr", "1e-4"],
}
ENV_STEPS_PER_ITERATION = 512 * 20 * 5  # the default's num_envs x num_steps x action_repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["default"], choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--at", type=float, nargs="+", default=[10, 16, 20], help="evaluate at these M env steps")
    parser.add_argument("--eval-episodes", type=int, default=1024)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[10_000, 10_001])
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", help="output folder (default: a new benchmarks/results/sweep_<time>)")
    parser.add_argument("--skip-training", action="store_true", help="only evaluate the runs already in --out")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="after `--`: flags for every run")
    args = parser.parse_args()
    if args.skip_training and not args.out:
        parser.error("--skip-training reads an earlier sweep: name its folder with --out")
    out = args.out or fresh_folder("sweep")
    iterations = [int(m * 1e6 // ENV_STEPS_PER_ITERATION) for m in args.at]  # the checkpoints at or below --at
    save_interval = reduce(math.gcd, iterations)
    common = [f for f in args.trainer_flags if f != "--"]
    common += ["--total-timesteps", str(max(iterations) * ENV_STEPS_PER_ITERATION), "--save-interval",
               str(save_interval)]
    if not args.skip_training:
        jobs = [(out, arm, seed, common + ARMS[arm]) for seed in args.seeds for arm in args.arms
                if not finished(out, arm, seed, max(iterations))]
        run_all(jobs, args.parallel, args.threads)

    rows = []
    for arm in args.arms:
        for seed in args.seeds:
            directory = run_dir(out, arm, seed)
            saved = dict(checkpoints(directory))
            wall = training_seconds(directory)
            for iteration in iterations:
                evals = [evaluate_checkpoint(saved[iteration], args.eval_episodes, s) for s in args.eval_seeds]
                rows.append(dict(arm=arm, seed=seed, iteration=iteration, env_steps=evals[0][2],
                                 eval_success=round(statistics.mean(e[0] for e in evals), 4),
                                 eval_completion_s=round(statistics.mean(e[1] for e in evals), 3),
                                 wall_clock_min=round(wall / 60, 1)))
                print(rows[-1], flush=True)
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, args.at, len(args.eval_seeds) * args.eval_episodes)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {out}/sweep.csv and sweep.md")


def finished(out: str, arm: str, seed: int, last: int) -> bool:
    try:
        return last in dict(checkpoints(run_dir(out, arm, seed)))
    except FileNotFoundError:
        return False


def markdown(rows, at, episodes: int) -> str:
    marks = " | ".join(f"{m:g} M" for m in at)
    lines = [f"| arm | seed | eval success at {marks} | wall-clock (min) |", "|---|---|" + "---|" * len(at) + "---|"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        for seed in dict.fromkeys(r["seed"] for r in mine):
            cells = [f"{100 * r['eval_success']:.1f} %" for r in mine if r["seed"] == seed]
            wall = next(r["wall_clock_min"] for r in mine if r["seed"] == seed)
            lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + f" | {wall} |")
    lines += ["", f"Mean and range over seeds ({episodes} eval episodes per cell):", "",
              f"| arm | {marks} |", "|---|" + "---|" * len(at)]
    for arm in arms:
        cells = []
        for iteration in dict.fromkeys(r["iteration"] for r in rows):
            values = [100 * r["eval_success"] for r in rows if r["arm"] == arm and r["iteration"] == iteration]
            cells.append(f"{statistics.mean(values):.1f} % ({min(values):.1f}-{max(values):.1f})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
