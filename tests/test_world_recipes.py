"""Every world recipe trains a tiny model end to end and is explained over all of its concepts."""
from __future__ import annotations

import json

import pytest

from debias.cli import main

TINY = ["train.epochs=1", "data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2",
        "matching.num_images=64", "explain.control_draws=1", "train.batch_size=32"]
SCRATCH = ["model.checkpoint=''"]
"""The recipes fine-tune the shipped backbone; this trains the same resnet10t from scratch instead."""

SPLITS = {
    "textured_digits": {"test", "shifted", "swapped"},
    "marked_digits": {"test", "shifted", "swapped"},
    "two_nuisances": {"test", "shifted", "swapped", "swapped_color", "swapped_background"},
}
CONCEPTS = {
    "textured_digits": {"background", "digit"},
    "marked_digits": {"marker", "digit"},
    "two_nuisances": {"color", "background", "digit"},
}


@pytest.mark.parametrize("recipe, method", [("textured_digits", "erm"), ("marked_digits", "erm"),
                                            ("two_nuisances", "concept")])
def test_world_recipe_trains_and_explains(tmp_path, recipe, method):
    out = tmp_path / recipe
    extra = ["concept.unlabeled_batch_size=8"] if method == "concept" else []
    extra += [] if recipe == "textured_digits" else SCRATCH  # one recipe fine-tunes the shipped backbone
    assert main(["train", f"recipes/{recipe}.toml", "--method", method, "--out", str(out), "--no-progress",
                 "--set", *TINY, *extra]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert SPLITS[recipe] <= set(m["splits"])
    for split in SPLITS[recipe]:
        s = m["splits"][split]
        assert 0.0 <= s["accuracy"] <= 1.0 and 0.0 <= s["worst_group_accuracy"] <= s["accuracy"]
    groups = m["splits"]["shifted"]["groups"]
    if recipe == "two_nuisances":
        assert "5|red+grass" in groups and "8|green+brick" in groups
    elif recipe == "textured_digits":
        assert set(groups) == {"5|grass", "5|brick", "8|grass", "8|brick"}
    else:
        assert set(groups) == {"5|square", "5|none", "8|square", "8|none"}
    explain = m["explain"]
    assert set(explain["scores"]) == CONCEPTS[recipe]
    assert explain["dominant_concept"] in CONCEPTS[recipe] | {"none"}
