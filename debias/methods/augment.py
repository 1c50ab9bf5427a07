"""``augment``: ERM on transformed training images: colour transforms against a known nuisance (does plain
augmentation against the nuisance suffice?) and generic ones (crop, flip, colour jitter: what a user tries without
knowing the nuisance)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import math

import torch
import torch.nn.functional as F

from ..errors import RecipeError, did_you_mean
from ..recipe_fields import _range
from .base import Method, MethodContext

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass
class AugmentCfg:
    """The ``augment`` method: ERM on transformed training images."""

    transforms: list[str] = field(default_factory=lambda: ["channel_permutation", "grayscale"])
    """Transforms applied in this order, one draw per training image. Against a colour nuisance:
    channel_permutation and grayscale (torchvision's, batched on the batch's device). Generic, knowing no nuisance:
    random_resized_crop (torchvision v2's RandomResizedCrop back to the input size, area ``crop_scale`` to 1, aspect
    ratio 3/4 to 4/3; batched), hflip (a horizontal flip with probability 0.5; batched), color_jitter (torchvision
    v2's ColorJitter, brightness, contrast and saturation 0.3, hue 0.2; image by image)."""
    grayscale_p: float = field(default=0.2, metadata=_range(0.0, 1.0))
    """The probability that the ``grayscale`` transform turns an image gray."""
    crop_scale: float = field(default=0.6, metadata=_range(0.01, 1.0))
    """The smallest fraction of an image's area that ``random_resized_crop`` keeps (torchvision's default, 0.08,
    would leave a fraction of a stroke of a 32 px digit)."""


def _v2():
    """torchvision's transforms, imported when an augmentation is built (the import costs seconds, and recipe
    validation, which reads this module's names, must stay fast)."""
    import torchvision.transforms.v2 as T

    return T


def permute_channels(images: torch.Tensor) -> torch.Tensor:
    """Each image of an (N, C, H, W) batch with its channels in an order of its own (torchvision's
    ``RandomChannelPermutation``, one draw per image, in a few batched operations on the batch's device)."""
    order = torch.rand(images.shape[:2], device=images.device).argsort(1)
    return images[torch.arange(len(images), device=images.device)[:, None], order]


def random_grayscale(images: torch.Tensor, p: float) -> torch.Tensor:
    """Each image of an RGB batch turned gray with probability ``p`` (torchvision's ``RandomGrayscale``, one draw
    per image, batched); the gray images keep three channels."""
    pick = torch.rand(len(images), device=images.device) < p
    # every image converted, then chosen by a mask: no data-dependent shape (``images[pick]`` waits for the device)
    gray = _v2().functional.rgb_to_grayscale(images, num_output_channels=3)
    return torch.where(pick[:, None, None, None], gray, images)


CROP_RATIO = (3 / 4, 4 / 3)
"""The aspect ratios (width / height) ``random_resized_crop`` draws from: torchvision's default."""


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO,
               device: torch.device | str = "cpu", tries: int = 10) -> torch.Tensor:
    """``(n, 4)`` integer boxes ``(top, left, height, width)``, one per image, drawn as torchvision's
    ``RandomResizedCrop`` draws one: up to ``tries`` candidates of area ``scale`` times the image's and aspect ratio
    log-uniform in ``ratio``, the first that fits the image, else the central crop of the largest box with a ratio
    in ``ratio``. All images' candidates are drawn at once."""
    area = torch.empty(n, tries, device=device).uniform_(*scale) * height * width
    log_ratio = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = (area * log_ratio.exp()).sqrt().round().long()
    h = (area / log_ratio.exp()).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1)  # the first candidate that fits (0 when none does: replaced below)
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    in_ratio = width / height
    fallback_w = width if in_ratio <= max(ratio) else int(round(height * max(ratio)))
    fallback_h = height if in_ratio >= min(ratio) else int(round(width / min(ratio)))
    none = ~fits.any(1)
    w, h = torch.where(none, fallback_w, w), torch.where(none, fallback_h, h)
    top = (torch.rand(n, device=device) * (height - h + 1)).long().clamp(max=height - h)
    left = (torch.rand(n, device=device) * (width - w + 1)).long().clamp(max=width - w)
    top, left = torch.where(none, (height - h) // 2, top), torch.where(none, (width - w) // 2, left)
    return torch.stack([top, left, h, w], 1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image of an (N, C, H, W) batch cropped to its box ``(top, left, height, width)`` and resized back to
    H x W, bilinear, in one ``grid_sample``: torchvision's ``resized_crop`` (antialiasing only acts when shrinking,
    and a crop is only ever enlarged), except that the outermost row or column of an output may blend in the pixel
    just outside its box where torchvision repeats the box's edge."""
    n, c, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    zero = torch.zeros_like(top)
    thetas = torch.stack([torch.stack([w / width, zero, (2 * left + w) / width - 1], 1),
                          torch.stack([zero, h / height, (2 * top + h) / height - 1], 1)], 1)
    grid = F.affine_grid(thetas, [n, c, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(images: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` to the input size, one box per image, batched on the batch's device."""
    n, _, height, width = images.shape
    return resized_crops(images, crop_boxes(n, height, width, scale, device=images.device))


def random_hflip(images: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Each image of a batch flipped left to right with probability ``p`` (torchvision's
    ``RandomHorizontalFlip``, one draw per image, batched)."""
    pick = torch.rand(len(images), device=images.device) < p
    return torch.where(pick[:, None, None, None], images.flip(-1), images)


def _per_image(transform):
    return lambda images: torch.stack([transform(img) for img in images])


AUGMENTATIONS = {  # each takes the recipe's augment section and returns a function of a batch
    "channel_permutation": lambda cfg: permute_channels,
    "grayscale": lambda cfg: partial(random_grayscale, p=cfg.grayscale_p),
    "random_resized_crop": lambda cfg: partial(random_resized_crop, scale=(cfg.crop_scale, 1.0)),
    "hflip": lambda cfg: random_hflip,
    "color_jitter": lambda cfg: _per_image(_v2().ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.2)),
}


def validate(recipe: "Recipe") -> None:
    """Every transform is known; ``train.method = 'augment'`` needs at least one."""
    for t in recipe.augment.transforms:
        if t not in AUGMENTATIONS:
            raise RecipeError(f"augment.transforms = {recipe.augment.transforms!r}: {t!r} is not one of "
                              f"{sorted(AUGMENTATIONS)}{did_you_mean(t, AUGMENTATIONS)}")
    if recipe.train.method == "augment" and not recipe.augment.transforms:
        raise RecipeError("augment.transforms = [] with train.method = 'augment': no transform (plain ERM); expected "
                          f"some of {sorted(AUGMENTATIONS)}")


class Augment(Method):
    """ERM on training images passed through recipe-given transforms, one draw per image: shows when plain
    augmentation against a known nuisance already suffices (channel permutation, grayscale against colour), and what
    generic augmentation does without knowing the nuisance (resized crop, flip, colour jitter). All but colour
    jitter run batched on the batch's device (per image they cost ten times an ERM step on a GPU); colour jitter is
    torchvision's, per image."""

    name = "augment"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        cfg = ctx.recipe.augment
        self.transforms = [AUGMENTATIONS[name](cfg) for name in cfg.transforms]

    def loss_terms(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        images = batch["images"]
        for transform in self.transforms:
            images = transform(images)
        logits = self.ctx.model(images)
        nll = self.task_loss(logits, batch["labels"])
        return {"loss": nll, "nll": nll}


Config = AugmentCfg
METHOD = Augment
