"""The experiment runner: train arms side by side on tasks and seeds, evaluate their checkpoints, keep the record.

An arm is the default plus one change (ARMS below). Every (seed, task, arm) run trains `--parallel` at a time with
one torch thread each, interleaved seed by seed, so that the machine's speed that hour falls on all arms alike. The
checkpoints nearest below `--at` million env steps are evaluated with MAPush's calculator (`--eval-episodes` envs for
each of `--eval-seeds`, averaged). Output, in `--out` (default: a new time-stamped folder under benchmarks/results/):
`experiment.csv`, one row per run and checkpoint, and `experiment.md`, per task IQM [95 % CI], min-max and
P(arm > first arm) per checkpoint (rliable, benchmarks/stats.py). Rerunning with the same `--out` continues: finished
runs are kept, unfinished ones resume exactly from their newest checkpoint, so an interrupted experiment goes on; the
folder's `experiment.json` fixes the settings and the trainer's defaults, and a run with others is refused.

    python benchmarks/experiment.py --tasks tblock cylinder --arms happo happo_shared mappo --seeds 51 52 53 54 55 \
        --at 10 16 20 --out benchmarks/results/tasks            # about 8 min per run on one core; 2 at a time
    python benchmarks/experiment.py --out benchmarks/results/tasks --skip-training   # the tables only
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
EVAL_SEED = 10_000  # the evaluation envs' seed, apart from the training seeds
sys.path.insert(0, ROOT)


def start_training(run_root: str, exp_name: str, seed: int, flags: Sequence[str], threads: int) -> subprocess.Popen:
    """Start `happo_mapush.py` in `run_root` (its runs/ folder lands there); stdout goes to a log file. A run of the
    same name and seed that has checkpoints there continues from its newest one (a benchmark that was killed
    continues exactly where it stopped)."""
    os.makedirs(run_root, exist_ok=True)
    newest = newest_checkpoint(run_root, exp_name, seed)
    log = open(os.path.join(run_root, f"{exp_name}__{seed}.log"), "a")
    cmd = [sys.executable, os.path.join(ROOT, "happo_mapush.py"), "--exp-name", exp_name, "--seed", str(seed),
           "--no-cuda", *flags] + (["--resume", os.path.abspath(newest)] if newest else [])  # it runs in run_root
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    started = time.time()
    if not newest:
        with open(os.path.join(run_root, f"{exp_name}__{seed}.start"), "w") as f:
            f.write(f"{started}\n")  # lets checkpoints' file times be turned into wall-clock since the start
    proc = subprocess.Popen(cmd, cwd=run_root, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.started = started  # type: ignore[attr-defined]
    proc.cmd = cmd  # type: ignore[attr-defined]
    return proc


def newest_checkpoint(run_root: str, exp_name: str, seed: int) -> str:
    """The newest checkpoint of the run (exp_name, seed) under run_root, or "" if there is none."""
    try:
        saved = checkpoints(run_dir(run_root, exp_name, seed))
    except FileNotFoundError:
        return ""
    return saved[-1][1] if saved else ""


def training_seconds(directory: str) -> float:
    """The wall-clock a run spent training, from its TensorBoard event times: each launch (one event file each, so a
    resumed run counts only its own launches, not the pauses between them) from its first logged iteration to its
    last, plus one median iteration for the first iteration of each launch. A run with no two logged iterations in
    one launch has no such median: its first iteration counts from the event file's creation (so setup is in it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    total, gaps, firsts = 0.0, [], []
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        times = [e.wall_time for e in acc.Scalars("losses/value_loss")] if "losses/value_loss" in acc.Tags()[
            "scalars"] else []
        if times:
            total += times[-1] - times[0]
            gaps += [b - a for a, b in zip(times, times[1:])]
            firsts.append(times[0] - acc.FirstEventTimestamp())
    if not gaps:
        return total + sum(firsts)
    median = sorted(gaps)[len(gaps) // 2]
    launches = len(glob.glob(os.path.join(directory, "events.out.tfevents.*")))
    return total + median * launches


def run_all(jobs: List[Tuple[str, str, int, List[str], List[int]]], parallel: int, threads: int = 0,
            finished: Callable[[str, int], None] = lambda exp_name, seed: None) -> Dict[Tuple[str, int], float]:
    """Run (run_root, exp_name, seed, flags, totals) jobs, `parallel` at a time, each with `threads` torch threads
    (0: one each when parallel, else all cores). A job trains to each of its `totals` (env steps) in turn, one launch
    each: a launch continues exactly from the newest checkpoint and saves one at its end, so every evaluation point
    is a checkpoint, however the points divide. `finished(exp_name, seed)` is called as each job ends (the other
    jobs train on meanwhile). Returns the wall-clock seconds of each (exp_name, seed)."""
    threads = threads or (1 if parallel > 1 else os.cpu_count() or 1)
    pending, running, wall, started = [tuple(job) for job in jobs], [], {}, {}

    def fill() -> None:
        while pending and len(running) < parallel:
            run_root, exp_name, seed, flags, totals = pending.pop(0)
            proc = start_training(run_root, exp_name, seed, [*flags, "--total-timesteps", str(totals[0])], threads)
            started.setdefault((exp_name, seed), proc.started)  # type: ignore[attr-defined]
            running.append(((run_root, exp_name, seed, flags, totals[1:]), proc))

    fill()
    while running:
        time.sleep(2.0)
        going_on, done = [], []
        for item in list(running):
            job, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(proc.cmd)} failed with exit code {proc.returncode}")
                (going_on if job[4] else done).append(job)
        pending[:0] = going_on  # a run goes on to its next point before another run starts
        fill()  # before `finished`, so the cores train while a finished run is evaluated
        for job in done:
            wall[job[1:3]] = time.time() - started[job[1:3]]
            finished(job[1], job[2])
    return wall


