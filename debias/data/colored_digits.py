"""The embedded default dataset: scikit-learn's bundled digits, coloured (``data.name = "colored_digits"``).

Base images are split first (per class, seeded), so no two splits share a base image; then each split is
coloured by its shift mode and augmented (:mod:`debias.data.render`). About 180 base images per digit exist, so every
split's size is a fraction of that; ``copies`` renders each base image several times, each copy with a colour and a
jitter of its own.

The training split is a fixed set of examples, as a real biased dataset is: an example is a base image times a copy
(``data.train_copies``), and its colour is drawn once from the seed and kept for the whole run. Only the geometric
jitter is drawn again each epoch (deterministic in ``(seed, epoch)``, so a resumed run renders the same images).
At bias 0.99 the training set therefore holds a fixed 1 % of minority examples, not a fresh 1 % every epoch.

As a dataset plugin (:mod:`debias.data.registry`) the module also holds the checks of the recipe's ``[data]``
section that coloured digits need (:func:`validate`, shared with ``colored_mnist``), the inputs it needs (none: the
digits ship with scikit-learn) and its built-in concepts, ``color`` (spurious attribute) and ``digit`` (class).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import DebiasError, RecipeError, did_you_mean
from .digits_base import load_base_digits
from .palette import DIGIT_WORDS, PALETTE
from .render import SHIFT_SPLITS, SPLIT_MODES, render_split, train_attributes
from .splits import DatasetBundle, Split, split_seed

if TYPE_CHECKING:
    from ..recipe import ConceptsCfg, DataCfg


# ----------------------------------------------------------------------------------------------- plugin surface

SETTING_KEYS = ("bias",)
"""``[data]`` keys that name a run's setting in ``debias compare`` tables (sweeps vary the bias)."""


def validate(cfg: DataCfg, concepts: ConceptsCfg | None = None) -> None:
    """The ``[data]`` checks of a coloured-digit dataset: two or more distinct digits, two or more distinct palette
    colours, split fractions in [0, 1] with train, val and test above 0 and a sum of at most 1."""
    if len(cfg.classes) < 2:
        raise RecipeError(f"data.classes = {cfg.classes!r}: expected at least two digits")
    for c in cfg.classes:
        if not 0 <= c <= 9:
            raise RecipeError(f"data.classes = {cfg.classes!r}: {c} is not a digit in this dataset (expected 0..9)")
    if len(set(cfg.classes)) != len(cfg.classes):
        raise RecipeError(f"data.classes = {cfg.classes!r}: expected distinct digits")
    if len(cfg.colors) < 2:
        raise RecipeError(f"data.colors = {cfg.colors!r}: expected at least two colours")
    for c in cfg.colors:
        if c not in PALETTE:
            raise RecipeError(f"data.colors = {cfg.colors!r}: {c!r} is not in the palette "
                              f"{sorted(PALETTE)}{did_you_mean(c, PALETTE)}")
    if len(set(cfg.colors)) != len(cfg.colors):
        raise RecipeError(f"data.colors = {cfg.colors!r}: expected distinct colours")
    for split, frac in cfg.split_fractions.items():
        if not 0.0 <= frac <= 1.0:
            raise RecipeError(f"data.split_fractions.{split} = {frac!r}: expected a value in [0, 1]")
    missing = {"train", "val", "test"} - set(cfg.split_fractions)
    if missing:
        raise RecipeError(f"data.split_fractions = {cfg.split_fractions!r}: missing splits {sorted(missing)}")
    for split in ("train", "val", "test"):
        if cfg.split_fractions[split] <= 0:
            raise RecipeError(f"data.split_fractions.{split} = {cfg.split_fractions[split]!r}: expected a fraction "
                              f"above 0 (the {split} split is needed)")
    total = sum(cfg.split_fractions.values())
    if total > 1.0 + 1e-9:
        raise RecipeError(f"data.split_fractions = {cfg.split_fractions!r}: fractions sum to {total:.3f}, "
                          "expected at most 1")


def missing_inputs(cfg: DataCfg) -> list[str]:
    """Nothing to look for: scikit-learn ships the digits."""
    return []


def builtin_concepts(cfg: DataCfg, concepts: ConceptsCfg) -> dict[str, tuple[list[str], str]]:
    """``color`` (one caption per ``data.colors``, the spurious attribute) and ``digit`` (one per ``data.classes``,
    the label), from ``concepts.color_template`` and ``concepts.digit_template``."""
    return {"color": ([concepts.color_template.format(color=col) for col in cfg.colors], "attr"),
            "digit": ([concepts.digit_template.format(word=DIGIT_WORDS[d], n=d) for d in cfg.classes], "label")}


def load(cfg: DataCfg, seed: int, concepts: ConceptsCfg | None = None) -> DatasetBundle:
    """scikit-learn's bundled digits, restricted to ``cfg.classes`` and coloured."""
    gray, digits = load_base_digits(cfg.image_size)
    keep = torch.isin(digits, torch.tensor(cfg.classes))
    gray, digits = gray[keep], digits[keep]
    labels = torch.tensor([cfg.classes.index(int(d)) for d in digits], dtype=torch.long)
    fractions = {k: v for k, v in cfg.split_fractions.items() if v > 0}
    index = split_base_indices(labels, len(cfg.classes), fractions, split_seed(seed, "base-split"))
    base = {name: (gray[idx], labels[idx]) for name, idx in index.items()}
    return colored_bundle(base, cfg, seed)


# ----------------------------------------------------------------------------------------------- splits

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
                                    split_seed(seed, "train", epoch), attrs=fixed)

            def render_plain(gray=gray, labels=labels, fixed=fixed):
                return render_split(gray, labels, cfg.colors, mode, cfg.bias, cfg.train_copies, False, 0,
                                    attrs=fixed)
            images, lab, attrs = render(0)
            splits[name] = Split(name, images, lab, attrs, class_names, attr_names, render=render, epoch=0,
                                 render_plain=render_plain)
        else:
            copies = cfg.unlabeled_copies if name == "unlabeled" else cfg.eval_copies
            images, lab, attrs = render_split(gray, labels, cfg.colors, mode, cfg.bias, copies, cfg.augment,
                                              split_seed(seed, name))
            splits[name] = Split(name, images, lab, attrs, class_names, attr_names)
    unlabeled = splits.pop("unlabeled", None)
    return DatasetBundle(splits=splits, class_names=class_names, attr_names=attr_names, attribute="color",
                         unlabeled=unlabeled, shift_splits=tuple(s for s in SHIFT_SPLITS if s in splits),
                         uncaptioned_attrs=("gray",))
