"""The world of nuisances (``data.name = "world_digits"``): scikit-learn's digits over real photographs, with markers.

Every image carries four attributes (:mod:`debias.data.world` renders them): the digit (the class), its ``color``
(``data.colors``), the ``background`` (``data.backgrounds``: ``plain`` or a photograph bundled with scikit-image)
and a ``marker`` in a random corner (``data.markers``). The recipe's ``concepts.spurious`` names the attributes that
follow the label: such an attribute's list holds one value per class (class ``k`` owns value ``k``), and in the
biased splits (train, val, test) an image has its class's value with probability ``data.bias``, each spurious
attribute drawn independently. Every other attribute is drawn uniformly from its list, independently of the label
(a list of one value fixes it).

Splits:

- ``train``, ``val`` and the unlabeled stream take ``data.split_fractions`` of each class's base images from the
  *pretraining pool* (:mod:`debias.data.base_pool`), split per seed; the stream keeps ``data.stream_fraction`` of
  its share (each class's first base images in the seeded order), and its spurious attributes are drawn uniformly
  (``data.stream_bias = "independent"``) or follow the label with probability ``data.stream_bias``;
- the evaluation splits render every base image of the *evaluation pool* (a fixed set that neither the digits CLIP
  nor the shipped backbone trains on), ``data.eval_copies`` times, each split with draws of its own: ``test`` (biased
  like training), ``shifted`` (every attribute random), ``swapped`` (every spurious attribute takes the next class's
  value) and, with several spurious attributes, ``swapped_<attribute>`` (that one swapped, the others biased).

A training example's attributes, background crop and marker corner are drawn once per seed; only the digit's
geometric jitter is drawn again each epoch. The group attribute of a split (``Split.attrs``) is the combination of
the spurious attributes (``"red+grass"``), and ``Split.factors`` holds each attribute's own value index, which the
concepts read.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import DebiasError, RecipeError, did_you_mean
from .base_pool import base_pools
from .digits_base import load_base_digits
from .palette import DIGIT_WORDS
from .shifts import assign_colors
from .splits import DatasetBundle, Split, split_seed
from .world import (BACKGROUND_WORDS, BACKGROUNDS, COLOR_NAMES, MARKER_WORDS, MARKERS, compose, digit_layers,
                    world_layers)

if TYPE_CHECKING:
    from ..recipe import ConceptsCfg, DataCfg

SETTING_KEYS = ("bias",)
"""``[data]`` keys that name a run's setting in ``debias compare`` tables."""

STREAM_KEYS = ("stream_bias", "stream_fraction")
"""The ``[data]`` keys of the unlabeled stream's bias and size this dataset reads (other datasets refuse them)."""

FACTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "color": ("colors", COLOR_NAMES),
    "background": ("backgrounds", BACKGROUNDS),
    "marker": ("markers", MARKERS),
}
"""Attribute (concept name) -> (its ``[data]`` key, the names it may take)."""

STREAM_SPLITS = ("train", "val", "unlabeled")
"""Splits drawn from the pretraining pool; every other split named in ``data.split_fractions`` is an evaluation
split over the evaluation pool."""


def _values(cfg: DataCfg, factor: str) -> list[str]:
    return list(getattr(cfg, FACTORS[factor][0]))


def spurious_factors(cfg: DataCfg, concepts: ConceptsCfg) -> list[str]:
    """The attributes that follow the label, in ``concepts.spurious`` order."""
    return [c for c in concepts.spurious if c in FACTORS]


