"""Recipes: TOML files of plain values, validated into dataclasses, with ``--set key=value`` overrides.

Every field has a default, so a recipe only states what differs. Validation is data-driven: a field's
``metadata`` may carry ``choices`` or a ``range``; an unknown key, a wrong type or an out-of-range value
raises :class:`RecipeError` with a one-line message naming the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.registry import DATASETS, dataset
from .errors import RecipeError, did_you_mean
from .recipe_fields import _choices, _range

if typing.TYPE_CHECKING:  # the method sections' dataclasses, defined in the method modules (imported lazily)
    from .methods.augment import AugmentCfg
    from .methods.concept import ConceptPenaltyCfg
    from .methods.groupdro import GroupDROCfg
    from .methods.jtt import JTTCfg
    from .methods.leace import LeaceCfg


@dataclass
class DataCfg:
    """Which images, which classes and how strongly the spurious attribute follows the label."""

    name: str = field(default="colored_digits", metadata={"choices": DATASETS.keys()})
    """The dataset, by its name in ``debias/data/registry.py`` (docs/DATASETS.md describes each):
    ``colored_digits`` is scikit-learn's bundled digits, coloured (nothing to download)."""
    classes: list[int] = field(default_factory=lambda: [5, 8])
    """Coloured-digit datasets: the digits to classify (two or more of 0..9); class ``k`` is ``classes[k]``."""
    colors: list[str] = field(default_factory=lambda: ["red", "green"])
    """Coloured-digit datasets: two or more palette colours (red, green, blue, yellow, magenta, cyan, orange,
    purple); class ``k`` owns colour ``colors[k mod len(colors)]``. ``world_digits``: with ``color`` in
    ``concepts.spurious``, one per class; otherwise each digit's colour is drawn uniformly from the list."""
    backgrounds: list[str] = field(default_factory=lambda: ["plain"])
    """``world_digits``: backgrounds (``plain``, ``grass``, ``brick``, ``gravel``: photographs bundled with
    scikit-image). With ``background`` in ``concepts.spurious``, one per class (class ``k`` owns ``backgrounds[k]``);
    otherwise each image's background is drawn uniformly from the list (one value: fixed)."""
    markers: list[str] = field(default_factory=lambda: ["none"])
    """``world_digits``: markers in a random corner (``none``, ``square``, ``ring``). With ``marker`` in
    ``concepts.spurious``, one per class; otherwise each image's marker is drawn uniformly from the list."""
    bias: float = field(default=1.0, metadata=_range(0.0, 1.0))
    """Coloured-digit datasets: the probability that an image of the biased splits (train, val, test) has its class's
    own colour; otherwise one of the other colours, uniformly. 1.0: colour and class always agree. ``world_digits``:
    the same for each spurious attribute, drawn independently. Folder datasets do not read it (their images fix
    their own bias)."""
    image_size: int = field(default=32, metadata=_range(8, 1024))
    """Side of the square images in pixels: digits are resized to it, a folder dataset's images resized on their
    shorter side and centre-cropped."""
    augment: bool = True
    """Small random affine jitter (translate, rotate, scale) on every rendered image."""
    split_fractions: dict[str, float] = field(default_factory=lambda: {
        "train": 0.40, "val": 0.10, "test": 0.10, "shifted": 0.10, "swapped": 0.10, "grayscale": 0.10,
        "unlabeled": 0.10,
    })
    """Fractions of each class's base images per split; base images are split first, so no two splits share one.
    Folder datasets read ``unlabeled`` only: the fraction of the val rows that form the unlabeled stream when the CSV
    has no rows mapped to ``unlabeled`` (a seeded draw that reads no label or attribute)."""
    train_copies: int = field(default=4, metadata=_range(1, 1000))
    """Training examples per base image: each copy's colour is drawn once from the seed and kept for the whole run
    (a fixed training set); only its augmentation jitter is drawn again each epoch."""
    eval_copies: int = field(default=4, metadata=_range(1, 1000))
    """Renders of each evaluation base image (fixed by the seed)."""
    unlabeled_copies: int = field(default=16, metadata=_range(1, 1000))
    """Renders of each unlabeled-stream base image (the stream and the ``independent`` probe images)."""
    stream_bias: float | str = "independent"
    """``world_digits``: how the unlabeled stream's spurious attributes follow the label. ``"independent"``: each is
    drawn uniformly, whatever the class; a number in [0.5, 1.0]: each spurious attribute has its class's value with
    this probability (one of the others otherwise), drawn as ``data.bias`` draws the training set's. The stream is
    also the ``independent`` probe images, so they follow it. Other datasets refuse any value but
    ``"independent"``."""
    stream_fraction: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    """``world_digits``: the fraction of the unlabeled stream's base images kept, per class (each class's first
    ones in the seeded order the split is drawn in, so a smaller fraction keeps a subset of a larger one's); 1.0:
    all of ``data.split_fractions.unlabeled``. Other datasets refuse any value but 1.0."""
    root: str = ""
    """Local data folder (MNIST in torchvision layout, or the folder dataset's images)."""
    download: bool = False
    """``colored_mnist``: let torchvision download MNIST into ``root`` (needs internet access); otherwise the files
    must be there already."""
    metadata: str = ""
    """Folder datasets: the metadata CSV, relative to ``root`` unless absolute."""
    columns: dict[str, str] = field(default_factory=dict)
    """Folder datasets: CSV column names for ``file``, ``label``, ``split`` and ``attribute``."""
    split_values: dict[str, str] = field(default_factory=dict)
    """Folder datasets: CSV split value -> train | val | test | unlabeled | ignore (default: 0/1/2, train/val/test).
    ``unlabeled`` rows form the unlabeled stream; their label and attribute cells may be empty."""
    attribute_values: list[str] = field(default_factory=list)
    """Folder datasets: names of the spurious attribute's values (index = value in the CSV)."""
    class_names: list[str] = field(default_factory=list)
    """Folder datasets: names of the classes (index = label value in the CSV); empty: named after the values."""
    train_per_class: int = field(default=0, metadata=_range(0, None))
    """Real datasets: images per class for training (0 = all); the paper uses 5,000."""
    test_per_class: int = field(default=0, metadata=_range(0, None))
    """Real datasets: ``colored_mnist``'s base images per class of every evaluation split (0 = as many as MNIST's
    test set has); a folder dataset's cap on the val and test images per class (0 = all)."""


