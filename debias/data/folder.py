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
- the **unlabeled stream** (the concept penalty's images, the ``independent`` matching probe, the images
  ``selection.concept_split = 'probe'`` scores): rows whose split value maps to ``unlabeled``; otherwise, when
  ``data.split_fractions.unlabeled > 0``, that fraction of the CSV's val rows, a seeded draw of row positions,
  removed from ``val``. Either way the rows are chosen, and put in a seeded order, without reading a label or an
  attribute: no group label decides which images form the stream. The label and attribute cells of
  ``unlabeled`` rows are not required (they may be empty) and never checked; where they name a known value they
  are kept (else -1) for reporting only (``metrics.json``'s ``stream`` entry, the oracle ``concept.source =
  'labels'``). Group labels are read for train, val and test rows only.

Images are decoded with PIL when a batch is drawn (never all at once): JPEG draft decoding, shorter side resized
(bicubic) to ``data.image_size`` and centre-cropped. ``data.augment`` adds a seeded random horizontal flip to
training images, fresh each epoch (the examples and their attributes are the CSV's, fixed); evaluation images are
never jittered and ``*_copies`` do not apply here.

As a dataset plugin (:mod:`debias.data.registry`) the module checks ``data.split_fractions.unlabeled``
(:func:`validate`), names a missing root, CSV or CSV column before anything is loaded (:func:`missing_inputs`, the
same checks the loader starts with) and has no built-in concepts: the recipe's ``concepts.captions`` define them.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import DebiasError, RecipeError
from .lazy import LazyImages, LazySplit
from .splits import DatasetBundle, Split, split_seed

if TYPE_CHECKING:
    from ..recipe import ConceptsCfg, DataCfg

DEFAULT_SPLIT_VALUES = {"0": "train", "1": "val", "2": "test", "train": "train", "val": "val", "valid": "val",
                        "validation": "val", "test": "test"}
SPLIT_TARGETS = ("train", "val", "test", "unlabeled", "ignore")
MISSING_LISTED = 3
"""How many missing or unreadable image files an error names before it only counts the rest."""
FOLDER_COLUMNS = ("file", "label", "split", "attribute")
"""Roles a folder dataset's metadata CSV must provide, and their Waterbirds column names by default."""
FOLDER_DEFAULT_COLUMNS = {"file": "img_filename", "label": "y", "split": "split", "attribute": "place"}


# ----------------------------------------------------------------------------------------------- plugin surface

SETTING_KEYS: tuple[str, ...] = ()
"""``[data]`` keys that name a run's setting in ``debias compare`` tables: none (the images fix their own bias)."""


def validate(cfg: DataCfg, concepts: ConceptsCfg | None = None) -> None:
    """The ``[data]`` checks a folder dataset makes before reading anything: the stream's fraction of val."""
    stream_fraction(cfg)


def missing_inputs(cfg: DataCfg) -> list[str]:
    """A missing root or CSV, or CSV columns absent from its header (the images are checked when loading)."""
    return folder_problems(cfg.root, cfg.metadata, cfg.columns)


def builtin_concepts(cfg: DataCfg, concepts: ConceptsCfg) -> dict[str, tuple[list[str], str]]:
    """None: a folder dataset's concepts are the recipe's ``concepts.captions``."""
    return {}


# ----------------------------------------------------------------------------------------------- metadata checks

def folder_columns(columns: dict[str, str]) -> dict[str, str]:
    """The recipe's ``data.columns`` over the Waterbirds defaults (``img_filename, y, split, place``)."""
    return {**FOLDER_DEFAULT_COLUMNS, **columns}


def folder_metadata_path(root: str, metadata: str) -> Path:
    """``data.metadata`` resolved against ``data.root`` (an absolute path stays as it is)."""
    path = Path(metadata or "metadata.csv")
    return path if path.is_absolute() else Path(root) / path


def folder_problems(root: str, metadata: str, columns: dict[str, str]) -> list[str]:
    """Missing root, missing CSV, or CSV columns absent from its header: what can be checked without the images."""
    if not root:
        return ["data.root is not set: a folder dataset needs the folder holding its images and metadata CSV"]
    if not Path(root).is_dir():
        return [f"data.root = {root!r}: folder not found; give the folder that holds the dataset's images "
                f"(image paths in the CSV are relative to it)"]
    csv_path = folder_metadata_path(root, metadata)
    if not csv_path.is_file():
        return [f"data.metadata = {metadata or 'metadata.csv'!r}: file {str(csv_path)!r} not found; put the metadata "
                f"CSV there or set data.metadata (relative to data.root, or absolute)"]
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [f"data.metadata: {str(csv_path)!r} cannot be read as CSV: {exc}"]
    header = [h.strip() for h in header]
    cols = folder_columns(columns)
    absent = [f"{role}={name!r}" for role, name in cols.items() if role in FOLDER_COLUMNS and name not in header]
    if absent:
        return [f"data.columns: {str(csv_path)!r} has no column {', '.join(absent)}; its columns are {header}; "
                "set data.columns = {file=..., label=..., split=..., attribute=...}"]
    return []


@dataclass
class FolderTable:
    """The parsed metadata: one entry per kept CSV row."""

    paths: list[str]
    lines: list[int]
    """CSV line number of each row (the header is line 1), for error messages."""
    split: list[str]
    labels: torch.Tensor
    attrs: torch.Tensor
    """Indices; on ``unlabeled`` rows -1 where the cell is empty or not a known value (reporting only)."""
    class_names: list[str]
    attr_names: list[str]


# ----------------------------------------------------------------------------------------------- CSV parsing

def _encode(values: list[str], lines: list[int], names: list[str], column: str, key: str, csv_name: str
            ) -> tuple[torch.Tensor, list[str], Callable[[str], int]]:
    """Map a label or attribute column to indices ``0..K-1`` and value names; see the module docstring.

    Also returns ``lookup``: a cell -> its index under the same coding, or -1 for anything else (an empty or
    unknown cell). It never raises: it reads the unlabeled rows' cells, for reporting only."""
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
            coded = {"-1": 0, "1": 1}
        else:
            k = len(names) if names else max(distinct) + 1
            for v, line in zip(ints, lines):
                if not 0 <= v < k:
                    expect = f"0..{k - 1} (one per name in {key} = {names})" if names else "0..K-1 or -1/1"
                    raise DebiasError(f"data.metadata: {csv_name} line {line}: column {column!r} has value {v}; "
                                      f"expected {expect}")
            idx = ints
            names = names or [str(i) for i in range(k)]
            coded = {str(i): i for i in range(k)}
    else:
        if not names:
            names = sorted(set(values))
        coded = {n: i for i, n in enumerate(names)}
        idx = []
        for v, line in zip(values, lines):
            if v not in coded:
                raise DebiasError(f"data.metadata: {csv_name} line {line}: column {column!r} has value {v!r}, "
                                  f"which is not in {key} = {names}")
            idx.append(coded[v])
    if len(names) < 2:
        raise DebiasError(f"data.metadata: column {column!r} of {csv_name} has the single value {names[0]!r}; "
                          f"expected at least two (set {key} to name them)")
    numeric = ints is not None

    def lookup(cell: str) -> int:
        if numeric:
            try:
                cell = str(int(cell))
            except ValueError:
                return -1
        return coded.get(cell, -1)

    return torch.tensor(idx, dtype=torch.long), list(names), lookup


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

                def cell(role: str) -> str:
                    value = row.get(cols[role])
                    if value is None or not value.strip():
                        raise DebiasError(f"data.metadata: {csv_name} line {line}: column {cols[role]!r} "
                                          f"({role}) is empty")
                    return value.strip()

                value = cell("split")
                target = split_map.get(value)
                if target is None:
                    unknown.setdefault(value, line)
                    continue
                if target == "ignore":
                    continue
                paths.append(cell("file"))
                lines.append(line)
                split.append(target)
                if target == "unlabeled":  # never required, never checked: kept for reporting where they parse
                    labels.append((row.get(cols["label"]) or "").strip())
                    attrs.append((row.get(cols["attribute"]) or "").strip())
                else:
                    labels.append(cell("label"))
                    attrs.append(cell("attribute"))
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
    for name in ("train", "val", "test"):
        if name not in split:
            raise DebiasError(f"data.metadata: {csv_name} has no {name} rows (column {cols['split']!r}); "
                              f"expected train, val and test rows")
    labelled = [i for i, name in enumerate(split) if name != "unlabeled"]
    stream = [i for i, name in enumerate(split) if name == "unlabeled"]
    y = torch.full((len(paths),), -1, dtype=torch.long)
    a = torch.full((len(paths),), -1, dtype=torch.long)
    y[labelled], class_names, label_of = _encode([labels[i] for i in labelled], [lines[i] for i in labelled],
                                                 list(cfg.class_names), cols["label"], "data.class_names", csv_name)
    a[labelled], attr_names, attr_of = _encode([attrs[i] for i in labelled], [lines[i] for i in labelled],
                                               list(cfg.attribute_values), cols["attribute"],
                                               "data.attribute_values", csv_name)
    if stream:  # the unlabeled rows' cells, for reporting only: -1 where empty or not a known value
        y[stream] = torch.tensor([label_of(labels[i]) for i in stream], dtype=torch.long)
        a[stream] = torch.tensor([attr_of(attrs[i]) for i in stream], dtype=torch.long)
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


def stream_fraction(cfg: DataCfg) -> float:
    """``data.split_fractions.unlabeled`` checked for a folder dataset: the fraction of the val rows that form the
    unlabeled stream when the CSV has no ``unlabeled`` rows."""
    f = cfg.split_fractions.get("unlabeled", 0.0)
    if not 0.0 <= f < 1.0:
        raise RecipeError(f"data.split_fractions.unlabeled = {f!r}: expected a fraction of the val rows in [0, 1) "
                          "(folder datasets draw the unlabeled stream from val when the CSV has no rows mapped to "
                          "'unlabeled'; 0 = no stream)")
    return f


def unlabeled_stream(val: torch.Tensor, marked: torch.Tensor, fraction: float, seed: int, csv_name: str
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The val rows that stay in val, and the unlabeled stream's rows (None: no stream), in a seeded order.

    Only row positions and the seed decide it, never a label or an attribute: the rows mapped to ``unlabeled``
    (``marked``) when there are any, else ``fraction`` of the val rows (at least one; val keeps at least one).
    """
    gen = torch.Generator().manual_seed(split_seed(seed, "folder-unlabeled"))
    if len(marked):
        return val, marked[torch.randperm(len(marked), generator=gen)]
    if fraction <= 0:
        return val, None
    n = max(1, round(fraction * len(val)))
    if n >= len(val):
        raise DebiasError(f"data.split_fractions.unlabeled = {fraction!r}: {n} of the {len(val)} val rows of "
                          f"{csv_name} would form the unlabeled stream, leaving none for validation; lower it or map "
                          "a CSV split value to 'unlabeled' in data.split_values")
    order = torch.randperm(len(val), generator=gen)
    return torch.sort(val[order[n:]]).values, val[order[:n]]


def load(cfg: DataCfg, seed: int, concepts: ConceptsCfg | None = None) -> DatasetBundle:
    """A folder dataset as a :class:`DatasetBundle`; see the module docstring for splits and values."""
    table = read_metadata(cfg)
    csv_name = str(folder_metadata_path(cfg.root, cfg.metadata))
    cols = folder_columns(cfg.columns)
    n_attr = len(table.attr_names)
    n_groups = len(table.class_names) * n_attr
    groups = table.labels * n_attr + table.attrs
    split_of = np.array(table.split)
    gen = torch.Generator().manual_seed(split_seed(seed, "folder-split"))

    def rows(name: str) -> torch.Tensor:
        return torch.from_numpy(np.nonzero(split_of == name)[0]).long()

    index: dict[str, torch.Tensor] = {"train": _cap_per_class(rows("train"), table.labels, cfg.train_per_class, gen)}
    val, stream = unlabeled_stream(rows("val"), rows("unlabeled"), stream_fraction(cfg), seed, csv_name)
    index["val"] = _cap_per_class(val, table.labels, cfg.test_per_class, gen)
    index["test"] = _cap_per_class(rows("test"), table.labels, cfg.test_per_class, gen)
    shifted = group_balanced(index["test"], groups, n_groups, None, gen)
    if shifted is not None:
        index["shifted"] = shifted
    if stream is not None:
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
                g = torch.Generator().manual_seed(split_seed(seed, "folder-flip", epoch))
                return make("train", idx, torch.rand(len(idx), generator=g) < 0.5)
            images, labels, attrs = render(0)
            splits[name] = LazySplit(name, images, labels, attrs, table.class_names, table.attr_names,
                                     render=render, epoch=0, render_plain=lambda idx=idx: make("train", idx, None))
        else:
            images, labels, attrs = make(name, idx, None)
            splits[name] = LazySplit(name, images, labels, attrs, table.class_names, table.attr_names)
    unlabeled = splits.pop("unlabeled", None)
    return DatasetBundle(splits=splits, class_names=table.class_names, attr_names=table.attr_names,
                         attribute=cols["attribute"], unlabeled=unlabeled,
                         shift_splits=tuple(s for s in ("test", "shifted") if s in splits))
