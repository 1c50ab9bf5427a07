"""Folder datasets: a tiny Waterbirds-style folder (PNG + metadata.csv) and a CelebA-style one (JPEG, -1/1 columns)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from debias.data import load_dataset
from debias.data.folder import load as load_folder_dataset
from debias.data.lazy import LazyImages
from debias.errors import DebiasError
from debias.recipe import DataCfg, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# (label, place) -> images per split: training biased (95%-like), val and test balanced within each class
WATERBIRDS_GROUPS = {
    0: {(0, 0): 12, (0, 1): 2, (1, 0): 2, (1, 1): 12},
    1: {(0, 0): 6, (0, 1): 6, (1, 0): 6, (1, 1): 6},
    2: {(0, 0): 8, (0, 1): 8, (1, 0): 4, (1, 1): 4},
}


def _image(label: int, attr: int, i: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """Background colour = attribute, a square whose brightness = label; a little per-image noise."""
    rng = np.random.default_rng(i)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[..., 1 + attr] = 150
    arr[8:20, 10:25] = 80 + 150 * label
    arr = np.clip(arr.astype(int) + rng.integers(0, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_waterbirds(root: Path) -> Path:
    """``root/metadata.csv`` (img_filename, y, split, place, place_filename) and PNGs in class subfolders."""
    rows, i = [], 0
    for split, groups in WATERBIRDS_GROUPS.items():
        for (y, place), n in groups.items():
            for _ in range(n):
                rel = f"{y:03d}.Bird_{y}/img_{i:04d}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                _image(y, place, i).save(root / rel)
                rows.append({"img_id": i, "img_filename": rel, "y": y, "split": split, "place": place,
                             "place_filename": f"/x/{i}.jpg"})
                i += 1
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def make_celeba(base: Path) -> Path:
    """``base/img_align_celeba/*.jpg`` and ``base/celeba_metadata.csv`` with -1/1 attribute columns."""
    images = base / "img_align_celeba"
    images.mkdir(parents=True)
    rows, i = [], 0
    for partition, groups in WATERBIRDS_GROUPS.items():
        for (blond, male), n in groups.items():
            for _ in range(n):
                name = f"{i + 1:06d}.jpg"
                _image(blond, male, i, size=(44, 54)).save(images / name, quality=90)
                rows.append({"image_id": name, "5_o_Clock_Shadow": -1, "Blond_Hair": 2 * blond - 1,
                             "Male": 2 * male - 1, "partition": partition})
                i += 1
    with open(base / "celeba_metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return images


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory) -> Path:
    return make_waterbirds(tmp_path_factory.mktemp("waterbirds"))


def _cfg(root: Path, **kw) -> DataCfg:
    return DataCfg(**{"name": "folder", "root": str(root), "metadata": "metadata.csv", "image_size": 16, **kw})


def _rewrite_csv(src: Path, dst_root: Path, edit) -> Path:
    """Copy the Waterbirds-style folder's CSV next to the same images with ``edit(rows)`` applied."""
    with open(src / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = edit(rows)
    dst_root.mkdir(parents=True, exist_ok=True)
    with open(dst_root / "bad.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst_root / "bad.csv"


def test_waterbirds_recipe_splits_groups_and_stream(waterbirds):
    recipe = load_recipe(RECIPES / "waterbirds.toml", [f'data.root="{waterbirds}"', "data.image_size=32"])
    bundle = load_dataset(recipe)
    s = bundle.splits
    assert set(s) == {"train", "val", "test", "shifted"} and bundle.shift_splits == ("test", "shifted")
    assert bundle.class_names == ["landbird", "waterbird"] and bundle.attr_names == ["land", "water"]
    assert bundle.attribute == "place"
    assert s["test"].group_names() == ["landbird|land", "landbird|water", "waterbird|land", "waterbird|water"]
    assert len(s["train"]) == 28 and len(s["test"]) == 24
    assert torch.bincount(s["train"].groups, minlength=4).tolist() == [12, 2, 2, 12]
    assert torch.bincount(s["shifted"].groups, minlength=4).tolist() == [4, 4, 4, 4]  # balanced subsample of test
    u = bundle.unlabeled  # 20% of val's rows (a draw that reads no label), taken out of val
    assert u is not None and len(u) == 5 and len(s["val"]) + len(u) == 24
    paths_val = set(s["val"].images.render.paths)
    assert not paths_val & set(u.images.render.paths)
    assert set(s["shifted"].images.render.paths) <= set(s["test"].images.render.paths)
    img, label, attr = s["train"][0]
    assert isinstance(s["train"].images, LazyImages) and img.shape == (3, 32, 32) and 0 <= img.min() <= img.max() <= 1
    batch, labels, attrs = next(iter(DataLoader(s["test"], batch_size=8)))
    assert batch.shape == (8, 3, 32, 32) and torch.equal(labels, s["test"].labels[:8])
    assert torch.equal(batch[3], s["test"].images[3])
    # the picture is what the CSV says: background channel = place
    means = batch.mean(dim=(2, 3))
    assert torch.equal(means[:, 1:].argmax(1), attrs)


def test_training_flips_are_seeded_and_change_with_the_epoch(waterbirds):
    cfg = _cfg(waterbirds, augment=True)
    a = load_folder_dataset(cfg, seed=0).splits["train"]
    b = load_folder_dataset(cfg, seed=0).splits["train"]
    first = a.images[:]
    assert torch.equal(first, b.images[:])
    a.set_epoch(1)
    flipped = a.images[:]
    assert not torch.equal(first, flipped)
    assert all(torch.equal(f, g) or torch.equal(f, g.flip(-1)) for f, g in zip(first, flipped))
    test = load_folder_dataset(cfg, seed=0).splits["test"]
    assert test.render is None  # evaluation images are fixed


def test_per_class_caps_subsample(waterbirds):
    bundle = load_folder_dataset(_cfg(waterbirds, train_per_class=5, test_per_class=4,
                                      split_fractions={"unlabeled": 0.0}), seed=0)
    assert torch.bincount(bundle.splits["train"].labels).tolist() == [5, 5]
    assert torch.bincount(bundle.splits["test"].labels).tolist() == [4, 4]
    assert bundle.unlabeled is None


def test_celeba_style_columns_and_minus_one_values(tmp_path):
    images = make_celeba(tmp_path / "celeba")
    recipe = load_recipe(RECIPES / "celeba_blond.toml", [f'data.root="{images}"', "data.image_size=24"])
    bundle = load_dataset(recipe)
    assert bundle.class_names == ["not blond", "blond"] and bundle.attr_names == ["female", "male"]
    assert bundle.attribute == "Male"
    assert torch.bincount(bundle.splits["train"].groups, minlength=4).tolist() == [12, 2, 2, 12]
    img = bundle.splits["test"].images[0]
    assert img.shape == (3, 24, 24)
    # without names the -1/1 columns are named after the column
    plain = load_folder_dataset(DataCfg(name="folder", root=str(images), metadata="../celeba_metadata.csv",
                                        columns=recipe.data.columns, image_size=8), seed=0)
    assert plain.class_names == ["not Blond_Hair", "Blond_Hair"] and plain.attr_names == ["not Male", "Male"]


def test_split_value_mapping_and_a_named_unlabeled_stream(waterbirds, tmp_path):
    names = {"0": "tr", "1": "va", "2": "te"}

    def edit(rows):
        for r in rows:
            r["split"] = names[r["split"]]
        for r in rows[-6:]:
            r["split"] = "pool"
        return rows

    csv_path = _rewrite_csv(waterbirds, tmp_path, edit)
    cfg = _cfg(waterbirds, metadata=str(csv_path))
    setattr(cfg, "split_values", {"tr": "train", "va": "val", "te": "test", "pool": "unlabeled"})
    bundle = load_folder_dataset(cfg, seed=0)
    assert len(bundle.unlabeled) == 6 and len(bundle.splits["val"]) == 24 and len(bundle.splits["test"]) == 18
    setattr(cfg, "split_values", {"tr": "train", "va": "val", "te": "test", "pool": "holdout"})
    with pytest.raises(DebiasError, match=r"data.split_values.pool = 'holdout': expected one of"):
        load_folder_dataset(cfg, seed=0)


def test_string_valued_columns(waterbirds, tmp_path):
    def edit(rows):
        for r in rows:
            r["place"] = ["land", "water"][int(r["place"])]
        return rows

    csv_path = _rewrite_csv(waterbirds, tmp_path, edit)
    bundle = load_folder_dataset(_cfg(waterbirds, metadata=str(csv_path), attribute_values=["water", "land"]), seed=0)
    assert bundle.attr_names == ["water", "land"]
    assert torch.bincount(bundle.splits["train"].groups, minlength=4).tolist() == [2, 12, 12, 2]


# ----------------------------------------------------------------------------------------------- bad inputs

def _error(cfg: DataCfg) -> str:
    with pytest.raises(DebiasError) as info:
        load_folder_dataset(cfg, seed=0)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_root_and_csv(tmp_path, waterbirds):
    msg = _error(_cfg(tmp_path / "nowhere"))
    assert "data.root" in msg and "nowhere" in msg
    msg = _error(_cfg(waterbirds, metadata="missing.csv"))
    assert "data.metadata" in msg and str(waterbirds / "missing.csv") in msg


def test_csv_without_a_column_lists_the_columns_present(waterbirds):
    msg = _error(_cfg(waterbirds, columns={"attribute": "background"}))
    assert "attribute='background'" in msg and "'img_filename'" in msg and "'place'" in msg


def test_unknown_split_value_names_line_and_value(waterbirds, tmp_path):
    def edit(rows):
        rows[4]["split"] = "7"
        return rows

    msg = _error(_cfg(waterbirds, metadata=str(_rewrite_csv(waterbirds, tmp_path, edit))))
    assert "line 6" in msg and "'7'" in msg and "'split'" in msg and "data.split_values" in msg


def test_bad_label_value_names_line_and_column(waterbirds, tmp_path):
    def edit(rows):
        rows[2]["y"] = "5"
        return rows

    msg = _error(_cfg(waterbirds, metadata=str(_rewrite_csv(waterbirds, tmp_path, edit)),
                      class_names=["landbird", "waterbird"]))
    assert "line 4" in msg and "'y'" in msg and "value 5" in msg


def test_listed_image_missing_names_the_file(waterbirds, tmp_path):
    def edit(rows):
        rows[1]["img_filename"] = "000.Bird_0/not_there.png"
        return rows

    msg = _error(_cfg(waterbirds, metadata=str(_rewrite_csv(waterbirds, tmp_path, edit))))
    assert "not_there.png" in msg and "line 3" in msg and "not found" in msg


def test_undecodable_images_name_the_file(waterbirds, tmp_path):
    def edit(rows):
        rows[0]["img_filename"] = "garbage.png"
        rows[1]["img_filename"] = "truncated.png"
        return rows

    (waterbirds / "garbage.png").write_bytes(b"this is not an image")
    csv_path = _rewrite_csv(waterbirds, tmp_path, edit)
    msg = _error(_cfg(waterbirds, metadata=str(csv_path)))  # also names truncated.png, not written yet
    assert "garbage.png" in msg and "cannot be decoded" in msg and "line 2" in msg and "truncated.png" in msg
    # a file whose header parses but whose pixels are cut off fails when its batch is drawn, as one line too
    whole = (waterbirds / "000.Bird_0/img_0000.png").read_bytes()
    (waterbirds / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (waterbirds / "garbage.png").write_bytes(whole)
    train = load_folder_dataset(_cfg(waterbirds, metadata=str(csv_path), augment=False), seed=0).splits["train"]
    paths = train.images.render.paths
    with pytest.raises(DebiasError) as info:
        train.images[paths.index("truncated.png")]
    msg = str(info.value)
    assert "\n" not in msg and "truncated.png" in msg and "line 3" in msg and "cannot be decoded" in msg


def test_empty_cell_and_a_val_split_without_a_group(waterbirds, tmp_path):
    def blank(rows):
        rows[3]["place"] = ""
        return rows

    msg = _error(_cfg(waterbirds, metadata=str(_rewrite_csv(waterbirds, tmp_path / "a", blank))))
    assert "line 5" in msg and "'place'" in msg and "empty" in msg

    def no_waterbird_on_land_in_val(rows):
        return [r for r in rows if not (r["split"] == "1" and r["y"] == "1" and r["place"] == "0")]

    csv_path = _rewrite_csv(waterbirds, tmp_path / "b", no_waterbird_on_land_in_val)
    bundle = load_folder_dataset(_cfg(waterbirds, metadata=str(csv_path)), seed=0)  # the stream reads no group
    assert len(bundle.unlabeled) + len(bundle.splits["val"]) == 18 and "shifted" in bundle.splits
    ok = load_folder_dataset(_cfg(waterbirds, metadata=str(csv_path), split_fractions={"unlabeled": 0.0}), seed=0)
    assert ok.unlabeled is None and "shifted" in ok.splits
