"""The one learning-rate schedule: linear warmup, then cosine decay to zero, as a torch ``LambdaLR``."""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total: int, warmup: int) -> float:
    """The rate's factor at ``step``: ``(step + 1) / warmup`` during the warmup, then a cosine from 1 to 0 that reaches
    0 at ``total`` and stays there. A Python float, so a scheduler's state loads weights-only."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's ``LambdaLR`` over ``optimizer`` with :func:`warmup_cosine_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps))
