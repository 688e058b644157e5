"""What each documented critic fix is worth: every arm against the default, same seeds and budget.

For each arm and seed, trains `happo_mapush.py` with the arm's flags (plus the common flags after `--`), then reads
the critic's value loss, explained variance and training success rate from TensorBoard and evaluates the final
checkpoint with MAPush's calculator. Writes the runs, per-iteration curves and a summary as CSV, and a PNG into the
output folder: a new benchmarks/results/<name>_<time> unless `--out` names one.

    python benchmarks/ablations.py --seeds 1 2 --parallel 2 -- --total-timesteps 5000000

`--reuse ARM=FOLDER:NAME` takes an arm's runs from FOLDER (the output folder of `learning_curve.py --name NAME`
with that arm's flags, same seeds), cut at the trained arms' last checkpoint, instead of training it again: nothing
in training depends on the total budget.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from typing import Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import checkpoints, evaluate_checkpoint, fresh_folder, run_all, run_dir, scalars  # noqa: E402

# Each arm changes one thing relative to the default (the documented fix or choice it undoes).
ARMS = {
    "default": [],
    "critic_agent0_obs": ["--critic-input", "agent0-obs"],
    "valuenorm_per_minibatch": ["--value-norm-update", "per-minibatch"],
    "critic_lr_1e-4": ["--critic-lr", "1e-4"],
    "no_clip_vloss": ["--no-clip-vloss"],
    "critic_128x128": ["--critic-hidden-sizes", "128", "128"],
    "no_sequential": ["--no-sequential"],
    # The width arm of the tables measured while the default critic was [128, 128]; the default since.
    "critic_256x256": ["--critic-hidden-sizes", "256", "256"],
}
DEFAULT_ARMS = [arm for arm in ARMS if arm != "critic_256x256"]
TAGS = ("losses/value_loss", "losses/explained_variance", "charts/success_rate", "charts/episodes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time (1 thread each if > 1)")
    parser.add_argument("--eval-episodes", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: 1 when parallel, else all)")
    parser.add_argument("--name", default="ablations", help="the output files' prefix")
    parser.add_argument("--out", help="output folder (default: a new benchmarks/results/<name>_<time>)")
    parser.add_argument("--skip-training", action="store_true", help="only analyse the runs in --out")
    parser.add_argument("--reuse", action="append", default=[], metavar="ARM=FOLDER:NAME",
                        help="read ARM's runs from FOLDER (runs of learning_curve.py --name NAME)")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="after `--`: flags for every run")
    args = parser.parse_args()
    reused = dict(item.split("=", 1) for item in args.reuse if "=" in item and ":" in item)
    if len(reused) != len(args.reuse) or not set(reused) <= set(args.arms):
        parser.error(f"--reuse takes ARM=FOLDER:NAME with ARM one of --arms ({', '.join(args.arms)}), got {args.reuse}")
    if args.skip_training and not args.out:
        parser.error("--skip-training analyses earlier runs: name their folder with --out")
    trained = [arm for arm in args.arms if arm not in reused]
    if reused and not trained:
        parser.error("reused runs are cut at a trained arm's budget: leave at least one arm to train (or analyse)")
    common = [f for f in args.trainer_flags if f != "--"] + ["--save-interval", "1000000"]
    run_root = args.out or fresh_folder(args.name)
    if not args.skip_training:
        # The arm's flags come last and win over a common flag for the same setting (tyro keeps the last).
        jobs = [(run_root, arm, seed, common + ARMS[arm]) for seed in args.seeds for arm in trained]
        run_all(jobs, args.parallel, args.threads)

    def arm_run(arm: str, seed: int) -> Tuple[str, str]:
        """(run directory, evaluated checkpoint) of an arm's seed."""
        if arm in reused:
            folder, name = reused[arm].rsplit(":", 1)
            directory = run_dir(folder, name, seed)
            last = checkpoints(run_dir(run_root, trained[0], seed))[-1][0]
            matching = [path for iteration, path in checkpoints(directory) if iteration == last]
            if not matching:
                raise FileNotFoundError(f"{directory} has no checkpoint at iteration {last}")
            return directory, matching[0]
        directory = run_dir(run_root, arm, seed)
        return directory, checkpoints(directory)[-1][1]

    curves, summary = [], []
    for arm in args.arms:
        for seed in args.seeds:
            directory, checkpoint = arm_run(arm, seed)
            success, completion, steps = evaluate_checkpoint(checkpoint, args.eval_episodes)
            series = {tag: [(s, v) for s, v in points if s <= steps]
                      for tag, points in scalars(directory, TAGS).items()}
            for tag in TAGS:
                curves += [dict(arm=arm, seed=seed, tag=tag, env_steps=s, value=v) for s, v in series[tag]]
            losses = [v for _, v in series["losses/value_loss"]]
            ev = [v for _, v in series["losses/explained_variance"]]
            tail = max(1, len(losses) // 5)  # the last fifth of the run
            summary.append(dict(arm=arm, seed=seed, env_steps=steps, eval_success=success,
                                eval_completion_s=round(completion, 3),
                                value_loss_first_fifth=statistics.mean(losses[:tail]),
                                value_loss_last_fifth=statistics.mean(losses[-tail:]),
                                explained_variance_last_fifth=statistics.mean(ev[-tail:]),
                                train_success_last_fifth=train_success(series, steps * 4 / 5)))
            print(summary[-1], flush=True)
    for rows, suffix in ((curves, "curves"), (summary, "summary")):
        with open(os.path.join(run_root, f"{args.name}_{suffix}.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print_table(summary)
    plot(curves, os.path.join(run_root, f"{args.name}.png"))


def train_success(series, after: float) -> float:
    """Success rate over all training episodes that ended after env step `after` (thousands of episodes, where the
    eval's 256 give about +-2 % standard error at 10 % success)."""
    episodes = dict(series["charts/episodes"])
    ended = [(episodes[s], rate) for s, rate in series["charts/success_rate"] if s > after and s in episodes]
    total = sum(n for n, _ in ended)
    return sum(n * rate for n, rate in ended) / total if total else float("nan")


def print_table(summary) -> None:
    """Markdown table: mean and per-seed values of each arm (pasted into the README)."""
    print("| arm | eval success (per seed) | training success, last fifth (per seed) | value loss, first -> last fifth "
          "| explained variance, last fifth |")
    print("|---|---|---|---|---|")
    for arm in dict.fromkeys(r["arm"] for r in summary):
        rows = [r for r in summary if r["arm"] == arm]
        mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
        seeds = ", ".join(f"{100 * r['eval_success']:.1f}" for r in rows)
        train = ", ".join(f"{100 * r['train_success_last_fifth']:.1f}" for r in rows)
        print(f"| {arm} | {100 * mean('eval_success'):.1f} % ({seeds}) | "
              f"{100 * mean('train_success_last_fifth'):.1f} % ({train}) | {mean('value_loss_first_fifth'):.4f} -> "
              f"{mean('value_loss_last_fifth'):.4f} | {mean('explained_variance_last_fifth'):.3f} |")


def smooth(values, width: int = 10):
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-width:]
        out.append(sum(acc) / len(acc))
    return out


def plot(curves, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("losses/value_loss", "critic value loss", "log"), ("losses/explained_variance",
              "explained variance", "linear"), ("charts/success_rate", "training success rate", "linear"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    arms = list(dict.fromkeys(r["arm"] for r in curves))
    for ax, (tag, label, scale) in zip(axes, panels):
        for k, arm in enumerate(arms):
            for seed in sorted({r["seed"] for r in curves if r["arm"] == arm}):
                points = [(r["env_steps"], r["value"]) for r in curves
                          if r["arm"] == arm and r["seed"] == seed and r["tag"] == tag]
                if points:
                    ax.plot([s / 1e6 for s, _ in points], smooth([v for _, v in points]), color=f"C{k}",
                            alpha=0.85, lw=1.2, label=arm if seed == min(r["seed"] for r in curves) else None)
        ax.set(xlabel="env steps (M)", ylabel=label, yscale=scale)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
