"""The benchmark's baselines: generic augmentation (resized crop, flip, colour jitter) and ``leace`` (ERM, then LEACE
erasure of the spurious concepts from the penultimate features and the classifier refitted), each on a tiny budget."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from debias import io
from debias.cli import main
from debias.methods.augment import CROP_RATIO, crop_boxes, random_hflip, random_resized_crop, resized_crops
from debias.methods.leace import penultimate_features
from debias.models.standalone import StandaloneModel
from debias.recipe import load_recipe
from debias.train.loop import Trainer

TINY = ["train.epochs=1", "data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2",
        "matching.num_images=64", "explain.control_draws=1", "train.batch_size=32"]
GENERIC = 'augment.transforms=["random_resized_crop", "hflip", "color_jitter"]'
"""What the benchmark's generic augmentation sets (with ``train.method=augment``)."""


# ------------------------------------------------------------------------------------ generic augmentation

def test_resized_crop_draws_torchvision_boxes_and_matches_its_resampling():
    """Boxes within the image, area in [crop_scale, 1] of it, aspect ratio in [3/4, 4/3], one per image; the batched
    resampling equals torchvision's ``resized_crop`` of each box away from the box's outermost row and column."""
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(0)
    boxes = crop_boxes(512, 32, 32, (0.6, 1.0))
    top, left, h, w = boxes.T
    assert ((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32)).all()
    area, ratio = (h * w).double() / 32**2, w.double() / h
    assert area.min() > 0.55 and area.max() <= 1.0  # rounding to whole pixels moves the area a little
    assert ratio.min() >= CROP_RATIO[0] - 0.05 and ratio.max() <= CROP_RATIO[1] + 0.05
    assert len(set(map(tuple, boxes.tolist()))) > 400  # a draw per image, not one per batch
    assert len(set(top.tolist())) > 5 and len(set(left.tolist())) > 5
    # no candidate fits a 20 x 40 image at area >= 0.99: torchvision's fallback, the central crop at ratio 4/3
    assert crop_boxes(3, 20, 40, (0.99, 1.0), tries=1).tolist() == [[0, 6, 20, 27]] * 3
    images = torch.rand(16, 3, 32, 32)
    out = resized_crops(images, boxes[:16])
    for img, o, (t, l, bh, bw) in zip(images, out, boxes[:16].tolist()):
        ref = TF.resized_crop(img, t, l, bh, bw, [32, 32], antialias=True)
        assert torch.allclose(o[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5)
    whole = torch.tensor([[0, 0, 32, 32]] * 16)
    assert torch.allclose(resized_crops(images, whole), images, atol=1e-5)  # the whole image: unchanged


def test_generic_transforms_change_images_and_keep_shape_and_range():
    torch.manual_seed(1)
    images = torch.rand(200, 3, 32, 32)
    cropped = random_resized_crop(images, (0.6, 1.0))
    assert cropped.shape == images.shape and cropped.min() >= 0 and cropped.max() <= 1
    changed = (cropped - images).abs().flatten(1).amax(1) > 1e-4
    assert changed.float().mean() > 0.95  # a crop of the whole image (rare at this scale) leaves it as it was
    flipped = random_hflip(images)
    is_flipped = (flipped == images.flip(-1)).flatten(1).all(1)
    kept = (flipped == images).flatten(1).all(1)
    assert (is_flipped ^ kept).all() and 60 < int(is_flipped.sum()) < 140  # Binomial(200, 0.5)
    assert flipped.shape == images.shape


def test_generic_augmentation_trains_through_the_cli(tmp_path, capsys):
    """The benchmark's generic augmentation, as it sets it, on a world recipe; an unknown transform is one line."""
    out = tmp_path / "generic"
    assert main(["train", "recipes/textured_digits.toml", "--out", str(out), "--no-progress", "--set", *TINY,
                 "train.method=augment", GENERIC]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "augment" and m["recipe"]["augment"]["transforms"] == ["random_resized_crop", "hflip",
                                                                                  "color_jitter"]
    assert 0 <= m["splits"]["swapped"]["accuracy"] <= 1
    capsys.readouterr()
    assert main(["train", "recipes/textured_digits.toml", "--out", str(tmp_path / "bad"), "--no-progress",
                 "--set", "train.method=augment", 'augment.transforms=["hflp"]']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "augment.transforms" in err and "hflip" in err
