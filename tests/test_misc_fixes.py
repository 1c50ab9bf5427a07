"""Small fixes with their own checks: compare and sweep labels for folder datasets, reweighting's sampling weights,
augmentation inside training, and the package metadata."""
from __future__ import annotations

import pytest
import json
import subprocess
import sys
from pathlib import Path

from debias.compare import compare_runs
from debias.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent


def _fake_run(root: Path, name: str, data_name: str, method: str = "erm", seed: int = 0) -> Path:
    """A run directory holding only what ``debias compare`` reads: metrics.json with the run's recipe."""
    recipe = Recipe().to_dict()
    recipe["data"]["name"] = data_name
    run = root / name
    run.mkdir(parents=True)
    split = {"accuracy": 0.9, "worst_group_accuracy": 0.8, "groups": {}}
    metrics = {"method": method, "seed": seed, "recipe": recipe, "splits": {"test": split, "shifted": split},
               "explain": {"dominant_concept": "place", "scores": {}, "control": {}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_compare_labels_folder_runs_without_a_bias(tmp_path):
    """A folder dataset's images fix their bias (data.bias is not read): its runs are not labelled bias=1.0."""
    runs = [_fake_run(tmp_path, f"wb{s}", "folder", seed=s) for s in (0, 1)]
    runs.append(_fake_run(tmp_path, "wb_concept", "folder", method="concept"))
    result = compare_runs(runs, tmp_path / "cmp")
    assert [r["setting"] for r in result["rows"]] == ["", "", "weight=1.0"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| erm |  | 2 |" in report and "| concept[graft] | weight=1.0 | 1 |" in report
    (digits,) = compare_runs([_fake_run(tmp_path, "digits", "colored_digits")], tmp_path / "cmp2")["rows"]
    assert digits["setting"] == "bias=1.0"  # a rendered dataset's bias is a knob: still named


def test_sweep_of_a_folder_recipe_names_runs_without_a_bias_and_refuses_one(tmp_path):
    sweep = [sys.executable, "tools/sweep.py", "--recipe", "recipes/waterbirds.toml", "--methods", "erm", "--seeds",
             "0", "--out", str(tmp_path / "sweep"), "--set", f'data.root="{tmp_path / "wb"}"',
             "model.checkpoint=/nonexistent/w.pth"]  # the run itself fails at once: only its name is checked here
    refused = subprocess.run([*sweep, "--bias", "0.9"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "--bias 0.9: recipes/waterbirds.toml is a folder dataset" in refused.stderr
    failed = subprocess.run(sweep, capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 2 and "erm_seed0: exit 2" in failed.stdout, failed.stdout + failed.stderr
    assert "bias" not in failed.stdout


def test_package_metadata_matches_the_code():
    """requires-python admits only versions with tomllib (3.11+, which debias.recipe imports), and every package-data
    pattern matches a shipped file (a pattern matching nothing ships nothing, silently)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    assert "import tomllib" in (ROOT / "debias" / "recipe.py").read_text()
    for package, patterns in project["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((ROOT / package.replace(".", "/")).glob(pattern)), f"{package}: {pattern} matches nothing"


TINY = ["train.epochs=1", "data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2",
        "matching.num_images=64", "explain.control_draws=1", "train.batch_size=32", "model.name=resnet10t"]


def _trainer(tmp_path: Path, method: str, *sets: str):
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    recipe = load_recipe(ROOT / "recipes" / "colored_digits.toml", [*TINY, f"train.method={method}", *sets])
    return Trainer(recipe, tmp_path, progress=False)


def test_reweight_draws_every_group_equally_often(tmp_path):
    """Each group present in training carries the same total sampling weight (exactly), and the trainer's own loader,
    drawing with those weights, yields the groups about equally often although the biased split does not hold them
    so (bias 0.8: about four majority images to one minority image per class)."""
    import torch

    trainer = _trainer(tmp_path, "reweight", "data.bias=0.8")
    split = trainer.bundle.splits["train"]
    n_groups = len(split.class_names) * len(split.attr_names)
    drawn, held = torch.zeros(n_groups), torch.zeros(n_groups)
    for epoch in range(8):
        loader = trainer.train_loader(epoch)  # re-renders the split for the epoch, then weighs its groups
        groups = split.groups
        present = groups.unique()
        weights = trainer.method.sample_weights()
        totals = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, weights.double())[present]
        assert torch.allclose(totals, torch.ones_like(totals)), totals  # every group's total: 1, the same
        held += torch.bincount(groups, minlength=n_groups)
        for _, labels, attrs in loader:
            drawn += torch.bincount(labels * len(split.attr_names) + attrs, minlength=n_groups)
    present = held > 0
    assert int(present.sum()) == 4 and held[present].min() < 0.5 * held[present].max()  # the split is imbalanced
    share = drawn[present] / drawn.sum()
    assert torch.allclose(share, torch.full_like(share, 0.25), atol=0.05), share  # sampled about equally


def _seen_by_the_model(trainer):
    """One training step on the loader's first batch; the raw images and the images the model was given."""
    import torch

    images, labels, attrs = next(iter(trainer.train_loader(0)))
    seen = []
    hook = trainer.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        trainer.train_step({"images": images, "labels": labels, "attrs": attrs})
    finally:
        hook.remove()
    assert len(seen) == 1 and seen[0].shape == images.shape
    return images, seen[0].to(torch.float32)


def test_augment_transforms_the_images_inside_training(tmp_path):
    """``augment`` feeds the model transformed images: a channel permutation keeps each pixel's set of channel values
    (and changes most images); grayscale at p = 1 makes the three channels equal, the luminance of the raw image."""
    import torch
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    raw, seen = _seen_by_the_model(_trainer(tmp_path / "perm", "augment", 'augment.transforms=["channel_permutation"]'))
    assert torch.equal(seen.sort(dim=1).values, raw.sort(dim=1).values)  # each pixel's channel values, permuted
    changed = (seen != raw).flatten(1).any(1)
    assert changed.float().mean() > 0.5, changed  # identity is 1 of 6 orders

    raw, seen = _seen_by_the_model(_trainer(tmp_path / "gray", "augment", 'augment.transforms=["grayscale"]',
                                            "augment.grayscale_p=1.0"))
    assert torch.allclose(seen, rgb_to_grayscale(raw, num_output_channels=3), atol=1e-6)
    assert not torch.allclose(raw[:, 0], raw[:, 1])  # the raw batch is coloured: the equality above is the transform's


@pytest.mark.slow  # a whole-tool run (about 13-22 s); the default suite keeps within 10 min
def test_bench_matching_takes_a_recipes_models_and_image_size():
    """tools/bench_matching.py --recipe: the recipe's models (random weights), image size and matching batch, shrunk
    here by --set; the cost per further 100 images; --set without a recipe is refused."""
    bench = [sys.executable, "tools/bench_matching.py", "--sizes", "8", "16", "--pair-sums", "adjoint", "--repeats",
             "1"]
    done = subprocess.run([*bench, "--recipe", "recipes/colored_mnist_paper.toml", "--set", "data.image_size=40",
                           "model.name=resnet10t", 'clip.name="digits"', 'clip.pretrained=""',
                           "matching.batch_size=8"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("matching resnet10t x digits CLIP (model random weights, CLIP weights shipped), "
                                  "40 px, batch 8,"), done.stdout
    assert "adjoint: each further 100 images" in done.stdout
    refused = subprocess.run([*bench, "--set", "data.image_size=40"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "give the recipe it overrides with --recipe" in refused.stderr
