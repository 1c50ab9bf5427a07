"""Preflight: every file a recipe needs, checked before any model or data is loaded.

A long run should not fail after minutes of loading because the CLIP weights or one MNIST file are missing, and a
user with several missing inputs should learn about all of them at once. :func:`missing_inputs` only looks at the
file system and the local Hugging Face cache (never the network). The hub repos of the shipped recipes' weights are
listed in :mod:`debias.models.hub` (checked against timm's and open_clip's registries by the tests), so those
recipes are checked without importing either library (each import costs seconds); other models import the library
whose registry names their hub repo.

A dataset's inputs are checked by its own module (``missing_inputs``, :mod:`debias.data.registry`), whose loader
starts with the same checks, so the preflight and the loader can never disagree about what a dataset needs.
"""
from __future__ import annotations

import os
from pathlib import Path

from .data.registry import dataset
from .errors import DebiasError, did_you_mean
from .models.backbone import is_shipped, shipped_weights
from .models.hub import (CLIP_HUB, TIMM_FILES, TIMM_HUB, cached_file, find_clip_weights, is_torchscript_archive,
                         torchscript_message)
from .recipe import Recipe


# ----------------------------------------------------------------------------------------------- models

def _checkpoint_problem(recipe: Recipe) -> str | None:
    path = recipe.model.checkpoint
    if is_shipped(path):  # a shipped backbone: its architecture and checksum (milliseconds)
        try:
            shipped_weights(path, recipe.model.name)
        except DebiasError as exc:
            return str(exc)
        return None
    if path and not Path(path).is_file():
        return (f"model.checkpoint = {path!r}: file not found; give the path of a local weights file "
                f"(.safetensors, .pth or .bin) for {recipe.model.name}")
    return None


def _hub_problem(name: str, hub_id: str, names: list[str], fix: str) -> str | None:
    if cached_file(hub_id, names):
        return None
    from huggingface_hub import constants

    return (f"model.pretrained = true: the timm weights of {name!r} (hub repo {hub_id}, file "
            f"{' or '.join(names)}) are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and this "
            f"run does not download; copy that cache here (HF_HOME) or {fix}")


def _timm_weights_problem(recipe: Recipe) -> str | None:
    """timm's pretrained weights for ``model.name`` in the local caches (file, Hugging Face hub, torch hub)."""
    m = recipe.model
    if not m.pretrained or m.checkpoint:
        return None
    fix = "set model.checkpoint to a local weights file, or model.pretrained = false"
    if m.name in TIMM_HUB:  # the shipped recipes' models: no timm import (seconds)
        hub_id, filename = TIMM_HUB[m.name]
        return _hub_problem(m.name, hub_id, [filename] if filename else list(TIMM_FILES), fix)
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(m.name)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    if cfg is None:
        return None  # not a timm model with pretrained weights: model creation names the problem
    if cfg.file:
        if Path(cfg.file).is_file():
            return None
        return f"model.pretrained = true: timm's weights file {cfg.file!r} for {m.name!r} not found; {fix}"
    if cfg.hf_hub_id:
        return _hub_problem(m.name, cfg.hf_hub_id, [cfg.hf_hub_filename] if cfg.hf_hub_filename
                            else list(TIMM_FILES), fix)
    if cfg.url:
        import torch.hub

        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if cached.is_file():
            return None
        return (f"model.pretrained = true: the timm weights of {m.name!r} are not in the torch hub cache ({cached}); "
                f"download {cfg.url} there on a connected machine or {fix}")
    return None


def _clip_weights_problem(recipe: Recipe) -> str | None:
    """The open_clip weights file named by ``clip.pretrained`` (a path, or a tag found in the hub cache)."""
    c = recipe.clip
    if c.name == "digits":
        return None
    pretrained = c.pretrained or "openai"
    if pretrained == "random":
        return None
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if Path(pretrained).is_file():  # a file path: no need to import open_clip to check it
            return torchscript_message(pretrained) if is_torchscript_archive(pretrained) else None
    try:
        if (c.name, pretrained) in CLIP_HUB:  # the shipped recipes' CLIP: no open_clip import (seconds)
            find_clip_weights(c.name, pretrained, CLIP_HUB[c.name, pretrained], c.cache_dir)
            return None
        import open_clip

        from .models.clip import resnet_clip_names, resolve_clip_weights

        if c.name not in open_clip.list_models():
            return (f"clip.name = {c.name!r}: not an open_clip model{did_you_mean(c.name, resnet_clip_names())}; "
                    f"ResNet CLIPs: {resnet_clip_names()}")
        resolve_clip_weights(c.name, pretrained, c.cache_dir)
    except DebiasError as exc:
        return str(exc)
    return None


# ----------------------------------------------------------------------------------------------- entry points

def missing_inputs(recipe: Recipe, model_weights: bool = True) -> list[str]:
    """One message per missing input of ``recipe``, each naming the file and the recipe key that fixes it.

    ``model_weights=False`` skips the standalone model's weights (``explain`` loads a trained run's checkpoint).
    Loads no model and no data; imports the dataset's module (which imports torch, as loading the recipe already
    did), and timm or open_clip only for a pretrained CNN or a CLIP tag.
    """
    problems: list[str] = list(dataset(recipe.data.name).missing_inputs(recipe.data))
    if model_weights:
        for check in (_checkpoint_problem, _timm_weights_problem):
            msg = check(recipe)
            if msg:
                problems.append(msg)
    msg = _clip_weights_problem(recipe)
    if msg:
        problems.append(msg)
    return problems


def check_inputs(recipe: Recipe, model_weights: bool = True) -> None:
    """Raise one single-line :class:`DebiasError` listing every missing input (joined by '; '), or return."""
    problems = missing_inputs(recipe, model_weights)
    if problems:
        head = "1 missing input" if len(problems) == 1 else f"{len(problems)} missing inputs"
        raise DebiasError(f"{head}: " + "; ".join(p.replace("\n", " ") for p in problems))
