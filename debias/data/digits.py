"""Coloured digits: the embedded default dataset (scikit-learn's bundled digits), and the colouring shared with
the coloured-MNIST loader.

Base images are split first (per class, seeded), so no two splits share a base image; then each split is
coloured by its shift mode and augmented. About 180 base images per digit exist, so every split's size is a
fraction of that; ``copies`` renders each base image several times, each copy with a colour and a jitter of its own.

The training split is a fixed set of examples, as a real biased dataset is: an example is a base image times a copy
(``data.train_copies``), and its colour is drawn once from the seed and kept for the whole run. Only the geometric
jitter is drawn again each epoch (deterministic in ``(seed, epoch)``, so a resumed run renders the same images).
At bias 0.99 the training set therefore holds a fixed 1 % of minority examples, not a fresh 1 % every epoch.
"""
from __future__ import annotations

import zlib

import torch

from ..errors import DebiasError
from ..recipe import DataCfg
from .colors import colorize
from .digits_base import load_base_digits
from .shifts import assign_colors, random_affine
from .splits import DatasetBundle, Split

SPLIT_MODES = {"train": "biased", "val": "biased", "test": "biased", "shifted": "shifted", "swapped": "swapped",
               "grayscale": "grayscale", "unlabeled": "shifted"}
SHIFT_SPLITS = ("shifted", "swapped", "grayscale")


def _split_seed(seed: int, name: str, epoch: int = 0) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + epoch) % (2**63 - 1)


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
    gen = torch.Generator().manual_seed(_split_seed(seed, "train-attributes"))
    return assign_colors(labels.repeat(copies), n_colors, mode, bias, gen)


def split_base_indices(labels: torch.Tensor, n_classes: int, fractions: dict[str, float], seed: int
                       ) -> dict[str, torch.Tensor]:
    """Disjoint base-image indices per split, split class by class with a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in fractions}
    for k in range(n_classes):
        idx = torch.nonzero(labels == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        start = 0
        for name, frac in fractions.items():
            n = int(round(frac * len(idx)))
            out[name].append(idx[start:start + n])
            start += n
    # shuffle within each split, so any prefix (the matching probe's first N images) mixes the classes
    shuffled = {}
    for name, parts in out.items():
        idx = torch.cat(parts)
        shuffled[name] = idx[torch.randperm(len(idx), generator=gen)]
    return shuffled


def colored_bundle(base: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: DataCfg, seed: int) -> DatasetBundle:
    """Colour grayscale base images per split. ``base[split] = (gray (N,H,W), label index (N,))``."""
    class_names = [str(c) for c in cfg.classes]
    attr_names = list(cfg.colors) + ["gray"]
    splits: dict[str, Split] = {}
    for name, (gray, labels) in base.items():
        mode = SPLIT_MODES.get(name, "shifted")
        if len(labels) == 0:
            raise DebiasError(f"data.split_fractions.{name}: the split has no base images; raise its fraction")
        if name == "train":  # a fixed set of examples: colours drawn once, the jitter each epoch
            fixed = train_attributes(labels, len(cfg.colors), mode, cfg.bias, cfg.train_copies, seed)

            def render(epoch: int, gray=gray, labels=labels, fixed=fixed):
                return render_split(gray, labels, cfg.colors, mode, cfg.bias, cfg.train_copies, cfg.augment,
                                    _split_seed(seed, "train", epoch), attrs=fixed)

            def render_plain(gray=gray, labels=labels, fixed=fixed):
                return render_split(gray, labels, cfg.colors, mode, cfg.bias, cfg.train_copies, False, 0,
                                    attrs=fixed)
            images, lab, attrs = render(0)
            splits[name] = Split(name, images, lab, attrs, class_names, attr_names, render=render, epoch=0,
                                 render_plain=render_plain)
        else:
            copies = cfg.unlabeled_copies if name == "unlabeled" else cfg.eval_copies
            images, lab, attrs = render_split(gray, labels, cfg.colors, mode, cfg.bias, copies, cfg.augment,
                                              _split_seed(seed, name))
            splits[name] = Split(name, images, lab, attrs, class_names, attr_names)
    unlabeled = splits.pop("unlabeled", None)
    return DatasetBundle(splits=splits, class_names=class_names, attr_names=attr_names, attribute="color",
                         unlabeled=unlabeled, shift_splits=tuple(s for s in SHIFT_SPLITS if s in splits))


def load_colored_digits(cfg: DataCfg, seed: int) -> DatasetBundle:
    """The embedded default: scikit-learn's bundled digits, restricted to ``cfg.classes`` and coloured."""
    gray, digits = load_base_digits(cfg.image_size)
    keep = torch.isin(digits, torch.tensor(cfg.classes))
    gray, digits = gray[keep], digits[keep]
    labels = torch.tensor([cfg.classes.index(int(d)) for d in digits], dtype=torch.long)
    fractions = {k: v for k, v in cfg.split_fractions.items() if v > 0}
    index = split_base_indices(labels, len(cfg.classes), fractions, _split_seed(seed, "base-split"))
    base = {name: (gray[idx], labels[idx]) for name, idx in index.items()}
    return colored_bundle(base, cfg, seed)
