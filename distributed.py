"""What HAPPO synchronizes across processes under torchrun (one process per GPU or CPU core group).

Every helper is a no-op in a single process, so a plain `python happo_mapush.py` computes exactly what it computed
before this file existed. Under torchrun (global RANK, LOCAL_RANK, WORLD_SIZE in the environment):
- the models start from rank 0's weights; each rank seeds its envs and action sampling with seed + rank;
- every Adam step uses the gradient averaged over ranks (one flattened all-reduce per step);
- the agent order and every mini-batch permutation are rank 0's, so all ranks run the same steps in the same order;
- the advantage normalization, ValueNorm and the logged statistics use all ranks' batches;
- a non-finite loss or a stop signal on any rank stops every rank at the same point.
"""
from __future__ import annotations

import os
import time
from typing import Tuple

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def init_distributed(cuda: bool, backend: str = "auto") -> torch.device:
    """Join torchrun's process group when launched by it (nccl on CUDA, gloo on CPU unless `backend` says);
    returns this process's device: cuda:LOCAL_RANK on CUDA."""
    cuda = cuda and torch.cuda.is_available()  # more processes than GPUs share them round-robin (gloo only)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(torch.cuda.device_count(), 1)}"
                          if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend if backend != "auto" else ("nccl" if cuda else "gloo"))
    return device


def shutdown() -> None:
    """Leave the process group. Gloo's worker threads free their last work objects, which takes the GIL, while
    ProcessGroupGloo's destructor holds the GIL and waits for them (a deadlock seen with torch 2.4.1 about once in
    ten runs): a short sleep, which releases the GIL, lets them finish first."""
    if dist.is_available() and dist.is_initialized():
        time.sleep(0.2)
        dist.destroy_process_group()


def rank_seed(seed: int) -> int:
    """The seed of this rank's envs and action sampling: ranks explore differently (seed + global RANK)."""
    return seed + rank()


def _comm(x: torch.Tensor) -> torch.Tensor:
    return x.cuda() if dist.get_backend() == "nccl" else x  # nccl moves CUDA tensors only


def all_sum(x: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """The sum (or with op="MAX" the maximum) over ranks of a tensor every rank holds."""
    if world_size() == 1:
        return x
    x = _comm(x.clone())
    dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
    return x


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor every rank holds (all ranks' batches have the same size)."""
    return x if world_size() == 1 else all_sum(x) / world_size()


def agreed(value: int) -> int:
    """The largest of the ranks' values of an int (a stop signal): the same answer on every rank."""
    return value if world_size() == 1 else int(all_sum(torch.tensor(float(value)), "MAX").item())


def mean_std(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of all ranks' batches (one process: x.mean(), x.std(unbiased=False))."""
    mean, std = x.mean(), x.std(unbiased=False)
    if world_size() == 1:
        return mean, std
    global_mean = all_mean(mean)
    return global_mean, all_mean(std * std + (mean - global_mean) ** 2).sqrt()  # sqrt(fl(s * s)) == s exactly


def moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean square of all ranks' batches (ValueNorm's update: identical statistics on every rank)."""
    both = all_mean(torch.stack([x.mean(), (x * x).mean()]))
    return both[0], both[1]


def shared_randperm(n: int, device) -> torch.Tensor:
    """A permutation all ranks use: each rank draws one (its RNG stream keeps a single pattern) and takes rank 0's,
    so all ranks run the same agent order and mini-batches, hence the same collectives in the same order."""
    perm = torch.randperm(n, device=device)
    if world_size() > 1:
        shared = _comm(perm)
        dist.broadcast(shared, 0)
        perm = shared.to(perm.device)
    return perm


class NonFiniteLoss(RuntimeError):
    pass


def sync_gradients(module: torch.nn.Module, loss: torch.Tensor, term: str) -> None:
    """Average `module`'s gradients over ranks in one flattened all-reduce (as CleanRL's multi-GPU PPO); raise
    NonFiniteLoss(term) on every rank at once when the loss is not finite on any rank."""
    nonfinite = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world_size() > 1:
        grads = [p.grad for p in module.parameters()]
        flat = torch.cat([g.flatten() for g in grads] + [nonfinite])
        dist.all_reduce(flat)
        nonfinite, offset = flat[-1:], 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g) / world_size())
            offset += g.numel()
    if nonfinite.item() > 0:
        raise NonFiniteLoss(term)


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    if world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, 0)


def broadcast(obj):
    """Rank 0's `obj` (any picklable object) on every rank."""
    box = [obj]
    if world_size() > 1:
        dist.broadcast_object_list(box, 0)
    return box[0]


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
