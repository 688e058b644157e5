"""The run lifecycle: atomic checkpoints, SIGINT/SIGTERM, resume and branch semantics, unique run folders, bad flags,
non-finite input. Faults happen to real trainer subprocesses (tests/hooked_trainer.py adds a slow env or a slow save).
"""
import glob
import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import happo_mapush as H
import lifecycle
from lifecycle import checkpoint_iterations
import mapush_vmas
from checkpoint_tensors import learned_state, same

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "happo_mapush.py")
HOOKED = os.path.join(ROOT, "tests", "hooked_trainer.py")
TINY = ["--num-envs", "8", "--num-steps", "16", "--hidden-sizes", "16", "16", "--critic-hidden-sizes", "16", "16",
        "--log-interval", "1", "--no-cuda", "--actor-num-minibatches", "2", "--critic-num-minibatches", "4"]
SIX = TINY + ["--total-timesteps", "3840"]  # 6 iterations of 8 envs x 16 decisions x 5 env steps


def environ(**hooks):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in hooks.items()}}


def run(cwd, *flags, script=SCRIPT, **hooks):
    return subprocess.run([sys.executable, script, *flags], cwd=cwd, capture_output=True, text=True,
                          env=environ(**hooks), timeout=300)


def start(cwd, *flags, **hooks):
    return subprocess.Popen([sys.executable, HOOKED, *flags], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environ(**hooks))


def wait_for(proc, marker: str, timeout: float = 120) -> list:
    """Read the process's stdout until a line contains `marker`; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"exited before {marker!r}: {''.join(lines)}{proc.stderr.read()}")
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} within {timeout} s")


def params(path):
    return learned_state(torch.load(path, weights_only=True))


def hashes(root):
    out = {}
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_dirs(cwd):
    return sorted(glob.glob(os.path.join(cwd, "runs", "*")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-iteration run with checkpoints at 2, 4, 6."""
    cwd = tmp_path_factory.mktemp("reference")
    result = run(cwd, *SIX, "--save-interval", "2")
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(cwd)
    return cwd, run_dir


def test_a_kill_during_a_save_leaves_the_previous_checkpoints_and_no_truncated_file(tmp_path):
    proc = start(tmp_path, *SIX, "--save-interval", "1", HOOK_SLOW_SAVE=3)
    wait_for(proc, "SAVING")  # checkpoint_3.pt is half written
    proc.kill()
    proc.wait(timeout=30)
    (run_dir,) = run_dirs(tmp_path)
    names = os.listdir(run_dir)
    assert sorted(n for n in names if n.startswith("checkpoint_")) == ["checkpoint_1.pt", "checkpoint_2.pt"]
    for iteration in (1, 2):
        assert H.load_checkpoint(os.path.join(run_dir, f"checkpoint_{iteration}.pt"), "cpu")["iteration"] == iteration
    assert [n for n in names if n.endswith(".tmp")] == [f".checkpoint_3.pt.{proc.pid}.tmp"]  # hidden, never loaded
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from experiment import checkpoints

    assert [i for i, _ in checkpoints(run_dir)] == [1, 2]  # what the benchmark scripts read


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(tmp_path, reference, signum, code):
    proc = start(tmp_path, *SIX, "--save-interval", "100", HOOK_STEP_DELAY=0.01)
    wait_for(proc, "iter 2/6")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    match = re.search(r"stopped by (SIG\w+): saved (\S+) \(iteration (\d) of 6\); continue with:\n  (.+)\n", out)
    assert match, out
    name, path, iteration, command = match.groups()
    assert name == signal.Signals(signum).name and 2 <= int(iteration) <= 5
    assert H.load_checkpoint(os.path.join(tmp_path, path), "cpu")["iteration"] == int(iteration)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "happo_mapush.py"] and argv[-2:] == ["--resume", path]
    result = run(tmp_path, *argv[2:])  # the printed command, as printed
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path)  # the newest checkpoint continues its own run
    assert same(params(os.path.join(run_dir, "checkpoint_6.pt")), params(os.path.join(reference[1], "checkpoint_6.pt")))


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path):
    proc = start(tmp_path, *SIX, "--save-interval", "100", HOOK_STEP_DELAY=0.05)  # a decision takes 0.25 s
    wait_for(proc, "iter 1/6")
    time.sleep(0.1)  # into the next rollout, away from the end-of-iteration check
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)  # two signals at once would merge into one; this one lands before the next safe point
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped by" not in out and "Traceback" not in err
    (run_dir,) = run_dirs(tmp_path)
    assert not [n for n in os.listdir(run_dir) if n.endswith(".pt")]


