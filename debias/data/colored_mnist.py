"""Coloured MNIST from a local torchvision-format folder, rendered lazily at any image size (224 px for the paper).

Base images are the 28 px grayscale MNIST digits, kept as uint8 (60k + 10k digits are 55 MB); a split stores base
indices, colours and jitter parameters, and renders a batch only when it is indexed
(:class:`~debias.data.lazy.LazyImages`), in one bicubic ``grid_sample`` that jitters and resizes at once. A 224 px
split of 10,000 images would take 6 GB as a float tensor; rendered lazily it costs nothing until a batch is drawn.

Split sizes, per digit (the paper: 5,000 for training, 1,000 for test and for the "real-world" random-colour set):

- ``train``: ``data.train_per_class`` images from MNIST's training set (0: the share
  ``train / (train + val + unlabeled)`` of ``data.split_fractions`` of it).
- evaluation splits (``test`` and the shift splits ``shifted``, ``swapped``, ``grayscale``, any split with a
  fraction > 0): ``data.test_per_class`` base images (0: as many as MNIST's test set has of that digit), taken from
  MNIST's test set first and then from training images the train split did not take. All evaluation splits render
  the **same** base images, each with its own colouring, so they differ only in colour: a paired comparison, and
  the only way to reach the paper's sizes (MNIST has 6,313 fives in all; 5,000 train + 1,000 test leaves 313).
- ``val`` and the ``unlabeled`` stream: what is left after that, shared in the ratio of their fractions and capped
  at ``train_per_class * fraction / split_fractions.train``, equal for every digit (156 and 157 fives at the
  paper's sizes). They share no base image with train, the evaluation splits or each other.

Colours follow :mod:`debias.data.shifts` exactly as the embedded digits do (:mod:`debias.data.render`: ``biased``
train/val/test, random ``shifted``, ``swapped``, ``grayscale``; the stream ``shifted``). The training split is a
fixed set of examples (base image times copy), each with a colour drawn once from the seed; only its jitter is drawn
again each epoch. The order of every split is shuffled (seeded), so any prefix (the matching probe's first
``matching.num_images``) mixes the digits.

As a dataset plugin (:mod:`debias.data.registry`) the module checks the ``[data]`` section as ``colored_digits``
does, names the MNIST files missing under ``data.root`` (:func:`missing_inputs`, read by the preflight and by the
loader, so the two never disagree) and has the same built-in concepts, ``color`` and ``digit``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import DebiasError
from .colored_digits import SETTING_KEYS, builtin_concepts, validate
from .lazy import LazySplit
from .render import SHIFT_SPLITS, SPLIT_MODES, render_lazy, train_attributes
from .splits import DatasetBundle, Split, split_seed

if TYPE_CHECKING:
    from ..recipe import ConceptsCfg, DataCfg

__all__ = ["MNIST_FILES", "SETTING_KEYS", "builtin_concepts", "load", "load_mnist_arrays", "missing_inputs",
           "mnist_base_indices", "validate"]

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
"""The four raw MNIST files torchvision reads from ``<data.root>/MNIST/raw/`` (each may also be gzipped)."""
MNIST_LEGACY_FILES = ("training.pt", "test.pt")
"""torchvision's older processed layout (``<data.root>/MNIST/processed/``), still read by ``datasets.MNIST``."""


# ----------------------------------------------------------------------------------------------- MNIST files

