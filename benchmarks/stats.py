"""The statistics every table in docs/results.md reports, from rliable (Agarwal et al., NeurIPS 2021).

rliable is the field's reference implementation of these estimators, so our numbers are comparable with papers that
use it and a reviewer need not audit a hand-written bootstrap: the interquartile mean (IQM) over seeds with a 95 %
stratified percentile-bootstrap confidence interval, and the probability of improvement P(X > Y) with its CI. It is a
benchmarks-only dependency (benchmarks/requirements.txt); the trainer does not need it.

    python benchmarks/stats.py CSV [CSV ...] [--group arm] [--baseline default] [--value eval_success]
        prints, per group and checkpoint, IQM [95 % CI], min-max over seeds and P(baseline > group)
    python benchmarks/stats.py sweep.csv --improves-on default      # P(candidate > default) instead
    python benchmarks/stats.py compare.csv sweep_20m_confirm.csv --where arm=mappo arm=ent_coef_0.02 \
        --rename ent_coef_0.02=happo --baseline happo       # arms from two files in one table

A CSV has one row per run and checkpoint, with columns for the group (e.g. `arm`, `task`), `seed`, `iteration` or
`env_steps`, and the value (e.g. `eval_success`), as benchmarks/experiment.py writes them.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

REPS = 10_000  # bootstrap resamples (rliable's default is 50,000; 10,000 move the CI edges by < 0.5 points here)
SEED = 0  # the bootstrap's own random state: the same CSV always gives the same intervals


def _rliable():
    try:
        from rliable import library, metrics
    except ImportError as err:  # one line, not a traceback
        raise SystemExit(f"error: the statistics need rliable: pip install -r benchmarks/requirements.txt ({err})")
    return library, metrics


@contextlib.contextmanager
def seeded_numpy():
    """numpy's global generator seeded with SEED, and the caller's state given back afterwards. rliable 1.2's
    bootstraps (StratifiedBootstrap.update_indices, StratifiedIndependentBootstrap._get_indices) draw their resamples
    with np.random.choice and ignore their random_state argument: unseeded, the same CSV gave P(happo > mappo) =
    0.52 [0.12, 1.00] in one call and 0.52 [0.16, 0.96] in the next."""
    outside = np.random.get_state()
    np.random.seed(SEED)
    try:
        yield
    finally:
        np.random.set_state(outside)


def iqm(values: Sequence[float], reps: int = REPS) -> Tuple[float, float, float]:
    """(IQM, low, high) over runs: the 25 % trimmed mean with a 95 % percentile-bootstrap CI (one task: the
    stratified bootstrap resamples the runs)."""
    library, metrics = _rliable()
    scores = {"x": np.asarray(values, dtype=float).reshape(-1, 1)}
    with seeded_numpy():
        point, interval = library.get_interval_estimates(scores, lambda s: np.array([metrics.aggregate_iqm(s)]),
                                                         reps=reps)
    return float(point["x"][0]), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def probability_of_improvement(x: Sequence[float], y: Sequence[float], reps: int = 2_000) -> Tuple[float, float, float]:
    """(P(X > Y), low, high): the chance that a run of X beats a run of Y (ties count half), with a 95 % CI."""
    library, metrics = _rliable()
    pair = {"xy": [np.asarray(x, dtype=float).reshape(-1, 1), np.asarray(y, dtype=float).reshape(-1, 1)]}
    with seeded_numpy():
        point, interval = library.get_interval_estimates(pair, metrics.probability_of_improvement, reps=reps)
    low, high = np.asarray(interval["xy"]).ravel()
    return float(point["xy"]), float(low), float(high)


def cell(values: Sequence[float], percent: bool = True) -> str:
    """`IQM [low, high], min-max (n)` of a list of per-seed values."""
    scale, unit = (100.0, " %") if percent else (1.0, "")
    centre, low, high = iqm(values)
    return (f"{scale * centre:.1f}{unit} [{scale * low:.1f}, {scale * high:.1f}], "
            f"{scale * min(values):.1f}-{scale * max(values):.1f} (n={len(values)})")


def read(path: str, where: Sequence[str] = ()) -> List[Dict[str, str]]:
    """The CSV's rows that match every `column=value` in `where` (a one-line error if none does)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise SystemExit(f"error: cannot read {path}: {err.strerror}")
    for condition in where:
        column, _, wanted = condition.partition("=")
        rows = [r for r in rows if r.get(column) == wanted]
    if not rows:
        raise SystemExit(f"error: no rows in {path} match {' '.join(where)}")
    return rows


