"""Learning curve of the default configuration: evaluation success rate and completion time against env steps.

Trains `happo_mapush.py` (default flags unless given after `--`) for each seed, saving a checkpoint every
`--eval-every` iterations, then evaluates every checkpoint with MAPush's calculator (deterministic actions, each
env's first episode, failures count as 20 s) on `--eval-episodes` envs. Writes the runs, `<name>.csv` and
`<name>.png` into the output folder: a new benchmarks/results/<name>_<time> unless `--out` names one (then the
other seeds' rows there are kept and finished runs are only evaluated with `--skip-training`).

    python benchmarks/learning_curve.py --seeds 1 2 --parallel 2
    python benchmarks/learning_curve.py --seeds 1 --name quick -- --total-timesteps 2000000
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import checkpoints, evaluate_checkpoint, fresh_folder, run_all, run_dir, start_time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--eval-every", type=int, default=10, help="iterations between evaluated checkpoints")
    parser.add_argument("--eval-episodes", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: 1 when parallel, else all)")
    parser.add_argument("--parallel", type=int, default=1, help="training runs at a time (1 thread each if > 1)")
    parser.add_argument("--name", default="learning_curve", help="the runs' --exp-name and the files' prefix")
    parser.add_argument("--out", help="output folder (default: a new benchmarks/results/<name>_<time>)")
    parser.add_argument("--skip-training", action="store_true", help="only evaluate the runs in --out")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="after `--`: flags for happo_mapush.py")
    args = parser.parse_args()
    flags = [f for f in args.trainer_flags if f != "--"] + ["--save-interval", str(args.eval_every)]
    if args.skip_training and not args.out:
        parser.error("--skip-training evaluates earlier runs: name their folder with --out")
    run_root = args.out or fresh_folder(args.name)
    if not args.skip_training:
        wall = run_all([(run_root, args.name, seed, flags) for seed in args.seeds], args.parallel, args.threads)
        print({f"seed {s}": f"{w / 60:.1f} min" for (_, s), w in wall.items()})

    rows = []
    for seed in args.seeds:
        directory = run_dir(run_root, args.name, seed)
        start = start_time(run_root, args.name, seed)
        for iteration, path in checkpoints(directory):
            success, completion, steps = evaluate_checkpoint(path, args.eval_episodes)
            wall_s = os.path.getmtime(path) - start
            rows.append(dict(seed=seed, iteration=iteration, env_steps=steps, wall_clock_s=round(wall_s, 1),
                             success_rate=success, completion_time_s=round(completion, 3)))
            print(rows[-1], flush=True)
    csv_path = os.path.join(run_root, f"{args.name}.csv")
    if os.path.isfile(csv_path):  # keep the other seeds' rows, so seeds can be run one at a time
        with open(csv_path, newline="") as f:
            kept = [{k: float(v) if k in ("wall_clock_s", "success_rate", "completion_time_s") else int(v)
                     for k, v in row.items()} for row in csv.DictReader(f) if int(row["seed"]) not in args.seeds]
        rows = sorted(kept + rows, key=lambda r: (r["seed"], r["iteration"]))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(run_root, f"{args.name}.png"))
    print(f"wrote {csv_path}")


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        steps = [r["env_steps"] / 1e6 for r in mine]
        ax1.plot(steps, [100 * r["success_rate"] for r in mine], marker=".", label=f"seed {seed}")
        ax2.plot(steps, [r["completion_time_s"] for r in mine], marker=".", label=f"seed {seed}")
    ax1.set(xlabel="env steps (M)", ylabel="eval success rate (%)", ylim=(0, 100))
    ax2.set(xlabel="env steps (M)", ylabel="mean completion time (s, failures = 20)", ylim=(0, 20.5))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
