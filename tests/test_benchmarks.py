"""benchmarks/experiment.py's Experiment: an experiment folder's record survives other processes and lost checkpoints.

An experiment outlives the machine that ran it, whose disk may be gone: the folder's CSV, committed, must be enough to
continue it, and two processes training into one folder must not erase each other's rows. Training and evaluation
are replaced by fakes that keep the real interfaces (checkpoint files named as the trainer names them, evaluations
as (success, completion time, env steps))."""
import argparse
import csv
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import experiment  # noqa: E402

STEPS = 1_000_000  # env steps per iteration: --at 1 2 are iterations 1 and 2


@pytest.fixture
def fake(monkeypatch):
    """Training writes the checkpoints a finished run would; evaluation reads a success rate from the path."""
    trained = []

    def run_all(jobs, parallel, threads=0, finished=lambda name, seed: None):
        for run_root, name, seed, flags, totals in jobs:
            trained.append((name, seed))
            folder = os.path.join(run_root, "runs", f"cuboid__{name}__{seed}__1")
            os.makedirs(folder, exist_ok=True)
            for total in totals:  # the trainer saves at the end of each launch
                open(os.path.join(folder, f"checkpoint_{total // STEPS}.pt"), "w").close()
            finished(name, seed)
        return {}

    def evaluate_checkpoint(path, episodes, seed=experiment.EVAL_SEED):
        iteration = int(os.path.basename(path)[len("checkpoint_"):-3])
        success = 0.25 * iteration + (0.125 if "__b__" in path else 0.0) + (seed - experiment.EVAL_SEED) / 1024
        return success, 9.5, iteration * STEPS

    monkeypatch.setattr(experiment, "run_all", run_all)
    monkeypatch.setattr(experiment, "evaluate_checkpoint", evaluate_checkpoint)
    monkeypatch.setattr(experiment, "training_seconds", lambda directory: 120.0)
    return trained


def open_experiment(out, *argv):
    parser = argparse.ArgumentParser()
    experiment.add_experiment_arguments(parser, at=[1, 2], seeds=[7])
    return experiment.Experiment(parser.parse_args(["--out", str(out), *argv]), "sweep", lambda flags: STEPS)


def run(out, name, *argv):
    e = open_experiment(out, *argv)
    e.train([(name, 7, [])])
    rows = e.evaluate(name, 7, [], dict(arm=name))
    e.write(rows, lambda every_row: f"{len(every_row)} rows\n")
    return rows