def checkpoint_column(row: Dict[str, str]) -> int:
    """A row's checkpoint column: its env steps to 0.1 M, so arms with other batches (other iterations) line up."""
    return round(int(row["env_steps"]) / 1e5) * 100_000


def table(rows: List[Dict[str, str]], group: str, value: str, baseline: str = "", improves_on: str = "") -> str:
    """A markdown table: one row per group value, one column per checkpoint; then, per column, P(baseline > group)
    (is the baseline better than each alternative?) or P(group > improves_on) (does each candidate improve on it?)."""
    checkpoints = sorted({checkpoint_column(r) for r in rows})
    groups = list(dict.fromkeys(r[group] for r in rows))
    runs = {(g, c): [float(r[value]) for r in rows if r[group] == g and checkpoint_column(r) == c]
            for g in groups for c in checkpoints}
    heads = [f"{c / 1e6:.1f} M" for c in checkpoints]
    lines = [f"| {group} | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(cell(runs[(g, c)]) if runs[(g, c)] else "-" for c in checkpoints) + " |")
    if baseline and improves_on:
        raise SystemExit("error: give --baseline or --improves-on, not both")
    reference = baseline or improves_on
    if reference and reference not in groups:
        raise SystemExit(f"error: {reference} is not one of the {group} values: {', '.join(groups)}")
    if reference and len(groups) > 1:
        title = f"P({baseline} > {group})" if baseline else f"P({group} > {improves_on})"
        lines += ["", f"{title} [95 % CI] over seeds:", "", f"| {group} | " + " | ".join(heads) + " |",
                  "|---|" + "---|" * len(heads)]
        for g in groups:
            if g != reference:
                pairs = [(runs[(reference, c)], runs[(g, c)]) if baseline else (runs[(g, c)], runs[(reference, c)])
                         for c in checkpoints]
                cells = [probability_of_improvement(x, y) if x and y else None for x, y in pairs]
                lines.append(f"| {g} | " + " | ".join(f"{p[0]:.2f} [{p[1]:.2f}, {p[2]:.2f}]" if p else "-"
                                                      for p in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", help="one or more CSVs; their rows are pooled")
    parser.add_argument("--group", default="arm", help="the column whose values are compared (default: arm)")
    parser.add_argument("--value", default="eval_success")
    parser.add_argument("--baseline", default="", help="a group value: P(baseline > each other group)")
    parser.add_argument("--improves-on", default="", help="a group value: P(each other group > it), for candidates")
    parser.add_argument("--where", nargs="*", default=[],
                        help="column=value filters, e.g. task=cylinder; the same column named twice keeps either value")
    parser.add_argument("--rename", nargs="*", default=[], help="old=new: a group value renamed in the table")
    args = parser.parse_args()
    rows = [row for path in args.csv for row in read(path)]
    for column in dict.fromkeys(c.partition("=")[0] for c in args.where):
        wanted = {c.partition("=")[2] for c in args.where if c.partition("=")[0] == column}
        rows = [r for r in rows if r.get(column) in wanted]
    if not rows:
        raise SystemExit(f"error: no rows match {' '.join(args.where)}")
    if any("=" not in r for r in args.rename):
        parser.error("--rename takes old=new pairs")
    renamed = dict(r.split("=", 1) for r in args.rename)
    for row in rows:
        row[args.group] = renamed.get(row[args.group], row[args.group])
    print(table(rows, args.group, args.value, args.baseline, args.improves_on))
    return 0


if __name__ == "__main__":
    sys.exit(main())
