"""Shipped pretrained backbones: timm weights files inside the package, named by ``model.checkpoint``.

``model.checkpoint = "digits-world"`` (with ``model.name = "resnet10t"``) starts the standalone model from
``debias/models/assets/backbone/backbone.safetensors``: a ``resnet10t`` pretrained by ``tools/pretrain_backbone.py``
on 32 px renders of the world (:mod:`debias.data.world`) from pretraining-pool digits only, with every attribute
(digit, colour, background, marker) drawn at random and predicted by its own head, so its features carry all of
them. The file holds the timm model's own weights in timm's key names (float16), its classifier being the 10-way
digit head; it goes through timm's pretrained loader like any local file, which keeps that head for a 10-class model
and drops it (a fresh classifier) for any other class count.

The file's SHA-256 is checked against ``backbone.safetensors.sha256`` before every load; a mismatch is a one-line
:class:`DebiasError` naming the file. Every other ``model.checkpoint`` value is a path to a local weights file.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DebiasError
from .hub import sha256_of

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "backbone"
WEIGHTS_FILE = "backbone.safetensors"
CHECKSUM_FILE = WEIGHTS_FILE + ".sha256"
HEADS_FILE = "heads.safetensors"
"""The pretraining's colour, background and marker heads (not part of the timm model; ``--evaluate`` reads them)."""
ARCH = "resnet10t"
DIGIT_CLASSES = 10
"""Width of the shipped classifier (the digit head): timm keeps it for a 10-class model, replaces it otherwise."""
SHIPPED: dict[str, tuple[str, Path]] = {"digits-world": (ARCH, ASSET_DIR)}
"""``model.checkpoint`` names of shipped backbones -> (timm architecture, asset folder)."""
REGENERATE_HINT = "regenerate it with `python tools/pretrain_backbone.py` or reinstall debias"


def write_checksum(folder: Path) -> str:
    """Write ``folder/backbone.safetensors.sha256`` for the weights there; return the digest."""
    digest = sha256_of(folder / WEIGHTS_FILE)
    (folder / CHECKSUM_FILE).write_text(f"{digest}  {WEIGHTS_FILE}\n", encoding="utf-8")
    return digest


def verify_checksum(folder: Path | str = ASSET_DIR) -> Path:
    """The weights file of ``folder`` after checking its SHA-256 against the ``.sha256`` file next to it.

    A missing file or a different digest raises a one-line :class:`DebiasError` naming the file.
    """
    folder = Path(folder)
    weights, checksum = folder / WEIGHTS_FILE, folder / CHECKSUM_FILE
    for path in (weights, checksum):
        if not path.is_file():
            raise DebiasError(f"pretrained backbone file missing: {path}; {REGENERATE_HINT}")
    text = checksum.read_text(encoding="utf-8").split()
    expected = text[0].strip().lower() if text else ""
    actual = sha256_of(weights)
    if actual != expected:
        raise DebiasError(f"{weights}: SHA-256 {actual[:16]}... does not match {checksum.name} "
                          f"({expected[:16] or '(empty)'}...); the weights are corrupt or were changed; "
                          f"{REGENERATE_HINT}")
    return weights


def is_shipped(checkpoint: str) -> bool:
    """Whether a ``model.checkpoint`` value names a shipped backbone rather than a file."""
    return checkpoint in SHIPPED


def shipped_weights(checkpoint: str, model_name: str, folder: Path | str | None = None) -> Path:
    """The verified weights file of the shipped backbone ``checkpoint`` for ``model.name = model_name``.

    ``folder`` replaces the asset folder (tests). Raises a one-line :class:`DebiasError` when the architecture
    differs or the checksum does not match.
    """
    arch, default = SHIPPED[checkpoint]
    if model_name != arch:
        raise DebiasError(f"model.checkpoint = {checkpoint!r} is a pretrained {arch}, but model.name = "
                          f"{model_name!r}; set model.name = {arch!r}, or model.checkpoint = \"\" to train "
                          f"{model_name} from scratch")
    return verify_checksum(default if folder is None else folder)


def pretrained_overlay(path: Path | str) -> dict:
    """timm's ``pretrained_cfg_overlay`` for a shipped backbone file: the file, and the width of its classifier
    (so timm keeps the digit head for a 10-class model and drops it for any other class count)."""
    return {"file": str(path), "num_classes": DIGIT_CLASSES}
