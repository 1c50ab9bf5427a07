"""Preflight: every file a recipe needs, checked before any model or data is loaded.

A long run should not fail after minutes of loading because the CLIP weights or one MNIST file are missing, and a
user with several missing inputs should learn about all of them at once. :func:`missing_inputs` only looks at the
file system and the local Hugging Face cache (never the network). The hub repos of the shipped recipes' weights are
listed in :mod:`debias.models.hub` (checked against timm's and open_clip's registries by the tests), so those
recipes are checked without importing either library (each import costs seconds); other models import the library
whose registry names their hub repo.

The MNIST and folder-CSV checks live here (plain ``os``), and the data loaders reuse them, so the preflight and the
loader can never disagree about what a dataset needs.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .errors import DebiasError, did_you_mean
from .models.hub import (CLIP_HUB, TIMM_FILES, TIMM_HUB, cached_file, find_clip_weights, is_torchscript_archive,
                         torchscript_message)
from .recipe import Recipe

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
"""The four raw MNIST files torchvision reads from ``<data.root>/MNIST/raw/`` (each may also be gzipped)."""
MNIST_LEGACY_FILES = ("training.pt", "test.pt")
"""torchvision's older processed layout (``<data.root>/MNIST/processed/``), still read by ``datasets.MNIST``."""
FOLDER_COLUMNS = ("file", "label", "split", "attribute")
"""Roles a folder dataset's metadata CSV must provide, and their Waterbirds column names by default."""
FOLDER_DEFAULT_COLUMNS = {"file": "img_filename", "label": "y", "split": "split", "attribute": "place"}


# ----------------------------------------------------------------------------------------------- MNIST

def mnist_raw_folder(root: str | Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def mnist_missing_files(root: str | Path) -> list[str]:
    """Raw MNIST files (torchvision layout) absent under ``root``; a file counts as present gzipped or not."""
    raw = mnist_raw_folder(root)
    processed = Path(root) / "MNIST" / "processed"
    if all((processed / f).is_file() for f in MNIST_LEGACY_FILES):
        return []
    return [str(raw / f) for f in MNIST_FILES if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]


def _mnist_layout_hint(root: Path) -> str:
    """A hint when ``root`` points one or two levels too deep (at ``MNIST/`` or ``MNIST/raw/``)."""
    for candidate, parent in ((root, root.parent.parent), (root / "raw", root.parent)):
        if any((candidate / f).is_file() or (candidate / f"{f}.gz").is_file() for f in MNIST_FILES):
            return f" (the files seem to be in {candidate}: set data.root = {str(parent)!r})"
    return ""


def mnist_missing_message(root: str, missing: list[str]) -> str:
    """One line naming each missing MNIST file and where it must go."""
    if not root:
        return ("data.root is not set: colored_mnist needs the folder that contains MNIST/raw/ with "
                f"{', '.join(MNIST_FILES)} (torchvision layout; .gz accepted); set data.root, or set "
                "data.download = true on a machine with internet access")
    raw = mnist_raw_folder(root)
    state = "does not exist" if not Path(root).exists() else "lacks MNIST files"
    return (f"data.root = {root!r} {state}: MNIST file(s) {', '.join(missing)} not found (.gz accepted); put the "
            f"torchvision-format MNIST files in {raw}/, or set data.download = true on a machine with internet "
            f"access{_mnist_layout_hint(Path(root))}")


# ----------------------------------------------------------------------------------------------- folder datasets

def folder_columns(columns: dict[str, str]) -> dict[str, str]:
    """The recipe's ``data.columns`` over the Waterbirds defaults (``img_filename, y, split, place``)."""
    return {**FOLDER_DEFAULT_COLUMNS, **columns}


def folder_metadata_path(root: str, metadata: str) -> Path:
    """``data.metadata`` resolved against ``data.root`` (an absolute path stays as it is)."""
    path = Path(metadata or "metadata.csv")
    return path if path.is_absolute() else Path(root) / path


def folder_problems(root: str, metadata: str, columns: dict[str, str]) -> list[str]:
    """Missing root, missing CSV, or CSV columns absent from its header: what can be checked without the images."""
    if not root:
        return ["data.root is not set: a folder dataset needs the folder holding its images and metadata CSV"]
    if not Path(root).is_dir():
        return [f"data.root = {root!r}: folder not found; give the folder that holds the dataset's images "
                f"(image paths in the CSV are relative to it)"]
    csv_path = folder_metadata_path(root, metadata)
    if not csv_path.is_file():
        return [f"data.metadata = {metadata or 'metadata.csv'!r}: file {str(csv_path)!r} not found; put the metadata "
                f"CSV there or set data.metadata (relative to data.root, or absolute)"]
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [f"data.metadata: {str(csv_path)!r} cannot be read as CSV: {exc}"]
    header = [h.strip() for h in header]
    cols = folder_columns(columns)
    absent = [f"{role}={name!r}" for role, name in cols.items() if role in FOLDER_COLUMNS and name not in header]
    if absent:
        return [f"data.columns: {str(csv_path)!r} has no column {', '.join(absent)}; its columns are {header}; "
                "set data.columns = {file=..., label=..., split=..., attribute=...}"]
    return []


# ----------------------------------------------------------------------------------------------- models

def _checkpoint_problem(recipe: Recipe) -> str | None:
    path = recipe.model.checkpoint
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
    Loads no model and no data; imports timm or open_clip only for a pretrained CNN or a CLIP tag.
    """
    problems: list[str] = []
    d = recipe.data
    if d.name == "colored_mnist" and not d.download:
        missing = mnist_missing_files(d.root) if d.root else list(MNIST_FILES)
        if missing:
            problems.append(mnist_missing_message(d.root, missing))
    elif d.name == "folder":
        problems.extend(folder_problems(d.root, d.metadata, d.columns))
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