def run_dir(run_root: str, exp_name: str, seed: int) -> str:
    found = sorted(glob.glob(os.path.join(run_root, "runs", f"*__{exp_name}__{seed}__*")))
    if not found:
        raise FileNotFoundError(f"no run directory for {exp_name} seed {seed} under {run_root}/runs")
    return found[-1]


def checkpoints(directory: str) -> List[Tuple[int, str]]:
    """(iteration, path) of every checkpoint in a run directory, in order."""
    paths = glob.glob(os.path.join(directory, "checkpoint_*.pt"))
    return sorted((int(os.path.basename(p)[len("checkpoint_"):-3]), p) for p in paths)


def evaluate_checkpoint(path: str, episodes: int, seed: int = EVAL_SEED) -> Tuple[float, float, int]:
    """MAPush's calculator on `episodes` envs seeded with `seed` (not a training seed): (success rate, mean completion
    time s, env steps trained). Remembered in `<checkpoint>.eval<episodes>[_s<seed>].json`, so reruns skip finished
    work."""
    suffix = "" if seed == EVAL_SEED else f"_s{seed}"
    cache = f"{path[:-3]}.eval{episodes}{suffix}.json"
    if os.path.isfile(cache) and os.path.getmtime(cache) >= os.path.getmtime(path):
        with open(cache) as f:
            success, completion, steps = json.load(f)
            return success, completion, steps
    import torch

    import happo_mapush as H

    from mapush_env import evaluate

    checkpoint = H.load_checkpoint(path, "cpu")
    env = H.policy_env(checkpoint["args"], episodes, "cpu", seed)
    actors = H.trained_actors(checkpoint, env)
    with torch.no_grad():
        success, completion = evaluate(lambda obs: H.mean_actions(actors, obs), env)
    with open(cache, "w") as f:
        json.dump([success, completion, checkpoint["global_step"]], f)
    return success, completion, checkpoint["global_step"]


def add_experiment_arguments(parser: argparse.ArgumentParser, at: Sequence[float], seeds: Sequence[int]) -> None:
    """The arguments of a side-by-side experiment: seeds, checkpoints, evaluation, parallelism, output folder, and the
    trainer flags for every run after `--`."""
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--at", type=float, nargs="+", default=list(at), help="evaluate at these M env steps")
    parser.add_argument("--eval-episodes", type=int, default=1024)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[10_000, 10_001])
    parser.add_argument("--parallel", type=int, default=2, help="training runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", help="output folder (default: a new time-stamped one under benchmarks/results)")
    parser.add_argument("--skip-training", action="store_true", help="only evaluate the runs already in --out")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="after `--`: flags for every run")


