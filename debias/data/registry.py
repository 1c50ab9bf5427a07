"""The datasets ``data.name`` can name: one line per dataset, name -> the module that implements it.

Importing this module imports nothing else (no torch): the recipe reads the names for ``data.name``'s choices.
:func:`dataset` imports a dataset's module when it is first asked for.

A dataset module provides (see :class:`DatasetModule`):

- ``load(cfg, seed, concepts) -> DatasetBundle``: the splits (:mod:`debias.data.splits`); ``concepts`` is the
  ``[concepts]`` section (which attributes are spurious: a dataset of several attributes reads it);
- ``validate(cfg, concepts)``: the checks of the recipe's ``[data]`` section this dataset needs, raising
  :class:`~debias.errors.RecipeError` naming the key (called when a recipe is loaded);
- ``missing_inputs(cfg) -> list[str]``: one message per missing local input (files, folders), looked up without
  loading anything (called by :mod:`debias.preflight` before a run starts);
- ``builtin_concepts(cfg, concepts) -> {name: (captions, "attr" | "label")}``: the concepts the dataset defines from
  the recipe (``concepts`` is the ``[concepts]`` section: its caption templates), one caption per attribute value
  (``attr``, the spurious attribute) or per class (``label``);
- ``SETTING_KEYS``: the ``[data]`` keys that name a run's setting in ``debias compare`` tables (``("bias",)``).

Adding a dataset: a module with these and one line below.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, cast

from ..errors import DebiasError, did_you_mean

if TYPE_CHECKING:
    from ..recipe import ConceptsCfg, DataCfg
    from .splits import DatasetBundle

DATASETS: dict[str, str] = {
    "colored_digits": "debias.data.colored_digits",
    "colored_mnist": "debias.data.colored_mnist",
    "folder": "debias.data.folder",
    "world_digits": "debias.data.world_digits",
}
"""``data.name`` -> the dataset's module."""


class DatasetModule(Protocol):
    """What a dataset module provides (module-level names)."""

    SETTING_KEYS: tuple[str, ...]

    def load(self, cfg: DataCfg, seed: int, concepts: ConceptsCfg | None = None) -> DatasetBundle: ...

    def validate(self, cfg: DataCfg, concepts: ConceptsCfg | None = None) -> None: ...

    def missing_inputs(self, cfg: DataCfg) -> list[str]: ...

    def builtin_concepts(self, cfg: DataCfg, concepts: ConceptsCfg) -> dict[str, tuple[list[str], str]]: ...


def dataset(name: str) -> DatasetModule:
    """The module of dataset ``name`` (imported on first use)."""
    if name not in DATASETS:
        raise DebiasError(f"data.name = {name!r}: expected one of {sorted(DATASETS)}{did_you_mean(name, DATASETS)}")
    module: ModuleType = importlib.import_module(DATASETS[name])
    return cast("DatasetModule", module)
