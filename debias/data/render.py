"""Rendering coloured digits from grayscale base images, shared by the coloured-digit datasets.

A split is ``copies`` renders of each base image: a colour index per render (drawn by the split's shift mode,
:func:`debias.data.shifts.assign_colors`, or given), then the paper's colouring (the grayscale digit times the
colour's RGB; ``gray`` copies it into all channels) and, with ``data.augment``, the affine jitter of
:mod:`debias.data.shifts`. Colours are drawn first and the jitter next, from one generator seeded per split.

- :func:`render_split`: every image at once, as a tensor (small images: the embedded digits);
- :func:`render_lazy`: colours and jitter parameters drawn up front, images rendered on access
  (:class:`~debias.data.lazy.LazyImages`; 28 px MNIST digits rendered at any size in one bicubic ``grid_sample``).

The training split is a fixed set of examples: :func:`train_attributes` draws each example's colour once per seed;
only the jitter is drawn again each epoch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .colors import colorize
from .lazy import LazyImages
from .palette import GRAY_RGB, PALETTE
from .shifts import affine_thetas, apply_affine, assign_colors, random_affine
from .splits import split_seed

if TYPE_CHECKING:
    from ..recipe import DataCfg

SPLIT_MODES = {"train": "biased", "val": "biased", "test": "biased", "shifted": "shifted", "swapped": "swapped",
               "grayscale": "grayscale", "unlabeled": "shifted"}
"""Shift mode of each split's colours (:mod:`debias.data.shifts`); any other split name is ``shifted``."""
SHIFT_SPLITS = ("shifted", "swapped", "grayscale")
"""The coloured-digit splits whose colour no longer follows the label."""


def render_split(gray: torch.Tensor, labels: torch.Tensor, colors: list[str], mode: str, bias: float, copies: int,
                 augment: bool, seed: int, attrs: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colour and jitter ``copies`` renders of each grayscale base image. Returns images, labels, colour index.

    ``attrs`` (one per render, copy-major as ``labels.repeat(copies)``): the colours to use; None draws them from
    ``seed`` by the split's ``mode`` first, then the jitter from the same generator."""
    gen = torch.Generator().manual_seed(seed)
    gray = gray.repeat(copies, 1, 1)
    labels = labels.repeat(copies)
    if attrs is None:
        attrs = assign_colors(labels, len(colors), mode, bias, gen)
    palette_names: list[str | None] = list(colors) + [None]
    images = torch.empty(gray.shape[0], 3, *gray.shape[1:])
    for idx, name in enumerate(palette_names):
        sel = attrs == idx
        if sel.any():
            images[sel] = colorize(gray[sel], name)
    if augment:
        images = random_affine(images, gen)
    return images, labels, attrs


def train_attributes(labels: torch.Tensor, n_colors: int, mode: str, bias: float, copies: int, seed: int
                     ) -> torch.Tensor:
    """The training examples' colours (``labels.repeat(copies)`` order), drawn once per seed from a generator of
    their own, so that the per-epoch jitter never changes them. At bias 1.0 no draw is made (every example has its
    class's colour), so the jitter stream, and every image, is what it was when colours were drawn each epoch."""
    gen = torch.Generator().manual_seed(split_seed(seed, "train-attributes"))
    return assign_colors(labels.repeat(copies), n_colors, mode, bias, gen)


class DigitRenderer:
    """Renders coloured digits from 28 px uint8 base images: jitter + resize in one bicubic ``grid_sample`` (or a
    bicubic resize without jitter, as CLIP's preprocessing does), then the paper's colouring: the grayscale digit
    times the colour's RGB (``gray`` copies it into all channels).

    A module-level class, not a closure, so the images of an evaluation split pickle (spawned DataLoader workers).
    """

    def __init__(self, base: torch.Tensor, attrs: torch.Tensor, palette: torch.Tensor, size: int,
                 thetas: torch.Tensor | None):
        self.base = base          # (N, 28, 28) uint8, the base image of each rendered image
        self.attrs = attrs        # (N,) colour index into palette
        self.palette = palette    # (K + 1, 3), the last row white (grayscale)
        self.size = size
        self.thetas = thetas      # (N, 2, 3) or None (no jitter)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        n = len(idx)
        gray = self.base[idx].unsqueeze(1).float().div_(255.0)
        if self.thetas is not None:
            out = apply_affine(gray, self.thetas[idx], size=self.size, mode="bicubic")
        elif gray.shape[-1] != self.size:  # no jitter: a plain resize, 4x faster than grid_sample
            out = F.interpolate(gray, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp_(0, 1)
        else:
            out = gray
        rgb = self.palette[self.attrs[idx]].view(n, 3, 1, 1)
        return out * rgb


def palette_rgb(colors: list[str]) -> torch.Tensor:
    """``(K + 1, 3)``: the RGB of each recipe colour, then the grayscale row."""
    return torch.tensor([PALETTE[c] for c in colors] + [GRAY_RGB], dtype=torch.float32)


def render_lazy(base: torch.Tensor, labels: torch.Tensor, cfg: DataCfg, mode: str, copies: int, seed: int,
                attrs: torch.Tensor | None = None, augment: bool | None = None
                ) -> tuple[LazyImages, torch.Tensor, torch.Tensor]:
    """``copies`` renders of each base image: colours drawn as :func:`render_split` does (or ``attrs`` given, one
    per render), jitter parameters drawn up front (``augment``: None follows ``data.augment``); images rendered on
    access. Returns images, labels, colour index."""
    gen = torch.Generator().manual_seed(seed)
    base = base.repeat(copies, 1, 1) if copies > 1 else base
    labels = labels.repeat(copies)
    if attrs is None:
        attrs = assign_colors(labels, len(cfg.colors), mode, cfg.bias, gen)
    augment = cfg.augment if augment is None else augment
    thetas = affine_thetas(len(labels), gen) if augment else None
    renderer = DigitRenderer(base, attrs, palette_rgb(cfg.colors), cfg.image_size, thetas)
    return LazyImages(len(labels), cfg.image_size, renderer), labels, attrs
