"""Field metadata of the recipe dataclasses: allowed choices and value ranges.

A leaf module (it imports nothing from ``debias``), so every module that defines a recipe section (``recipe.py``,
the method modules) can use it without importing ``debias.recipe``, which imports their registries: no import
circle. :func:`debias.recipe._check_meta` reads the metadata when a recipe is built; ``debias recipe`` prints it.
"""
from __future__ import annotations


def _choices(*values: object) -> dict:
    """``field(metadata=_choices("a", "b"))``: the value must be one of ``values``."""
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    """``field(metadata=_range(lo, hi))``: ``lo <= value <= hi`` (``lo < value`` with ``lo_open``; None: unbounded)."""
    return {"range": (lo, hi, lo_open)}
