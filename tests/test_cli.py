"""The command line a user meets first: --help, --version and ``debias recipe``."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version

import pytest

from debias.cli import main
from debias.recipe import TrainCfg, load_recipe, recipe_from_dict
from debias.recipe_doc import describe_recipe, field_docs


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"debias {version('debias')}"


def test_help_speaks_to_users():
    out = subprocess.run([sys.executable, "-m", "debias", "--help"], capture_output=True, text=True, check=True).stdout
    assert "spurious" in out and "debias train recipes/colored_digits.toml" in out
    assert "main(argv)" not in out and "tests call" not in out
    for command in ("train", "explain", "compare", "recipe"):
        assert f"    {command} " in out


def test_recipe_prints_every_key_with_its_meaning(capsys):
    assert main(["recipe", "recipes/colored_digits.toml", "--set", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe("recipes/colored_digits.toml", ["train.lr=0.5"])
    assert recipe_from_dict(tomllib.loads(out)) == recipe  # what it prints loads back as the same recipe
    lines = out.splitlines()
    lr = lines.index("lr = 0.5")
    assert lines[lr - 1].startswith("# (default 0.001")  # a changed value names the default
    label_smoothing = lines.index("label_smoothing = 0.05")
    doc = field_docs(TrainCfg)["label_smoothing"].split()[0]
    assert any(doc in line for line in lines[label_smoothing - 3:label_smoothing])
    assert '# (default; one of "paper", "mutual")' in out


def test_recipe_bad_key_is_one_line(capsys):
    assert main(["recipe", "recipes/colored_digits.toml", "--set", "train.lrr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lrr" in err[0]


def test_describe_without_source_line():
    text = describe_recipe(load_recipe("recipes/colored_digits.toml"))
    assert text.startswith("# the resolved recipe")