class Experiment:
    """Runs (exp_name, seed, flags) side by side into one output folder and evaluates their checkpoints at `--at`.

    A run trains to each evaluation point in turn (one launch each, ending with a checkpoint there); runs that already
    reached the last one are not trained again, unfinished ones continue from their newest checkpoint.
    The folder is one experiment, and its `<name>.csv` is its record: every write merges the new rows into it (under a
    lock, so several processes can train into one folder), and a run whose checkpoints are not on this machine (a
    folder committed to git or copied from another machine) keeps its recorded rows instead of training again. The
    settings that decide the numbers (`--at`, the evaluation, the trainer flags) are fixed in `experiment.json` by the
    first run; a later one with other settings is refused, so one table never mixes two experiments."""

    def __init__(self, args: argparse.Namespace, name: str, steps_per_iteration: Callable[[List[str]], int]):
        if args.skip_training and not args.out:
            raise SystemExit("error: --skip-training reads an earlier experiment: name its folder with --out")
        if args.skip_training and not os.path.isdir(args.out):
            raise SystemExit(f"error: --skip-training reads an earlier experiment, and {args.out} does not exist")
        self.args, self.name, self.out = args, name, args.out or fresh_folder(name)
        self.steps_per_iteration = steps_per_iteration
        self.common = flags = [f for f in args.trainer_flags if f != "--"]
        self.fix_settings(dict(at=list(args.at), eval_episodes=args.eval_episodes, eval_seeds=list(args.eval_seeds),
                               trainer_flags=flags))

    def fix_settings(self, settings: dict) -> None:
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, "experiment.json")
        defaults = trainer_defaults()
        if os.path.isfile(path):
            with open(path) as f:
                fixed = json.load(f)
            changed = [k for k in settings if fixed.get(k) != settings[k]]
            if changed:
                was = "; ".join(f"{k} was {fixed.get(k)}" for k in changed)
                raise SystemExit(f"error: {self.out} holds an experiment with other settings ({was}): use a new --out")
            # an arm is "the default plus one change": a new default would silently change every arm still to run
            # (the tables of a finished experiment, --skip-training, train nothing and stay readable)
            before = fixed.get("trainer_defaults", {})
            moved = [] if self.args.skip_training else [k for k in defaults if before.get(k) != defaults[k]]
            if moved:
                was = "; ".join(f"{k} was {before.get(k)}" for k in moved)
                raise SystemExit(f"error: the trainer's defaults changed since {self.out} began ({was}): continue it "
                                 f"at its commit: git worktree add --detach DIR {fixed.get('commit', '?')}")
        else:
            with open(path, "w") as f:
                json.dump(dict(settings, trainer_defaults=defaults, commit=commit()), f, indent=1)

    def recorded(self, name: str, seed: int) -> List[dict]:
        """The rows `<name>.csv` holds for the run (exp_name `name`, `seed`), numbers parsed."""
        return [row for row in self.record() if row["seed"] == seed and row.get("run") == name]

    def record(self) -> List[dict]:
        path = os.path.join(self.out, f"{self.name}.csv")
        if not os.path.isfile(path):
            return []
        with open(path, newline="") as f:
            return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def points(self, flags: List[str]) -> List[Tuple[int, int]]:
        """(iteration, env steps) of each evaluation point of a run with the arm's `flags`: the last iteration at or
        below each `--at` (an arm that changes the batch has other iterations)."""
        per_iteration = self.steps_per_iteration(self.common + flags)
        iterations = [int(m * 1e6 // per_iteration) for m in self.args.at]
        return [(i, i * per_iteration) for i in iterations]

    def train(self, runs: Sequence[Tuple[str, int, List[str]]],
              finished: Callable[[str, int], None] = lambda exp_name, seed: None) -> None:
        """Train each (exp_name, seed, arm flags) run to its evaluation points that it has not reached: beyond its
        newest checkpoint here; none when its checkpoints are elsewhere and its rows hold every point; else all.
        `finished(exp_name, seed)` is called as each run's training ends."""
        if self.args.skip_training:
            return
        jobs = []
        for name, seed, flags in runs:
            points, saved = self.points(flags), self.saved(name, seed)
            recorded = {r["iteration"] for r in self.recorded(name, seed)}
            if saved:
                totals = [steps for iteration, steps in points if iteration > max(saved)]
            else:
                totals = [] if {i for i, _ in points} <= recorded else [steps for _, steps in points]
            if totals:
                jobs.append((self.out, name, seed, self.common + flags, totals))
        run_all(jobs, self.args.parallel, self.args.threads, finished)

    def saved(self, name: str, seed: int) -> Dict[int, str]:
        try:
            return dict(checkpoints(run_dir(self.out, name, seed)))
        except FileNotFoundError:
            return {}

    def evaluate(self, name: str, seed: int, flags: List[str], labels: dict) -> List[dict]:
        """One row per evaluation point that the run (arm `flags`) has reached: `labels`, seed, iteration, env steps,
        eval success and completion time (the mean over the eval seeds), training wall-clock (total and per
        iteration)."""
        saved, rows, iterations = self.saved(name, seed), [], [i for i, _ in self.points(flags)]
        if not saved:
            kept = [r for r in self.recorded(name, seed) if r["iteration"] in iterations]
            if kept:
                print(f"{name} seed {seed}: no checkpoints here, its {len(kept)} recorded rows kept", flush=True)
            return kept
        wall = training_seconds(run_dir(self.out, name, seed))
        for iteration in (i for i in iterations if i in saved):
            evals = [evaluate_checkpoint(saved[iteration], self.args.eval_episodes, s) for s in self.args.eval_seeds]
            rows.append(dict(**labels, run=name, seed=seed, iteration=iteration, env_steps=evals[0][2],
                             eval_success=round(statistics.mean(e[0] for e in evals), 4),
                             eval_completion_s=round(statistics.mean(e[1] for e in evals), 3),
                             wall_clock_min=round(wall / 60, 1),
                             wall_clock_s_per_iteration=round(wall / max(saved), 3)))
            print(rows[-1], flush=True)
        return rows

    def write(self, rows: List[dict], report: Callable[[List[dict]], str]) -> None:
        """Merge `rows` into the record (a new row replaces the recorded one of the same run, seed and iteration),
        then write the record and `report(all rows)` as `<name>.md`."""
        import fcntl

        with open(os.path.join(self.out, f"{self.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            new = {(r["run"], r["seed"], r["iteration"]): r for r in rows}
            merged = [new.pop((r["run"], r["seed"], r["iteration"]), r) for r in self.record()]
            rows = merged + list(new.values())
            if not rows:
                raise SystemExit(f"error: no evaluated checkpoint under {self.out}")
            path = os.path.join(self.out, f"{self.name}.csv")
            with open(path + ".tmp", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            os.replace(path + ".tmp", path)  # a crash mid-write leaves the old record whole
            text = report(rows)
            with open(os.path.join(self.out, f"{self.name}.md"), "w") as f:
                f.write(text)
        print(text)
        print(f"wrote {path} and {self.name}.md")


def trainer_defaults() -> dict:
    """The defaults of happo_mapush.Args that decide what a run computes (not names, logging, paths or the budget,
    which the experiment sets itself)."""
    import dataclasses

    import happo_mapush as H

    ignored = {"exp_name", "seed", "cuda", "log_interval", "save_interval", "resume",
               "eval_checkpoint", "eval_episodes", "total_timesteps"}
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(H.Args()))).items() if k not in ignored}


def commit() -> str:
    """The checkout's commit (with "+changes" when the trainer differs from it), or "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "happo_mapush.py"], cwd=ROOT).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty else "")


def parse(value: str):
    """A CSV cell back to the int or float it was written from; anything else stays a string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def fresh_folder(prefix: str) -> str:
    """A new folder benchmarks/results/<prefix>_<time stamp>: a rerun never overwrites committed results."""
    path = os.path.join(RESULTS, f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(path)
    return path


def scalars(directory: str, tags: Sequence[str]) -> Dict[str, List[Tuple[int, float]]]:
    """(step, value) series of the given TensorBoard tags (missing tags give empty lists)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(directory, size_guidance={"scalars": 0})
    acc.Reload()
    available = set(acc.Tags()["scalars"])
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] if t in available else [] for t in tags}


def start_time(run_root: str, exp_name: str, seed: int) -> float:
    with open(os.path.join(run_root, f"{exp_name}__{seed}.start")) as f:
        return float(f.read())


# Each arm changes one setting of the default (its flags come after the common ones, so they win).
ARMS = {
    "happo": [],  # the default: a separate actor per agent, sequential updates weighted by the factor
    "happo_shared": ["--share-actor"],  # one actor (HARL's share_param), still sequential with the factor
    "mappo": ["--share-actor", "--no-sequential"],  # one actor, one PPO update on every agent's samples
    "happo_simultaneous": ["--no-sequential"],  # separate actors, all updated against factor 1
    "critic_17": ["--critic-input", "global-state"],  # the fix's 17-dim state, without the object's velocity
    "value_norm_per_minibatch": ["--value-norm-update", "per-minibatch"],  # HARL upstream
    "critic_lr_1e-4": ["--critic-lr", "1e-4"],
    "ent_coef_0.01": ["--ent-coef", "0.01"],
    "lr_1e-3": ["--learning-rate", "1e-3", "--critic-lr", "1e-3"],  # both learning rates doubled
    "num_envs_256": ["--num-envs", "256"],  # half the batch: twice the updates per env step
    "lr_1e-3_num_envs_256": ["--learning-rate", "1e-3", "--critic-lr", "1e-3", "--num-envs", "256"],  # both at once
}


def steps_per_iteration(flags: List[str]) -> int:
    """Env steps per iteration of `happo_mapush.py` with `flags` (one process): num_envs x num_steps x action_repeat."""
    import tyro

    import happo_mapush as H

    args = tyro.cli(H.Args, args=flags)
    return args.num_envs * args.num_steps * args.action_repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["cuboid"], choices=["cuboid", "tblock", "cylinder"])
    parser.add_argument("--arms", nargs="+", default=["happo"], choices=list(ARMS))
    add_experiment_arguments(parser, at=[10, 16, 20], seeds=[51, 52, 53, 54, 55])
    args = parser.parse_args()
    experiment = Experiment(args, "experiment", steps_per_iteration)
    runs = [(f"{task}_{arm}", seed, ["--task", task] + ARMS[arm], dict(task=task, arm=arm))
            for seed in args.seeds for task in args.tasks for arm in args.arms]
    by_run = {(name, seed): (flags, labels) for name, seed, flags, labels in runs}

    def record(name: str, seed: int) -> None:  # a run's rows reach the record as soon as it has trained
        experiment.write(experiment.evaluate(name, seed, *by_run[name, seed]), lambda rows: report(rows, args))

    experiment.train([(name, seed, flags) for name, seed, flags, _ in runs], record)
    rows = [row for name, seed, flags, labels in runs for row in experiment.evaluate(name, seed, flags, labels)]
    experiment.write(rows, lambda every_row: report(every_row, args))


def report(rows, args) -> str:
    """Per task: IQM [95 % CI], min-max (n seeds) and P(arm > the first arm) per checkpoint, and the wall-clock."""
    from stats import table

    parts = [f"Eval success, MAPush's calculator on {args.eval_episodes} envs x {len(args.eval_seeds)} eval seeds; "
             "IQM [95 % CI], min-max (n seeds), rliable.\n"]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [{k: str(v) for k, v in r.items()} for r in rows if r["task"] == task]
        arms = list(dict.fromkeys(r["arm"] for r in mine))
        parts += [f"\n### {task}\n\n", table(mine, "arm", "eval_success", improves_on=arms[0] if len(arms) > 1 else "")]
        walls = {arm: statistics.median(float(r["wall_clock_s_per_iteration"]) for r in mine if r["arm"] == arm)
                 for arm in arms}
        parts.append("\nTraining wall-clock per iteration (median over seeds, runs side by side): "
                     + ", ".join(f"{arm} {s:.2f} s" for arm, s in walls.items()) + "\n")
    return "".join(parts)


if __name__ == "__main__":
    main()