@dataclass
class ModelCfg:
    """The standalone timm CNN."""

    name: str = "resnet18"
    """A timm model name (any model with ``forward_intermediates``: its stage outputs are the taps)."""
    pretrained: bool = False
    """Start from timm's pretrained weights, read from the local caches (never downloaded: the preflight names a
    missing file); false trains from random weights."""
    checkpoint: str = ""
    """Weights the standalone model starts from, loaded by timm's pretrained loader (which replaces the classifier
    when the class count differs): a local weights file (.safetensors, .pth or .bin) for ``name``, or
    ``digits-world``, the shipped ``resnet10t`` pretrained on the world's renders to predict digit, colour,
    background and marker (``tools/pretrain_backbone.py``; needs ``name = "resnet10t"``; its SHA-256 is checked on
    load). Empty: ``pretrained`` decides."""


@dataclass
class ClipCfg:
    """Which CLIP explains the standalone model."""

    name: str = "digits"
    """``digits`` (the shipped digits CLIP) or an open_clip ResNet config name such as ``RN50-quickgelu``."""
    pretrained: str = ""
    """Weights for an open_clip model: a local file path, or a tag (``openai``) found in the hub cache."""
    cache_dir: str = ""
    """The Hugging Face hub cache folder searched for a ``pretrained`` tag's weights (empty: the default, under
    ``HF_HOME``)."""


