"""Which default reaches the success goal on every seed: a sweep of candidate defaults, arms run side by side.

Trains every arm (the default plus one changed setting each) for every seed, `--parallel` runs at a time with one
torch thread each, interleaved seed by seed so that the machine's speed that hour falls on all arms alike. Evaluates
the checkpoints nearest below `--at` million env steps with MAPush's calculator on `--eval-episodes` envs for each
of `--eval-seeds` (averaged), and writes `sweep.csv` and `sweep.md` (per seed; then IQM [95 % CI], min-max and
P(arm > default) per checkpoint, rliable via benchmarks/stats.py) into the output folder: a new
time-stamped folder under benchmarks/results/ unless `--out` names one (then finished runs are not trained again, and
unfinished ones continue from their newest checkpoint).

    python benchmarks/sweep.py --arms ent_coef_0.01 gae_lambda_0.98 actor_256x256 ppo_epochs_10 ent_coef_0.02 \
        --seeds 1 2 3 -- --ent-coef 0.01                  # the screen of docs/results.md
    python benchmarks/sweep.py --arms ent_coef_0.02 --seeds 4 5 6 7 8    # its confirmation on fresh seeds
    python benchmarks/sweep.py --out benchmarks/results/sweep_20261201-220000 --skip-training   # tables only
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Experiment, add_experiment_arguments  # noqa: E402

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
    # issue 21's candidates: the object's velocities and continuous yaws for the critic, cos/sin yaws for the actors.
    # They ran at f6f455a, whose default critic input was `global-state` (the field notes' 17 dims); `critic_full`
    # won there and is the default since, so `critic_17` is the old default now.
    "critic_full": ["--critic-input", "global-state-full"],
    "critic_17": ["--critic-input", "global-state"],
    "critic_vel": ["--critic-input", "global-state-vel"],
    "actor_cos_sin": ["--actor-input", "obs-cos-sin"],
    "critic_full_actor_cos_sin": ["--critic-input", "global-state-full", "--actor-input", "obs-cos-sin"],
    "anneal_lr": ["--anneal-lr"],
}
ENV_STEPS_PER_ITERATION = 512 * 20 * 5  # the default's num_envs x num_steps x action_repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["default"], choices=list(ARMS))
    add_experiment_arguments(parser, at=[10, 16, 20], seeds=[1, 2, 3])
    args = parser.parse_args()
    experiment = Experiment(args, "sweep", ENV_STEPS_PER_ITERATION)
    experiment.train([(arm, seed, ARMS[arm]) for seed in args.seeds for arm in args.arms])
    rows = [row for arm in args.arms for seed in args.seeds for row in experiment.evaluate(arm, seed, dict(arm=arm))]
    experiment.write(rows, lambda every_row: report(every_row, args))


def report(rows, args) -> str:
    """Per seed, then IQM [95 % CI], min-max and P(arm > default) per checkpoint (rliable, benchmarks/stats.py)."""
    from stats import table

    marks = " | ".join(f"{m:g} M" for m in args.at)
    lines = [f"| arm | seed | eval success at {marks} | wall-clock (min) |",
             "|---|---|" + "---|" * len(args.at) + "---|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        for seed in dict.fromkeys(r["seed"] for r in rows if r["arm"] == arm):
            mine = [r for r in rows if r["arm"] == arm and r["seed"] == seed]
            lines.append(f"| {arm} | {seed} | " + " | ".join(f"{100 * r['eval_success']:.1f} %" for r in mine)
                         + f" | {mine[0]['wall_clock_min']} |")
    arms = {r["arm"] for r in rows}
    return ("\n".join(lines) + f"\n\nMAPush's calculator on {args.eval_episodes} envs x {len(args.eval_seeds)} eval "
            "seeds; IQM [95 % CI], min-max (n seeds), rliable:\n\n"
            + table([{k: str(v) for k, v in r.items()} for r in rows], "arm", "eval_success",
                    improves_on="default" if "default" in arms and len(arms) > 1 else ""))


if __name__ == "__main__":
    main()
