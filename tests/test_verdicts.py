"""What a verdict means: the dominant concept, the random-matching control beside it, the paper's per-image vote,
the plot of them, and the paper recipe's probe (docs/EXPLAIN.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from debias.cli import main
from debias.data import load_dataset
from debias.explain import probe_split
from debias.recipe import load_recipe
from test_mnist import write_fake_mnist

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2", "matching.num_images=64",
        "train.batch_size=32", "model.name=test_resnet", "train.epochs=1", "train.lr=0.01",
        "selection.track_concepts=false"]


def test_the_paper_recipe_matches_on_images_where_colour_and_digit_vary_independently(tmp_path):
    """On the biased training images colour and digit coincide, so every verdict there is `none`."""
    root = write_fake_mnist(tmp_path / "data")
    recipe = load_recipe(str(ROOT / "recipes" / "colored_mnist_paper.toml"),
                         [f'data.root="{root}"', "data.train_per_class=40", "data.test_per_class=20",
                          "data.image_size=32"])
    assert recipe.matching.probe == "independent"
    probe = probe_split(recipe, load_dataset(recipe))
    for label in (0, 1):  # every digit in both colours
        assert set(probe.attrs[probe.labels == label].tolist()) == {0, 1}
    assert recipe.explain.split == "shifted"


def test_the_plot_shows_decision_alignment_and_no_control_below_zero():
    from debias.report import concept_figure

    # the default biased model's figures: control colour 0.22 +- 0.44 over 5 draws reached below 0 as mean - std
    ex = {"dominant_concept": "color", "scores": {"color": 1.0, "digit": 0.1},
          "control": {"color": 0.22, "digit": 0.05}, "control_std": {"color": 0.44, "digit": 0.08},
          "control_draws": 5, "roles": {"color": "spurious", "digit": "core"}}
    fig = concept_figure(ex)
    ax = fig.axes[0]
    assert "alignment" in ax.get_ylabel() and "plain CLIP" not in ax.get_ylabel()
    assert ax.get_ylim()[0] >= 0
    ys = [y for line in ax.lines for y in line.get_ydata()]
    ys += [y for coll in ax.collections for seg in coll.get_segments() for _, y in seg]
    ys += [p.get_y() + p.get_height() for p in ax.patches]
    assert ys and min(ys) >= 0.0 and max(ys) <= 1.0


def test_the_verdict_is_behavioural_and_the_control_is_reported_beside_it(tmp_path, capsys):
    """A 1-epoch colour model (tests/test_ddp.py's BatchNorm case): through the graft both caption sets follow its
    decision (the graft reads the CNN's own features), plain CLIP on the image names colour; the control is
    reported, not used to gate the verdict."""
    from debias.concepts import dominant

    out = tmp_path / "run"
    assert main(["train", "recipes/colored_digits.toml", "--no-progress", "--out", str(out), "--set", *TINY,
                 "explain.control_draws=4"]) == 0
    ex = json.loads((out / "metrics.json").read_text())["explain"]
    printed = capsys.readouterr().out
    assert ex["verdict_basis"] == "behaviour"
    assert ex["dominant_concept"] == dominant(ex["scores"])  # the control does not enter the verdict
    assert ex["clip_dominant_concept"] == "color" and ex["clip_scores"] == ex["clip_alignment"]
    assert ex["control_draws"] == 4 and 0.0 <= ex["control_same_verdict"] <= 1.0
    for name in ("color", "digit"):
        assert 0.0 <= ex["control_min"][name] <= ex["control"][name] <= ex["control_max"][name] <= 1.0
        assert 0.0 <= ex["control_reach"][name] <= 1.0
    assert math.isclose(sum(ex["paper_votes"].values()), 1.0, abs_tol=1e-6)
    assert "paper's per-image vote" in printed and "plain CLIP on the image" in printed
    if ex["dominant_concept"] != "color":
        assert "plain CLIP on the image says color" in printed


def test_control_reach_counts_the_draws_that_read_a_concept_as_well_as_the_matching():
    from debias.concepts import control_reach

    draws = [{"color": 1.0, "digit": 0.0}, {"color": 0.2, "digit": 0.0}, {"color": 0.97, "digit": 0.9}]
    assert control_reach({"color": 1.0, "digit": 0.8}, draws) == {"color": 2 / 3, "digit": 1 / 3}
    assert math.isnan(control_reach({"color": 1.0}, [])["color"])
