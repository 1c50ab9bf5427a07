"""``reweight``: group-balanced sampling (uses the training group labels)."""
from __future__ import annotations

import torch

from .base import Method


class Reweight(Method):
    """Group-balanced sampling: every (label, attribute) group present in training is drawn equally often."""

    name = "reweight"

    def sample_weights(self) -> torch.Tensor | None:
        groups = self.ctx.bundle.splits["train"].groups
        counts = torch.bincount(groups).float()
        return 1.0 / counts[groups]


METHOD = Reweight
