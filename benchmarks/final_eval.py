"""Final evaluation: MAPush's calculator on the last checkpoint of every seed of finished runs, at several eval sizes.

The learning curve evaluates on 256 envs (about +-2.5 % standard error at 85 % success); this adds larger samples of
the same first-episode statistic. Reads the runs of `learning_curve.py --name NAME --out FOLDER` given as
FOLDER:NAME; writes one CSV row per run, seed and eval size to `--out` (default: a new
benchmarks/results/final_eval_<time>.csv). Evaluations are cached next to the checkpoints.

    python benchmarks/final_eval.py --runs benchmarks/results/lc_20261201-220000:learning_curve --episodes 256 1024
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, checkpoints, evaluate_checkpoint, run_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, metavar="FOLDER:NAME",
                        help="learning_curve.py's output folder and --name of each configuration")
    parser.add_argument("--episodes", type=int, nargs="+", default=[256, 1024], help="eval envs, one row each")
    parser.add_argument("--out", help="the CSV to write (default: a new benchmarks/results/final_eval_<time>.csv)")
    args = parser.parse_args()

    import happo_mapush as H

    rows = []
    for item in args.runs:
        root, name = item.rsplit(":", 1)
        pattern = re.compile(rf"__{re.escape(name)}__(\d+)__[^_]+$")
        found = (pattern.search(d) for d in glob.glob(os.path.join(root, "runs", "*")))
        seeds = sorted({int(m.group(1)) for m in found if m})
        if not seeds:
            raise SystemExit(f"no runs of {name!r} under {os.path.join(root, 'runs')}")
        for seed in seeds:  # the newest run of each seed, as the other scripts read them
            _, path = checkpoints(run_dir(root, name, seed))[-1]
            saved = H.load_checkpoint(path, "cpu")["args"]
            for episodes in args.episodes:
                success, completion, steps = evaluate_checkpoint(path, episodes)
                rows.append(dict(run=name, seed=seed, action_repeat=saved.get("action_repeat", 1),
                                 num_steps=saved["num_steps"],
                                 critic_hidden_sizes=" ".join(map(str, saved["critic_hidden_sizes"])),
                                 env_steps=steps, eval_envs=episodes, success_rate=round(success, 4),
                                 completion_time_s=round(completion, 3)))
                print(rows[-1], flush=True)
    path = args.out or os.path.join(RESULTS, f"final_eval_{time.strftime('%Y%m%d-%H%M%S')}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
