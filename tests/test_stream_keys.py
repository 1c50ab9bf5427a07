"""``data.stream_bias`` and ``data.stream_fraction``: the unlabeled stream's bias and size (``world_digits``); at
their defaults the stream is drawn exactly as without them, and other datasets refuse them."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from debias.cli import main
from debias.data import load_dataset
from debias.recipe import load_recipe, recipe_to_toml

TWO = "recipes/two_nuisances.toml"
SMALL = ["data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2"]

DEFAULT_STREAM = {
    # the two_nuisances stream (SMALL, seed 0) as drawn without the stream keys: sha256 prefixes of its integer
    # tensors, and of the rendered images (the stream's and the training split's) their sum, sum of squares and
    # sum weighted by position
    "labels": "1c6edd8106c24d1c", "attrs": "34b32fa7e9a77c4d",
    "color": "acb3fa44fab04e82", "background": "4deb0d89060614ae", "marker": "c81893883354c8dd", "n": 142,
    "images": [159128.0596, 84526.37178, 79025.99378], "train": [198511.2019, 107190.2608, 98440.34807],
}
"""Integer tensors hash the same on any machine. Rendered images go through float kernels whose last bits differ
between CPUs, so they are compared by their moments, to 1e-6."""


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def _moments(t: torch.Tensor) -> list[float]:
    t = t.double().flatten()
    return [float(t.sum()), float((t * t).sum()), float((t * torch.linspace(0, 1, len(t), dtype=t.dtype)).sum())]


def _load(*sets: str):
    return load_dataset(load_recipe(TWO, [*SMALL, *sets]))


def _fingerprint(bundle) -> dict:
    u = bundle.unlabeled
    return {"images": _moments(u.images), "labels": _hash(u.labels), "attrs": _hash(u.attrs),
            **{f: _hash(v) for f, v in u.factors.items()}, "train": _moments(bundle.splits["train"].images), "n": len(u)}


@pytest.fixture(scope="module")
def default():
    return _load()


def test_the_defaults_draw_the_stream_as_without_the_keys(default):
    floats = ("images", "train")
    explicit = _load('data.stream_bias="independent"', "data.stream_fraction=1.0")
    assert torch.equal(explicit.unlabeled.images, default.unlabeled.images)  # the same draw, on this machine
    for bundle in (default, explicit):
        got = _fingerprint(bundle)
        assert {k: v for k, v in got.items() if k not in floats} == \
               {k: v for k, v in DEFAULT_STREAM.items() if k not in floats}
        for key in floats:
            assert got[key] == pytest.approx(DEFAULT_STREAM[key], rel=1e-6), key


def test_stream_bias_makes_each_spurious_attribute_follow_the_label(default):
    full = _load("data.stream_bias=1.0").unlabeled
    for factor in ("color", "background"):  # class k has value k, in every stream image
        assert torch.equal(full.factors[factor], full.labels)
    assert set(full.factors["marker"].tolist()) == {0, 1, 2}  # not spurious: still uniform
    assert torch.equal(full.labels, default.unlabeled.labels)  # the same base images
    assert abs(float((default.unlabeled.factors["color"] == default.unlabeled.labels).float().mean()) - 0.5) < 0.15
    part = _load("data.stream_bias=0.75", "data.unlabeled_copies=8")
    for factor in ("color", "background"):
        agree = float((part.unlabeled.factors[factor] == part.unlabeled.labels).float().mean())
        assert 0.68 < agree < 0.82, (factor, agree)  # 568 draws: 0.75 within about 4 standard errors
    assert torch.equal(part.splits["train"].images, default.splits["train"].images)  # the stream's own draws only


def test_stream_fraction_keeps_that_share_of_each_class(default):
    per_class = torch.bincount(default.unlabeled.labels).tolist()
    for fraction in (0.25, 0.5):
        a, b = _load(f"data.stream_fraction={fraction}"), _load(f"data.stream_fraction={fraction}")
        counts = torch.bincount(a.unlabeled.labels).tolist()
        assert counts == [int(round(fraction * n / 2)) * 2 for n in per_class]  # 2 renders per base image
        assert torch.equal(a.unlabeled.images, b.unlabeled.images)  # seeded: the same on every load
        assert torch.equal(a.splits["train"].images, default.splits["train"].images)
        assert torch.equal(a.splits["val"].labels, default.splits["val"].labels)
    other = load_dataset(load_recipe(TWO, [*SMALL, "data.stream_fraction=0.5", "seed=1"]))
    assert not torch.equal(other.unlabeled.images, a.unlabeled.images)


def test_the_keys_round_trip_through_the_resolved_recipe(tmp_path: Path):
    recipe = load_recipe(TWO, ["data.stream_bias=0.75", "data.stream_fraction=0.25"])
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_to_toml(recipe))
    assert load_recipe(path) == recipe and recipe.data.stream_bias == 0.75
    default = load_recipe(TWO)
    path.write_text(recipe_to_toml(default))
    assert load_recipe(path).data.stream_bias == "independent" and load_recipe(path) == default


@pytest.mark.parametrize("recipe, override, needle", [
    ("recipes/colored_digits.toml", "data.stream_bias=0.75", "data.stream_bias = 0.75: data.name = 'colored_digits'"),
    ("recipes/colored_digits.toml", "data.stream_fraction=0.5", "data.stream_fraction = 0.5: data.name = 'colored_"),
    (TWO, "data.stream_bias=0.4", "data.stream_bias = 0.4: expected a value in [0.5, 1.0]"),
    (TWO, "data.stream_bias=1.5", "data.stream_bias = 1.5: expected a value in [0.5, 1.0]"),
    (TWO, 'data.stream_bias="biased"', "data.stream_bias = 'biased': expected \"independent\" or a number"),
    (TWO, "data.stream_fraction=0", "data.stream_fraction = 0.0: expected a value in (0.0, 1.0]"),
    (TWO, "data.stream_fraction=1.5", "data.stream_fraction = 1.5: expected a value in (0.0, 1.0]"),
])
def test_bad_stream_keys_fail_with_one_line_and_write_nothing(tmp_path: Path, capsys, recipe, override, needle):
    out = tmp_path / "out"
    code = main(["train", recipe, "--out", str(out), "--no-progress", "--set", override])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err and not out.exists()
