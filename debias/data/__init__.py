"""Datasets: every loader returns a :class:`~debias.data.splits.DatasetBundle` of labelled splits with a spurious
attribute. The datasets are listed in :mod:`debias.data.registry`; importing this package imports no torch."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import DATASETS, dataset

if TYPE_CHECKING:
    from ..recipe import Recipe
    from .splits import DatasetBundle, Split


def load_dataset(recipe: Recipe) -> DatasetBundle:
    """The dataset named by ``data.name``, loaded for the recipe's ``[data]`` section, seed and ``[concepts]``
    (which attributes are spurious)."""
    return dataset(recipe.data.name).load(recipe.data, recipe.seed, recipe.concepts)


def __getattr__(name: str) -> Any:
    """``DatasetBundle`` and ``Split`` from :mod:`debias.data.splits`, imported (with torch) when first asked for."""
    if name in ("DatasetBundle", "Split"):
        from . import splits

        return getattr(splits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DATASETS", "DatasetBundle", "Split", "dataset", "load_dataset"]
