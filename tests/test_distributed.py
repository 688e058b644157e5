"""One HAPPO run over 2 CPU processes: torchrun with gloo, the real trainer (tests/hooked_trainer.py adds hooks)."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import happo_mapush as H
from checkpoint_tensors import learned_state, same  # what must be identical on every rank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKED = os.path.join(ROOT, "tests", "hooked_trainer.py")
TINY = ["--num-envs", "8", "--num-steps", "16", "--hidden-sizes", "16", "16", "--critic-hidden-sizes", "16", "16",
        "--log-interval", "1", "--no-cuda", "--actor-num-minibatches", "2", "--critic-num-minibatches", "4"]
ITERATION = 8 * 16 * 5  # env steps of one rank per iteration
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def command(nproc, *flags):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return (launcher if nproc > 1 else [sys.executable]) + [HOOKED, *flags]


def run(cwd, nproc, *flags, **hooks):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in hooks.items()}}
    return subprocess.run(command(nproc, *flags), cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def only_run_dir(cwd):
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return run_dir


def test_two_ranks_hold_identical_models_and_explore_differently(tmp_path):
    # three agents: ranks that drew their agent orders apart (1 in 6 per iteration alike) would train different
    # actors at the same time, and DDP would average one actor's gradients into another's
    result = run(tmp_path, 2, *TINY, "--task", "cylinder", "--total-timesteps", str(3 * 2 * ITERATION),
                 HOOK_DUMP_STATE=tmp_path)
    assert result.returncode == 0, result.stderr
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 3
    assert same(learned_state(ranks[0]), learned_state(ranks[1]))  # actors, critic, Adam states, ValueNorm
    assert int(ranks[0]["value_norm"]["num_updates"]) == 3
    for part in (lambda env: env["target_xy"], lambda env: env["bodies"]["go1_0"][0]):  # each rank's own envs
        assert not torch.equal(*(part(r["local"]["env"]) for r in ranks))  # (seed + rank): targets, agents' paths
    assert not torch.equal(ranks[0]["local"]["rng"]["torch"], ranks[1]["local"]["rng"]["torch"])
    run_dir = only_run_dir(tmp_path)  # rank 0 alone writes: one folder, one checkpoint with both ranks' parts
    assert [n for n in os.listdir(run_dir) if n.endswith(".pt")] == ["checkpoint_3.pt"]
    assert result.stdout.count("checkpoint: ") == 1
    checkpoint = H.load_checkpoint(os.path.join(run_dir, "checkpoint_3.pt"), "cpu")
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    assert checkpoint["global_step"] == 3 * 2 * ITERATION  # both ranks' env steps
    assert same(learned_state(checkpoint), learned_state(ranks[0]))


def test_two_ranks_with_one_seed_reproduce_one_process_exactly(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert run(one, 1, *TINY, "--total-timesteps", str(3 * ITERATION)).returncode == 0
    result = run(two, 2, *TINY, "--total-timesteps", str(3 * 2 * ITERATION), HOOK_SAME_SEED=1)
    assert result.returncode == 0, result.stderr
    # identical data on both ranks: the averaged gradients, the advantage moments and ValueNorm statistics equal one
    # process's exactly, so any double count or missing sync shows here
    paths = [os.path.join(only_run_dir(d), "checkpoint_3.pt") for d in (one, two)]
    states = [torch.load(p, weights_only=True) for p in paths]
    assert same(learned_state(states[0]), learned_state(states[1]))
    # and the logs: counts summed over ranks, rates and averages as one process's
    logs = [scalars(only_run_dir(d)) for d in (one, two)]
    assert logs[1]["charts/episodes"] == [2 * n for n in logs[0]["charts/episodes"]] and sum(logs[0]["charts/episodes"])
    for tag in ("charts/success_rate", "charts/episodic_length", "losses/value_loss", "agent1/policy_loss",
                "rewards/push", "diagnostics/returns_std"):
        assert logs[1][tag] == pytest.approx(logs[0][tag], rel=1e-6), tag


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_two_rank_resume_reproduces_the_uninterrupted_run(tmp_path):
    flags = [*TINY, "--total-timesteps", str(6 * 2 * ITERATION), "--save-interval", "3"]
    assert run(tmp_path, 2, *flags).returncode == 0
    run_dir = only_run_dir(tmp_path)
    result = run(tmp_path, 2, *flags, "--resume", os.path.join(run_dir, "checkpoint_3.pt"))
    assert result.returncode == 0, result.stderr
    (branch,) = set(glob.glob(os.path.join(tmp_path, "runs", "*"))) - {run_dir}
    expected, resumed = (torch.load(os.path.join(d, "checkpoint_6.pt"), weights_only=True) for d in (run_dir, branch))
    assert same(learned_state(expected), learned_state(resumed))
    for a, b in zip(expected["ranks"], resumed["ranks"]):  # and every rank's envs and RNG
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
        assert all(torch.equal(x, y) for x, y in zip(a["env"]["bodies"]["box"], b["env"]["bodies"]["box"]))
    result = run(tmp_path, 1, *flags, "--resume", os.path.join(run_dir, "checkpoint_3.pt"))
    assert result.returncode == 2 and "the run used 2 process(es), this one 1" in result.stderr


def test_a_nonfinite_loss_on_one_rank_stops_both_and_saves_once(tmp_path):
    result = run(tmp_path, 2, *TINY, "--total-timesteps", str(4 * 2 * ITERATION), HOOK_NAN_RANK=1)
    assert result.returncode != 0
    run_dir = only_run_dir(tmp_path)
    assert sorted(n for n in os.listdir(run_dir) if n.endswith(".pt")) == ["checkpoint_1.pt"]
    # rank 0 says it once (torchrun then reports the failed workers in its own words); no rank hung
    path = os.path.join(os.path.relpath(run_dir, tmp_path), "checkpoint_1.pt")
    assert result.stderr.count(f"at iteration 2; stopped. The last good checkpoint (iteration 1) is {path}") == 1


def test_sigterm_to_torchrun_stops_both_ranks_with_one_checkpoint(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HOOK_STEP_DELAY": "0.01"}
    proc = subprocess.Popen(command(2, *TINY, "--total-timesteps", str(50 * 2 * ITERATION)), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline, line = time.time() + 120, ""
    while "iter 2/" not in line and time.time() < deadline:
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both workers
    out, err = proc.communicate(timeout=120)
    assert "stopped by SIGTERM: saved" in out and out.count("stopped by") == 1
    saved = [n for n in os.listdir(only_run_dir(tmp_path)) if n.endswith(".pt")]
    assert len(saved) == 1
    checkpoint = H.load_checkpoint(os.path.join(only_run_dir(tmp_path), saved[0]), "cpu")
    assert checkpoint["world_size"] == 2 and checkpoint["iteration"] >= 2


def test_the_gpu_check_script_runs_here_at_small_sizes(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "gpu", "--smoke"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("| check | result |")[1]
    for check in ("CUDA-only tests", "env only, 64 envs", "training, 64 envs, 1 process", "2 processes x 64 envs"):
        assert check in table
    assert "failed" not in table
