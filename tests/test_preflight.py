"""Preflight: every missing input of a recipe is named at once, in one line, in seconds, before anything is loaded."""
from __future__ import annotations

import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from debias.cli import main
from debias.errors import DebiasError
from debias.data.colored_mnist import MNIST_FILES
from debias.preflight import check_inputs, missing_inputs
from debias.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PAPER = RECIPES / "colored_mnist_paper.toml"


def _fake_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / f"{name}.gz").write_bytes(b"")  # presence is all a preflight checks
    return root


def _fake_hub_file(cache: Path, repo_id: str, filename: str) -> Path:
    """A file in the Hugging Face hub-cache layout: models--org--name/{refs/main, snapshots/<rev>/<file>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    path = repo / "snapshots" / rev / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, so the checks do not depend on what this machine has cached."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_paper_recipe_with_no_inputs_names_every_missing_file(tmp_path, empty_hub_cache):
    recipe = load_recipe(PAPER, [f'data.root="{tmp_path / "nope"}"', f'clip.cache_dir="{empty_hub_cache}"'])
    start = time.perf_counter()
    problems = missing_inputs(recipe)
    assert time.perf_counter() - start < 5.0
    assert len(problems) == 3, problems
    mnist, timm_weights, clip_weights = problems
    for name in MNIST_FILES:
        assert str(tmp_path / "nope" / "MNIST" / "raw" / name) in mnist
    assert "data.root" in mnist and "data.download" in mnist
    assert "model.pretrained" in timm_weights and "timm/resnet50" in timm_weights and "model.checkpoint" in timm_weights
    assert "clip.pretrained" in clip_weights and "RN50-quickgelu" in clip_weights
    with pytest.raises(DebiasError) as info:
        check_inputs(recipe)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("3 missing inputs: ") and msg.count("; ") >= 2
    assert all(p in msg for p in problems)


def test_everything_present_means_nothing_missing(tmp_path, empty_hub_cache):
    root = _fake_mnist(tmp_path / "data")
    _fake_hub_file(empty_hub_cache, "timm/resnet50.tv_in1k", "model.safetensors")
    _fake_hub_file(empty_hub_cache, "timm/resnet50_clip.openai", "open_clip_model.safetensors")
    recipe = load_recipe(PAPER, [f'data.root="{root}"', f'clip.cache_dir="{empty_hub_cache}"'])
    assert missing_inputs(recipe) == []
    check_inputs(recipe)
    local = tmp_path / "RN50.pt"
    local.write_bytes(b"x")
    offline = load_recipe(PAPER, [f'data.root="{root}"', f'clip.pretrained="{local}"', "model.pretrained=false"])
    assert missing_inputs(offline) == []
    assert missing_inputs(load_recipe(PAPER, [f'data.root="{tmp_path}/nope"', "data.download=true",
                                              'clip.pretrained="random"', "model.pretrained=false"])) == []


def test_checkpoint_and_clip_file_paths(tmp_path):
    root = _fake_mnist(tmp_path / "data")
    recipe = load_recipe(PAPER, [f'data.root="{root}"', f'model.checkpoint="{tmp_path}/cnn.safetensors"',
                                 f'clip.pretrained="{tmp_path}/clip/RN50.pt"'])
    problems = missing_inputs(recipe)
    assert len(problems) == 2
    assert "model.checkpoint" in problems[0] and f"{tmp_path}/cnn.safetensors" in problems[0]
    assert "clip.pretrained" in problems[1] and f"{tmp_path}/clip/RN50.pt" in problems[1]
    assert missing_inputs(recipe, model_weights=False) == problems[1:]  # explain: the run has the CNN weights


def test_embedded_default_needs_nothing():
    assert missing_inputs(load_recipe(RECIPES / "colored_digits.toml")) == []


def test_folder_dataset_root_csv_and_columns(tmp_path):
    wb = RECIPES / "waterbirds.toml"
    offline = ['clip.pretrained="random"', "model.pretrained=false"]
    (problem,) = missing_inputs(load_recipe(wb, [f'data.root="{tmp_path}/nope"', *offline]))
    assert "data.root" in problem and f"{tmp_path}/nope" in problem
    (problem,) = missing_inputs(load_recipe(wb, [f'data.root="{tmp_path}"', *offline]))
    assert "data.metadata" in problem and str(tmp_path / "metadata.csv") in problem
    (tmp_path / "metadata.csv").write_text("img_filename,y,split,background\na.png,0,0,1\n")
    (problem,) = missing_inputs(load_recipe(wb, [f'data.root="{tmp_path}"', *offline]))
    assert "attribute='place'" in problem and "'background'" in problem and "data.columns" in problem
    (tmp_path / "metadata.csv").write_text("img_filename,y,split,place\na.png,0,0,1\n")
    assert missing_inputs(load_recipe(wb, [f'data.root="{tmp_path}"', *offline])) == []


def test_cli_train_stops_before_loading_anything(tmp_path, capsys, empty_hub_cache):
    out = tmp_path / "run"
    recipe_args = [f'data.root="{tmp_path / "nope"}"', f'clip.cache_dir="{empty_hub_cache}"']
    expected = missing_inputs(load_recipe(PAPER, recipe_args))
    start = time.perf_counter()
    code = main(["train", str(PAPER), "--out", str(out), "--no-progress", "--set", *recipe_args])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("debias train: error: ") and err.count("\n") == 1, err
    for name in MNIST_FILES:
        assert str(tmp_path / "nope" / "MNIST" / "raw" / name) in err
    for problem in expected:  # the CNN and CLIP weights are named too: the preflight runs first
        assert problem in err
    assert not out.exists(), "nothing may be written when inputs are missing"
    assert elapsed < 5.0


def test_hub_table_agrees_with_timm_and_open_clip():
    """The preflight's fast path (no timm/open_clip import) must name the same hub repos the libraries would."""
    import open_clip
    import timm

    from debias.models.hub import CLIP_HUB, TIMM_HUB

    for name, (hub_id, filename) in TIMM_HUB.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename) == (hub_id, filename), name
    for (name, tag), hub in CLIP_HUB.items():
        assert open_clip.get_pretrained_cfg(name, tag)["hf_hub"] == hub, (name, tag)
    for recipe in RECIPES.glob("*.toml"):  # every shipped recipe's pretrained weights take the fast path
        r = load_recipe(recipe)
        assert not r.model.pretrained or r.model.name in TIMM_HUB, recipe.name
        assert r.clip.name == "digits" or (r.clip.name, r.clip.pretrained or "openai") in CLIP_HUB, recipe.name


def test_models_outside_the_hub_table_are_resolved_by_their_library(tmp_path, empty_hub_cache):
    recipe = load_recipe(PAPER, [f'data.root="{_fake_mnist(tmp_path / "data")}"', "model.name=resnet18",
                                 "clip.name=RN101", f'clip.cache_dir="{empty_hub_cache}"'])
    timm_weights, clip_weights = missing_inputs(recipe)
    assert "hub repo timm/resnet18.a1_in1k" in timm_weights
    assert "RN101 openai" in clip_weights and "timm/resnet101_clip.openai" in clip_weights
    _fake_hub_file(empty_hub_cache, "timm/resnet18.a1_in1k", "model.safetensors")
    _fake_hub_file(empty_hub_cache, "timm/resnet101_clip.openai", "open_clip_model.safetensors")
    assert missing_inputs(recipe) == []