@dataclass
class MatchingCfg:
    """How standalone channels are matched to CLIP channels."""

    probe: str = field(default="independent", metadata=_choices("train", "independent"))
    """``train``: the biased training images (what a user has); ``independent``: images whose spurious
    attribute varies independently of the label (the unlabeled stream's base images)."""
    num_images: int = field(default=512, metadata=_range(8, None))
    """Probe images streamed through both models to correlate their channels (at most the probe split's size)."""
    batch_size: int = field(default=128, metadata=_range(1, None))
    """Probe images per forward pass while matching (memory; the matching is the same up to float rounding)."""
    selection: str = field(default="paper", metadata=_choices("paper", "mutual"))
    """``paper``: every CLIP channel takes its best-correlated standalone channel; ``mutual``: only pairs that are
    each other's best, with a correlation of at least ``threshold``."""
    threshold: float = field(default=0.0, metadata=_range(-1.0, 1.0))
    """``mutual`` selection keeps a pair only above this correlation."""
    standalone_taps: list[str] = field(default_factory=list)
    """Standalone taps that may be matched (timm ``feature_info`` module names); empty = all stages."""


@dataclass
class GraftCfg:
    """How matched channels are put into CLIP."""

    mode: str = field(default="swap", metadata=_choices("swap", "stitch"))
    """``swap`` (the paper's surgery): matched CLIP channels replaced by their standalone channels, rescaled to the
    CLIP channel's mean and std; ``stitch``: each grafted stage replaced by a linear map fitted from the standalone
    taps."""
    stages: list[str] = field(default_factory=lambda: ["layer2", "layer3", "layer4"])
    """The CLIP stages grafted: one or more of ``layer1`` .. ``layer4``."""
    unmatched: str = field(default="mean", metadata=_choices("mean", "keep"))
    """CLIP channels without a match in a grafted stage: fixed to their probe mean, or CLIP's own."""
    stitch_ridge: float = field(default=1e-3, metadata=_range(0.0, None))
    """``stitch``: the ridge penalty of the closed-form linear map, relative to the standalone taps' mean variance."""


@dataclass
class ConceptsCfg:
    """Concepts: named caption sets. For coloured digits they follow ``data.classes`` and ``data.colors``."""

    spurious: list[str] = field(default_factory=lambda: ["color"])
    """Concepts the model should not rely on; the ``concept`` method penalises each of them, at the same weight. A
    concept's captions describe the spurious attribute's values, one each."""
    core: list[str] = field(default_factory=lambda: ["digit"])
    """Concepts the model should rely on; their captions describe the classes, one each."""
    color_template: str = "a photo of a {color} digit."
    """Coloured-digit datasets: the ``color`` concept's caption of each ``data.colors`` value (``{color}``)."""
    digit_template: str = "a photo of the digit {word}."
    """Coloured-digit datasets: the ``digit`` concept's caption of each ``data.classes`` value (``{word}``: the
    digit's English word, ``{n}``: the digit)."""
    background_template: str = "a photo of a digit on {background}."
    """``world_digits``: the ``background`` concept's caption of each ``data.backgrounds`` value (``{background}``)."""
    marker_template: str = "a photo of a digit with {marker}."
    """``world_digits``: the ``marker`` concept's caption of each ``data.markers`` value (``{marker}``: ``no
    marker``, ``a small square``, ``a small ring``)."""
    captions: dict[str, list[str]] = field(default_factory=dict)
    """Explicit captions per concept (one per attribute value, in order); overrides the templates."""


@dataclass
class ExplainCfg:
    """The explanation: concept scores of the grafted model and the random-matching control."""

    split: str = "shifted"
    """Images the scores are computed on; the spurious attribute must vary independently of the label."""
    control_draws: int = field(default=5, metadata=_range(0, 100))
    """Random matchings (as many channels swapped as the real matching, chosen at random) scored as the control
    (0 = none)."""
    num_images: int = field(default=0, metadata=_range(0, None))
    """Score at most this many images of the split (0: all)."""