def validate(cfg: DataCfg, concepts: ConceptsCfg) -> None:
    """Digits 0..9, known and distinct attribute values, one value per class for each spurious attribute, at least
    one spurious attribute, and split fractions that the pretraining pool can hold."""
    if len(cfg.classes) < 2 or len(set(cfg.classes)) != len(cfg.classes):
        raise RecipeError(f"data.classes = {cfg.classes!r}: expected two or more distinct digits")
    for c in cfg.classes:
        if not 0 <= c <= 9:
            raise RecipeError(f"data.classes = {cfg.classes!r}: {c} is not a digit in this dataset (expected 0..9)")
    spurious = spurious_factors(cfg, concepts)
    for factor, (key, names) in FACTORS.items():
        values = _values(cfg, factor)
        if not values:
            raise RecipeError(f"data.{key} = []: expected one or more of {list(names)}")
        for v in values:
            if v not in names:
                raise RecipeError(f"data.{key} = {values!r}: {v!r} is not one of {list(names)}"
                                  f"{did_you_mean(v, names)}")
        if len(set(values)) != len(values):
            raise RecipeError(f"data.{key} = {values!r}: expected distinct values")
        if factor in spurious and len(values) != len(cfg.classes):
            raise RecipeError(f"data.{key} = {values!r}: {factor!r} is spurious (concepts.spurious), so it needs one "
                              f"value per class of data.classes = {cfg.classes!r} ({len(cfg.classes)} values)")
    if not spurious:
        raise RecipeError(f"concepts.spurious = {list(concepts.spurious)!r}: world_digits needs one or more of "
                          f"{list(FACTORS)} spurious")
    for split, frac in cfg.split_fractions.items():
        if not 0.0 <= frac <= 1.0:
            raise RecipeError(f"data.split_fractions.{split} = {frac!r}: expected a value in [0, 1]")
    for split in ("train", "val", "test"):
        if cfg.split_fractions.get(split, 0) <= 0:
            raise RecipeError(f"data.split_fractions.{split} = {cfg.split_fractions.get(split)!r}: expected a "
                              f"fraction above 0 (the {split} split is needed)")
    total = sum(cfg.split_fractions.get(s, 0) for s in STREAM_SPLITS)
    if total > 1.0 + 1e-9:
        raise RecipeError(f"data.split_fractions: train + val + unlabeled = {total:.3f} of the pretraining pool, "
                          "expected at most 1")


def missing_inputs(cfg: DataCfg) -> list[str]:
    """Nothing to look for: scikit-learn ships the digits and scikit-image the photographs."""
    return []


def builtin_concepts(cfg: DataCfg, concepts: ConceptsCfg) -> dict[str, tuple[list[str], str]]:
    """``digit`` (one caption per class) and one concept per attribute with two or more values in the recipe
    (``color``, ``background``, ``marker``: one caption per value, from ``concepts.<attribute>_template``)."""
    out: dict[str, tuple[list[str], str]] = {
        "digit": ([concepts.digit_template.format(word=DIGIT_WORDS[d], n=d) for d in cfg.classes], "label")}
    templates = {"color": (concepts.color_template, "color"),
                 "background": (concepts.background_template, "background"),
                 "marker": (concepts.marker_template, "marker")}
    for factor, (template, field_name) in templates.items():
        values = _values(cfg, factor)
        if len(values) >= 2:
            words = {"background": BACKGROUND_WORDS, "marker": MARKER_WORDS}.get(factor, {})
            phrases = [words.get(v, v) for v in values]
            out[factor] = ([template.format(**{field_name: p}) for p in phrases], factor)
    return out


def draw_attributes(labels: torch.Tensor, cfg: DataCfg, spurious: list[str], split: str, gen: torch.Generator
                    ) -> dict[str, torch.Tensor]:
    """Each attribute's value index (into its ``[data]`` list) for images of class index ``labels`` in ``split``:
    spurious attributes by the split's mode, the others uniform. Attributes are drawn in :data:`FACTORS` order."""
    out = {}
    for factor in FACTORS:
        n_values = len(_values(cfg, factor))
        if factor in spurious:
            if split in ("train", "val", "test"):
                mode = "biased"
            elif split == "swapped" or split == f"swapped_{factor}":
                mode = "swapped"
            elif split.startswith("swapped_"):
                mode = "biased"
            elif split == "unlabeled" and cfg.stream_bias != "independent":  # the stream's own bias
                mode = "biased"
            else:  # shifted, the unlabeled stream at "independent", any other split
                mode = "shifted"
            bias = float(cfg.stream_bias) if split == "unlabeled" and mode == "biased" else cfg.bias
            out[factor] = assign_colors(labels, n_values, mode, bias, gen)  # any attribute, not colour only
        else:
            out[factor] = torch.randint(0, n_values, (len(labels),), generator=gen)
    return out


