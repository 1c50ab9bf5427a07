"""Training methods as plugins: the registry, one line per method (name -> module).

A method module holds its recipe section (``Config``, a dataclass whose field docstrings are the user
documentation ``debias recipe`` prints; the section is named after the method), its cross-key checks
(``validate(recipe)``, run on every recipe whatever its ``train.method``) and ``METHOD``, its
:class:`~debias.methods.base.Method` subclass. Adding a method is one module and one line here (and, when it has a
section, the section's field in :class:`debias.recipe.Recipe`). This file imports nothing heavy: the modules (which
import torch) are imported when a method is looked up.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import RecipeError, did_you_mean

if TYPE_CHECKING:
    from ..recipe import Recipe
    from .base import Method, MethodContext

METHODS: dict[str, str] = {
    "erm": "debias.methods.erm",
    "concept": "debias.methods.concept",
    "groupdro": "debias.methods.groupdro",
    "jtt": "debias.methods.jtt",
    "reweight": "debias.methods.reweight",
    "augment": "debias.methods.augment",
    "leace": "debias.methods.leace",
}
"""Every method ``train.method`` may name, and the module that implements it."""


def method_module(name: str) -> ModuleType:
    """The module of method ``name``; an unknown name is a recipe error naming ``train.method``."""
    if name not in METHODS:
        raise RecipeError(f"train.method = {name!r}: expected one of {sorted(METHODS)}{did_you_mean(name, METHODS)}")
    return importlib.import_module(METHODS[name])


def config_class(name: str) -> type | None:
    """The recipe section dataclass of method ``name`` (section ``[name]``), or None for a method without one."""
    return getattr(method_module(name), "Config", None)


def config_classes() -> dict[str, type]:
    """``{section name: dataclass}`` for every method with a recipe section."""
    return {name: cls for name in METHODS if (cls := config_class(name)) is not None}


def validate(recipe: "Recipe") -> None:
    """Every method's cross-key checks of its own section (and ``train.method`` itself)."""
    method_module(recipe.train.method)
    for name in METHODS:
        check = getattr(method_module(name), "validate", None)
        if check is not None:
            check(recipe)


def needs_unlabeled(name: str) -> bool:
    """Whether method ``name`` draws batches from the unlabeled stream."""
    return bool(method_module(name).METHOD.needs_unlabeled)


def build_method(name: str, ctx: "MethodContext") -> "Method":
    """Method ``name``, built for a run."""
    return method_module(name).METHOD(ctx)