@dataclass
class TrainCfg:
    """The training run: method, budget, optimizer and where it runs."""

    method: str = "erm"
    """The training method: ``erm`` (plain cross-entropy) or a debiasing method by name (``concept``, ``groupdro``,
    ``jtt``, ``reweight``, ``augment``, ``leace``); a method's own settings are its section (``[concept]``, ``[jtt]``, ...)."""
    epochs: int = field(default=8, metadata=_range(1, 100000))
    """Passes over the training split (JTT's ``retrain`` adds its identification epochs before them)."""
    batch_size: int = field(default=64, metadata=_range(2, None))
    """At least 2: BatchNorm cannot train on one image."""
    lr: float = field(default=1e-3, metadata=_range(0.0, None, lo_open=True))
    """AdamW's peak learning rate."""
    weight_decay: float = field(default=1e-4, metadata=_range(0.0, None))
    """AdamW's decoupled weight decay."""
    label_smoothing: float = field(default=0.0, metadata=_range(0.0, 1.0))
    """Label smoothing of the task loss on labelled images, every method (torch's ``cross_entropy``)."""
    warmup_epochs: float = field(default=0.5, metadata=_range(0.0, None))
    """Epochs of linear learning-rate warmup, after which the rate follows a cosine to zero at the last step."""
    device: str = "auto"
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun, ``auto`` and
    ``cuda`` give each process ``cuda:LOCAL_RANK``, ``cpu`` runs every process on the CPU."""
    num_workers: int = field(default=0, metadata=_range(0, 64))
    """DataLoader worker processes for the training split (0: batches are made in the training process)."""
    log_every: int = field(default=10, metadata=_range(1, None))
    """Write the loss terms and the learning rate to TensorBoard every N steps."""
    precision: str = field(default="fp32", metadata=_choices("fp32", "bf16", "fp16"))
    """Autocast precision for the training step, the graft included (fp16 adds a gradient scaler on CUDA)."""
    channels_last: bool = False
    """Channels-last memory format for the standalone model and its inputs (faster convolutions on GPUs)."""
    skip_nonfinite: bool = False
    """Skip batches whose loss is not finite (counted in TensorBoard) instead of stopping the run."""
    sync_batchnorm: bool | str = field(default="auto", metadata=_choices("auto", True, False))
    """Several processes (torchrun): normalise BatchNorm layers with the statistics of the global batch (timm's
    ``convert_sync_batchnorm``, torch's ``SyncBatchNorm``, CUDA only). ``auto``: on when the processes train on
    CUDA; on the CPU each process normalises with its own share of each batch (the run says so). ``true`` on the
    CPU is refused; ``false``: per process everywhere. One process: nothing to synchronise."""


def _method_section(name: str) -> Any:
    """The default factory of method ``name``'s section (``[name]``): its dataclass lives in the method's module
    (:mod:`debias.methods`), imported through the registry when a recipe is built, not when this module is."""
    def make() -> Any:
        from .methods import config_class

        return config_class(name)()

    return field(default_factory=make)


def _method_section_classes() -> dict[str, type]:
    """The method sections' dataclasses by class name (what ``Recipe``'s annotations name)."""
    from .methods import config_classes

    return {cls.__name__: cls for cls in config_classes().values()}


def __getattr__(name: str) -> Any:
    """``ConceptPenaltyCfg``, ``GroupDROCfg``, ``JTTCfg``, ``AugmentCfg``, ``LeaceCfg``: the method sections, from their modules."""
    classes = _method_section_classes() if name.endswith("Cfg") else {}
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class SelectionCfg:
    """Checkpoint selection rules evaluated every epoch (metrics.json records each rule's pick)."""

    track_concepts: bool = True
    """Compute the concept dominance during training (needed by the ``dominance`` rule)."""
    track_every: int = field(default=4, metadata=_range(1, None))
    """With ``track_concepts``: match the model to CLIP and score the concept dominance after every N-th epoch and
    after the last one (the ``dominance`` rule picks among those epochs). One tracking costs about two forward passes
    of the model over ``concept_images`` images, which on a small dataset is as much as an epoch's training; 1 tracks
    every epoch."""
    split: str = "val"
    """Split for validation accuracy and worst-group accuracy."""
    concept_split: str = "probe"
    """Images the per-epoch dominance is scored on: ``probe`` (the matching's probe images: with
    ``matching.probe = 'independent'`` unlabeled images whose colour varies independently, no labels used) or a
    split name. On biased validation images colour and class coincide and the score cannot tell them apart."""
    concept_images: int = field(default=512, metadata=_range(8, None))
    """Images scored per epoch."""
    oracle_split: str = "auto"
    """Split whose accuracy is recorded every epoch for reporting only, never to pick a checkpoint: the oracle
    (best accuracy under shift over the epochs) that the selection rules are compared with. ``auto``: ``shifted``
    where the dataset has it, else none; ``""``: none; or a split name."""


@dataclass
class Recipe:
    seed: int = field(default=0, metadata=_range(0, 2**32 - 1))
    """Seeds every random draw of a run: the data's splits, colours and jitter, the model's initial weights, the
    batch order."""
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    clip: ClipCfg = field(default_factory=ClipCfg)
    matching: MatchingCfg = field(default_factory=MatchingCfg)
    graft: GraftCfg = field(default_factory=GraftCfg)
    concepts: ConceptsCfg = field(default_factory=ConceptsCfg)
    explain: ExplainCfg = field(default_factory=ExplainCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    # the methods' sections: each dataclass is defined in its method's module (debias/methods/<name>.py)
    concept: ConceptPenaltyCfg = _method_section("concept")
    groupdro: GroupDROCfg = _method_section("groupdro")
    jtt: JTTCfg = _method_section("jtt")
    augment: AugmentCfg = _method_section("augment")
    leace: LeaceCfg = _method_section("leace")
    selection: SelectionCfg = field(default_factory=SelectionCfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- validation

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a table of {_type_name(typing.get_args(tp)[1])}"
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(arm) for arm in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    expected = _type_name(tp)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key} = {value!r}: expected {expected}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key} = {value!r}: expected {expected}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if isinstance(tp, types.UnionType):  # a value of any one of the arms (bool | str: true, false or a word)
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except RecipeError:
                pass
        raise RecipeError(f"{key} = {value!r}: expected {expected}")
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key} = {value!r}: expected {expected}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key} = {value!r}: expected {expected}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key} = {value!r}: expected {expected}")
        if not math.isfinite(value):
            raise RecipeError(f"{key} = {value!r}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key} = {value!r}: expected {expected}")
        return value
    raise TypeError(f"unsupported recipe field type {tp!r} for {key}")


