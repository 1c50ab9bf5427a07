"""``erm``: cross-entropy on the training batch (the baseline every other method adds to)."""
from __future__ import annotations

from .base import Method


class ERM(Method):
    """Cross-entropy on the training batch."""

    name = "erm"


METHOD = ERM
