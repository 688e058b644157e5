"""ValueNorm against hand-computed statistics (HARL's numerics: beta 0.99999, debiasing, variance floor 1e-2)."""
import math

import pytest
import torch

from value_norm import ValueNorm


def test_before_any_update_denormalize_scales_by_0_1():
    vn = ValueNorm()
    x = torch.tensor([[-3.0], [0.0], [2.5]])
    assert torch.allclose(vn.denormalize(x), 0.1 * x)
    assert torch.allclose(vn.normalize(x), 10.0 * x)


def test_three_batch_sequence():
    # With beta = 0.99999 and a handful of updates, the debiased statistics are (to ~1e-5 relative) the plain
    # average of the batch means of x and of x^2.
    vn = ValueNorm()
    vn.update(torch.tensor([[1.0], [2.0], [3.0]]))  # mean 2, mean of squares 14/3
    mean, var = vn.mean_var()
    assert mean.item() == pytest.approx(2.0, rel=1e-4) and var.item() == pytest.approx(2.0 / 3.0, rel=1e-4)
    vn.update(torch.tensor([[0.0], [10.0]]))  # mean 5, mean of squares 50
    mean, var = vn.mean_var()
    assert mean.item() == pytest.approx(3.5, rel=1e-4)
    assert var.item() == pytest.approx((14.0 / 3.0 + 50.0) / 2.0 - 3.5**2, rel=1e-4)  # 15.0833
    vn.update(torch.tensor([[-4.0]]))  # mean -4, mean of squares 16
    mean, var = vn.mean_var()
    assert mean.item() == pytest.approx(1.0, rel=1e-4)
    assert var.item() == pytest.approx(22.555556, rel=1e-4)
    assert vn.normalize(torch.tensor([7.0])).item() == pytest.approx(6.0 / math.sqrt(22.555556), rel=1e-4)
    assert vn.denormalize(torch.tensor([1.263340])).item() == pytest.approx(7.0, rel=1e-4)
    assert int(vn.num_updates) == 3


def test_exact_first_update_and_debiasing_term():
    vn = ValueNorm()
    vn.update(torch.tensor([[4.0], [8.0]]))
    assert vn.running_mean.item() == pytest.approx(6.0e-5, rel=1e-5)
    assert vn.running_mean_sq.item() == pytest.approx(40.0e-5, rel=1e-5)
    assert vn.debiasing_term.item() == pytest.approx(1.0e-5, rel=1e-5)
    vn.update(torch.tensor([[0.0]]))
    assert vn.debiasing_term.item() == pytest.approx(1.0e-5 * 0.99999 + 1.0e-5, rel=1e-6)


def test_variance_floor():
    vn = ValueNorm()
    vn.update(torch.full((10, 1), 3.0))
    mean, var = vn.mean_var()
    assert mean.item() == pytest.approx(3.0, rel=1e-5) and var.item() == pytest.approx(0.01)
    assert vn.denormalize(torch.tensor([2.0])).item() == pytest.approx(3.2, rel=1e-5)


def test_state_dict_round_trip():
    vn = ValueNorm()
    for batch in ([1.0, 5.0], [2.0], [-7.0, 0.5, 3.0]):
        vn.update(torch.tensor(batch).unsqueeze(-1))
    state = vn.state_dict()
    assert {"running_mean", "running_mean_sq", "debiasing_term"} <= set(state)
    restored = ValueNorm()
    restored.load_state_dict(state)
    x = torch.linspace(-5, 5, 11)
    assert torch.equal(vn.normalize(x), restored.normalize(x))
    assert torch.equal(vn.denormalize(x), restored.denormalize(x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_dict_keeps_statistics_on_cuda():
    vn = ValueNorm(device="cuda")
    vn.update(torch.tensor([[1.0], [3.0]], device="cuda"))
    state = vn.state_dict()
    assert state["running_mean"].device.type == "cuda"
    restored = ValueNorm()
    restored.load_state_dict({k: v.cpu() for k, v in state.items()})
    assert restored.mean_var()[0].item() == pytest.approx(2.0, rel=1e-5)


def test_statistics_are_registered_on_a_device_other_than_the_cpu():
    # HARL's `nn.Parameter(...).to(device)` is a plain, unregistered tensor on any device but the CPU, so its
    # state_dict loses the statistics on CUDA. The "meta" device shows the same on a machine without a GPU.
    vn = ValueNorm(device="meta")
    state = vn.state_dict()
    assert {"running_mean", "running_mean_sq", "debiasing_term", "num_updates"} <= set(state)
    assert all(t.device.type == "meta" for t in state.values())
    assert not list(vn.parameters())  # buffers: no optimizer ever touches them