def _check_meta(key: str, value: Any, meta: typing.Mapping) -> None:
    if "choices" in meta and value not in meta["choices"]:
        choices = meta["choices"]
        words = [c for c in choices if isinstance(c, str)]
        shown = str(list(choices)) if len(words) == len(choices) else (  # true/false written as in TOML
            "[" + ", ".join(repr(c) if isinstance(c, str) else str(c).lower() for c in choices) + "]")
        raise RecipeError(f"{key} = {value!r}: expected one of {shown}{did_you_mean(str(value), words)}")
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
        if bad_lo or (hi is not None and value > hi):
            lo_s = "-inf" if lo is None else lo
            hi_s = "inf" if hi is None else hi
            raise RecipeError(f"{key} = {value!r}: expected a value in {'(' if lo_open else '['}{lo_s}, {hi_s}]")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls, localns=_method_section_classes() if cls is Recipe else None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    retired = getattr(cls, "RETIRED", {})
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields and key in retired:  # a removed key: only at the value every run now trains with
            if value != retired[key]:
                raise RecipeError(f"{full} = {value!r}: this key was removed from the recipe; only "
                                  f"{_toml_value(retired[key])} (what every run now does) is accepted")
            continue
        if key not in fields:
            raise RecipeError(f"unknown recipe key {full!r}{did_you_mean(key, fields)}; "
                              f"valid keys here: {sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{full} = {value!r}: expected a table [{full}]")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
            if typing.get_origin(tp) is dict and fields[key].default_factory is not dataclasses.MISSING:
                kwargs[key] = {**fields[key].default_factory(), **kwargs[key]}  # tables extend their defaults
            _check_meta(full, kwargs[key], fields[key].metadata)
    return cls(**kwargs)


