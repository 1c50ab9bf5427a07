"""The paper's recipe end to end at its real scale of model and image (slow; ``python -m pytest -q -m slow``).

``recipes/colored_mnist_paper.toml`` as shipped (224 px, timm ResNet-50 as the standalone model, open_clip
RN50-quickgelu as CLIP, all four CLIP stages grafted), with random weights instead of the downloaded ones
(``model.pretrained = false``, ``clip.pretrained = "random"``) and a tiny fake MNIST in the real idx-ubyte format,
a few digits per class, one epoch: checks that the real-scale path runs on the CPU through ``debias.cli.main`` and
writes the output contract's ``metrics.json``. The figures themselves mean nothing with random weights.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from debias.cli import main
from test_mnist import write_fake_mnist

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "colored_mnist_paper.toml"


@pytest.mark.slow
def test_paper_recipe_runs_end_to_end_at_224px_with_rn50(tmp_path):
    root = write_fake_mnist(tmp_path / "data")
    out = tmp_path / "run"
    overrides = [f'data.root="{root}"', "data.train_per_class=8", "data.test_per_class=4",
                 "model.pretrained=false", 'clip.pretrained="random"', "train.epochs=1", "train.batch_size=8",
                 "matching.num_images=16", "matching.batch_size=8", "explain.control_draws=1"]
    t0 = time.perf_counter()
    code = main(["train", str(RECIPE), "--no-progress", "--out", str(out), "--set", *overrides])
    elapsed = time.perf_counter() - t0
    print(f"\npaper recipe (resnet50.tv_in1k + RN50-quickgelu, random weights, 224 px, 1 epoch): {elapsed:.1f} s")
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "erm" and m["seed"] == 0
    assert set(m["splits"]) >= {"test", "shifted", "swapped", "grayscale"}
    for name, split in m["splits"].items():
        assert 0.0 <= split["accuracy"] <= 1.0 and 0.0 <= split["worst_group_accuracy"] <= 1.0, name
        assert split["groups"] and all(0.0 <= v <= 1.0 for v in split["groups"].values()), name
        assert split["worst_group_accuracy"] == min(split["groups"].values()), name
    assert set(m["splits"]["test"]["groups"]) == {"5|red", "8|green"}  # bias 1.0: the test split follows colour
    ex = m["explain"]
    assert set(ex["scores"]) == set(ex["control"]) == {"color", "digit"}
    assert ex["dominant_concept"] in {"color", "digit", "none"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in [*ex["scores"].values(), *ex["control"].values()])
    assert ex["split"] == "shifted" and ex["control_draws"] == 1
    # what ran, read from what the run computed rather than from the recipe it echoes: RN50's four stages, every
    # channel matched (the paper's selection) to one of ResNet-50's channels, with real correlations
    graft = ex["graft"]
    assert graft["selection"] == "paper"
    stages = graft["matching"]
    assert {c: s["matched"] for c, s in stages.items()} == {"layer1": 256, "layer2": 512, "layer3": 1024,
                                                           "layer4": 2048}
    for c, s in stages.items():
        assert s["fraction_swapped"] == 1.0 and 0.0 < abs(s["corr_mean"]) <= 1.0 and -1.0 <= s["corr_median"] <= 1.0
        assert 1 <= s["distinct_standalone_channels"] <= s["matched"], c
    weights = load_file(str(out / "model.safetensors"))  # the trained ResNet-50 itself: 2048 features into 2 classes
    (fc,) = [v for k, v in weights.items() if k.endswith("fc.weight")]
    assert tuple(fc.shape) == (2, 2048) and sum(v.numel() for v in weights.values()) > 23_000_000
    assert m["timing"]["train_s"] > 0 and m["timing"]["step_s_median"] > 0
    assert m["timing"]["steps"] == 2  # 16 training images (8 per class), batch 8, one epoch
    for name in ("done", "model.safetensors", "recipe.toml", "concept_scores.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "checkpoint.pt").exists()  # a finished run keeps no resumable state
