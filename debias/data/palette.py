"""Colour names and digit words: plain data, importable without torch (recipe checks and captions read it).

The coloured-digit datasets put the grayscale digit into the colour's RGB channels on a black background:
``gray * (r, g, b)``. Red, green and blue reproduce the paper exactly; mixed colours add more concepts to probe.
"""
from __future__ import annotations

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

GRAY_RGB: tuple[float, float, float] = (1.0, 1.0, 1.0)
"""The grayscale variant's "colour": the digit copied into all three channels (attribute ``gray``)."""

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""English word of each digit 0..9, for captions such as "a photo of the digit five."."""
