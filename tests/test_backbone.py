"""The shipped pretrained backbone (``model.checkpoint = "digits-world"``) and its pretraining tool."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from debias.data import world
from debias.data.base_pool import evaluation_pool
from debias.errors import DebiasError
from debias.models import backbone as bb
from debias.models.standalone import StandaloneModel
from debias.preflight import missing_inputs
from debias.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "pretrain_backbone.py"
WORLD_RECIPES = ["recipes/textured_digits.toml", "recipes/marked_digits.toml", "recipes/two_nuisances.toml"]


def _images(n: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    idx = evaluation_pool()[:n]
    zeros = torch.zeros(n, dtype=torch.long)
    return world.render(world.digit_layers(idx), zeros, zeros + 1, zeros, gen)


def test_shipped_asset_loads_into_a_two_class_model():
    bb.verify_checksum()
    shipped = load_file(str(bb.ASSET_DIR / bb.WEIGHTS_FILE))
    assert (bb.ASSET_DIR / bb.WEIGHTS_FILE).stat().st_size <= 10_000_000
    model = StandaloneModel("resnet10t", 2, checkpoint="digits-world")
    assert model.net.get_classifier().out_features == 2  # timm replaced the 10-way digit head
    own = model.net.state_dict()
    assert torch.equal(own["conv1.0.weight"], shipped["conv1.0.weight"].float())
    assert torch.equal(own["layer4.0.bn2.running_var"], shipped["layer4.0.bn2.running_var"].float())
    model.eval()
    logits, taps = model(_images(), taps=True)
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    assert [t.dim() for t in taps.values()] == [4] * len(taps)


def test_ten_class_model_keeps_the_digit_head():
    model = StandaloneModel("resnet10t", 10, checkpoint="digits-world")
    shipped = load_file(str(bb.ASSET_DIR / bb.WEIGHTS_FILE))
    assert torch.equal(model.net.fc.weight.data, shipped["fc.weight"].float())


def test_corrupted_copy_is_refused_with_one_line(tmp_path):
    copy = tmp_path / "backbone"
    shutil.copytree(bb.ASSET_DIR, copy)
    weights = copy / bb.WEIGHTS_FILE
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DebiasError) as err:
        bb.shipped_weights("digits-world", "resnet10t", folder=copy)
    msg = str(err.value)
    assert "\n" not in msg and str(weights) in msg and "SHA-256" in msg
    (copy / bb.CHECKSUM_FILE).unlink()
    with pytest.raises(DebiasError, match="missing"):
        bb.verify_checksum(copy)


def test_wrong_architecture_is_refused_by_loader_and_preflight():
    with pytest.raises(DebiasError, match="model.name = 'resnet18'"):
        StandaloneModel("resnet18", 2, checkpoint="digits-world")
    recipe = load_recipe(ROOT / WORLD_RECIPES[0], ["model.name='resnet18'"])
    problems = missing_inputs(recipe)
    assert len(problems) == 1 and "digits-world" in problems[0] and "resnet10t" in problems[0]


@pytest.mark.parametrize("path", WORLD_RECIPES)
def test_world_recipes_fine_tune_the_backbone(path):
    recipe = load_recipe(ROOT / path)
    assert (recipe.model.name, recipe.model.checkpoint) == ("resnet10t", "digits-world")
    assert missing_inputs(recipe) == []
    text = (ROOT / path).read_text(encoding="utf-8")
    assert "--set 'model.checkpoint=\"\"'" in text.split("seed =")[0]
    scratch = load_recipe(ROOT / path, ['model.checkpoint=""'])
    assert scratch.model.checkpoint == "" and missing_inputs(scratch) == []


def _tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=300)


def test_tiny_pretraining_writes_its_files_and_evaluates(tmp_path):
    out = tmp_path / "bb"
    run = _tool("--out", str(out), "--steps", "3", "--batch-size", "8", "--threads", "1", "--no-progress")
    assert run.returncode == 0, run.stderr
    for name in (bb.WEIGHTS_FILE, bb.CHECKSUM_FILE, "training.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 3 and summary["weights_sha256"] == bb.sha256_of(bb.verify_checksum(out))
    assert set(summary["evaluation_accuracy"]) == {"digit", "color", "background", "marker"}
    run = _tool("--evaluate", "--out", str(out))
    assert run.returncode == 0, run.stderr
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert line == {"accuracy": summary["evaluation_accuracy"]}
    run = _tool("--evaluate", "--out", str(tmp_path / "nothing"))
    assert run.returncode == 2 and "missing" in run.stderr and len(run.stderr.strip().splitlines()) == 1
