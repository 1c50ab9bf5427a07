"""The world of nuisances: coloured digits drawn over backgrounds, with markers, rendered on the fly from a seed.

Every image has four attributes, each an index into a name list:

- ``digit``: a base digit from scikit-learn's bundled digits (:func:`digit_layers`), all ten classes;
- ``color``: the digit's colour, an index into :data:`COLOR_NAMES` (:data:`debias.data.colors.PALETTE` order);
  index ``len(COLOR_NAMES)`` is the uncoloured (white) digit of grayscale shift splits;
- ``background``: :data:`BACKGROUNDS`: ``plain`` (black, the colour-only world) or a crop of one of the grayscale
  photographs that ship inside scikit-image's wheel (``skimage.data``; never downloaded), loaded once per process;
  each image takes a seeded random square crop at a random scale (:data:`CROP_FRACTION` of the photograph's side,
  log-uniform), area-averaged to the output size with ``torchvision.ops.roi_align`` (no aliasing);
- ``marker``: :data:`MARKERS`: ``none`` or a small white shape (filled ``square``, ``ring``) in a random corner.

Composition (:func:`render`): background -> a dark halo around the digit and the marker (the strokes dilated by
:data:`HALO_PX` px at 32 px, darkened by :data:`HALO_STRENGTH`) -> the coloured digit -> the marker. The digit is
drawn at :data:`DIGIT_SCALE` of the image side, centred, so that the corners stay free for the marker. The
photographs are grayscale, so colour stays a property of the digit alone.

Why 32 px and a halo (measured with ``python -m debias.data.world``: a 10-way logistic regression on raw pixels,
trained on two renders of each of the 1,437 pretraining-pool digits, tested on one render of each of the 360
evaluation-pool digits, all over photographs (grass, brick, gravel), random colour and marker, no jitter): without
the halo the digit is barely readable (0.21 at 32 px, 0.18 at 64 px; chance 0.10), with it 0.79 at 32 px and 0.80
at 64 px. The halo is what keeps a digit readable over a photograph; once it has one, the image size hardly
matters, and 32 px is the smallest size the digits CLIP's ``ModifiedResNet`` accepts (its attention pool needs a
multiple of 32), so the cheapest to train (64 px costs about four times as much per image). The figures are in
:data:`READABILITY`.

Everything random comes from the ``torch.Generator`` passed in, so a seed fixes the images.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from .colors import PALETTE
from .digits_base import load_base_digits
from .shifts import random_affine

COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
"""Digit colours, indices into :data:`debias.data.colors.PALETTE`; index ``len(COLOR_NAMES)`` is white (grayscale)."""
BACKGROUNDS: tuple[str, ...] = ("plain", "grass", "brick", "gravel")
"""Background names: ``plain`` is black; the others are ``skimage.data`` photographs of the same name."""
MARKERS: tuple[str, ...] = ("none", "square", "ring")
"""Marker names: no marker, a filled square, a ring (both white, in a random corner)."""
BACKGROUND_WORDS: dict[str, str] = {"plain": "a plain background", "grass": "grass", "brick": "brick",
                                    "gravel": "gravel"}
"""How captions name each background (after ``on``)."""
MARKER_WORDS: dict[str, str] = {"none": "no marker", "square": "a small square", "ring": "a small ring"}
"""How captions name each marker (after ``with``)."""
CORNERS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")

IMAGE_SIZE = 32
DIGIT_SCALE = 0.8
"""Side of the digit's box as a fraction of the image side (centred)."""
MARKER_FRACTION = 0.22
"""Side of a marker as a fraction of the image side (7 px at 32 px)."""
MARKER_MARGIN_FRACTION = 0.04
"""Gap between a marker and the image border, as a fraction of the image side (1 px at 32 px)."""
HALO_PX = 1.0
"""Radius of the dark halo around digit and marker strokes, in pixels at 32 px (scaled with the image size)."""
HALO_STRENGTH = 1.0
"""How far the halo darkens the background (1: to black)."""
CROP_FRACTION: tuple[float, float] = (0.125, 0.5)
"""Side of a background crop as a fraction of the photograph's side (the photographs are 512 px): a log-uniform
random scale, so a crop covers 64-256 photograph pixels."""
PHOTO_RANGE: tuple[float, float] = (0.1, 0.9)
"""Each photograph's 1st and 99th intensity percentiles are mapped here, so no photograph is darker overall."""
MARKER_RGB: tuple[float, float, float] = (1.0, 1.0, 1.0)

READABILITY: dict[str, float] = {"32px_halo": 0.794, "32px_no_halo": 0.212, "64px_halo": 0.797, "64px_no_halo": 0.178}
"""Digit readability over photographs, measured by :func:`measure_readability` (``python -m debias.data.world``):
test accuracy of a 10-way pixel logistic regression (chance 0.10) per image size and halo, backgrounds grass /
brick / gravel only, random colour and marker; on a 2-core AMD EPYC, about 6 minutes for all four."""


