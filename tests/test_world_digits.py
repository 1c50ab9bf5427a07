"""The world_digits dataset: attributes per split as the recipe says, fixed evaluation base images, bad input."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from debias.cli import main
from debias.data import load_dataset
from debias.data.base_pool import base_pools
from debias.data.digits_base import load_base_digits
from debias.data.world import BACKGROUNDS, MARKERS
from debias.recipe import load_recipe

TWO = "recipes/two_nuisances.toml"
SMALL = ["data.train_copies=1", "data.eval_copies=2", "data.unlabeled_copies=2"]


@pytest.fixture(scope="module")
def two():
    return load_dataset(load_recipe(TWO, SMALL))


def test_splits_follow_the_recipe(two):
    b = two
    assert b.attr_names == ["red+grass", "red+brick", "green+grass", "green+brick"]
    assert set(b.splits) == {"train", "val", "test", "shifted", "swapped", "swapped_color", "swapped_background"}
    assert b.shift_splits == ("shifted", "swapped", "swapped_color", "swapped_background")
    for name in ("train", "val", "test"):  # bias 1.0: class k has colour k and background k
        s = b.splits[name]
        assert torch.equal(s.factors["color"], s.labels) and torch.equal(s.factors["background"], s.labels)
        assert torch.equal(s.attrs, s.labels * 2 + s.labels)  # the group attribute combines both
    sw = b.splits["swapped"]
    assert torch.equal(sw.factors["color"], 1 - sw.labels) and torch.equal(sw.factors["background"], 1 - sw.labels)
    sc, sb = b.splits["swapped_color"], b.splits["swapped_background"]
    assert torch.equal(sc.factors["color"], 1 - sc.labels) and torch.equal(sc.factors["background"], sc.labels)
    assert torch.equal(sb.factors["background"], 1 - sb.labels) and torch.equal(sb.factors["color"], sb.labels)
    sh = b.splits["shifted"]  # both at random: all four combinations with each class
    assert len(set(zip(sh.labels.tolist(), sh.attrs.tolist()))) == 8
    for s in b.splits.values():  # the marker is not spurious: drawn at random from its three values
        assert set(s.factors["marker"].tolist()) == {0, 1, 2}
    assert b.factor_names["marker"] == ["none", "square", "ring"]


def test_evaluation_splits_render_the_fixed_evaluation_pool(two):
    """Evaluation splits hold the evaluation pool's digits of the classes (the same for every seed); training,
    validation and the stream hold pretraining-pool digits only, split per seed."""
    pre, ev = base_pools()
    assert not set(pre.tolist()) & set(ev.tolist())
    other = load_dataset(load_recipe(TWO, SMALL + ["seed=1"]))
    # evaluation images of seed 0 and 1: the same digits (same labels, same count), other draws
    for name in ("test", "shifted"):
        a, c = two.splits[name], other.splits[name]
        assert torch.equal(a.labels, c.labels) and not torch.equal(a.images, c.images)
    digits = load_base_digits(8)[1]
    n_eval = len(two.splits["test"]) // 2  # eval_copies = 2
    assert n_eval == int(torch.isin(digits[ev], torch.tensor([5, 8])).sum())
    used = len(two.splits["train"]) + len(two.splits["val"]) // 2 + len(two.unlabeled) // 2  # copies: 1, 2, 2
    assert used <= int(torch.isin(digits[pre], torch.tensor([5, 8])).sum())


def test_training_examples_keep_their_surroundings_across_epochs(two):
    train = two.splits["train"]
    first = train.images.clone()
    train.set_epoch(1)
    assert not torch.equal(first, train.images)  # the digit's jitter is fresh
    plain = train.unaugmented().images
    again = two.splits["train"].unaugmented().images
    assert torch.equal(plain, again)  # background crop, marker corner and attributes are fixed


def test_partial_bias_draws_each_spurious_attribute_independently():
    b = load_dataset(load_recipe(TWO, SMALL + ["data.bias=0.75", "data.train_copies=8"]))
    s = b.splits["train"]
    own_c = (s.factors["color"] == s.labels).float().mean()
    own_b = (s.factors["background"] == s.labels).float().mean()
    both = ((s.factors["color"] == s.labels) & (s.factors["background"] == s.labels)).float().mean()
    assert abs(own_c - 0.75) < 0.05 and abs(own_b - 0.75) < 0.05
    assert abs(both - own_c * own_b) < 0.05


@pytest.mark.parametrize("override, needle", [
    ('data.backgrounds=["grass", "sand"]', "data.backgrounds = ['grass', 'sand']: 'sand' is not one of"),
    ('data.markers=["square", "star"]', "data.markers = ['square', 'star']: 'star' is not one of"),
    ('data.backgrounds=["grass", "brick", "gravel"]', "one value per class"),
    ('data.colors=["red"]', "data.colors = ['red']: 'color' is spurious"),
    ('concepts.spurious=["digit"]', "world_digits needs one or more of"),
])
def test_bad_world_keys_fail_with_one_line_and_write_nothing(tmp_path: Path, capsys, override: str, needle: str):
    out = tmp_path / "out"
    code = main(["train", TWO, "--out", str(out), "--no-progress", "--set", override])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err and not out.exists()
    if "is not one of" in needle:  # an unknown name: the choices are listed
        assert all(name in err for name in (BACKGROUNDS if "backgrounds" in override else MARKERS))
