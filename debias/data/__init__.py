"""Datasets: every loader returns a :class:`DatasetBundle` of labelled splits with a spurious attribute."""
from __future__ import annotations

from ..errors import DebiasError
from ..recipe import Recipe
from .splits import DatasetBundle, Split


def load_dataset(recipe: Recipe) -> DatasetBundle:
    """The dataset named by ``data.name``."""
    name = recipe.data.name
    if name == "colored_digits":
        from .digits import load_colored_digits

        return load_colored_digits(recipe.data, recipe.seed)
    if name == "colored_mnist":
        from .mnist import load_colored_mnist

        return load_colored_mnist(recipe.data, recipe.seed)
    if name == "folder":
        from .folder import load_folder_dataset

        return load_folder_dataset(recipe.data, recipe.seed)
    raise DebiasError(f"data.name = {name!r}: expected one of ['colored_digits', 'colored_mnist', 'folder']")


__all__ = ["DatasetBundle", "Split", "load_dataset"]
