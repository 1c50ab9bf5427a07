"""Folder datasets: images under ``data.root`` listed in a metadata CSV (Waterbirds, CelebA, your own).

The CSV has one row per image with a column for each role in ``data.columns`` (defaults: Waterbirds'
``img_filename, y, split, place``; CelebA-style: ``{file = "image_id", label = "Blond_Hair", split = "partition",
attribute = "Male"}``). Image paths are relative to ``data.root``; the CSV path ``data.metadata`` too, unless
absolute (``"../list_attr.csv"`` works when the images sit in a subfolder).

Values:

- **split**: ``0/1/2`` or ``train/val/test`` (also ``valid``, ``validation``) by default; ``data.split_values``
  (CSV value -> ``train | val | test | unlabeled | ignore``) maps anything else, when the recipe has that key.
- **label / attribute**: integers ``0..K-1``; CelebA's ``-1/1`` (read as 0/1); or strings, which must be listed in
  ``data.class_names`` / ``data.attribute_values`` (their index is the value), or are sorted when not listed.
  Names default to the listed names, ``"not <column>"``/``"<column>"`` for ``-1/1`` columns, or the values.

Splits (groups = ``(label, attribute)``, named ``"<class>|<attribute value>"``):

- ``train``, ``val``, ``test`` as the CSV says; ``data.train_per_class`` / ``data.test_per_class`` (> 0) cap the
  images per class of train / of val and test (a seeded subsample, for quick runs on large sets such as CelebA).
- ``test`` is the group-shifted evaluation: worst-group accuracy over its groups is the robustness figure.
- ``shifted``: a group-balanced subsample of ``test`` (every group as large as the smallest one), so the attribute
  is independent of the label there; it is the default ``explain.split``. Left out if a group is absent from test.
- the **unlabeled stream**: rows whose split value maps to ``unlabeled``, as they are; otherwise, when
  ``data.split_fractions.unlabeled > 0``, a group-balanced subsample of the CSV's val rows of about that fraction of
  them (at most half of val's smallest group, so val keeps every group), removed from ``val``. Balancing uses the
  group labels once, to build a stream whose attribute varies independently of the label (as Waterbirds' val split
  is built); methods still never see its labels.

Images are decoded with PIL when a batch is drawn (never all at once): JPEG draft decoding, shorter side resized
(bicubic) to ``data.image_size`` and centre-cropped. ``data.augment`` adds a seeded random horizontal flip to
training images, fresh each epoch; evaluation images are never jittered and ``*_copies`` do not apply here.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DebiasError
from ..preflight import FOLDER_COLUMNS, folder_columns, folder_metadata_path, folder_problems
from ..recipe import DataCfg
from .digits import _split_seed
from .mnist import LazyImages, LazySplit
from .splits import DatasetBundle, Split

DEFAULT_SPLIT_VALUES = {"0": "train", "1": "val", "2": "test", "train": "train", "val": "val", "valid": "val",
                        "validation": "val", "test": "test"}
SPLIT_TARGETS = ("train", "val", "test", "unlabeled", "ignore")
MISSING_LISTED = 3
"""How many missing or unreadable image files an error names before it only counts the rest."""


@dataclass
class FolderTable:
    """The parsed metadata: one entry per kept CSV row."""

    paths: list[str]
    lines: list[int]
    """CSV line number of each row (the header is line 1), for error messages."""
    split: list[str]
    labels: torch.Tensor
    attrs: torch.Tensor
    class_names: list[str]
    attr_names: list[str]


# ----------------------------------------------------------------------------------------------- CSV parsing

def _encode(values: list[str], lines: list[int], names: list[str], column: str, key: str, csv_name: str
            ) -> tuple[torch.Tensor, list[str]]:
    """Map a label or attribute column to indices ``0..K-1`` and value names; see the module docstring."""
    ints: list[int] | None = []
    for v in values:
        try:
            ints.append(int(v))
        except ValueError:
            ints = None
            break
    if ints is not None:
        distinct = set(ints)
        if -1 in distinct and distinct <= {-1, 1}:  # CelebA's attribute convention
            idx = [(v + 1) // 2 for v in ints]
            names = names or [f"not {column}", column]
            k = 2
        else:
            k = len(names) if names else max(distinct) + 1
            for v, line in zip(ints, lines):
                if not 0 <= v < k:
                    expect = f"0..{k - 1} (one per name in {key} = {names})" if names else "0..K-1 or -1/1"
                    raise DebiasError(f"data.metadata: {csv_name} line {line}: column {column!r} has value {v}; "
                                      f"expected {expect}")
            idx = ints
            names = names or [str(i) for i in range(k)]
    else:
        if not names:
            names = sorted(set(values))
        lookup = {n: i for i, n in enumerate(names)}
        idx = []
        for v, line in zip(values, lines):
            if v not in lookup:
                raise DebiasError(f"data.metadata: {csv_name} line {line}: column {column!r} has value {v!r}, "
                                  f"which is not in {key} = {names}")
            idx.append(lookup[v])
    if len(names) < 2:
        raise DebiasError(f"data.metadata: column {column!r} of {csv_name} has the single value {names[0]!r}; "
                          f"expected at least two (set {key} to name them)")
    return torch.tensor(idx, dtype=torch.long), list(names)


def _split_map(cfg: DataCfg) -> dict[str, str]:
    given = dict(getattr(cfg, "split_values", {}) or {})
    for value, target in given.items():
        if target not in SPLIT_TARGETS:
            raise DebiasError(f"data.split_values.{value} = {target!r}: expected one of {list(SPLIT_TARGETS)}")
    return given or DEFAULT_SPLIT_VALUES


def read_metadata(cfg: DataCfg) -> FolderTable:
    """Read and check the metadata CSV: columns present, split values known, labels and attributes valid."""
    problems = folder_problems(cfg.root, cfg.metadata, cfg.columns)
    if problems:
        raise DebiasError(problems[0])
    cols = folder_columns(cfg.columns)
    csv_path = folder_metadata_path(cfg.root, cfg.metadata)
    csv_name = str(csv_path)
    split_map = _split_map(cfg)
    paths, lines, split, labels, attrs = [], [], [], [], []
    unknown: dict[str, int] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, skipinitialspace=True)
            reader.fieldnames = [h.strip() for h in (reader.fieldnames or [])]
            for row in reader:
                line = reader.line_num
                cells = {}
                for role in FOLDER_COLUMNS:
                    value = row.get(cols[role])
                    if value is None or not value.strip():
                        raise DebiasError(f"data.metadata: {csv_name} line {line}: column {cols[role]!r} "
                                          f"({role}) is empty")
                    cells[role] = value.strip()
                target = split_map.get(cells["split"])
                if target is None:
                    unknown.setdefault(cells["split"], line)
                    continue
                if target == "ignore":
                    continue
                paths.append(cells["file"])
                lines.append(line)
                split.append(target)
                labels.append(cells["label"])
                attrs.append(cells["attribute"])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DebiasError(f"data.metadata: {csv_name} cannot be read as CSV: {exc}") from None
    if unknown:
        value, line = next(iter(unknown.items()))
        others = f" (and {len(unknown) - 1} other unknown values)" if len(unknown) > 1 else ""
        raise DebiasError(f"data.metadata: {csv_name} line {line}: column {cols['split']!r} has value {value!r}"
                          f"{others}; expected one of {sorted(split_map)} (map other values with data.split_values, "
                          f"e.g. {{{value} = \"test\"}})")
    if not paths:
        raise DebiasError(f"data.metadata: {csv_name} lists no images")
    y, class_names = _encode(labels, lines, list(cfg.class_names), cols["label"], "data.class_names", csv_name)
    a, attr_names = _encode(attrs, lines, list(cfg.attribute_values), cols["attribute"], "data.attribute_values",
                            csv_name)
    return FolderTable(paths, lines, split, y, a, class_names, attr_names)


# ----------------------------------------------------------------------------------------------- images

def load_image(path: str, size: int) -> torch.Tensor:
    """Decode one image to ``(3, size, size)`` in [0, 1]: shorter side resized (bicubic), centre crop."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that still covers ``size``
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class ImageFileRenderer:
    """Renders the listed image files on access; ``flips`` (optional) mirrors chosen images horizontally."""

    def __init__(self, root: str, paths: list[str], lines: list[int], csv_name: str, size: int,
                 flips: torch.Tensor | None = None):
        self.root, self.paths, self.lines, self.csv_name = root, paths, lines, csv_name
        self.size = size
        self.flips = flips

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(idx), 3, self.size, self.size)
        for j, i in enumerate(idx.tolist()):
            path = self.full_path(i)
            try:
                out[j] = load_image(path, self.size)
            except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError is an OSError
                raise DebiasError(f"data.root: image {path!r} ({self.csv_name} line {self.lines[i]}) cannot be "
                                  f"decoded: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                                  ) from None
        if self.flips is not None:
            sel = self.flips[idx]
            if sel.any():
                out[sel] = out[sel].flip(-1)
        return out


def check_image_files(root: str, paths: list[str], lines: list[int], csv_name: str) -> None:
    """Every listed file exists and PIL recognises it (header only; a full decode happens per batch)."""
    from PIL import Image

    missing, broken = [], []
    for path, line in zip(paths, lines):
        full = os.path.join(root, path)
        try:
            with Image.open(full) as img:
                img.size  # noqa: B018 - the header is parsed on open
        except FileNotFoundError:
            missing.append((full, line))
        except (OSError, ValueError, SyntaxError) as exc:
            broken.append((full, line, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    problems = []
    if missing:
        named = ", ".join(f"{p!r} (line {ln})" for p, ln in missing[:MISSING_LISTED])
        more = f" and {len(missing) - MISSING_LISTED} more" if len(missing) > MISSING_LISTED else ""
        problems.append(f"data.root = {root!r}: {len(missing)} image file(s) listed in {csv_name} not found: "
                        f"{named}{more}; put the images under data.root (paths in the CSV are relative to it)")
    if broken:
        path, line, why = broken[0]
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        problems.append(f"data.root: image {path!r} ({csv_name} line {line}) cannot be decoded: {why}{more}")
    if problems:
        raise DebiasError("; ".join(problems))


# ----------------------------------------------------------------------------------------------- splits

def _cap_per_class(idx: torch.Tensor, labels: torch.Tensor, cap: int, gen: torch.Generator) -> torch.Tensor:
    """At most ``cap`` rows per class (a seeded subsample); ``cap = 0`` keeps everything."""
    if cap <= 0:
        return idx
    keep = []
    for k in labels[idx].unique().tolist():
        rows = idx[labels[idx] == k]
        keep.append(rows[torch.randperm(len(rows), generator=gen)[:cap]])
    return torch.sort(torch.cat(keep)).values


def group_balanced(idx: torch.Tensor, groups: torch.Tensor, n_groups: int, per_group: int | None,
                   gen: torch.Generator) -> torch.Tensor | None:
    """A seeded subsample of ``idx`` with ``per_group`` rows of every group (default: the smallest group's size).

    None when a group has no row: then no subsample can make the attribute independent of the label.
    """
    by_group = [idx[groups[idx] == g] for g in range(n_groups)]
    smallest = min(len(rows) for rows in by_group)
    if smallest == 0:
        return None
    m = smallest if per_group is None else max(1, min(per_group, smallest))
    picked = [rows[torch.randperm(len(rows), generator=gen)[:m]] for rows in by_group]
    out = torch.cat(picked)
    return out[torch.randperm(len(out), generator=gen)]


def load_folder_dataset(cfg: DataCfg, seed: int) -> DatasetBundle:
    """A folder dataset as a :class:`DatasetBundle`; see the module docstring for splits and values."""
    table = read_metadata(cfg)
    csv_name = str(folder_metadata_path(cfg.root, cfg.metadata))
    cols = folder_columns(cfg.columns)
    n_attr = len(table.attr_names)
    n_groups = len(table.class_names) * n_attr
    groups = table.labels * n_attr + table.attrs
    split_of = np.array(table.split)
    gen = torch.Generator().manual_seed(_split_seed(seed, "folder-split"))

    def rows(name: str) -> torch.Tensor:
        return torch.from_numpy(np.nonzero(split_of == name)[0]).long()

    index: dict[str, torch.Tensor] = {}
    for name in ("train", "val", "test"):
        if len(rows(name)) == 0:
            raise DebiasError(f"data.metadata: {csv_name} has no {name} rows (column {cols['split']!r}); "
                              f"expected train, val and test rows")
    index["train"] = _cap_per_class(rows("train"), table.labels, cfg.train_per_class, gen)
    val = rows("val")
    stream = rows("unlabeled")
    f_unl = cfg.split_fractions.get("unlabeled", 0.0)
    if len(stream) == 0 and f_unl > 0:
        smallest = min(int((groups[val] == g).sum()) for g in range(n_groups))
        per_group = min(max(1, int(f_unl * len(val) / n_groups)), smallest // 2)  # val keeps every group
        picked = group_balanced(val, groups, n_groups, per_group, gen) if per_group > 0 else None
        if picked is None:
            names = [f"{c}|{a}" for c in table.class_names for a in table.attr_names]
            small = [names[g] for g in range(n_groups) if int((groups[val] == g).sum()) < 2]
            raise DebiasError(f"data.split_fractions.unlabeled = {f_unl}: the val rows of {csv_name} have fewer than "
                              f"two images of group(s) {small}, so no unlabeled stream with the attribute independent "
                              "of the label can be drawn from them; set data.split_fractions.unlabeled = 0 or map a "
                              "CSV split value to 'unlabeled' in data.split_values")
        stream = picked
        val = val[~torch.isin(val, stream)]
    index["val"] = _cap_per_class(val, table.labels, cfg.test_per_class, gen)
    index["test"] = _cap_per_class(rows("test"), table.labels, cfg.test_per_class, gen)
    shifted = group_balanced(index["test"], groups, n_groups, None, gen)
    if shifted is not None:
        index["shifted"] = shifted
    if len(stream):
        index["unlabeled"] = stream
    used = torch.unique(torch.cat(list(index.values())))
    check_image_files(cfg.root, [table.paths[i] for i in used.tolist()], [table.lines[i] for i in used.tolist()],
                      csv_name)

    def make(name: str, idx: torch.Tensor, flips: torch.Tensor | None) -> tuple[LazyImages, torch.Tensor,
                                                                                   torch.Tensor]:
        sub = idx.tolist()
        renderer = ImageFileRenderer(cfg.root, [table.paths[i] for i in sub], [table.lines[i] for i in sub],
                                     csv_name, cfg.image_size, flips)
        return LazyImages(len(sub), cfg.image_size, renderer), table.labels[idx], table.attrs[idx]

    splits: dict[str, Split] = {}
    for name, idx in index.items():
        if name == "train" and cfg.augment:
            def render(epoch: int, idx=idx):
                g = torch.Generator().manual_seed(_split_seed(seed, "folder-flip", epoch))
                return make("train", idx, torch.rand(len(idx), generator=g) < 0.5)
            images, labels, attrs = render(0)
            splits[name] = LazySplit(name, images, labels, attrs, table.class_names, table.attr_names,
                                     render=render, epoch=0)
        else:
            images, labels, attrs = make(name, idx, None)
            splits[name] = LazySplit(name, images, labels, attrs, table.class_names, table.attr_names)
    unlabeled = splits.pop("unlabeled", None)
    return DatasetBundle(splits=splits, class_names=table.class_names, attr_names=table.attr_names,
                         attribute=cols["attribute"], unlabeled=unlabeled,
                         shift_splits=tuple(s for s in ("test", "shifted") if s in splits))
