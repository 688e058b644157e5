"""Learning curves with 95 % CI bands and a performance profile, from a results CSV (rliable's estimators and plots).

Reads a CSV with one row per run and checkpoint (benchmarks/experiment.py's experiment.csv): a group column
(`arm`, or `task`), `seed`, `env_steps` and the value (`eval_success`). Draws, per group, the IQM over seeds against
env steps with its 95 % bootstrap CI band, and the performance profile at the last checkpoint (the fraction of runs
whose success exceeds tau, with CI bands). Writes curves.png and profile.png into a new
benchmarks/results/plot_<time> folder unless `--out` names one.

    python benchmarks/plot.py benchmarks/results/tasks/experiment.csv --where task=cylinder --out OUT
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment import fresh_folder  # noqa: E402
from stats import REPS, checkpoint_column, read, seeded_numpy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--group", default="arm")
    parser.add_argument("--value", default="eval_success")
    parser.add_argument("--where", nargs="*", default=[], help="column=value filters, e.g. task=cylinder")
    parser.add_argument("--out", help="output folder (default: a new benchmarks/results/plot_<time>)")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from rliable import library, metrics, plot_utils
    except ImportError as err:
        raise SystemExit(f"error: plotting needs rliable and matplotlib: pip install -r benchmarks/requirements.txt "
                         f"({err})")
    rows = read(args.csv, args.where)
    groups = list(dict.fromkeys(r[args.group] for r in rows))
    steps = sorted({checkpoint_column(r) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    # [runs, checkpoints] per group; a run missing a checkpoint is left out of that group
    scores = {}
    for g in groups:
        table = {(int(r["seed"]), checkpoint_column(r)): float(r[args.value]) for r in rows if r[args.group] == g}
        complete = [s for s in seeds if all((s, t) in table for t in steps)]
        scores[g] = np.array([[table[(s, t)] for t in steps] for s in complete])
    out = args.out or fresh_folder("plot")
    os.makedirs(out, exist_ok=True)

    def iqm_per_checkpoint(x):
        return np.array([metrics.aggregate_iqm(x[:, i]) for i in range(x.shape[1])])

    with seeded_numpy():  # rliable draws its resamples from numpy's global generator
        point, interval = library.get_interval_estimates(
            {g: s[:, None, :] for g, s in scores.items()}, lambda x: iqm_per_checkpoint(x[:, 0, :]), reps=REPS // 5)
    fig, ax = plt.subplots(figsize=(7, 5))
    plot_utils.plot_sample_efficiency_curve(np.array(steps) / 1e6, point, interval, algorithms=groups, ax=ax,
                                            xlabel="env steps (millions)", ylabel="eval success (IQM)",
                                            labelsize="large", ticklabelsize="large")
    ax.legend(ax.get_lines(), groups, loc="upper left")  # the lines, not the CI bands
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)

    taus = np.linspace(0.0, 1.0, 101)
    last = {g: s[:, -1:] for g, s in scores.items()}
    with seeded_numpy():
        profiles, profile_cis = library.create_performance_profile(last, taus, reps=REPS // 5)
    fig, ax = plt.subplots(figsize=(7, 5))
    plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=profile_cis, ax=ax,
                                         xlabel=f"eval success at {steps[-1] / 1e6:.1f} M env steps (tau)",
                                         ylabel="fraction of runs with success > tau")
    ax.legend(ax.get_lines(), groups, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "profile.png"), dpi=120)
    print(f"wrote {out}/curves.png and profile.png ({', '.join(f'{g}: {len(s)} runs' for g, s in scores.items())})")


if __name__ == "__main__":
    main()