def read(out):
    with open(os.path.join(out, "sweep.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_two_processes_writing_one_folder_keep_each_others_rows(tmp_path, fake):
    a, b = run(tmp_path, "a"), run(tmp_path, "b")
    assert fake == [("a", 7), ("b", 7)]
    rows = read(tmp_path)
    assert [(r["run"], r["iteration"]) for r in rows] == [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]
    # eval success is the mean over the two eval seeds: 0.25 * iteration (+ 0.125 for b) + 0.5 / 1024
    assert [float(r["eval_success"]) for r in rows] == [round(x + 0.5 / 1024, 4) for x in (0.25, 0.5, 0.375, 0.625)]
    assert open(os.path.join(tmp_path, "sweep.md")).read() == "4 rows\n"
    assert [r["eval_success"] for r in a + b] == [float(r["eval_success"]) for r in rows]


def test_a_run_whose_checkpoints_are_gone_keeps_its_recorded_rows_and_is_not_trained_again(tmp_path, fake):
    first = run(tmp_path, "a")
    shutil.rmtree(os.path.join(tmp_path, "runs"))  # another machine: only the committed record
    again = run(tmp_path, "a")
    assert fake == [("a", 7)]
    assert again == first  # the same numbers, parsed back to the same types
    assert len(read(tmp_path)) == 2


def test_a_run_recorded_only_partly_is_trained(tmp_path, fake):
    run(tmp_path, "a")
    rows = read(tmp_path)
    with open(os.path.join(tmp_path, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow(rows[0])  # only the first evaluation point
    shutil.rmtree(os.path.join(tmp_path, "runs"))
    run(tmp_path, "a")
    assert fake == [("a", 7), ("a", 7)]
    assert len(read(tmp_path)) == 2


@pytest.mark.parametrize("argv, named", [(["--eval-episodes", "512"], "eval_episodes"),
                                         (["--at", "1", "3"], "at"),
                                         (["--", "--ent-coef", "0.02"], "trainer_flags")])
def test_a_folder_refuses_an_experiment_with_other_settings(tmp_path, fake, argv, named):
    run(tmp_path, "a")
    with pytest.raises(SystemExit, match=f"other settings \\({named} was"):
        open_experiment(tmp_path, *argv)
    assert len(read(tmp_path)) == 2


def test_a_folder_refuses_to_continue_after_the_trainers_default_changed(tmp_path, fake, monkeypatch):
    # each arm is "the default plus one change": continuing a sweep under a new default would change every arm
    # still to run without a word
    run(tmp_path, "a")
    defaults = experiment.trainer_defaults()
    assert "critic_input" in defaults and "seed" not in defaults
    monkeypatch.setattr(experiment, "trainer_defaults", lambda: dict(defaults, critic_input="another"))
    with pytest.raises(SystemExit, match=f"defaults changed .* \\(critic_input was {defaults['critic_input']}\\): "
                                         "continue it at"):
        open_experiment(tmp_path)
    assert open_experiment(tmp_path, "--skip-training").record()[0]["run"] == "a"  # its tables stay readable


def test_a_run_trains_to_each_point_it_has_not_reached_one_launch_each(tmp_path, monkeypatch):
    # every evaluation point must be a checkpoint: the trainer saves at the end of a launch, so a run is launched
    # once per point (10 / 16 / 20 M are iterations 195 / 312 / 390, whose gcd of 39 once set the save interval;
    # 10 / 20 / 30 / 40 / 50 M have a gcd of 1)
    launches = []

    class Finished:
        returncode = 0

        def __init__(self, name, seed, flags):
            launches.append((name, int(flags[flags.index("--total-timesteps") + 1])))
            self.started, self.cmd = 0.0, ["happo_mapush.py"]
            folder = os.path.join(tmp_path, "runs", f"cuboid__{name}__{seed}__1")
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, f"checkpoint_{launches[-1][1] // 51_200}.pt"), "w").close()

        def poll(self):
            return 0

    monkeypatch.setattr(experiment, "start_training", lambda root, name, seed, flags, threads: Finished(name, seed,
                                                                                                       flags))
    monkeypatch.setattr(experiment.time, "sleep", lambda seconds: None)
    parser = argparse.ArgumentParser()
    experiment.add_experiment_arguments(parser, at=[10, 16, 20], seeds=[7])
    e = experiment.Experiment(parser.parse_args(["--out", str(tmp_path), "--parallel", "1"]), "sweep",
                              experiment.steps_per_iteration)
    assert e.points([]) == [(195, 9_984_000), (312, 15_974_400), (390, 19_968_000)]
    assert e.points(["--num-envs", "256"]) == [(390, 9_984_000), (625, 16_000_000), (781, 19_993_600)]
    finished = []  # (run, launches so far) as each run's training ends: its rows can be recorded at once
    e.train([("a", 7, []), ("b", 7, [])], lambda name, seed: finished.append((name, len(launches))))
    assert launches == [("a", 9_984_000), ("a", 15_974_400), ("a", 19_968_000),  # one at a time: a, then b
                        ("b", 9_984_000), ("b", 15_974_400), ("b", 19_968_000)]
    assert finished == [("a", 4), ("b", 6)]  # b was launched before a's rows were recorded
    os.remove(os.path.join(tmp_path, "runs", "cuboid__b__7__1", "checkpoint_390.pt"))  # b stopped after 16 M
    del launches[:]
    e.train([("a", 7, []), ("b", 7, [])])
    assert launches == [("b", 19_968_000)]
    e.args.parallel = 2  # two at a time: a run's next point goes before the next run
    del launches[:]
    e.train([("c", 7, []), ("d", 7, []), ("e", 7, [])])
    assert [name for name, _ in launches] == ["c", "d", "c", "d", "c", "d", "e", "e", "e"]


def test_a_run_in_a_relative_folder_resumes_from_a_checkpoint_the_trainer_can_find(tmp_path, monkeypatch):
    # the trainer runs in the experiment folder: a --resume path relative to the runner's folder once pointed nowhere
    # ("checkpoint not found"), so an interrupted experiment given `--out benchmarks/results/X` could not continue
    folder = tmp_path / "results" / "x" / "runs" / "cuboid__a__7__1"
    folder.mkdir(parents=True)
    (folder / "checkpoint_39.pt").write_text("")
    launched = {}

    def popen(cmd, cwd, **kwargs):
        launched.update(cmd=cmd, cwd=cwd)
        return argparse.Namespace()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment.subprocess, "Popen", popen)
    experiment.start_training(os.path.join("results", "x"), "a", 7, ["--task", "cuboid"], threads=1)
    resume = launched["cmd"][launched["cmd"].index("--resume") + 1]
    assert os.path.samefile(os.path.join(launched["cwd"], resume), folder / "checkpoint_39.pt")


def test_training_time_of_a_run_with_one_logged_iteration_is_not_zero(tmp_path):
    # the runner's training column once read 0.00 s per iteration for one-iteration runs (no two events to time)
    import time

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))  # its first event carries the creation time
    created = time.time()
    writer.add_scalar("losses/value_loss", 0.5, 1, walltime=created + 3.0)
    writer.close()
    assert experiment.training_seconds(str(tmp_path)) == pytest.approx(3.0, abs=0.5)
    writer = SummaryWriter(str(tmp_path / "many"))
    for i, t in enumerate([10.0, 12.0, 14.0, 17.0]):  # gaps 2, 2, 3: 7 s logged + one median iteration (2 s)
        writer.add_scalar("losses/value_loss", 0.5, i, walltime=created + t)
    writer.close()
    assert experiment.training_seconds(str(tmp_path / "many")) == pytest.approx(9.0, abs=1e-3)


def test_same_seed_finds_any_difference_and_none_between_two_runs_of_this_checkout():
    import copy

    import torch

    import same_seed

    a, b = (same_seed.final_checkpoint(same_seed.ROOT, same_seed.TINY) for _ in range(2))
    assert same_seed.differences(a, b) == []  # the same seed twice on one machine: bit-identical
    critic, envs = copy.deepcopy(a), copy.deepcopy(a)
    critic["critic"][next(iter(critic["critic"]))].view(-1)[0] += 1e-7
    envs["ranks"][0]["env"]["bodies"]["box"][0].view(-1)[0] += 1e-6
    assert same_seed.differences(a, critic) == ["networks, optimizers or ValueNorm"]
    assert same_seed.differences(a, envs) == ["the envs"]
    rng = copy.deepcopy(a)
    rng["ranks"][0]["rng"]["torch"] = torch.zeros_like(rng["ranks"][0]["rng"]["torch"])
    assert same_seed.differences(a, rng) == ["the RNG state"]