STREAM_KEYS = ("stream_bias", "stream_fraction")
"""``[data]`` keys that shape the unlabeled stream: a dataset reads those its module lists in ``STREAM_KEYS``
(``world_digits`` reads both) and refuses any other value than the default for the rest."""


def _check_stream_keys(d: DataCfg, data: Any) -> None:
    """``data.stream_bias``'s value, and every stream key left at its default for a dataset that does not read it."""
    if isinstance(d.stream_bias, str) and d.stream_bias != "independent":
        raise RecipeError(f"data.stream_bias = {d.stream_bias!r}: expected \"independent\" or a number in [0.5, 1.0]")
    if isinstance(d.stream_bias, float) and not 0.5 <= d.stream_bias <= 1.0:
        raise RecipeError(f"data.stream_bias = {d.stream_bias!r}: expected a value in [0.5, 1.0] (the probability "
                          "that a stream image's spurious attribute is its class's), or \"independent\"")
    reads = getattr(data, "STREAM_KEYS", ())
    for f in dataclasses.fields(DataCfg):
        if f.name in STREAM_KEYS and f.name not in reads and getattr(d, f.name) != f.default:
            readers = [name for name in DATASETS if f.name in getattr(dataset(name), "STREAM_KEYS", ())]
            raise RecipeError(f"data.{f.name} = {_toml_value(getattr(d, f.name))}: data.name = {d.name!r} does not "
                              f"read it (read by: {', '.join(readers)}); expected {_toml_value(f.default)} or no "
                              "such key")


def _validate_cross(recipe: Recipe) -> None:
    """Checks that involve several keys."""
    d = recipe.data
    data = dataset(d.name)
    _check_stream_keys(d, data)
    data.validate(d, recipe.concepts)
    c = recipe.concepts
    for name, caps in c.captions.items():
        if not caps:
            raise RecipeError(f"concepts.captions.{name} = []: expected at least two captions")
        if len(caps) < 2:
            raise RecipeError(f"concepts.captions.{name} = {caps!r}: expected at least two captions")
        if any(not s.strip() for s in caps):
            raise RecipeError(f"concepts.captions.{name} = {caps!r}: expected non-empty captions")
    if not c.spurious and not c.core:
        raise RecipeError("concepts.spurious = [] and concepts.core = []: expected at least one concept to score")
    for key, placeholder, values in (("color_template", "color", {"color": "red"}),
                                     ("digit_template", "word", {"word": "five", "n": 5}),
                                     ("background_template", "background", {"background": "grass"}),
                                     ("marker_template", "marker", {"marker": "a small square"})):
        template = getattr(c, key)
        try:
            filled = template.format(**values)
        except (KeyError, IndexError, ValueError) as exc:
            raise RecipeError(f"concepts.{key} = {template!r}: not a caption template ({type(exc).__name__}: {exc}); "
                              f"expected text with {{{placeholder}}}"
                              + (" (or {n}, the digit)" if placeholder == "word" else "")) from None
        if filled == template:
            raise RecipeError(f"concepts.{key} = {template!r}: no placeholder, so every caption would be the same; "
                              f"expected text with {{{placeholder}}}")
    names = set(c.captions) | set(data.builtin_concepts(d, c))
    for role in ("spurious", "core"):
        for name in getattr(c, role):
            if name not in names:
                raise RecipeError(f"concepts.{role} = {getattr(c, role)!r}: concept {name!r} is not defined; "
                                  f"defined concepts: {sorted(names)}{did_you_mean(name, names)}")
    for name, caps in c.captions.items():
        if len(set(caps)) != len(caps):
            raise RecipeError(f"concepts.captions.{name} = {caps!r}: expected distinct captions")
    if set(c.spurious) & set(c.core):
        raise RecipeError(f"concepts: {sorted(set(c.spurious) & set(c.core))} marked both spurious and core")
    for stage in recipe.graft.stages:
        if stage not in ("layer1", "layer2", "layer3", "layer4"):
            raise RecipeError(f"graft.stages = {recipe.graft.stages!r}: {stage!r} is not a CLIP stage; expected "
                              f"some of ['layer1', 'layer2', 'layer3', 'layer4']{did_you_mean(stage, ['layer1', 'layer2', 'layer3', 'layer4'])}")
    from .methods import validate as validate_methods

    validate_methods(recipe)  # train.method, and each method's checks of its own section
    if not recipe.graft.stages:
        raise RecipeError("graft.stages = []: expected at least one CLIP stage")
    if len(set(recipe.graft.stages)) != len(recipe.graft.stages):
        raise RecipeError(f"graft.stages = {recipe.graft.stages!r}: expected distinct stages")


