"""ValueNorm: HARL's running mean/variance normalizer for value targets (HARL's harl/common/valuenorm.py).

Debiased exponential moving averages of the returns and their squares (beta = 0.99999), variance floored at 1e-2.
The statistics are registered buffers, so `state_dict()` saves and restores them on any device (HARL's
`nn.Parameter(...).to(device)` leaves them unregistered on CUDA and checkpoints silently lose them). Under torchrun
`update` averages the batch moments over ranks first, so every rank holds the same statistics.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn


class ValueNorm(nn.Module):
    def __init__(self, beta: float = 0.99999, epsilon: float = 1e-5, var_floor: float = 1e-2, device="cpu"):
        super().__init__()
        self.beta = beta
        self.epsilon = epsilon
        self.var_floor = var_floor
        # Fix: registered buffers, so checkpoints keep the statistics on CUDA too (HARL's would lose them).
        self.register_buffer("running_mean", torch.zeros(1, device=device))
        self.register_buffer("running_mean_sq", torch.zeros(1, device=device))
        self.register_buffer("debiasing_term", torch.zeros((), device=device))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=device))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """One update with the batch mean and mean square of x (any shape; HARL passes [B, 1]); under torchrun, of
        every rank's batch (all ranks' batches have the same size)."""
        x = x.to(self.running_mean.device, torch.float32)
        moments = torch.stack([x.mean(), (x * x).mean()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(moments)
            moments = moments / dist.get_world_size()
        self.update_moments(moments[0], moments[1])

    @torch.no_grad()
    def update_moments(self, mean: torch.Tensor, mean_sq: torch.Tensor) -> None:
        """One update with a batch's mean and mean square."""
        w = self.beta
        self.running_mean.mul_(w).add_((1.0 - w) * mean)
        self.running_mean_sq.mul_(w).add_((1.0 - w) * mean_sq)
        self.debiasing_term.mul_(w).add_(1.0 - w)
        self.num_updates += 1

    def mean_var(self) -> Tuple[torch.Tensor, torch.Tensor]:
        denom = self.debiasing_term.clamp(min=self.epsilon)
        mean = self.running_mean / denom
        mean_sq = self.running_mean_sq / denom
        var = (mean_sq - mean * mean).clamp(min=self.var_floor)
        return mean, var

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.mean_var()
        return (x - mean.to(x.device)) / torch.sqrt(var).to(x.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.mean_var()
        return x * torch.sqrt(var).to(x.device) + mean.to(x.device)
