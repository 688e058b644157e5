"""End to end: train, log, checkpoint, resume exactly, evaluate, and fail clearly on bad input."""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

import happo_mapush as H
import mapush_env
import mapush_task
import mapush_vmas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "happo_mapush.py")
TINY = ["--num-envs", "8", "--num-steps", "16", "--hidden-sizes", "16", "16", "--critic-hidden-sizes", "16", "16",
        "--log-interval", "1", "--no-cuda", "--actor-num-minibatches", "2", "--critic-num-minibatches", "4"]
OTHER_SIZE = ["--num-envs", "16"] + TINY[2:]


def run(cwd, *flags, check=True):
    result = subprocess.run([sys.executable, SCRIPT, *flags], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def params(checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    return [t for sd in state["actors"] + [state["critic"], state["value_norm"]] for t in sd.values()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("train")
    result = run(cwd, *TINY, "--total-timesteps", "3840", "--save-interval", "3")
    run_dir = glob.glob(os.path.join(cwd, "runs", "*"))[0]
    return cwd, run_dir, result


def test_trains_logs_and_checkpoints(trained):
    cwd, run_dir, result = trained
    assert "iter 6/6" in result.stdout and "SPS" in result.stdout
    assert os.path.isfile(os.path.join(run_dir, "checkpoint_3.pt"))
    assert os.path.isfile(os.path.join(run_dir, "checkpoint_6.pt"))
    tags = scalars(run_dir)
    for tag in ("charts/SPS", "losses/value_loss", "losses/explained_variance",
                "losses/critic_grad_norm", "agent0/policy_loss", "agent1/entropy", "agent0/approx_kl",
                "agent1/clip_fraction", "agent0/grad_norm", "agent1/ratio", "agent0/update_position",
                "agent1/factor_mean", "agent0/factor_max", "rewards/ocb", "rewards/collision",
                "diagnostics/returns_mean", "diagnostics/value_norm_std", "diagnostics/advantages_std",
                "diagnostics/values_mean", "diagnostics/nonfinite_state"):
        assert len(tags[tag]) == 6, tag
    # a fresh random agent order every iteration: agent 0 is not always updated at the same position
    assert len(set(tags["agent0/update_position"])) == 2
    # the first agent of an iteration trains with factor 1 exactly
    for first in (0, 1):
        positions = tags[f"agent{first}/update_position"]
        maxima = tags[f"agent{first}/factor_max"]
        assert all(m == 1.0 for p, m in zip(positions, maxima) if p == 0.0)
    state = torch.load(os.path.join(run_dir, "checkpoint_6.pt"), weights_only=True)
    assert state["iteration"] == 6 and state["global_step"] == 3840  # 6 x 8 envs x 16 decisions x 5 env steps
    assert int(state["value_norm"]["num_updates"]) == 6  # once per iteration by default


def test_resume_reproduces_the_uninterrupted_run_exactly(trained, tmp_path):
    cwd, run_dir, _ = trained
    expected = params(os.path.join(run_dir, "checkpoint_6.pt"))
    mid = os.path.join(tmp_path, "mid.pt")
    shutil.copy(os.path.join(run_dir, "checkpoint_3.pt"), mid)
    before = set(glob.glob(os.path.join(cwd, "runs", "*")))
    run(cwd, *TINY, "--total-timesteps", "3840", "--save-interval", "3", "--resume", mid)
    (branch,) = set(glob.glob(os.path.join(cwd, "runs", "*"))) - before  # a checkpoint outside its run: a new run
    resumed = params(os.path.join(branch, "checkpoint_6.pt"))
    assert len(resumed) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed))


def test_evaluate_checkpoint(trained):
    cwd, run_dir, _ = trained
    result = run(cwd, "--eval-checkpoint", os.path.join(run_dir, "checkpoint_6.pt"), "--eval-episodes", "8",
                 "--no-cuda")
    assert "success rate" in result.stdout and "over 8 episodes" in result.stdout


def test_evaluate_counts_first_episodes_like_the_calculator():
    class Scripted:
        """Env stub: envs 0, 1, 2 succeed at steps 1, 2, 3 (env 2 again at 5); env 3 times out at step 1001."""

        num_envs, num_agents, episode_steps, device = 4, 2, 1000, torch.device("cpu")

        def reset(self):
            self.t = 0
            return torch.zeros(4, 2, 8)

        def step(self, actions):
            self.t += 1
            success = torch.tensor([self.t == 1, self.t == 2, self.t in (3, 5), False])
            time_out = torch.tensor([False, False, False, self.t == 1001])
            return torch.zeros(4, 2, 8), torch.zeros(4, 2), success | time_out, {"success": success}

    actors = [H.Actor(8, 3, (8,)) for _ in range(2)]
    policy = lambda obs: H.mean_actions(actors, obs)  # noqa: E731
    success, completion = mapush_env.evaluate(policy, Scripted())
    assert success == pytest.approx(0.75)
    assert completion == pytest.approx((0.02 + 0.04 + 0.06 + 20.0) / 4)

    class Repeated(Scripted):
        """As ActionRepeat with k = 5: a decision takes 5 env steps, 3 when an episode ends during it."""

        def step(self, actions):
            obs, reward, done, info = super().step(actions)
            return obs, reward, done, {**info, "env_steps": torch.where(done, 3, 5)}

    success, completion = mapush_env.evaluate(policy, Repeated())
    assert success == pytest.approx(0.75)
    assert completion == pytest.approx((0.06 + 0.16 + 0.26 + 20.0) / 4)  # ((decision - 1) * 5 + 3) * 0.02 s


def test_bad_input_exits_with_a_clear_message(tmp_path):
    result = run(tmp_path, *TINY, "--total-timesteps", "100", check=False)
    assert result.returncode != 0 and "below one iteration" in result.stderr and "Traceback" not in result.stderr
    result = run(tmp_path, "--eval-checkpoint", "missing.pt", check=False)
    assert result.returncode != 0 and "checkpoint not found: missing.pt" in result.stderr
    with open(tmp_path / "corrupt.pt", "wb") as f:
        f.write(b"\x80\x02garbage, not a checkpoint")
    result = run(tmp_path, *TINY, "--total-timesteps", "640", "--resume", "corrupt.pt", check=False)
    assert result.returncode != 0 and "corrupt" in result.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a happo_mapush checkpoint"):
        H.load_checkpoint(str(tmp_path / "foreign.pt"), "cpu")


def test_resume_rejects_a_different_run(trained):
    cwd, run_dir, _ = trained
    result = run(cwd, *OTHER_SIZE, "--total-timesteps", "3840", "--resume", os.path.join(run_dir, "checkpoint_6.pt"),
                 check=False)
    assert result.returncode != 0 and "--num-envs 16 (saved 8)" in result.stderr


def test_nan_loss_stops_after_saving_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_gae = H.compute_gae
    calls = {"n": 0}

    def poisoned_gae(*args, **kwargs):
        advantages, returns = real_gae(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:  # from the third iteration on the losses are NaN
            advantages = advantages * float("nan")
        return advantages, returns

    monkeypatch.setattr(H, "compute_gae", poisoned_gae)
    args = H.Args(num_envs=8, num_steps=16, total_timesteps=8 * 16 * 5 * 5, hidden_sizes=(16,),
                  critic_hidden_sizes=(16,), actor_num_minibatches=2, critic_num_minibatches=2,
                  save_interval=100, cuda=False)
    with pytest.raises(SystemExit) as err:
        H.train(H.check_args(args))
    message = str(err.value)
    assert "non-finite agent0/policy_loss, agent1/policy_loss at iteration 3" in message
    assert "checkpoint_2.pt" in message
    saved = glob.glob(os.path.join(tmp_path, "runs", "*", "checkpoint_2.pt"))
    assert len(saved) == 1
    state = H.load_checkpoint(saved[0], "cpu")
    assert state["iteration"] == 2 and all(torch.isfinite(t).all() for t in params(saved[0]))


@pytest.mark.parametrize("random_start", [False, True])
def test_random_episode_start_reaches_the_first_rollout(tmp_path, monkeypatch, random_start):
    monkeypatch.chdir(tmp_path)
    real_step = mapush_vmas.VmasPushEnv.step
    first_counts = []

    def spying_step(self, actions):
        if not first_counts:
            first_counts.append(self.step_count.clone())  # the counters the first rollout step starts from
        return real_step(self, actions)

    monkeypatch.setattr(mapush_vmas.VmasPushEnv, "step", spying_step)
    args = H.Args(num_envs=64, num_steps=4, total_timesteps=64 * 4 * 5, hidden_sizes=(16,), critic_hidden_sizes=(16,),
                  actor_num_minibatches=1, critic_num_minibatches=1, random_episode_start=random_start, cuda=False)
    H.train(H.check_args(args))
    counts = first_counts[0]
    if random_start:
        assert counts.unique().numel() > 32 and counts.max() < mapush_task.EPISODE_STEPS
    else:
        assert (counts == 0).all()