@lru_cache(maxsize=1)
def photographs() -> torch.Tensor:
    """The non-``plain`` backgrounds as grayscale ``(len(BACKGROUNDS) - 1, 1, 512, 512)`` in [0, 1]; loaded once."""
    import numpy as np
    from skimage import data

    out = []
    for name in BACKGROUNDS[1:]:
        img = np.asarray(getattr(data, name)(), dtype=np.float64)
        if img.ndim == 3:
            img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
        lo, hi = np.percentile(img, [1, 99])
        img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * (PHOTO_RANGE[1] - PHOTO_RANGE[0]) + PHOTO_RANGE[0]
        out.append(torch.from_numpy(img).float()[None])
    return torch.stack(out)


def background_crops(background: torch.Tensor, gen: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Grayscale backgrounds ``(N, 1, size, size)``: zeros for ``plain``, seeded random crops of the photographs.

    Draws the same amount of randomness for every image (crop scale and position), whatever its background.
    """
    from torchvision.ops import roi_align

    background = background.long()
    n = background.shape[0]
    _check(background, len(BACKGROUNDS), "background")
    photos = photographs()
    side_px = photos.shape[-1]
    lo, hi = math.log(CROP_FRACTION[0]), math.log(CROP_FRACTION[1])
    u = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    side = torch.exp(lo + u[:, 0] * (hi - lo)) * side_px
    x0, y0 = u[:, 1] * (side_px - side), u[:, 2] * (side_px - side)
    out = torch.zeros(n, 1, size, size)
    photo = background > 0
    if photo.any():
        boxes = torch.stack([(background - 1).double(), x0, y0, x0 + side, y0 + side], 1)[photo].float()
        out[photo] = roi_align(photos, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out


@lru_cache(maxsize=4)
def _digit_layers(size: int) -> torch.Tensor:
    box = int(round(DIGIT_SCALE * size))
    gray, _ = load_base_digits(box)
    pad = size - box
    return F.pad(gray, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))


def digit_layers(index: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Grayscale digit layers ``(N, size, size)`` in [0, 1] of the bundled base digits ``index`` (0..1796).

    The digit fills :data:`DIGIT_SCALE` of the side, centred; labels come from
    :func:`debias.data.digits_base.load_base_digits`.
    """
    return _digit_layers(size)[index.long()]


@lru_cache(maxsize=4)
def _marker_masks(size: int) -> torch.Tensor:
    """Anti-aliased marker alpha masks ``(len(MARKERS), m, m)``; ``none`` is all zero."""
    m = max(3, int(round(MARKER_FRACTION * size)))
    c = (torch.arange(m, dtype=torch.float64) + 0.5) - m / 2
    d = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    outer = m / 2
    inner = outer - max(1.0, m / 4.5)
    ring = (outer - d + 0.5).clamp(0, 1) * (d - inner + 0.5).clamp(0, 1)
    square = torch.ones(m, m, dtype=torch.float64)
    square_inset = max(0, int(round(m * 0.07)))
    if square_inset:
        square = F.pad(torch.ones(m - 2 * square_inset, m - 2 * square_inset, dtype=torch.float64), [square_inset] * 4)
    shapes = {"none": torch.zeros(m, m, dtype=torch.float64), "square": square, "ring": ring}
    return torch.stack([shapes[name] for name in MARKERS]).float()


def marker_layers(
    marker: torch.Tensor, gen: torch.Generator, size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marker alpha layers ``(N, 1, size, size)`` and the corner of each (index into :data:`CORNERS`).

    A corner is drawn for every image, also for ``none``, so the randomness used does not depend on the markers.
    """
    marker = marker.long()
    _check(marker, len(MARKERS), "marker")
    n = marker.shape[0]
    corner = torch.randint(len(CORNERS), (n,), generator=gen)
    masks = _marker_masks(size)
    m = masks.shape[-1]
    margin = max(1, int(round(MARKER_MARGIN_FRACTION * size)))
    out = torch.zeros(n, 1, size, size)
    for k in range(len(CORNERS)):
        sel = corner == k
        if not sel.any():
            continue
        y = margin if k in (0, 1) else size - margin - m
        x = margin if k in (0, 2) else size - margin - m
        out[sel, 0, y:y + m, x:x + m] = masks[marker[sel]]
    return out, corner


def world_layers(background: torch.Tensor, marker: torch.Tensor, gen: torch.Generator, size: int = IMAGE_SIZE
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Background ``(N, 1, S, S)`` and marker alpha ``(N, 1, S, S)`` layers for background and marker indices
    (:func:`background_crops`, then :func:`marker_layers`, from ``gen``): an image's fixed surroundings, which
    :func:`compose` puts under and over its digit."""
    bg = background_crops(background, gen, size)
    mk, _ = marker_layers(marker, gen, size)
    return bg, mk


def compose(digits: torch.Tensor, color: torch.Tensor, bg: torch.Tensor, mk: torch.Tensor,
            gen: torch.Generator | None = None, jitter: bool = False) -> torch.Tensor:
    """RGB ``(N, 3, S, S)`` in [0, 1]: the background, a dark halo around digit and marker, the coloured digit, the
    marker. ``digits``: grayscale digit layers ``(N, S, S)`` (:func:`digit_layers`); ``color``: index into
    :data:`COLOR_NAMES` (``len(COLOR_NAMES)`` = white); ``bg``, ``mk``: :func:`world_layers`. With ``jitter``, the
    digit alone gets a small random affine from ``gen`` (:func:`debias.data.shifts.random_affine`)."""
    if digits.dim() != 3 or digits.shape[1] != digits.shape[2]:
        raise ValueError(f"digits of shape {tuple(digits.shape)}; expected (N, S, S) digit layers")
    n, size = digits.shape[0], digits.shape[-1]
    if color.shape != (n,):
        raise ValueError(f"color of shape {tuple(color.shape)}; expected ({n},), one index per image")
    color = color.long()
    _check(color, len(COLOR_NAMES) + 1, "color")
    d = digits.float().unsqueeze(1)
    if jitter:
        if gen is None:
            raise ValueError("jitter needs a generator")
        d = random_affine(d, gen)
    rgb = torch.tensor(list(PALETTE.values()) + [(1.0, 1.0, 1.0)], dtype=torch.float32)[color].view(n, 3, 1, 1)
    radius = max(1, int(round(HALO_PX * size / IMAGE_SIZE)))
    halo = F.max_pool2d(torch.maximum(d, mk), 2 * radius + 1, stride=1, padding=radius)
    img = bg.expand(n, 3, size, size) * (1 - HALO_STRENGTH * halo)
    img = img * (1 - d) + d * rgb
    img = img * (1 - mk) + mk * torch.tensor(MARKER_RGB).view(1, 3, 1, 1)
    return img.clamp_(0, 1)


def render(
    digits: torch.Tensor,
    color: torch.Tensor,
    background: torch.Tensor,
    marker: torch.Tensor,
    gen: torch.Generator,
    jitter: bool = False,
) -> torch.Tensor:
    """Render a batch: RGB ``(N, 3, S, S)`` in [0, 1].

    ``digits``: grayscale digit layers ``(N, S, S)`` (:func:`digit_layers`); ``color`` (index into
    :data:`COLOR_NAMES`, ``len(COLOR_NAMES)`` = white), ``background`` (into :data:`BACKGROUNDS`) and ``marker``
    (into :data:`MARKERS`): one index per image. ``gen`` draws the background crops, the marker corners and, with
    ``jitter``, a small random affine of the digit. Deterministic for a generator state.
    """
    if digits.dim() != 3 or digits.shape[1] != digits.shape[2]:
        raise ValueError(f"digits of shape {tuple(digits.shape)}; expected (N, S, S) digit layers")
    n, size = digits.shape[0], digits.shape[-1]
    for name, t in (("color", color), ("background", background), ("marker", marker)):
        if t.shape != (n,):
            raise ValueError(f"{name} of shape {tuple(t.shape)}; expected ({n},), one index per image")
    bg, mk = world_layers(background, marker, gen, size)
    return compose(digits, color, bg, mk, gen, jitter)


def _check(index: torch.Tensor, n: int, name: str) -> None:
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"{name} indices in [{int(index.min())}, {int(index.max())}]; expected 0..{n - 1}")


def measure_readability(sizes: tuple[int, ...] = (32, 64), halos: tuple[float, ...] = (0.0, 1.0)) -> dict[str, float]:
    """Digit readability over photographs: test accuracy of a pixel logistic regression per size and halo.

    Trains on two renders of every pretraining-pool digit, tests on one render of every evaluation-pool digit;
    backgrounds grass / brick / gravel, random colour and marker, fixed seeds. Minutes on two cores.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from .base_pool import base_pools

    global HALO_STRENGTH
    _, labels = load_base_digits(8)
    pre, ev = base_pools()
    old = HALO_STRENGTH
    out: dict[str, float] = {}

    def make(idx: torch.Tensor, size: int, seed: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed)
        n = len(idx)
        col = torch.randint(len(COLOR_NAMES), (n,), generator=gen)
        bg = torch.randint(1, len(BACKGROUNDS), (n,), generator=gen)
        mk = torch.randint(len(MARKERS), (n,), generator=gen)
        return render(digit_layers(idx, size), col, bg, mk, gen).reshape(n, -1).numpy()

    try:
        for size in sizes:
            for halo in halos:
                HALO_STRENGTH = halo
                x_train = np.concatenate([make(pre, size, s) for s in range(2)])
                y_train = np.concatenate([labels[pre].numpy()] * 2)
                clf = LogisticRegression(max_iter=300, C=0.05).fit(x_train, y_train)
                key = f"{size}px_{'halo' if halo else 'no_halo'}"
                out[key] = round(float(clf.score(make(ev, size, 99), labels[ev].numpy())), 3)
    finally:
        HALO_STRENGTH = old
    return out


if __name__ == "__main__":
    import json
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(measure_readability()))
