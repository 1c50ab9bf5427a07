"""``debias recipe``: a resolved recipe printed as TOML, each key under its meaning, default and allowed values.

:func:`undocumented` lists the keys without a meaning (the tests keep it empty).

The meanings are the recipe dataclasses' attribute docstrings (the string literal under a field), read from the
source with :mod:`ast`, so the recipe reference lives in one place: :mod:`debias.recipe`.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing

from .recipe import Recipe, _toml_key, _toml_value

WIDTH = 110


@functools.cache
def _class_node(cls: type) -> ast.ClassDef:
    return ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]


def class_doc(cls: type) -> str:
    """The class's own docstring as written (a dataclass without one gets its signature as ``__doc__``)."""
    return ast.get_docstring(_class_node(cls)) or ""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the fields of dataclass ``cls`` that have a string literal right below them."""
    body = _class_node(cls).body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _default(f: dataclasses.Field) -> typing.Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    value = f.default_factory()  # type: ignore[misc]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _allowed(f: dataclasses.Field) -> str:
    if "choices" in f.metadata:
        return "one of " + ", ".join(_toml_value(c) for c in f.metadata["choices"])
    if "range" in f.metadata:
        lo, hi, lo_open = f.metadata["range"]
        left = "(" if lo_open else "["
        return f"range {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    return ""


def _comment(text: str) -> list[str]:
    if not text.strip():
        return []
    out = []
    for para in text.split("\n\n"):
        out.extend(textwrap.wrap(" ".join(para.split()), WIDTH - 2, break_on_hyphens=False) or [""])
    return [f"# {line}".rstrip() for line in out]


def _key_lines(f: dataclasses.Field, value: typing.Any, doc: str | None) -> list[str]:
    lines = _comment(doc) if doc else []
    notes = []
    default = _default(f)
    notes.append("default" if value == default else f"default {_toml_value(default)}")
    if _allowed(f):
        notes.append(_allowed(f))
    if notes:
        lines.append(f"# ({'; '.join(notes)})")
    lines.append(f"{_toml_key(f.name)} = {_toml_value(value)}")
    return lines


def describe_recipe(recipe: Recipe, source: str = "") -> str:
    """The resolved recipe as TOML (it loads back as the same recipe), every key under its meaning."""
    lines = [f"# {source}: the resolved recipe" if source else "# the resolved recipe",
             "# every key under its meaning and default: '(default)' when the value is the default, '(default X)' when",
             "# this recipe changes it", ""]
    tables = []
    for f in dataclasses.fields(Recipe):
        value = getattr(recipe, f.name)
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value))
        else:
            lines += _key_lines(f, value, field_docs(Recipe).get(f.name))
    for name, section in tables:
        cls = type(section)
        lines += ["", f"[{name}]"] + _comment(class_doc(cls))
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            lines += [""] + _key_lines(f, getattr(section, f.name), docs.get(f.name))
    return "\n".join(lines) + "\n"


def undocumented() -> list[str]:
    """Recipe keys without a docstring (``section.key``)."""
    missing: list[str] = []
    defaults = Recipe()
    for f in dataclasses.fields(Recipe):
        section = getattr(defaults, f.name)
        if dataclasses.is_dataclass(section):
            docs = field_docs(type(section))
            missing += [f"{f.name}.{g.name}" for g in dataclasses.fields(section) if g.name not in docs]
        elif f.name not in field_docs(Recipe):
            missing.append(f.name)
    return missing