def test_resuming_an_older_checkpoint_branches_and_leaves_every_file_unchanged(tmp_path, reference):
    cwd, run_dir = reference
    before = hashes(os.path.join(cwd, "runs"))
    old = os.path.join(run_dir, "checkpoint_2.pt")
    result = run(cwd, *SIX, "--save-interval", "2", "--resume", old)
    assert result.returncode == 0, result.stderr
    after = hashes(os.path.join(cwd, "runs"))
    assert {k: after[k] for k in before} == before  # nothing that existed was touched
    (branch,) = set(run_dirs(cwd)) - {run_dir}
    with open(os.path.join(branch, "parent.txt")) as f:
        parent = f.read()
    assert os.path.abspath(old) in parent and before[os.path.relpath(old, os.path.join(cwd, "runs"))] in parent
    assert sorted(n for n in os.listdir(branch) if n.endswith(".pt")) == ["checkpoint_4.pt", "checkpoint_6.pt"]
    assert same(params(os.path.join(branch, "checkpoint_6.pt")), params(os.path.join(run_dir, "checkpoint_6.pt")))


def test_resuming_the_newest_checkpoint_continues_the_run_without_duplicate_logs(tmp_path, reference):
    result = run(tmp_path, *TINY, "--total-timesteps", "2560", "--save-interval", "2")  # 4 iterations
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path)
    before = hashes(run_dir)
    result = run(tmp_path, *SIX, "--save-interval", "2", "--resume", os.path.join(run_dir, "checkpoint_4.pt"))
    assert result.returncode == 0 and "(continued)" in result.stdout, result.stderr
    assert run_dirs(tmp_path) == [run_dir]
    assert {k: hashes(run_dir)[k] for k in before} == before
    assert same(params(os.path.join(run_dir, "checkpoint_6.pt")), params(os.path.join(reference[1], "checkpoint_6.pt")))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("losses/value_loss")] == [640 * i for i in range(1, 7)]


def test_two_runs_started_at_once_write_two_folders(tmp_path):
    procs = [start(tmp_path, *TINY, "--total-timesteps", "640") for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    paths = [re.search(r"checkpoint: (\S+)", out).group(1) for out in outs]
    assert len(set(os.path.dirname(p) for p in paths)) == 2 and len(run_dirs(tmp_path)) == 2
    assert all(os.path.isfile(os.path.join(tmp_path, p)) for p in paths)


@pytest.mark.parametrize("changed, named", [
    (["--no-sequential"], "--no-sequential (saved --sequential)"),
    (["--learning-rate", "0.001"], "--learning-rate 0.001 (saved 0.0005)"),
    (["--gamma", "0.95"], "--gamma 0.95 (saved 0.99)"),
    (["--value-norm-update", "per-minibatch"], "--value-norm-update per-minibatch (saved once)"),
    (["--critic-lr", "0.0001"], "--critic-lr 0.0001 (saved 0.0005)"),
    (["--num-envs", "16"], "--num-envs 16 (saved 8)"),
    (["--seed", "2"], "--seed 2 (saved 1)"),
])
def test_resume_refuses_a_changed_experiment_and_names_the_flag(reference, changed, named):
    cwd, run_dir = reference
    before = run_dirs(cwd)
    result = run(cwd, *SIX, *changed, "--resume", os.path.join(run_dir, "checkpoint_4.pt"))
    assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr
    assert run_dirs(cwd) == before


def test_resume_allows_a_larger_budget_and_says_when_there_is_nothing_to_train(tmp_path):
    result = run(tmp_path, *TINY, "--total-timesteps", "1280")
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path)
    last = os.path.join(run_dir, "checkpoint_2.pt")
    result = run(tmp_path, *TINY, "--total-timesteps", "1280", "--resume", last)
    assert result.returncode == 2 and "nothing to train" in result.stderr and "checkpoint_2.pt" in result.stderr
    result = run(tmp_path, *TINY, "--total-timesteps", "1920", "--resume", last)
    assert result.returncode == 0, result.stderr
    assert checkpoint_iterations(run_dir)[-1] == 3  # the run went on in its own folder