def mnist_raw_folder(root: str | Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def mnist_missing_files(root: str | Path) -> list[str]:
    """Raw MNIST files (torchvision layout) absent under ``root``; a file counts as present gzipped or not."""
    raw = mnist_raw_folder(root)
    processed = Path(root) / "MNIST" / "processed"
    if all((processed / f).is_file() for f in MNIST_LEGACY_FILES):
        return []
    return [str(raw / f) for f in MNIST_FILES if not (raw / f).is_file() and not (raw / f"{f}.gz").is_file()]


def _mnist_layout_hint(root: Path) -> str:
    """A hint when ``root`` points one or two levels too deep (at ``MNIST/`` or ``MNIST/raw/``)."""
    for candidate, parent in ((root, root.parent.parent), (root / "raw", root.parent)):
        if any((candidate / f).is_file() or (candidate / f"{f}.gz").is_file() for f in MNIST_FILES):
            return f" (the files seem to be in {candidate}: set data.root = {str(parent)!r})"
    return ""


def mnist_missing_message(root: str, missing: list[str]) -> str:
    """One line naming each missing MNIST file and where it must go."""
    if not root:
        return ("data.root is not set: colored_mnist needs the folder that contains MNIST/raw/ with "
                f"{', '.join(MNIST_FILES)} (torchvision layout; .gz accepted); set data.root, or set "
                "data.download = true on a machine with internet access")
    raw = mnist_raw_folder(root)
    state = "does not exist" if not Path(root).exists() else "lacks MNIST files"
    return (f"data.root = {root!r} {state}: MNIST file(s) {', '.join(missing)} not found (.gz accepted); put the "
            f"torchvision-format MNIST files in {raw}/, or set data.download = true on a machine with internet "
            f"access{_mnist_layout_hint(Path(root))}")


def missing_inputs(cfg: DataCfg) -> list[str]:
    """One message naming every raw MNIST file missing under ``data.root`` (none with ``data.download``)."""
    if cfg.download:
        return []
    missing = mnist_missing_files(cfg.root) if cfg.root else list(MNIST_FILES)
    return [mnist_missing_message(cfg.root, missing)] if missing else []


def _gunzip_missing(raw: Path) -> None:
    """torchvision reads only uncompressed raw files (it extracts .gz only while downloading): extract them here."""
    import gzip
    import shutil

    for name in MNIST_FILES:
        target, packed = raw / name, raw / f"{name}.gz"
        if not target.is_file() and packed.is_file():
            tmp = target.with_suffix(".tmp")
            try:
                with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp.replace(target)
            except (OSError, EOFError) as exc:
                tmp.unlink(missing_ok=True)
                raise DebiasError(f"data.root: cannot extract {packed} next to it ({exc}); extract it by hand "
                                  f"(gunzip) into {raw}/") from None


def load_mnist_arrays(root: str, download: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST's train and test sets as ``{"train": (uint8 (N, 28, 28), digit (N,)), "test": ...}``.

    Read by ``torchvision.datasets.MNIST`` from ``<root>/MNIST/raw``; downloads only when ``download`` is true.
    """
    from torchvision.datasets import MNIST

    if not root:
        raise DebiasError(mnist_missing_message(root, list(MNIST_FILES)))
    if not download:
        missing = mnist_missing_files(root)
        if missing:
            raise DebiasError(mnist_missing_message(root, missing))
        _gunzip_missing(mnist_raw_folder(root))
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = MNIST(root, train=train, download=download)
        except Exception as exc:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, AssertionError ...
            what = "download MNIST into" if download else "read MNIST from"
            raise DebiasError(f"data.root = {root!r}: cannot {what} {mnist_raw_folder(root)}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        data, targets = ds.data, ds.targets
        if data.dtype != torch.uint8 or data.dim() != 3 or len(data) != len(targets):
            raise DebiasError(f"data.root = {root!r}: MNIST {split} files in {mnist_raw_folder(root)} are malformed "
                              f"(images {tuple(data.shape)} {data.dtype}, {len(targets)} labels)")
        out[split] = (data, targets.long())
    return out


# ----------------------------------------------------------------------------------------------- split sizes

def _perm(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return idx[torch.randperm(len(idx), generator=gen)]


def mnist_base_indices(train_digits: torch.Tensor, test_digits: torch.Tensor, cfg: DataCfg, seed: int
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base-image indices per split into ``cat(train, test)`` and their class index; see the module docstring.

    Returns ``{split: (indices, class index)}`` with ``"eval"`` standing for every evaluation split.
    """
    fr = {k: v for k, v in cfg.split_fractions.items() if v > 0}
    for need in ("train", "val", "test"):
        if need not in fr:
            raise DebiasError(f"data.split_fractions.{need} = 0: colored_mnist needs a {need} split; give it a "
                              "fraction > 0")
    f_train, f_val, f_unl = fr["train"], fr["val"], fr.get("unlabeled", 0.0)
    gen = torch.Generator().manual_seed(split_seed(seed, "mnist-base-split"))
    offset = len(train_digits)
    n_train: list[int] = []
    held: list[torch.Tensor] = []
    parts: dict[str, list[torch.Tensor]] = {"train": [], "eval": [], "val": [], "unlabeled": []}
    labels: dict[str, list[torch.Tensor]] = {k: [] for k in parts}
    for k, digit in enumerate(cfg.classes):
        pool_train = _perm(torch.nonzero(train_digits == digit).flatten(), gen)
        pool_test = _perm(torch.nonzero(test_digits == digit).flatten(), gen) + offset
        n = cfg.train_per_class or int(round(len(pool_train) * f_train / (f_train + f_val + f_unl)))
        if n > len(pool_train):
            raise DebiasError(f"data.train_per_class = {cfg.train_per_class}: MNIST's training set has only "
                              f"{len(pool_train)} images of digit {digit}; lower data.train_per_class")
        if n == 0:
            raise DebiasError(f"data.root: MNIST has no training images of digit {digit} (data.classes = "
                              f"{cfg.classes})")
        n_train.append(n)
        parts["train"].append(pool_train[:n])
        labels["train"].append(torch.full((n,), k, dtype=torch.long))
        pool = torch.cat([pool_test, pool_train[n:]])  # held out: MNIST test first, then unused training images
        n_eval = cfg.test_per_class or len(pool_test)
        spare = 2 if f_unl > 0 else 1
        if n_eval + spare > len(pool):
            raise DebiasError(f"data.test_per_class = {cfg.test_per_class}: digit {digit} has only {len(pool)} "
                              f"held-out MNIST images (its test images plus training images beyond "
                              f"data.train_per_class = {n}), and val{' and unlabeled' if f_unl else ''} need some "
                              f"too; lower data.test_per_class or data.train_per_class")
        parts["eval"].append(pool[:n_eval])
        labels["eval"].append(torch.full((n_eval,), k, dtype=torch.long))
        held.append(pool[n_eval:])
    rest = min(len(h) for h in held)
    n_val = int(round(rest * f_val / (f_val + f_unl)))
    n_val = max(1, min(n_val, math.ceil(min(n_train) * f_val / f_train)))
    n_unl = min(rest - n_val, math.ceil(min(n_train) * f_unl / f_train)) if f_unl > 0 else 0
    if f_unl > 0 and n_unl < 1:
        raise DebiasError("data.split_fractions.unlabeled > 0 but no MNIST images are left for the unlabeled stream; "
                          "lower data.test_per_class or data.train_per_class")
    for k, h in enumerate(held):
        for name, start, count in (("val", 0, n_val), ("unlabeled", n_val, n_unl)):
            parts[name].append(h[start:start + count])
            labels[name].append(torch.full((count,), k, dtype=torch.long))
    out = {}
    for name in parts:
        idx, lab = torch.cat(parts[name]), torch.cat(labels[name])
        order = torch.randperm(len(idx), generator=gen)  # mix the digits: any prefix is a fair sample
        out[name] = (idx[order], lab[order])
    return out


# ----------------------------------------------------------------------------------------------- the bundle

def _split(name: str, base: torch.Tensor, labels: torch.Tensor, cfg: DataCfg, seed: int, class_names: list[str],
           attr_names: list[str]) -> LazySplit:
    mode = SPLIT_MODES.get(name, "shifted")
    if name == "train":  # a fixed set of examples: colours drawn once, the jitter each epoch
        fixed = train_attributes(labels, len(cfg.colors), mode, cfg.bias, cfg.train_copies, seed)

        def render(epoch: int, base=base, labels=labels):
            return render_lazy(base, labels, cfg, mode, cfg.train_copies, split_seed(seed, "train", epoch),
                               attrs=fixed)

        def render_plain(base=base, labels=labels):
            return render_lazy(base, labels, cfg, mode, cfg.train_copies, 0, attrs=fixed, augment=False)
        images, lab, attrs = render(0)
        return LazySplit(name, images, lab, attrs, class_names, attr_names, render=render, epoch=0,
                         render_plain=render_plain)
    copies = cfg.unlabeled_copies if name == "unlabeled" else cfg.eval_copies
    images, lab, attrs = render_lazy(base, labels, cfg, mode, copies, split_seed(seed, name))
    return LazySplit(name, images, lab, attrs, class_names, attr_names)


def load(cfg: DataCfg, seed: int, concepts: ConceptsCfg | None = None) -> DatasetBundle:
    """Coloured MNIST digits ``cfg.classes`` in ``cfg.colors`` at ``cfg.image_size``, split as the module says."""
    arrays = load_mnist_arrays(cfg.root, cfg.download)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    base_all = torch.cat([train_x, test_x])
    index = mnist_base_indices(train_y, test_y, cfg, seed)
    class_names = [str(c) for c in cfg.classes]
    attr_names = list(cfg.colors) + ["gray"]
    splits: dict[str, Split] = {}
    eval_names = [n for n, f in cfg.split_fractions.items() if f > 0 and n not in ("train", "val", "unlabeled")]
    for name in ["train", "val", *eval_names, "unlabeled"]:
        key = "eval" if name in eval_names else name
        idx, labels = index[key]
        if len(idx) == 0:
            continue
        splits[name] = _split(name, base_all[idx], labels, cfg, seed, class_names, attr_names)
    unlabeled = splits.pop("unlabeled", None)
    return DatasetBundle(splits=splits, class_names=class_names, attr_names=attr_names, attribute="color",
                         unlabeled=unlabeled, shift_splits=tuple(s for s in SHIFT_SPLITS if s in splits),
                         uncaptioned_attrs=("gray",))
