"""The colouring of grayscale digits with the palette of :mod:`debias.data.palette` (re-exported here)."""
from __future__ import annotations

import torch

from .palette import DIGIT_WORDS, GRAY_RGB, PALETTE


def colorize(gray: torch.Tensor, color: str | None) -> torch.Tensor:
    """Colour grayscale images ``(..., H, W)`` in [0, 1] into RGB ``(..., 3, H, W)``.

    ``color=None`` gives the grayscale variant: the digit copied into all three channels.
    """
    if color is None:
        rgb = torch.tensor(GRAY_RGB, dtype=gray.dtype, device=gray.device)
    else:
        if color not in PALETTE:
            raise KeyError(f"unknown colour {color!r}; expected one of {sorted(PALETTE)}")
        rgb = torch.tensor(PALETTE[color], dtype=gray.dtype, device=gray.device)
    return gray.unsqueeze(-3) * rgb.view(3, 1, 1)


__all__ = ["DIGIT_WORDS", "PALETTE", "colorize"]