def main_in_process(monkeypatch, capsys, cwd, *flags):
    """happo_mapush.main() with these flags in `cwd`, in this process: (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["happo_mapush.py", *flags])
    code = H.main()
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags, message", [
    (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
    (["--gae-lambda", "2"], "--gae-lambda must be in (0, 1]"),
    (["--clip-coef", "0"], "--clip-coef must be in (0, inf]"),
    (["--ent-coef", "-1"], "--ent-coef must be >= 0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be in (0, inf]"),
    (["--learning-rate", "-1"], "--learning-rate must be in (0, inf]"),
    (["--critic-lr", "nan"], "--critic-lr must be in (0, inf] and finite, got nan"),
    (["--huber-delta", "0"], "--huber-delta must be in (0, inf]"),
    (["--hidden-sizes"], "--hidden-sizes needs one or more positive layer sizes"),
    (["--critic-hidden-sizes", "64", "0"], "--critic-hidden-sizes needs one or more positive layer sizes"),
    (["--batch-size", "64"], "unrecognized flags: --batch-size 64"),
    (["--num-iterations", "3"], "unrecognized flags: --num-iterations 3"),
    (["--actor-num-minibatches", "3"], "--num-envs 9 or --num-envs 12 would"),
    (["--total-timesteps", "100"], "below one iteration"),
    (["--resume", "missing.pt"], "checkpoint not found: missing.pt"),
])
def test_nonsense_flags_get_a_one_line_error(tmp_path, monkeypatch, capsys, flags, message):
    argv = list(TINY)
    if "--actor-num-minibatches" in flags:
        argv[argv.index("--num-envs") + 1] = "10"
    code, _, err = main_in_process(monkeypatch, capsys, tmp_path, *argv, "--total-timesteps", "3840", *flags)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("name", ["a/b", "../../x", "..", "x..y", ""])
def test_an_exp_name_that_is_a_path_is_refused(tmp_path, monkeypatch, capsys, name):
    code, _, err = main_in_process(monkeypatch, capsys, tmp_path, *SIX, "--exp-name", name)
    assert code == 2 and err.startswith("error: --exp-name names a run, not a path") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "runs") and not os.listdir(tmp_path)


def test_a_second_process_on_the_same_run_is_refused_and_the_first_is_unharmed(tmp_path, monkeypatch, capsys,
                                                                              reference):
    result = run(tmp_path, *TINY, "--total-timesteps", "1280", "--save-interval", "2")  # 2 iterations
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path)
    newest = os.path.join(run_dir, "checkpoint_2.pt")
    resume = [*SIX, "--save-interval", "2", "--resume", newest]
    first = start(tmp_path, *resume, HOOK_STEP_DELAY=0.03)  # about 2.4 s an iteration: it saves at 4 and 6
    wait_for(first, "iter 3/6")
    code, _, err = main_in_process(monkeypatch, capsys, tmp_path, *resume)  # e.g. a requeued copy of the same job
    assert first.poll() is None, "the first process ended before the second one tried"
    assert code == 2 and err.count("\n") == 1 and f"is being written by process {first.pid} on " in err, err
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert run_dirs(tmp_path) == [run_dir]  # the refused process made no folder
    assert sorted(n for n in os.listdir(run_dir) if n.endswith(".pt")) == [f"checkpoint_{i}.pt" for i in (2, 4, 6)]
    assert same(params(os.path.join(run_dir, "checkpoint_6.pt")), params(os.path.join(reference[1], "checkpoint_6.pt")))
    events = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert len(events) == 2  # the first run's and its one continuation's, none of the refused process


def test_a_lock_left_by_a_killed_process_does_not_block_the_resume(tmp_path, reference):
    proc = start(tmp_path, *SIX, "--save-interval", "1", HOOK_STEP_DELAY=0.01)
    wait_for(proc, "iter 3/6")
    proc.kill()  # SIGKILL: no handler runs, the lock file stays behind
    proc.wait(timeout=30)
    (run_dir,) = run_dirs(tmp_path)
    with open(os.path.join(run_dir, ".lock")) as f:
        assert f.read().startswith(f"process {proc.pid} on ")
    newest = max(int(n[len("checkpoint_"):-3]) for n in os.listdir(run_dir) if n.startswith("checkpoint_"))
    result = run(tmp_path, *SIX, "--save-interval", "1", "--resume",
                 os.path.join(run_dir, f"checkpoint_{newest}.pt"))
    assert result.returncode == 0 and "(continued)" in result.stdout, result.stderr
    assert run_dirs(tmp_path) == [run_dir]
    assert same(params(os.path.join(run_dir, "checkpoint_6.pt")), params(os.path.join(reference[1], "checkpoint_6.pt")))


def test_a_resume_of_a_finished_run_says_so(reference):
    cwd, run_dir = reference
    result = run(cwd, *SIX, "--resume", os.path.join(run_dir, "checkpoint_6.pt"))
    assert result.returncode == 2 and "nothing to train" in result.stderr and "iteration 6 of 6" in result.stderr


def test_a_checkpoint_from_before_the_env_stream_change_is_refused_in_one_line(reference, tmp_path):
    cwd, run_dir = reference
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint_4.pt"), weights_only=False)
    for own in checkpoint["ranks"]:
        del own["env"]["version"]  # as the env state of every checkpoint saved before the layout had a version
    old = tmp_path / "old.pt"
    torch.save(checkpoint, old)
    before = run_dirs(cwd)
    result = run(cwd, *SIX, "--resume", str(old))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot resume" in result.stderr and "layout version None" in result.stderr
    assert run_dirs(cwd) == before


def test_nonfinite_observations_and_rewards_are_zeroed_counted_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_step = mapush_vmas.VmasPushEnv.step

    def poisoned_step(self, actions):
        obs, reward, done, info = real_step(self, actions)
        obs, reward = obs.clone(), reward.clone()
        obs[0, 1, 3], reward[1, 0] = float("nan"), float("inf")  # past the env's own checks, every step
        return obs, reward, done, info

    monkeypatch.setattr(mapush_vmas.VmasPushEnv, "step", poisoned_step)
    args = H.check_args(H.Args(num_envs=8, num_steps=16, total_timesteps=8 * 16 * 5 * 3, hidden_sizes=(16,),
                               critic_hidden_sizes=(16,), actor_num_minibatches=2, critic_num_minibatches=2,
                               cuda=False))
    path = H.train(args)
    assert H.load_checkpoint(path, "cpu")["iteration"] == 3 and all(torch.isfinite(t).all() for t in params(path))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(path), size_guidance={"scalars": 0})
    acc.Reload()
    # one poisoned entry of each per decision reaches the trainer (ActionRepeat sums the hold's rewards)
    assert [e.value for e in acc.Scalars("diagnostics/nonfinite_reward")] == [16] * 3
    assert [e.value for e in acc.Scalars("diagnostics/nonfinite_obs")] == [16] * 3
    # the critic's global state is built from the env's own scene, which stayed finite
    assert [e.value for e in acc.Scalars("diagnostics/nonfinite_state")] == [0] * 3


def test_in_one_process_the_run_adds_nothing_to_the_algorithm(tmp_path, monkeypatch):
    # the update functions get the modules themselves and torch's global generator: plain single-process torch
    monkeypatch.chdir(tmp_path)
    args = H.check_args(H.Args(num_envs=8, num_steps=10, total_timesteps=400, hidden_sizes=(16,),
                               critic_hidden_sizes=(16,), cuda=False))
    with lifecycle.Run(args) as run:
        module = torch.nn.Linear(2, 2)
        assert run.wrap(module) is module and run.order_rng is torch.default_generator
        assert (run.world, run.rank, run.seed, run.num_iterations) == (1, 0, args.seed, 1)


def test_the_run_sums_counts_averages_the_rest_and_turns_episode_counts_into_rates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = H.check_args(H.Args(num_envs=8, num_steps=10, action_repeat=5, total_timesteps=400, cuda=False))
    with lifecycle.Run(args) as run:
        sums = {"episodes/count": torch.tensor(4), "episodes/return": torch.tensor(10.0),
                "episodes/length": torch.tensor(2000.0), "episodes/success": torch.tensor(3),
                "episodes/exception": torch.tensor(1), "episodes/time_out": torch.tensor(0),
                "rewards/push": torch.tensor(8.0), "diagnostics/nonfinite_obs": torch.tensor(2)}
        scalars = run.reduce(sums, {"losses/value_loss": torch.tensor(0.25), "agent1/ratio": 1.5})
    assert scalars == {"charts/episodes": 4.0, "charts/episodic_return": 2.5, "charts/episodic_length": 500.0,
                       "charts/success_rate": 0.75, "charts/exception_rate": 0.25, "charts/time_out_rate": 0.0,
                       "rewards/push": 8.0 / (8 * 10 * 5), "diagnostics/nonfinite_obs": 2.0,
                       "losses/value_loss": 0.25, "agent1/ratio": 1.5}
