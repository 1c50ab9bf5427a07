import torch

from debias.data.colored_digits import load as load_colored_digits, split_base_indices
from debias.data.digits_base import load_base_digits
from debias.recipe import DataCfg


def test_base_images_split_first_and_disjoint():
    _, digits = load_base_digits(8)
    labels = (digits == 8).long()
    fr = DataCfg().split_fractions
    idx = split_base_indices(labels, 2, fr, seed=0)
    seen = torch.cat(list(idx.values()))
    assert len(seen) == len(set(seen.tolist())), "a base image is in two splits"
    assert abs(len(idx["train"]) - 0.4 * len(labels)) <= 2


def test_colours_follow_bias_and_shift_modes():
    cfg = DataCfg(bias=1.0, train_copies=2, eval_copies=2)
    b = load_colored_digits(cfg, seed=0)
    s = b.splits
    for name in ("train", "val", "test"):
        assert torch.equal(s[name].attrs, s[name].labels), name  # 5 red, 8 green
    assert torch.equal(s["swapped"].attrs, 1 - s["swapped"].labels)
    assert (s["grayscale"].attrs == 2).all()
    gray = s["grayscale"].images
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    red = s["train"].images[s["train"].attrs == 0]
    assert red[:, 1:].abs().max() == 0 and red[:, 0].max() > 0.5  # the paper's colouring: one channel only
    sh = s["shifted"]
    agree = (sh.attrs == sh.labels).float().mean()
    assert 0.3 < agree < 0.7
    assert b.unlabeled is not None and 0.3 < (b.unlabeled.attrs == b.unlabeled.labels).float().mean() < 0.7
    assert s["test"].group_names() == ["5|red", "5|green", "5|gray", "8|red", "8|green", "8|gray"]


def test_bias_below_one_uses_other_colours_and_is_seeded():
    cfg = DataCfg(bias=0.5, colors=["red", "green", "blue"], train_copies=4)
    a = load_colored_digits(cfg, seed=1).splits["train"]
    b = load_colored_digits(cfg, seed=1).splits["train"]
    assert torch.equal(a.images, b.images)
    own = (a.attrs == a.labels).float().mean()
    assert 0.4 < own < 0.6
    assert (a.attrs == 2).any()  # blue belongs to no class, drawn as an "other" colour
    a.set_epoch(1)
    assert not torch.equal(a.images, b.images)  # a fresh jitter each epoch
    assert torch.equal(a.attrs, b.attrs)  # of the same examples: colours are drawn once per seed


def test_other_classes_and_all_ten_digits():
    b = load_colored_digits(DataCfg(classes=[1, 7], colors=["blue", "yellow"]), seed=0)
    assert b.class_names == ["1", "7"] and b.attr_names == ["blue", "yellow", "gray"]
    ten = load_colored_digits(DataCfg(classes=list(range(10)), colors=["red", "green", "blue", "yellow", "magenta",
                                                                      "cyan", "orange", "purple"]), seed=0)
    train = ten.splits["train"]
    assert sorted(set(train.labels.tolist())) == list(range(10))
    assert torch.equal(train.attrs, train.labels % 8)  # more classes than colours: classes share colours
