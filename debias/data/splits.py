"""The bundle type every dataset loader returns: labelled splits with a spurious attribute and group names.

A split holds images in [0, 1] (RGB, CHW), the class label, and the spurious attribute's value. Groups are
``(label, attribute)`` pairs named ``"<class>|<attribute>"`` (``"5|red"``); they are for evaluation only.
Normalisation is left to each model, so the CNN and CLIP can each use their own. :func:`split_seed` derives the
seed of each named set of draws from the recipe's seed.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset


def split_seed(seed: int, name: str, epoch: int = 0) -> int:
    """The seed of one named set of draws of a run (a split's colours and jitter, the base-image split, an epoch's
    re-render): a function of the recipe's ``seed``, the name and the epoch only."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + epoch) % (2**63 - 1)


@dataclass
class Split(Dataset):
    """One split held in memory: images ``(N, 3, H, W)`` in [0, 1], labels ``(N,)``, attributes ``(N,)``.

    ``render`` (optional, the training split) re-draws the images for a new epoch, deterministic in
    ``(seed, epoch)``: a fresh geometric jitter (or flip) of the same examples, whose labels and spurious attributes
    are fixed by the seed for the whole run. ``render_plain`` (optional) renders those examples without the jitter.
    Evaluation splits have neither and stay fixed.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    attrs: torch.Tensor
    class_names: list[str]
    attr_names: list[str]
    render: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    epoch: int = -1
    render_plain: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = field(default=None,
                                                                                                repr=False)
    factors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Datasets of several attributes (``world_digits``): each attribute's value index per image, by concept name
    (``{"color": ..., "background": ..., "marker": ...}``); ``attrs`` is then the combination of the spurious ones."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i], int(self.labels[i]), int(self.attrs[i])

    def set_epoch(self, epoch: int) -> None:
        """Re-render for ``epoch`` when the split is re-drawn each epoch (the training split)."""
        if self.render is not None and epoch != self.epoch:
            self.images, self.labels, self.attrs = self.render(epoch)
            self.epoch = epoch

    def unaugmented(self) -> "Split":
        """The same examples, in the same order, without the per-epoch jitter: the examples' fixed identity (JTT's
        error set is read there). A split without ``render_plain`` is returned as it is."""
        if self.render_plain is None:
            return self
        images, labels, attrs = self.render_plain()
        return dataclasses.replace(self, images=images, labels=labels, attrs=attrs, render=None, epoch=-1,
                                   render_plain=None)

    @property
    def groups(self) -> torch.Tensor:
        """Group index ``label * n_attrs + attr``."""
        return self.labels * len(self.attr_names) + self.attrs

    def group_names(self) -> list[str]:
        return [f"{c}|{a}" for c in self.class_names for a in self.attr_names]


@dataclass
class DatasetBundle:
    """All splits of one dataset. ``unlabeled`` (may be None) is the stream whose spurious attribute varies
    independently of the label, chosen without reading labels or attributes; its labels and attributes (-1 where
    not known) are kept for reporting only and never given to a method (the oracle ``concept.source = 'labels'``
    aside)."""

    splits: dict[str, Split]
    class_names: list[str]
    attr_names: list[str]
    attribute: str
    """Name of the spurious attribute (``color`` for coloured digits)."""
    unlabeled: Split | None = None
    probe_independent: Split | None = None
    """Images for matching whose attribute varies independently of the label (None: use ``unlabeled``)."""
    shift_splits: tuple[str, ...] = ()
    """Splits whose spurious attribute no longer follows the label (evaluated and reported as shifts)."""
    factor_names: dict[str, list[str]] = field(default_factory=dict)
    """Datasets of several attributes: each attribute's value names (index = ``Split.factors[name]``)."""
    uncaptioned_attrs: tuple[str, ...] = ()
    """Attribute values no caption describes, at the end of ``attr_names`` (coloured digits' ``gray``): a spurious
    concept has one caption per other value."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def captioned_attr_names(self) -> list[str]:
        """The attribute values a spurious concept's captions describe, in order."""
        return [a for a in self.attr_names if a not in self.uncaptioned_attrs]
