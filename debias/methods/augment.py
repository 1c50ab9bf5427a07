"""``augment``: ERM on colour-transformed training images (does plain augmentation against the nuisance suffice?)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch

from ..errors import RecipeError, did_you_mean
from ..recipe_fields import _range
from .base import Method, MethodContext

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass
class AugmentCfg:
    """The ``augment`` method: ERM on colour-transformed training images."""

    transforms: list[str] = field(default_factory=lambda: ["channel_permutation", "grayscale"])
    """Colour transforms, one draw per training image: channel_permutation and grayscale (torchvision's, batched on
    the batch's device), color_jitter (torchvision v2, image by image)."""
    grayscale_p: float = field(default=0.2, metadata=_range(0.0, 1.0))
    """The probability that the ``grayscale`` transform turns an image gray."""


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


def _per_image(transform):
    return lambda images: torch.stack([transform(img) for img in images])


AUGMENTATIONS = {  # each takes the recipe's augment section and returns a function of a batch
    "channel_permutation": lambda cfg: permute_channels,
    "grayscale": lambda cfg: partial(random_grayscale, p=cfg.grayscale_p),
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
    """ERM on training images passed through recipe-given colour transforms, one draw per image: shows when plain
    augmentation against a known nuisance already suffices. Channel permutation and grayscale run batched on the
    batch's device (per image they cost ten times an ERM step on a GPU); colour jitter is torchvision's, per image."""

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
