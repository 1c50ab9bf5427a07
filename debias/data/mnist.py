"""Coloured MNIST from a local torchvision-format folder, rendered lazily at any image size (224 px for the paper).

Base images are the 28 px grayscale MNIST digits, kept as uint8 (60k + 10k digits are 55 MB); a split stores base
indices, colours and jitter parameters, and renders a batch only when it is indexed (:class:`LazyImages`), in one
bicubic ``grid_sample`` that jitters and resizes at once. A 224 px split of 10,000 images would take 6 GB as a
float tensor; rendered lazily it costs nothing until a batch is drawn.

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

Colours follow :mod:`debias.data.shifts` exactly as the embedded digits do (``biased`` train/val/test, random
``shifted``, ``swapped``, ``grayscale``; the stream ``shifted``). The training split is a fixed set of examples
(base image times copy), each with a colour drawn once from the seed; only its jitter is drawn again each epoch.
The order of every split is shuffled (seeded), so any prefix (the matching probe's first ``matching.num_images``)
mixes the digits.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import DebiasError
from ..preflight import MNIST_FILES, mnist_missing_files, mnist_missing_message, mnist_raw_folder
from ..recipe import DataCfg
from .colors import PALETTE
from .digits import SHIFT_SPLITS, SPLIT_MODES, _split_seed, train_attributes
from .shifts import assign_colors
from .splits import DatasetBundle, Split

EVAL_CHUNK = 512
"""Most images rendered at once when a large index is asked for (bounds the temporary memory)."""


# ----------------------------------------------------------------------------------------------- lazy images

class LazyImages:
    """Images rendered on access, indexed like an ``(N, 3, H, W)`` tensor.

    ``images[i]`` gives ``(3, H, W)``; a slice, an index tensor, a list or a boolean mask gives ``(n, 3, H, W)``;
    a tuple indexes the rendered result further (``images[:, 0]``). ``render(indices)`` must be deterministic in
    the indices, so an image is the same whether it is drawn alone or in any batch.
    """

    def __init__(self, n: int, size: int, render: Callable[[torch.Tensor], torch.Tensor]):
        self.n = int(n)
        self.size = int(size)
        self.render = render

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n, 3, self.size, self.size))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __repr__(self) -> str:
        return f"LazyImages(n={self.n}, size={self.size})"

    def _indices(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            return torch.arange(self.n)[index]
        idx = torch.as_tensor(index)
        if idx.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        if idx.dtype == torch.bool:
            if idx.shape != (self.n,):
                raise IndexError(f"boolean mask of shape {tuple(idx.shape)} for {self.n} images")
            return torch.nonzero(idx).flatten()
        if idx.is_floating_point() or idx.dim() != 1:
            raise IndexError(f"cannot index {self!r} with {type(index).__name__} of shape {tuple(idx.shape)}")
        idx = idx.long()
        idx = torch.where(idx < 0, idx + self.n, idx)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"index out of range for {self.n} images")
        return idx

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Render the images at ``idx`` (a 1-D long tensor), in chunks of :data:`EVAL_CHUNK`."""
        if len(idx) <= EVAL_CHUNK:
            return self.render(idx)
        return torch.cat([self.render(part) for part in idx.split(EVAL_CHUNK)])

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, tuple):
            first, rest = index[0], index[1:]
            out = self[first]
            return out[rest] if isinstance(first, int) else out[(slice(None),) + rest]
        if isinstance(index, numbers.Integral) or (torch.is_tensor(index) and index.dim() == 0
                                                   and not index.is_floating_point()):
            i = int(index)
            if not -self.n <= i < self.n:
                raise IndexError(f"image index {i} out of range for {self.n} images")
            return self.render(torch.tensor([i % self.n]))[0]
        return self.take(self._indices(index))

    def materialize(self) -> torch.Tensor:
        """Every image as one tensor (mind the memory: ``N * 3 * H * W * 4`` bytes)."""
        return self.take(torch.arange(self.n))


class LazySplit(Split):
    """A :class:`Split` whose ``images`` is a :class:`LazyImages`; a DataLoader batch is rendered in one call.

    PyTorch's map-style fetcher calls ``__getitems__`` with a whole batch of indices when a dataset has it.
    """

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        images = self.images[idx]
        labels, attrs = self.labels[idx].tolist(), self.attrs[idx].tolist()
        return list(zip(images.unbind(0), labels, attrs))


# ----------------------------------------------------------------------------------------------- rendering

