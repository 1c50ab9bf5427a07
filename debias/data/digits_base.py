"""The grayscale base images: scikit-learn's bundled 8x8 digits (no download), upsampled."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def load_base_digits(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 bundled digits as grayscale ``(N, image_size, image_size)`` in [0, 1] and labels 0..9.

    The 8x8 images are padded by one pixel (digits touch the border) and resized bicubically.
    """
    images, targets = _load()
    x = torch.from_numpy(images).unsqueeze(1)
    x = F.pad(x, (1, 1, 1, 1))
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp_(0, 1)
    return x.squeeze(1), torch.from_numpy(targets)
