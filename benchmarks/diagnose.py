"""Why seeds differ: when each run discovers pushing, what its critic does around then, and how its final policy fails;
and the highest success the calculator can report on each task.

For every run folder under `--out`'s runs/ (a benchmarks/experiment.py output folder; or run folders given directly):
- from TensorBoard, the env steps at which the training success rate (a 5-iteration moving average of
  charts/success_rate, the episodes that ended in each iteration) first reaches 20 %, 50 % and 80 %;
- around the 20 % crossing (the discovery of pushing), the critic's explained variance and value loss: their means
  over the 10 iterations before it and the 10 from it on, and the lowest explained variance within +-20 iterations;
- for the newest checkpoint, how the first episodes of `--eval-episodes` envs end under the deterministic policy
  (MAPush's calculator): success, collision (agents closer than the task's distance; how many on the first decision,
  i.e. spawned overlapping), time-out, and the median box-target distance the time-outs were left at.

Writes `diagnosis.csv` into `--out` (or prints only, for run folders) and prints a markdown table, one row per run.

`--ceiling`: the task spawns the agents at random, and a pair closer than the collision distance (0.25 m; the
T-block 0.27 m) ends the episode as an exception on its first env step, whatever the policy does. The calculator
counts each env's first episode, so on a given eval seed those envs can never succeed: this counts them with one
decision of zero actions per eval seed, and the ceiling = 1 - ended / envs, averaged over the eval seeds.

    python benchmarks/diagnose.py --out benchmarks/results/tasks
    python benchmarks/diagnose.py runs/RUN_A runs/RUN_B
    python benchmarks/diagnose.py --ceiling                 # cuboid, T-block, cylinder on eval seeds 10000, 10001
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from experiment import EVAL_SEED, checkpoints, scalars  # noqa: E402

THRESHOLDS = (0.2, 0.5, 0.8)
SMOOTH = 5  # iterations in the moving average of the training success rate
WINDOW = 10  # iterations before and after the discovery


def crossings(steps, values):
    """Env steps at which the moving average of `values` first reaches each threshold (None if never)."""
    found = {}
    for i in range(len(values)):
        mean = statistics.mean(values[max(0, i - SMOOTH + 1): i + 1])
        for t in THRESHOLDS:
            if t not in found and mean >= t:
                found[t] = i
    return {t: (steps[found[t]] if t in found else None) for t in THRESHOLDS}, found.get(THRESHOLDS[0])


def first_episodes(path: str, envs: int, seed: int) -> dict:
    """How each env's first episode ends under the checkpoint's deterministic policy (the calculator's episodes)."""
    import happo_mapush as H

    checkpoint = H.load_checkpoint(path, "cpu")
    env = H.policy_env(checkpoint["args"], envs, "cpu", seed)
    actors = H.trained_actors(checkpoint, env)
    obs, alive = env.reset(), torch.ones(envs, dtype=torch.bool)
    ended = {key: torch.zeros(envs, dtype=torch.bool) for key in ("success", "exception", "time_out")}
    on_first_decision, left_at = torch.zeros(envs, dtype=torch.bool), torch.zeros(envs)
    for decision in range(env.episode_steps // env.k + 2):
        with torch.no_grad():
            obs, _, done, info = env.step(H.mean_actions(actors, obs))
        now = done & alive
        for key in ended:
            ended[key] |= now & info[key]
        on_first_decision |= now & (decision == 0)
        final = info["final_scene"]
        left_at = torch.where(now, torch.linalg.vector_norm(final.box_xy - final.target_xy, dim=-1), left_at)
        alive &= ~done
        if not alive.any():
            break
    collision = ended["exception"] & ~ended["success"]  # exclusive, in the calculator's order
    time_out = ended["time_out"] & ~ended["success"] & ~ended["exception"]
    return {"success": int(ended["success"].sum()), "collision": int(collision.sum()),
            "collision_on_first_decision": int((collision & on_first_decision).sum()), "time_out": int(time_out.sum()),
            "time_out_box_target_m": round(float(left_at[time_out].median()), 2) if time_out.any() else None}


def diagnose(run_dir: str, envs: int, seed: int) -> dict:
    series = scalars(run_dir, ["charts/success_rate", "losses/explained_variance", "losses/value_loss"])
    success = series["charts/success_rate"]
    steps, values = [s for s, _ in success], [v for _, v in success]
    reached, discovery = crossings(steps, values)
    row = {"run": os.path.basename(run_dir)}
    row.update({f"steps_to_{int(100 * t)}pct": reached[t] for t in THRESHOLDS})
    ev = [v for _, v in series["losses/explained_variance"]]
    loss = [v for _, v in series["losses/value_loss"]]
    if discovery is not None and len(ev) == len(values):
        before, after = slice(max(0, discovery - WINDOW), discovery), slice(discovery, discovery + WINDOW)
        row.update(ev_before=round(statistics.mean(ev[before] or [float("nan")]), 3),
                   ev_after=round(statistics.mean(ev[after]), 3),
                   ev_min_around=round(min(ev[max(0, discovery - 2 * WINDOW): discovery + 2 * WINDOW]), 3),
                   value_loss_before=round(statistics.mean(loss[before] or [float("nan")]), 4),
                   value_loss_after=round(statistics.mean(loss[after]), 4))
    saved = checkpoints(run_dir)
    if saved:
        row["final_iteration"] = saved[-1][0]
        row.update(first_episodes(saved[-1][1], envs, seed))
    return row


def ceiling(envs: int, seeds) -> None:
    import happo_mapush as H

    print("| task | " + " | ".join(f"ended at spawn, eval seed {s}" for s in seeds) + " | ceiling |")
    print("|---|" + "---|" * len(seeds) + "---|")
    for task in ("cuboid", "tblock", "cylinder"):
        ended = []
        for seed in seeds:
            env = H.policy_env(dict(env_backend="vmas", task=task, action_repeat=5), envs, "cpu", seed)
            obs = env.reset()
            _, _, done, info = env.step(torch.zeros(obs.shape[0], obs.shape[1], env.action_dim))
            assert bool((done == info["exception"]).all()), "only exceptions can end an episode on its first decision"
            ended.append(int(done.sum()))
        cells = " | ".join(f"{n} of {envs}" for n in ended)
        print(f"| {task} | {cells} | {100 * (1.0 - sum(ended) / (len(ended) * envs)):.1f} % |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders (default: every folder under --out's runs/)")
    parser.add_argument("--out", help="a benchmarks/experiment.py output folder")
    parser.add_argument("--eval-episodes", type=int, default=1024)
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    parser.add_argument("--ceiling", action="store_true", help="the calculator's ceiling per task instead")
    args = parser.parse_args()
    if args.ceiling:
        return ceiling(args.eval_episodes, [args.eval_seed, args.eval_seed + 1])
    runs = args.runs or sorted(glob.glob(os.path.join(args.out or "", "runs", "*")))
    if not runs:
        parser.error("no run folders: give them, or --out with a runs/ folder")
    torch.set_num_threads(1)
    rows = [diagnose(r, args.eval_episodes, args.eval_seed) for r in runs]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(fields) + " |\n|" + "---|" * len(fields))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in fields) + " |")
    if args.out and not args.runs:
        with open(os.path.join(args.out, "diagnosis.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}/diagnosis.csv")


if __name__ == "__main__":
    main()
