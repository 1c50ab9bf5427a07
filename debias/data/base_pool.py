"""The fixed partition of scikit-learn's 1,797 bundled base digits into a pretraining pool and an evaluation pool.

- **pretraining pool**: the base images the digits CLIP and any pretrained backbone train on;
- **evaluation pool**: a fixed, seeded, per-class stratified share (:data:`EVAL_FRACTION` of each class) that no
  model ever trains on; every evaluation split (test, shifted, swapped, the CLIP's zero-shot figures) draws its base
  images from here.

The partition depends on :data:`POOL_SEED` only, never on a run's seed, so every model, run and recipe sees the same
two pools.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .digits_base import load_base_digits

POOL_SEED = 20240607
"""Seed of the partition (fixed; independent of every training seed)."""
EVAL_FRACTION = 0.2
"""Share of each class that goes to the evaluation pool (rounded per class)."""


@lru_cache(maxsize=4)
def _pools(seed: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, labels = load_base_digits(8)
    gen = torch.Generator().manual_seed(seed)
    evaluation = []
    for k in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == k).flatten()
        take = int(round(len(members) * fraction))
        evaluation.append(members[torch.randperm(len(members), generator=gen)[:take]])
    eval_idx = torch.cat(evaluation).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[eval_idx] = False
    return torch.nonzero(mask).flatten(), eval_idx


def base_pools(seed: int = POOL_SEED, fraction: float = EVAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices ``(pretraining, evaluation)`` into the bundled base digits; disjoint, together all 1,797.

    1,438 pretraining and 359 evaluation images with the defaults (20 % of each class, rounded).
    """
    pre, ev = _pools(seed, fraction)
    return pre.clone(), ev.clone()


def pretraining_pool() -> torch.Tensor:
    """Sorted base-digit indices that the digits CLIP and pretrained backbones train on."""
    return base_pools()[0]


def evaluation_pool() -> torch.Tensor:
    """Sorted base-digit indices that evaluation splits draw from and no model trains on."""
    return base_pools()[1]