def affine_thetas(n: int, gen: torch.Generator, max_shift: float = 0.08, max_rot_deg: float = 10.0,
                  scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Per-image affine jitter ``(n, 2, 3)`` with the distribution of :func:`debias.data.shifts.random_affine`.

    Drawn once per split (and per epoch for training), so a lazily rendered image never changes between accesses.
    """
    angle = (torch.rand(n, generator=gen) * 2 - 1) * max_rot_deg * torch.pi / 180
    s = scale[0] + torch.rand(n, generator=gen) * (scale[1] - scale[0])
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    return torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)


class DigitRenderer:
    """Renders coloured digits from 28 px uint8 base images: jitter + resize in one bicubic ``grid_sample`` (or a
    bicubic resize without jitter, as CLIP's preprocessing does), then the paper's colouring: the grayscale digit
    times the colour's RGB (``gray`` copies it into all channels).

    A module-level class, not a closure, so the images of an evaluation split pickle (spawned DataLoader workers).
    """

    def __init__(self, base: torch.Tensor, attrs: torch.Tensor, palette: torch.Tensor, size: int,
                 thetas: torch.Tensor | None):
        self.base = base          # (N, 28, 28) uint8, the base image of each rendered image
        self.attrs = attrs        # (N,) colour index into palette
        self.palette = palette    # (K + 1, 3), the last row white (grayscale)
        self.size = size
        self.thetas = thetas      # (N, 2, 3) or None (no jitter)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        n = len(idx)
        gray = self.base[idx].unsqueeze(1).float().div_(255.0)
        if self.thetas is not None:
            grid = F.affine_grid(self.thetas[idx], [n, 1, self.size, self.size], align_corners=False)
            out = F.grid_sample(gray, grid, mode="bicubic", padding_mode="zeros", align_corners=False).clamp_(0, 1)
        elif gray.shape[-1] != self.size:  # no jitter: a plain resize, 4x faster than grid_sample
            out = F.interpolate(gray, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp_(0, 1)
        else:
            out = gray
        rgb = self.palette[self.attrs[idx]].view(n, 3, 1, 1)
        return out * rgb


def _palette(colors: list[str]) -> torch.Tensor:
    return torch.tensor([PALETTE[c] for c in colors] + [(1.0, 1.0, 1.0)], dtype=torch.float32)


def render_lazy(base: torch.Tensor, labels: torch.Tensor, cfg: DataCfg, mode: str, copies: int, seed: int,
                attrs: torch.Tensor | None = None, augment: bool | None = None
                ) -> tuple[LazyImages, torch.Tensor, torch.Tensor]:
    """``copies`` renders of each base image: colours drawn as :func:`debias.data.digits.render_split` does (or
    ``attrs`` given, one per render), jitter parameters drawn up front (``augment``: None follows
    ``data.augment``); images rendered on access. Returns images, labels, colour index."""
    gen = torch.Generator().manual_seed(seed)
    base = base.repeat(copies, 1, 1) if copies > 1 else base
    labels = labels.repeat(copies)
    if attrs is None:
        attrs = assign_colors(labels, len(cfg.colors), mode, cfg.bias, gen)
    augment = cfg.augment if augment is None else augment
    thetas = affine_thetas(len(labels), gen) if augment else None
    renderer = DigitRenderer(base, attrs, _palette(cfg.colors), cfg.image_size, thetas)
    return LazyImages(len(labels), cfg.image_size, renderer), labels, attrs


# ----------------------------------------------------------------------------------------------- MNIST files

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
    gen = torch.Generator().manual_seed(_split_seed(seed, "mnist-base-split"))
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
            return render_lazy(base, labels, cfg, mode, cfg.train_copies, _split_seed(seed, "train", epoch),
                               attrs=fixed)

        def render_plain(base=base, labels=labels):
            return render_lazy(base, labels, cfg, mode, cfg.train_copies, 0, attrs=fixed, augment=False)
        images, lab, attrs = render(0)
        return LazySplit(name, images, lab, attrs, class_names, attr_names, render=render, epoch=0,
                         render_plain=render_plain)
    copies = cfg.unlabeled_copies if name == "unlabeled" else cfg.eval_copies
    images, lab, attrs = render_lazy(base, labels, cfg, mode, copies, _split_seed(seed, name))
    return LazySplit(name, images, lab, attrs, class_names, attr_names)


def load_colored_mnist(cfg: DataCfg, seed: int) -> DatasetBundle:
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
                         unlabeled=unlabeled, shift_splits=tuple(s for s in SHIFT_SPLITS if s in splits))
