"""A folder dataset's unlabeled stream is chosen without reading a label or an attribute.

The stream (the concept penalty's images, the ``independent`` matching probe, the images dominance is scored on)
comes from CSV rows mapped to ``unlabeled`` (whose label and attribute cells may be empty) or from a seeded fraction
of the val rows; what those rows' label and attribute cells say never changes which rows are drawn, nor their order.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from debias.cli import main
from debias.data import load_dataset
from debias.data.folder import load as load_folder_dataset
from debias.errors import DebiasError, RecipeError
from debias.explain import probe_split
from debias.recipe import DataCfg, load_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "waterbirds.toml"
# (y, place) -> images per split: training biased, the others balanced
GROUPS = {
    "train": {(0, 0): 10, (0, 1): 2, (1, 0): 2, (1, 1): 10},
    "val": {(0, 0): 5, (0, 1): 5, (1, 0): 5, (1, 1): 5},
    "test": {(0, 0): 4, (0, 1): 4, (1, 0): 4, (1, 1): 4},
    "pool": {(0, 0): 4, (0, 1): 4, (1, 0): 4, (1, 1): 4},
}
SPLIT_VALUES = {"train": "train", "val": "val", "test": "test", "pool": "unlabeled"}
RUN = ["model.name=resnet10t", "model.pretrained=false", 'clip.name="digits"', 'clip.pretrained=""',
       "data.image_size=32", "train.epochs=1", "train.batch_size=8", "concept.unlabeled_batch_size=8",
       "matching.num_images=16", "matching.batch_size=16", "explain.control_draws=0", "explain.num_images=16",
       "selection.concept_images=16",
       'concepts.captions.place=["a photo of a digit on grass.", "a photo of a digit on brick."]',
       'concepts.captions.bird=["a photo of the digit five.", "a photo of the digit eight."]']
"""Overrides that turn recipes/waterbirds.toml into a run of seconds on the tiny folder below (the digits CLIP
refuses words it never saw, so the captions are ones it knows)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Images (background colour = place, a square whose brightness = y) and their CSV rows, not yet written."""
    root = tmp_path_factory.mktemp("birds")
    rows, i = [], 0
    for split, groups in GROUPS.items():
        for (y, place), n in groups.items():
            for _ in range(n):
                rng = np.random.default_rng(i)
                arr = np.zeros((30, 40, 3), dtype=np.uint8)
                arr[..., 1 + place] = 150
                arr[8:20, 10:25] = 80 + 150 * y
                arr = np.clip(arr.astype(int) + rng.integers(0, 20, arr.shape), 0, 255).astype(np.uint8)
                name = f"img_{i:03d}.png"
                Image.fromarray(arr).save(root / name)
                rows.append({"img_filename": name, "y": str(y), "split": split, "place": str(place)})
                i += 1
    return root, rows


def _write(root: Path, rows: list[dict], name: str) -> str:
    path = root / f"{name}.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["img_filename", "y", "split", "place"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _edit(rows: list[dict], split: str, edit) -> list[dict]:
    """A copy of ``rows`` whose rows of ``split`` get ``edit(list of those rows)`` (which changes them in place)."""
    out = [dict(r) for r in rows]
    edit([r for r in out if r["split"] == split])
    return out


def _recipe(root: Path, metadata: str, *extra: str):
    return load_recipe(RECIPE, [f'data.root="{root}"', f'data.metadata="{metadata}"', "data.image_size=16",
                                *extra])


def _paths(split) -> list[str]:
    return list(split.images.render.paths)


def _splits(bundle) -> dict[str, list[str]]:
    return {name: sorted(_paths(s)) for name, s in bundle.splits.items()}


def test_unlabeled_rows_with_empty_cells_form_the_stream(folder):
    root, rows = folder

    def blank(pool):
        for r in pool:
            r["y"] = r["place"] = ""

    metadata = _write(root, _edit(rows, "pool", blank), "blank")
    recipe = _recipe(root, metadata, f"data.split_values={json.dumps(SPLIT_VALUES).replace(':', '=')}")
    bundle = load_dataset(recipe)
    stream = bundle.unlabeled
    assert sorted(_paths(stream)) == sorted(r["img_filename"] for r in rows if r["split"] == "pool")
    assert stream.labels.tolist() == [-1] * 16 and stream.attrs.tolist() == [-1] * 16  # nothing known, nothing made up
    assert [len(bundle.splits[s]) for s in ("train", "val", "test")] == [24, 20, 16]  # val keeps every row
    assert probe_split(recipe, bundle) is stream  # the matching probe and selection.concept_split = 'probe'


def test_stream_and_probe_do_not_depend_on_the_stream_rows_labels(folder):
    root, rows = folder
    rng = np.random.default_rng(0)

    def shuffle(pool):
        ys, places = rng.permutation([r["y"] for r in pool]), rng.permutation([r["place"] for r in pool])
        for r, y, p in zip(pool, ys, places):
            r["y"], r["place"] = str(y), str(p)

    def corrupt(pool):
        for r, junk in zip(pool, ["", "7", "-1", "bird?", "1.5", " "] * 3):
            r["y"], r["place"] = junk, junk[::-1]

    values = f"data.split_values={json.dumps(SPLIT_VALUES).replace(':', '=')}"
    seen = []
    for name, edit in (("as_is", lambda pool: None), ("shuffled", shuffle), ("corrupted", corrupt)):
        recipe = _recipe(root, _write(root, _edit(rows, "pool", edit), name), values)
        bundle = load_dataset(recipe)
        seen.append((_paths(bundle.unlabeled), _paths(probe_split(recipe, bundle)), _splits(bundle)))
    assert seen[0] == seen[1] == seen[2]  # the same rows, in the same order, and the same labelled splits
    stream = seen[0][0]
    assert sorted(stream) == sorted(r["img_filename"] for r in rows if r["split"] == "pool")
    assert stream != sorted(stream)  # a seeded order, so a prefix (the probe's first images) is a fair sample


def test_fraction_of_val_is_drawn_without_reading_labels(folder):
    root, rows = folder
    labelled = [r for r in rows if r["split"] != "pool"]

    def swap_groups(val):  # every val row now claims another group
        for r in val:
            r["y"], r["place"] = str(1 - int(r["y"])), str(1 - int(r["place"]))

    def one_group(val):  # a val split with a single group: a group-balanced draw could not be made
        for r in val:
            r["y"], r["place"] = "1", "0"

    val_files = sorted(r["img_filename"] for r in labelled if r["split"] == "val")
    seen = []
    for name, edit in (("val_as_is", lambda val: None), ("val_swapped", swap_groups), ("val_one", one_group)):
        recipe = _recipe(root, _write(root, _edit(labelled, "val", edit), name), "data.split_fractions.unlabeled=0.25")
        bundle = load_dataset(recipe)
        stream, val = _paths(bundle.unlabeled), _paths(bundle.splits["val"])
        assert len(stream) == 5 and sorted(stream + val) == val_files  # a quarter of val, taken out of it
        seen.append((stream, _paths(probe_split(recipe, bundle))))
    assert seen[0] == seen[1] == seen[2]
    metadata = _write(root, labelled, "val_as_is")
    other_seed = load_folder_dataset(DataCfg(name="folder", root=str(root), metadata=metadata, image_size=16,
                                             split_fractions={"unlabeled": 0.25}), seed=1)
    assert _paths(other_seed.unlabeled) != seen[0][0]  # a seeded draw


def _cli_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("value", ["1.0", "1.5", "-0.1"])
def test_a_fraction_out_of_range_names_the_key(folder, value):
    root, rows = folder
    metadata = _write(root, [r for r in rows if r["split"] != "pool"], "labelled")
    with pytest.raises(RecipeError) as info:
        _recipe(root, metadata, f"data.split_fractions.unlabeled={value}")
    msg = str(info.value)
    assert "\n" not in msg and f"data.split_fractions.unlabeled = {float(value)!r}: expected" in msg
    assert "[0, 1)" in msg


def test_a_fraction_that_takes_all_of_val_names_the_key(folder):
    root, rows = folder
    metadata = _write(root, [r for r in rows if r["split"] != "pool"], "labelled")
    with pytest.raises(DebiasError) as info:
        load_folder_dataset(DataCfg(name="folder", root=str(root), metadata=metadata, image_size=16,
                                    split_fractions={"unlabeled": 0.99}), seed=0)
    msg = str(info.value)
    assert "\n" not in msg and "data.split_fractions.unlabeled = 0.99" in msg and "20 of the 20 val rows" in msg


def test_concept_without_a_stream_names_both_keys(folder, tmp_path, capsys):
    root, rows = folder
    metadata = _write(root, [r for r in rows if r["split"] != "pool"], "labelled")
    err = _cli_error(capsys, ["train", str(RECIPE), "--method", "concept", "--out", str(tmp_path / "run"),
                              "--no-progress", "--set", f'data.root="{root}"', f'data.metadata="{metadata}"', *RUN,
                              "data.split_fractions.unlabeled=0"])
    assert "data.split_fractions.unlabeled" in err and "data.split_values" in err and "'unlabeled'" in err


def test_concept_trains_on_a_stream_without_labels_and_the_oracle_is_refused(folder, tmp_path, capsys):
    root, rows = folder

    def blank(pool):
        for r in pool:
            r["y"] = r["place"] = ""

    metadata = _write(root, _edit(rows, "pool", blank), "blank_run")
    sets = [f'data.root="{root}"', f'data.metadata="{metadata}"',
            f"data.split_values={json.dumps(SPLIT_VALUES).replace(':', '=')}", *RUN]

    def train(out: str, *extra: str) -> list[str]:
        return ["train", str(RECIPE), "--method", "concept", "--out", str(tmp_path / out), "--no-progress",
                "--set", *sets, *extra]

    err = _cli_error(capsys, train("oracle", 'concept.source="labels"'))
    assert "concept.source = 'labels'" in err and "16 of its 16 rows" in err
    assert main(train("run")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "stream" not in metrics  # no labels to score the stream with
    assert metrics["history"][-1]["dominant_concept"] in ("place", "bird", "none")  # scored on the stream
    assert set(metrics["splits"]) == {"train", "val", "test", "shifted"}
