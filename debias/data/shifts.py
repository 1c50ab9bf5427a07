"""Colour assignment per split: how the spurious attribute relates to the label.

- ``biased``: with probability ``bias`` a class's own colour, otherwise one of the other recipe colours;
- ``shifted``: uniform over the recipe colours, independent of the label;
- ``swapped``: each class gets the next class's colour (5 and 8 exchange red and green);
- ``grayscale``: no colour (attribute ``gray``).

And the one geometric jitter every digit renderer uses (:func:`affine_thetas`, :func:`random_affine`).
"""
from __future__ import annotations

import torch

SHIFT_MODES = ("biased", "shifted", "swapped", "grayscale")


def assign_colors(labels: torch.Tensor, n_colors: int, mode: str, bias: float, gen: torch.Generator) -> torch.Tensor:
    """Colour index per image. Class ``k`` (index into the recipe's classes) owns colour ``k mod n_colors``.

    Returns indices into the recipe's colour list; ``grayscale`` returns ``n_colors`` (the ``gray`` slot).
    """
    n = labels.shape[0]
    if mode == "biased":
        own = labels % n_colors
        if bias >= 1.0:
            return own
        other = torch.randint(0, n_colors - 1, (n,), generator=gen)
        other = other + (other >= own).long()  # any colour except the class's own
        keep = torch.rand(n, generator=gen) < bias
        return torch.where(keep, own, other)
    if mode == "shifted":
        return torch.randint(0, n_colors, (n,), generator=gen)
    if mode == "swapped":
        n_classes = int(labels.max().item()) + 1 if n else 0
        return ((labels + 1) % max(n_classes, 1)) % n_colors
    if mode == "grayscale":
        return torch.full((n,), n_colors, dtype=torch.long)
    raise ValueError(f"unknown shift mode {mode!r}; expected one of {SHIFT_MODES}")


def affine_thetas(n: int, gen: torch.Generator, max_shift: float = 0.08, max_rot_deg: float = 10.0,
                  scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Per-image small random affine jitter as ``(n, 2, 3)`` matrices for ``affine_grid`` (rotation up to
    ``max_rot_deg``, isotropic scale in ``scale``, translation up to ``max_shift`` of the image size).

    Draws, from ``gen`` and in this order: ``n`` angles, ``n`` scales, ``n`` translation pairs."""
    angle = (torch.rand(n, generator=gen) * 2 - 1) * max_rot_deg * torch.pi / 180
    s = scale[0] + torch.rand(n, generator=gen) * (scale[1] - scale[0])
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift * 2  # grid units span [-1, 1]
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    return torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)


def apply_affine(images: torch.Tensor, thetas: torch.Tensor, size: int | None = None, mode: str = "bilinear"
                 ) -> torch.Tensor:
    """Warp ``(N, C, H, W)`` images by ``thetas`` ``(N, 2, 3)`` in one ``grid_sample`` (zero fill), optionally
    resampled to ``size`` x ``size`` in the same pass; clamped to [0, 1]."""
    n, c = images.shape[:2]
    out_hw = list(images.shape[2:]) if size is None else [size, size]
    grid = torch.nn.functional.affine_grid(thetas, [n, c, *out_hw], align_corners=False)
    out = torch.nn.functional.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.clamp_(0, 1)


def random_affine(images: torch.Tensor, gen: torch.Generator, max_shift: float = 0.08, max_rot_deg: float = 10.0,
                  scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Batched small random affine jitter of ``(N, C, H, W)`` images: :func:`affine_thetas` drawn from ``gen``,
    applied by :func:`apply_affine` (bilinear). No draw for an empty batch."""
    if images.shape[0] == 0:
        return images
    return apply_affine(images, affine_thetas(images.shape[0], gen, max_shift, max_rot_deg, scale))
