"""Datasets as plugins: the registry, what each dataset module provides, a new dataset added with one module and one
registry line, the torch-free palette and registry, and the one affine jitter."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from debias.concepts import build_concepts
from debias.data import load_dataset
from debias.data.registry import DATASETS, dataset
from debias.data.shifts import affine_thetas, apply_affine, random_affine
from debias.errors import DebiasError, RecipeError
from debias.preflight import missing_inputs
from debias.recipe import DataCfg, load_recipe

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "recipes" / "colored_digits.toml"


def test_every_registered_dataset_provides_the_plugin_surface():
    assert list(DataCfg.__dataclass_fields__["name"].metadata["choices"]) == list(DATASETS)
    for name in DATASETS:
        module = dataset(name)
        for attr in ("load", "validate", "missing_inputs", "builtin_concepts"):
            assert callable(getattr(module, attr)), (name, attr)
        assert isinstance(module.SETTING_KEYS, tuple)
    assert set(dataset("colored_digits").builtin_concepts(DataCfg(), load_recipe(DEFAULT).concepts)) == {"color",
                                                                                                        "digit"}
    assert dataset("folder").builtin_concepts(DataCfg(name="folder"), load_recipe(DEFAULT).concepts) == {}


def test_an_unknown_dataset_is_one_line_naming_the_choices():
    with pytest.raises(RecipeError, match=r"data.name = 'colored_mnst'.*colored_mnist"):
        load_recipe(DEFAULT, ["data.name=colored_mnst"])
    with pytest.raises(DebiasError, match="data.name = 'nope': expected one of"):
        dataset("nope")


def test_dataset_checks_run_when_the_recipe_loads():
    with pytest.raises(RecipeError, match="data.colors.*'teal' is not in the palette"):
        load_recipe(DEFAULT, ['data.colors=["red", "teal"]'])
    with pytest.raises(RecipeError, match="data.split_fractions.unlabeled = 1.0"):
        load_recipe(DEFAULT, ["data.name=folder", "data.split_fractions={unlabeled = 1.0}", "concepts.spurious=[]",
                              "concepts.core=[]", 'concepts.captions={a = ["x", "y"]}'])
    with pytest.raises(RecipeError, match="concept 'color' is not defined"):  # folder datasets define no concepts
        load_recipe(DEFAULT, ["data.name=folder"])


PLUGIN = '''
"""Squares: a dark or light square on a plain background, the shade the spurious attribute."""
import torch

from debias.errors import RecipeError
from debias.data.splits import DatasetBundle, Split, split_seed

SETTING_KEYS = ("bias",)


def validate(cfg, concepts=None):
    if cfg.image_size > 64:
        raise RecipeError(f"data.image_size = {cfg.image_size}: squares are at most 64 px")


def missing_inputs(cfg):
    return [] if cfg.root else ["data.root is not set: squares need a (any) folder"]


def builtin_concepts(cfg, concepts):
    return {"shade": (["a dark square.", "a light square."], "attr"),
            "side": (["a square on the left.", "a square on the right."], "label")}


def load(cfg, seed, concepts=None):
    gen = torch.Generator().manual_seed(split_seed(seed, "squares"))
    splits = {}
    for name in ("train", "val", "test", "shifted"):
        labels = torch.randint(0, 2, (16,), generator=gen)
        keep = torch.rand(16, generator=gen) < (cfg.bias if name != "shifted" else 0.5)
        attrs = torch.where(keep, labels, 1 - labels)
        images = torch.zeros(16, 3, cfg.image_size, cfg.image_size)
        half = cfg.image_size // 2
        for i in range(16):
            x = 0 if labels[i] == 0 else half
            images[i, :, 4:half, x:x + half // 2] = 0.3 + 0.6 * attrs[i]
        splits[name] = Split(name, images, labels, attrs, ["left", "right"], ["dark", "light"])
    return DatasetBundle(splits=splits, class_names=["left", "right"], attr_names=["dark", "light"],
                         attribute="shade", shift_splits=("shifted",))
'''


def test_a_new_dataset_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    (tmp_path / "squares_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(DATASETS, "squares", "squares_plugin")  # the one registry line
    with pytest.raises(RecipeError, match="data.image_size = 128: squares"):
        load_recipe(DEFAULT, ["data.name=squares", "data.image_size=128", 'concepts.spurious=["shade"]',
                              'concepts.core=["side"]'])
    recipe = load_recipe(DEFAULT, ["data.name=squares", "data.bias=0.9", 'concepts.spurious=["shade"]',
                                   'concepts.core=["side"]'])
    assert missing_inputs(recipe, model_weights=False) == ["data.root is not set: squares need a (any) folder"]
    bundle = load_dataset(recipe)
    assert bundle.attribute == "shade" and len(bundle.splits["train"]) == 16
    concepts = {c.name: c for c in build_concepts(recipe, bundle)}
    assert concepts["shade"].captions == ["a dark square.", "a light square."] and concepts["shade"].role == "spurious"
    assert concepts["side"].attribute == "label" and concepts["side"].role == "core"


def test_coloured_digit_concepts_follow_classes_and_colours_and_skip_gray():
    recipe = load_recipe(DEFAULT, ["data.classes=[1, 7, 3]", 'data.colors=["blue", "yellow"]'])
    bundle = load_dataset(recipe)
    assert bundle.attr_names == ["blue", "yellow", "gray"] and bundle.captioned_attr_names == ["blue", "yellow"]
    concepts = {c.name: c.captions for c in build_concepts(recipe, bundle)}
    assert concepts == {"color": ["a photo of a blue digit.", "a photo of a yellow digit."],
                        "digit": ["a photo of the digit one.", "a photo of the digit seven.",
                                  "a photo of the digit three."]}


def test_recipe_registry_and_palette_import_without_torch():
    code = ("import sys, debias.recipe, debias.data, debias.data.registry, debias.data.palette, debias.preflight; "
            "bad = sorted(m for m in ('torch', 'timm', 'open_clip', 'numpy') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_one_affine_jitter():
    images = torch.rand(6, 3, 16, 16)
    a = random_affine(images, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    thetas = affine_thetas(6, gen)
    assert torch.equal(a, apply_affine(images, thetas))
    assert thetas.shape == (6, 2, 3)
    gen = torch.Generator().manual_seed(4)  # the draw order every rendered split depends on: angles, scales, shifts
    angle = (torch.rand(6, generator=gen) * 2 - 1) * 10.0 * torch.pi / 180
    scale = 0.9 + torch.rand(6, generator=gen) * 0.2
    shift = (torch.rand(6, 2, generator=gen) * 2 - 1) * 0.16
    assert torch.equal(thetas[:, 0, 0], torch.cos(angle) / scale) and torch.equal(thetas[:, 1, 2], shift[:, 1])
    upsampled = apply_affine(images[:, :1], thetas, size=32, mode="bicubic")
    assert upsampled.shape == (6, 1, 32, 32) and 0 <= upsampled.min() and upsampled.max() <= 1
    empty = torch.zeros(0, 3, 16, 16)
    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    assert random_affine(empty, gen).shape == (0, 3, 16, 16) and torch.equal(gen.get_state(), state)