def _global_indices(cfg: DataCfg, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Value indices into the recipe's lists -> indices into :mod:`debias.data.world`'s name lists."""
    out = {}
    for factor, idx in factors.items():
        names = FACTORS[factor][1]
        lookup = torch.tensor([names.index(v) for v in _values(cfg, factor)], dtype=torch.long)
        out[factor] = lookup[idx]
    return out


def _group_attribute(factors: dict[str, torch.Tensor], sizes: list[int], spurious: list[str]) -> torch.Tensor:
    attrs = torch.zeros_like(factors[spurious[0]])
    for factor, size in zip(spurious, sizes):
        attrs = attrs * size + factors[factor]
    return attrs


def _group_names(cfg: DataCfg, spurious: list[str]) -> list[str]:
    names = [""]
    for factor in spurious:
        names = [f"{a}+{v}" if a else v for a in names for v in _values(cfg, factor)]
    return names


class _Renderer:
    """One split's examples: digit layers and fixed attributes, background crops and marker corners; renders the
    images with a fresh digit jitter per call."""

    def __init__(self, base: torch.Tensor, labels: torch.Tensor, cfg: DataCfg, spurious: list[str], split: str,
                 copies: int, seed: int):
        gen = torch.Generator().manual_seed(split_seed(seed, f"world-{split}"))
        self.base = base.repeat(copies)
        self.labels = labels.repeat(copies)
        self.factors = draw_attributes(self.labels, cfg, spurious, split, gen)
        world = _global_indices(cfg, self.factors)
        self.digits = digit_layers(self.base, cfg.image_size)
        self.color = world["color"]
        self.bg, self.mk = world_layers(world["background"], world["marker"], gen, cfg.image_size)
        self.attrs = _group_attribute(self.factors, [len(_values(cfg, f)) for f in spurious], spurious)

    def __call__(self, jitter_seed: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(jitter_seed if jitter_seed is not None else 0)
        images = compose(self.digits, self.color, self.bg, self.mk, gen, jitter=jitter_seed is not None)
        return images, self.labels, self.attrs


def load(cfg: DataCfg, seed: int, concepts: ConceptsCfg) -> DatasetBundle:
    """The recipe's classes, rendered per split (see the module docstring)."""
    spurious = spurious_factors(cfg, concepts)
    _, digits = load_base_digits(8)
    pre, evaluation = base_pools()
    class_names = [str(c) for c in cfg.classes]
    attr_names = _group_names(cfg, spurious)

    def members(pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.isin(digits[pool], torch.tensor(cfg.classes))
        idx = pool[keep]
        return idx, torch.tensor([cfg.classes.index(int(d)) for d in digits[idx]], dtype=torch.long)

    pre_idx, pre_labels = members(pre)
    gen = torch.Generator().manual_seed(split_seed(seed, "world-base-split"))
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in STREAM_SPLITS if cfg.split_fractions.get(s, 0) > 0}
    for k in range(len(cfg.classes)):
        idx = pre_idx[pre_labels == k]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        start = 0
        for name in parts:
            n = int(round(cfg.split_fractions[name] * len(idx)))
            keep = int(round(cfg.stream_fraction * n)) if name == "unlabeled" else n  # a prefix: no draw
            parts[name].append(idx[start:start + keep])
            start += n
    ev_idx, ev_labels = members(evaluation)
    eval_splits = ["test"] + [s for s in cfg.split_fractions if s not in STREAM_SPLITS and s != "test"
                              and cfg.split_fractions[s] > 0 and s != "grayscale"]
    if "swapped" in eval_splits and len(spurious) > 1:
        eval_splits += [f"swapped_{f}" for f in spurious]

    splits: dict[str, Split] = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(len(idx), generator=gen)]  # any prefix mixes the classes
        if len(idx) == 0:
            raise DebiasError(f"data.split_fractions.{name}: the split has no base images; raise its fraction"
                              + (f" or data.stream_fraction = {cfg.stream_fraction!r}" if name == "unlabeled" else ""))
        labels = torch.tensor([cfg.classes.index(int(d)) for d in digits[idx]], dtype=torch.long)
        copies = {"train": cfg.train_copies, "unlabeled": cfg.unlabeled_copies}.get(name, cfg.eval_copies)
        r = _Renderer(idx, labels, cfg, spurious, name, copies, seed)
        if name == "train":
            def render(epoch: int, r=r):
                return r(split_seed(seed, "train", epoch) if cfg.augment else None)

            images, lab, attrs = render(0)
            splits[name] = Split(name, images, lab, attrs, class_names, attr_names, render=render, epoch=0,
                                 render_plain=lambda r=r: r(None), factors=r.factors)
        else:
            images, lab, attrs = r(split_seed(seed, name) if cfg.augment else None)
            splits[name] = Split(name, images, lab, attrs, class_names, attr_names, factors=r.factors)
    for name in eval_splits:
        r = _Renderer(ev_idx, ev_labels, cfg, spurious, name, cfg.eval_copies, seed)
        images, lab, attrs = r(split_seed(seed, name) if cfg.augment else None)
        splits[name] = Split(name, images, lab, attrs, class_names, attr_names, factors=r.factors)
    unlabeled = splits.pop("unlabeled", None)
    factor_names = {f: _values(cfg, f) for f in FACTORS}
    return DatasetBundle(splits=splits, class_names=class_names, attr_names=attr_names, attribute="+".join(spurious),
                         unlabeled=unlabeled, shift_splits=tuple(s for s in eval_splits if s != "test"),
                         factor_names=factor_names)
