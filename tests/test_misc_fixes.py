"""Small fixes with their own checks: compare and sweep labels for folder datasets, reweighting's sampling weights,
augmentation inside training, and the package metadata."""
from __future__ import annotations

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
