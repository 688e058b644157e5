"""Checks that need a CUDA GPU (skipped without one): `python -m pytest -m cuda tests/` or
`python benchmarks/throughput.py gpu`."""
import glob
import os

import pytest
import torch

import happo_mapush as H
import mapush_isaacgym

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_on_cuda_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = H.Args(num_envs=64, num_steps=8, total_timesteps=64 * 8 * 5 * 4, hidden_sizes=(16,),
                  critic_hidden_sizes=(16,), actor_num_minibatches=2, critic_num_minibatches=2, save_interval=2)
    final = H.train(H.check_args(args))
    state = torch.load(final, weights_only=True)
    assert state["ranks"][0]["rng"]["cuda"] is not None and state["critic"]["head.weight"].is_cuda
    resumed = H.Args(**{**vars(args), "resume": final.replace("checkpoint_4", "checkpoint_2")})
    branch = H.train(H.check_args(resumed))
    assert os.path.dirname(branch) != os.path.dirname(final) and len(glob.glob("runs/*")) == 2
    a, b = (torch.load(p, weights_only=True) for p in (final, branch))
    for x, y in zip(a["actors"] + [a["critic"]], b["actors"] + [b["critic"]]):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_isaacgym_device_check_takes_the_current_gpu():
    device = mapush_isaacgym.cuda_device("cuda")
    assert device == torch.device("cuda", torch.cuda.current_device())
    assert mapush_isaacgym.cuda_device(f"cuda:{torch.cuda.device_count() - 1}").index == torch.cuda.current_device()
    torch.cuda.set_device(0)
