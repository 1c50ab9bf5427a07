"""Every recipe key has a meaning: the field docstring ``debias recipe`` prints above it."""
from __future__ import annotations

import dataclasses

import pytest

from debias.recipe import Recipe, load_recipe
from debias.recipe_doc import describe_recipe, field_docs, undocumented

SECTIONS = [f.name for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(getattr(Recipe(), f.name))]


@pytest.mark.parametrize("section", ["(top level)", *SECTIONS])
def test_every_key_of_every_section_is_documented(section):
    """Each section the recipe has, whichever module defines its dataclass, is checked."""
    missing = [k for k in undocumented() if (k.partition(".")[0] == section if "." in k else section == "(top level)")]
    assert not missing, f"recipe keys without a docstring: {missing}"


def test_the_default_recipe_prints_each_key_with_its_meaning_and_default():
    """``debias recipe recipes/colored_digits.toml``: each key under its docstring and a ``(default ...)`` note."""
    recipe = load_recipe("recipes/colored_digits.toml")
    lines = describe_recipe(recipe, "recipes/colored_digits.toml").splitlines()
    section = None
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = getattr(recipe, line.strip("[]"))
            continue
        if not line or line.startswith("#"):
            continue
        key = line.split(" = ")[0]
        cls = type(section) if section is not None else Recipe
        notes = lines[i - 1]
        assert notes.startswith("# (default"), (key, notes)
        doc = field_docs(cls).get(key)  # a key without one fails the test above
        if doc:
            assert any(doc.split()[0] in above for above in lines[max(0, i - 8):i - 1]), (key, doc)
    assert "epochs = 32" in lines and lines[lines.index("epochs = 32") - 1].startswith("# (default 8;")