def retired_keys() -> dict[str, Any]:
    """``{"section.key": value}`` for the keys removed from the recipe, each with the value every run now trains
    with (a section's ``RETIRED``): a saved recipe or ``metrics.json`` holding one at that value is this recipe."""
    defaults = Recipe()
    return {f"{f.name}.{key}": value for f in dataclasses.fields(Recipe)
            for key, value in getattr(type(getattr(defaults, f.name)), "RETIRED", {}).items()}


def recipe_differences(run_dir: str | Path, recipe: Recipe) -> list[str]:
    """The keys whose values differ between a run directory's ``recipe.toml`` and ``recipe`` (empty: the same
    recipe, or no ``recipe.toml`` to compare with). A key the saved file lacks (written before the key existed)
    counts as its default."""
    saved = Path(run_dir) / "recipe.toml"
    if not saved.exists():
        return []
    before, now = flatten_recipe(load_recipe(saved).to_dict()), flatten_recipe(recipe.to_dict())
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def require_same_recipe(run_dir: str | Path, recipe: Recipe, where: str = "", finished: bool = True,
                        remedy: str = "use another --out") -> None:
    """Refuse a run directory whose ``recipe.toml`` differs from ``recipe``: its finished results (or, with
    ``finished = False``, its resume state) are not this recipe's. ``where`` names the directory in the message."""
    diff = recipe_differences(run_dir, recipe)
    if diff:
        raise RecipeError(f"{where or run_dir} holds {'a finished' if finished else 'an unfinished'} run of a "
                          f"different recipe (differs in {', '.join(diff[:5])}); {remedy}")


def flatten_recipe(tree: dict[str, Any]) -> dict[str, Any]:
    """A recipe as a dict (``Recipe.to_dict()``, or metrics.json's ``recipe``) keyed by dotted names:
    ``{"seed": 0, "train.epochs": 16, "data.split_fractions": {...}, ...}``; a field holding a table stays one value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # a section
            flat.update({f"{key}.{field_name}": v for field_name, v in value.items()})
        else:
            flat[key] = value
    return flat


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    recipe = _build(Recipe, raw, "")
    _validate_cross(recipe)
    return recipe


# ----------------------------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[list[str], Any]:
    """``data.bias=0.5`` -> (['data', 'bias'], 0.5). Values are TOML literals; a bare word is a string."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key=value, e.g. --set data.bias=0.5")
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: expected a dotted key such as data.bias")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        stripped = value_text.strip()
        if stripped and all(ch.isalnum() or ch in "-_./:" for ch in stripped) and not stripped[0].isdigit():
            value = stripped  # a bare word such as resnet18 or RN50-quickgelu
        else:
            raise RecipeError(f"--set {text!r}: {value_text.strip()!r} is not a TOML value "
                              "(quote strings, e.g. 'data.colors=[\"blue\", \"yellow\"]')") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part!r} is a value, not a table")
            node = child
        node[path[-1]] = value
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply ``--set`` overrides and validate. Errors name the file, line, key or value."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    if not path.is_file():
        raise RecipeError(f"recipe path {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe file {str(path)!r} is not valid TOML: {exc}") from None
    raw = apply_overrides(raw, overrides or [])
    try:
        return recipe_from_dict(raw)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------------------------- writing

_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # a TOML basic string: quotes, backslashes and control characters escaped
        return '"' + "".join(_TOML_ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                             for ch in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML: every key, defaults included, so the run can be repeated from it alone."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    for key, value in recipe.to_dict().items():
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(recipe, key)):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"

