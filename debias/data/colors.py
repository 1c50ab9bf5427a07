"""Named colours and the colouring of grayscale digits.

The paper puts the grayscale digit into one RGB channel and leaves the others at zero. A palette
generalises that: a digit of colour ``(r, g, b)`` is ``gray * (r, g, b)`` on a black background, so
red, green and blue reproduce the paper exactly and mixed colours add more concepts to probe.
"""
from __future__ import annotations

import torch

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 1.0),
}
"""Colour name -> RGB in [0, 1]. White is left out on purpose: a white digit is the grayscale split."""

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def colorize(gray: torch.Tensor, color: str | None) -> torch.Tensor:
    """Colour grayscale images ``(..., H, W)`` in [0, 1] into RGB ``(..., 3, H, W)``.

    ``color=None`` gives the grayscale variant: the digit copied into all three channels.
    """
    if color is None:
        rgb = torch.ones(3, dtype=gray.dtype, device=gray.device)
    else:
        if color not in PALETTE:
            raise KeyError(f"unknown colour {color!r}; expected one of {sorted(PALETTE)}")
        rgb = torch.tensor(PALETTE[color], dtype=gray.dtype, device=gray.device)
    return gray.unsqueeze(-3) * rgb.view(3, 1, 1)
