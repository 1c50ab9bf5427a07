"""The "digits CLIP": a small open_clip CLIP trained by the project, the offline default CLIP model.

What it is
    An open_clip ``CLIP`` with a ``ModifiedResNet`` image tower (``patch_size`` null in the config) at 32 px and a
    small causal text transformer, built through open_clip's own config mechanism (``local-dir:`` schema) and
    tokenised with open_clip's bundled BPE ``SimpleTokenizer`` (vocabulary 49,408, works offline). It is trained
    (:mod:`debias.models.digits_clip_train`, ``python tools/train_digits_clip.py``) on a captioned corpus of the world
    of nuisances (:mod:`debias.data.world`: coloured digits over plain or photographed backgrounds, with or without a
    corner marker), so that the whole project can graft, explain and debias CNNs without downloading any CLIP.
    It reads four concepts zero-shot, each with its own single-attribute probe (:data:`PROBES`): ``color`` (8-way),
    ``digit`` (10-way), ``background`` (4-way) and ``marker`` (3-way).

This module: loading and using the shipped model
    Config (:data:`DIGITS_CLIP_CFG`), checksum-verified loading (:func:`load_digits_clip`), the encode helpers of
    :class:`DigitsClip`, the vocabulary guard (:class:`VocabularyTokenizer`) and zero-shot evaluation on the
    evaluation pool (:func:`zero_shot_world`, :func:`evaluation_images`). Training lives in
    :mod:`debias.models.digits_clip_train`.

Why the token embedding is stored compactly, and why unknown words are refused
    ``vocab_size`` stays 49,408 so that open_clip's stock tokenizer works unchanged, but the full token embedding
    alone would take 49,408 x width x 4 bytes (25 MB at width 128), and the corpus uses only a few dozen tokens:
    every other row never receives a gradient and carries no information. Training therefore runs with a compact
    ``nn.Embedding`` over the corpus vocabulary, and the weights file stores just those rows
    (``token_embedding.rows``) plus their token ids (``token_embedding.index``). On load the full 49,408-row matrix
    is rebuilt with the unused rows set to zero and loaded strictly into the model that
    ``open_clip.create_model("local-dir:<folder>", load_weights=False)`` builds from the shipped
    ``open_clip_config.json``. A word outside the corpus vocabulary would embed to zero and silently mean nothing,
    so the loaded model's tokenizer (:class:`VocabularyTokenizer`) refuses any caption with such a word
    (:class:`debias.errors.DebiasError` naming the word, the caption and the known words). ``load_weights=False``
    is needed because open_clip's own loader would try to load the compact file strictly and fail.

Use
    ``clip = load_digits_clip()`` gives a :class:`DigitsClip`: ``clip.model`` (open_clip ``CLIP``, eval, frozen),
    ``clip.tokenizer``, ``clip.mean`` / ``clip.std`` / ``clip.image_size``, and helpers ``clip.encode_images(rgb01)``
    and ``clip.encode_texts(captions)`` that return L2-normalised embeddings.

Shipped folder (``debias/models/assets/digits_clip/``)
    ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg`` with the normalisation mean/std),
    ``digits_clip.safetensors`` (fp32 weights, compact token embedding), ``digits_clip.safetensors.sha256``
    (checked on every load) and ``training.json`` (zero-shot figures, steps, seed, wall time).
    Regenerate it with ``python tools/train_digits_clip.py``.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from debias.data import world
from debias.data.base_pool import EVAL_FRACTION, POOL_SEED, base_pools, evaluation_pool
from debias.data.colors import DIGIT_WORDS, PALETTE, colorize
from debias.data.digits_base import load_base_digits
from debias.errors import DebiasError
from debias.models.hub import sha256_of

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "digits_clip"
"""The shipped model folder (open_clip ``local-dir:`` format)."""
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "digits_clip.safetensors"
CHECKSUM_FILE = WEIGHTS_FILE + ".sha256"
TRAINING_FILE = "training.json"
REGENERATE_HINT = "regenerate with python tools/train_digits_clip.py"

IMAGE_SIZE = 32
CONTEXT_LENGTH = 24

DIGITS_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}
"""open_clip model config (the shape of open_clip's ``model_configs/*.json``). ``patch_size`` null selects
open_clip's ``ModifiedResNet`` (CLIP's RN50 design: 3-conv stem, anti-aliased bottlenecks, attention pooling) with
widths 16-32-64-128 (x4 expansion, 512 channels into the attention pool) at 32 px."""

SPLIT_SEED = POOL_SEED
"""Seed of the fixed pretraining / evaluation partition of the base images (:mod:`debias.data.base_pool`)."""
HELDOUT_FRACTION = EVAL_FRACTION

COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)

BACKGROUND_WORDS = world.BACKGROUND_WORDS
"""How captions name each background of :data:`debias.data.world.BACKGROUNDS` (after ``on``)."""
MARKER_WORDS = world.MARKER_WORDS
"""How captions name each marker of :data:`debias.data.world.MARKERS` (after ``with``)."""

COLOR_PROBE = "a photo of a {color} digit."
"""Colour-only concept probe, used for the 8-way colour zero-shot figure."""
DIGIT_PROBE = "a photo of the digit {word}."
"""Digit-only concept probe, used for the 10-way digit zero-shot figure."""
DIGIT_VALUE_PROBE = "a photo of a digit with the value {n}."
"""Digit-only concept probe in the paper's wording; reported as ``digit_value``."""
BACKGROUND_PROBE = "a photo of a digit on {background}."
"""Background-only probe (``{background}`` from :data:`BACKGROUND_WORDS`): "a photo of a digit on grass."."""
MARKER_PROBE = "a photo of a digit with {marker}."
"""Marker-only probe (``{marker}`` from :data:`MARKER_WORDS`): "a photo of a digit with a small square."."""
PROBES: dict[str, str] = {"color": COLOR_PROBE, "digit": DIGIT_PROBE, "digit_value": DIGIT_VALUE_PROBE,
                          "background": BACKGROUND_PROBE, "marker": MARKER_PROBE}


def probe_captions(concept: str) -> list[str]:
    """The single-attribute captions of a concept, one per value, in the order of its name list."""
    if concept == "color":
        return [COLOR_PROBE.format(color=c) for c in COLOR_NAMES]
    if concept == "digit":
        return [DIGIT_PROBE.format(word=w) for w in DIGIT_WORDS]
    if concept == "digit_value":
        return [DIGIT_VALUE_PROBE.format(n=n) for n in range(10)]
    if concept == "background":
        return [BACKGROUND_PROBE.format(background=BACKGROUND_WORDS[b]) for b in world.BACKGROUNDS]
    if concept == "marker":
        return [MARKER_PROBE.format(marker=MARKER_WORDS[m]) for m in world.MARKERS]
    raise KeyError(f"unknown concept {concept!r}; expected one of {sorted(PROBES)}")


EVAL_SEED = 7
"""Seed of the fixed attribute draws and background crops of the evaluation images."""
EVAL_RENDERS_PER_DIGIT = 4
"""Each evaluation-pool digit is rendered this many times (359 x 4 = 1,436 evaluation images)."""

@dataclass(frozen=True)
class DigitsClip:
    """The loaded digits CLIP and what callers need to feed it.

    ``model`` is an open_clip ``CLIP`` in eval mode with ``requires_grad`` False; ``tokenizer`` is open_clip's
    ``SimpleTokenizer`` (context :data:`CONTEXT_LENGTH`) behind a :class:`VocabularyTokenizer` that refuses words the
    model never saw (:class:`debias.errors.DebiasError`); images go in as RGB in [0, 1] at ``image_size`` px and are
    normalised with ``mean``/``std`` (per channel, the training corpus statistics) by :meth:`normalize`.
    """

    model: nn.Module
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    path: Path

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise RGB images ``(N, 3, H, W)`` in [0, 1] with the model's mean/std."""
        return normalize(images, self.mean, self.std)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of RGB images ``(N, 3, H, W)`` in [0, 1]."""
        device = next(self.model.parameters()).device
        return self.model.encode_image(self.normalize(images.to(device)), normalize=True)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings of a list of captions; a word outside the vocabulary raises DebiasError."""
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(list(texts)).to(device), normalize=True)


# ----------------------------------------------------------------------------------------------------- data


def heldout_split(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(pretraining, evaluation)`` of the base digits (:func:`debias.data.base_pool.base_pools`)."""
    if n is not None and n != len(load_base_digits(8)[1]):
        raise ValueError(f"n={n}; the partition covers the {len(load_base_digits(8)[1])} bundled base digits")
    return base_pools()


def heldout_images(
    image_size: int = IMAGE_SIZE, n: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluation-pool digits in every palette colour on the plain (black) background, no marker, no jitter.

    Returns RGB images ``(M, 3, H, W)`` in [0, 1], digit labels 0..9 and colour labels (indices into
    :data:`COLOR_NAMES`). ``n`` keeps a seeded random subset of ``n`` images (e.g. for a fast test).
    """
    gray, digits = load_base_digits(image_size)
    idx = evaluation_pool()
    gray, digits = gray[idx], digits[idx]
    images = torch.cat([colorize(gray, c) for c in COLOR_NAMES])
    colors = torch.arange(len(COLOR_NAMES)).repeat_interleave(len(digits))
    digits = digits.repeat(len(COLOR_NAMES))
    if n is not None:
        if not 0 < n <= len(images):
            raise ValueError(f"n={n} held-out images requested; expected 1..{len(images)}")
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        images, digits, colors = images[keep], digits[keep], colors[keep]
    return images, digits, colors


def evaluation_images(
    image_size: int = IMAGE_SIZE, n: int | None = None, seed: int = EVAL_SEED,
    renders_per_digit: int = EVAL_RENDERS_PER_DIGIT,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """World images of the evaluation pool, every attribute drawn uniformly and independently (fixed seed).

    Returns RGB images ``(M, 3, S, S)`` in [0, 1] and their attributes ``{"digit", "color", "background",
    "marker"}`` (indices into the name lists of :mod:`debias.data.world`); no jitter. ``n`` keeps the first ``n``.
    """
    _, labels = load_base_digits(8)
    idx = evaluation_pool().repeat(renders_per_digit)
    gen = torch.Generator().manual_seed(seed)
    m = len(idx)
    attrs = {"digit": labels[idx],
             "color": torch.randint(len(COLOR_NAMES), (m,), generator=gen),
             "background": torch.randint(len(world.BACKGROUNDS), (m,), generator=gen),
             "marker": torch.randint(len(world.MARKERS), (m,), generator=gen)}
    images = world.render(world.digit_layers(idx, image_size), attrs["color"], attrs["background"], attrs["marker"],
                          gen)
    if n is not None:
        if not 0 < n <= m:
            raise ValueError(f"n={n} evaluation images requested; expected 1..{m}")
        images, attrs = images[:n], {k: v[:n] for k, v in attrs.items()}
    return images, attrs


def get_tokenizer(context_length: int = CONTEXT_LENGTH) -> Any:
    """open_clip's bundled BPE tokenizer (``SimpleTokenizer``; no download) at the digits CLIP's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class VocabularyTokenizer:
    """open_clip's tokenizer that refuses captions with a word the model never saw in training.

    ``known_ids`` are the token ids whose embedding rows the weights file stores (the corpus vocabulary). A word
    whose BPE tokens are not all known would embed to zero and silently mean nothing; :meth:`__call__` raises
    :class:`debias.errors.DebiasError` naming the word, the caption and the known words instead.
    """

    def __init__(self, tokenizer: Any, known_ids: torch.Tensor) -> None:
        self.tokenizer = tokenizer
        specials = {tokenizer.sot_token_id, tokenizer.eot_token_id, 0}
        self.known = {int(i) for i in known_ids.tolist()} - specials
        self.context_length = tokenizer.context_length

    @property
    def known_words(self) -> list[str]:
        """The words (BPE tokens) the model knows, sorted; a piece that only starts a word ends in ``-``."""
        pieces = (self.tokenizer.decoder[i] for i in self.known)
        return sorted(p[:-4] if p.endswith("</w>") else p + "-" for p in pieces)

    def check(self, caption: str) -> None:
        """Raise :class:`DebiasError` if ``caption`` holds a word outside the known vocabulary."""
        if all(t in self.known for t in self.tokenizer.encode(caption)):
            return
        for word in re.findall(r"[\w'-]+|[^\w\s]", caption):  # words and punctuation apart: 'wood', not 'wood.'
            if not all(t in self.known for t in self.tokenizer.encode(word)):
                raise DebiasError(f"caption {caption!r}: the word {word!r} is unknown to the digits CLIP and would "
                                  f"embed to zero; known words: {' '.join(self.known_words)}")
        raise DebiasError(f"caption {caption!r} holds text unknown to the digits CLIP; known words: "
                          f"{' '.join(self.known_words)}")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        captions = [texts] if isinstance(texts, str) else list(texts)
        for caption in captions:
            self.check(caption)
        return self.tokenizer(captions, context_length) if context_length else self.tokenizer(captions)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


# ---------------------------------------------------------------------------------------------------- model


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def write_config(folder: Path, model_cfg: dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> None:
    """Write open_clip's ``local-dir`` config: ``{"model_cfg": ..., "preprocess_cfg": {...}}``."""
    preprocess = {"size": model_cfg["vision_cfg"]["image_size"], "mode": "RGB", "mean": list(mean), "std": list(std),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    text = json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n"
    (folder / CONFIG_FILE).write_text(text, encoding="utf-8")


class _QuietOpenClipWeights(logging.Filter):
    """Drop open_clip's warnings about the checkpoint it finds (or not) in the folder: we load the weights."""

    NOISE = ("no CLIP weights found", "No pretrained weights loaded", "Multiple checkpoints found")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(noise in msg for noise in self.NOISE)


def create_model(folder: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Build the (randomly initialised) model from ``folder/open_clip_config.json`` via open_clip's factory."""
    import open_clip

    quiet = _QuietOpenClipWeights()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        # load_weights=False: the compact weights file is loaded by us (see module docstring), not by open_clip.
        return open_clip.create_model(f"local-dir:{folder}", load_weights=False, device=device)
    finally:
        root.removeFilter(quiet)


def save_weights(model: nn.Module, vocab: torch.Tensor, folder: Path) -> str:
    """Save the weights with the compact token embedding; write and return the SHA-256 checksum."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    full = state.pop("token_embedding.weight")
    unused = torch.ones(len(full), dtype=torch.bool)
    unused[vocab] = False
    if full[unused].abs().max() > 0:
        raise RuntimeError("token-embedding rows outside the corpus vocabulary are not zero; refusing to drop them")
    state["token_embedding.rows"] = full[vocab].clone()
    state["token_embedding.index"] = vocab.clone().to(torch.int64)
    path = folder / WEIGHTS_FILE
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates the file owner-only; it is package data
    digest = sha256_of(path)
    (folder / CHECKSUM_FILE).write_text(f"{digest}  {WEIGHTS_FILE}\n", encoding="utf-8")
    return digest


def verify_checksum(folder: Path | str = ASSET_DIR) -> str:
    """Check ``folder/digits_clip.safetensors`` against its ``.sha256`` file; return the digest.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when a file is missing or the digest differs.
    """
    folder = Path(folder)
    weights, checksum = folder / WEIGHTS_FILE, folder / CHECKSUM_FILE
    for path in (folder / CONFIG_FILE, weights, checksum):
        if not path.is_file():
            raise FileNotFoundError(f"digits CLIP file missing: {path}; {REGENERATE_HINT}")
    expected = checksum.read_text(encoding="utf-8").split()[0].strip().lower() if checksum.stat().st_size else ""
    actual = sha256_of(weights)
    if actual != expected:
        raise ValueError(f"SHA-256 of {weights} is {actual}, but {checksum} expects {expected or '(empty)'}; "
                         f"the weights are corrupt or were changed; {REGENERATE_HINT}")
    return actual


def load_digits_clip(device: str | torch.device = "cpu", path: Path | str | None = None) -> DigitsClip:
    """Load the shipped digits CLIP (or the one in ``path``) for inference.

    Verifies the SHA-256 checksum of the weights, builds the model with ``open_clip.create_model("local-dir:...")``,
    rebuilds the full token embedding from the stored rows (unused rows zero), loads the state dict strictly and
    returns a :class:`DigitsClip` (model in eval mode, ``requires_grad`` False, tokenizer, mean/std, image size).
    The tokenizer is a :class:`VocabularyTokenizer` over the stored token ids: unknown words are refused.
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else ASSET_DIR
    verify_checksum(folder)
    model = create_model(folder, device="cpu")
    state = load_file(str(folder / WEIGHTS_FILE))
    rows, index = state.pop("token_embedding.rows"), state.pop("token_embedding.index")
    full = torch.zeros_like(model.token_embedding.weight)
    full[index] = rows
    state["token_embedding.weight"] = full
    model.load_state_dict(state, strict=True)
    model.to(device).eval().requires_grad_(False)

    import open_clip

    cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    pre = cfg["preprocess_cfg"]
    tokenizer = VocabularyTokenizer(open_clip.get_tokenizer(f"local-dir:{folder}"), index)
    return DigitsClip(model=model, tokenizer=tokenizer, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                      image_size=int(cfg["model_cfg"]["vision_cfg"]["image_size"]), path=folder)


# ------------------------------------------------------------------------------------------------- zero-shot


@torch.no_grad()
def _image_features(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model.encode_image(normalize(images[i:i + batch_size].to(device), mean, std), normalize=True)
                      for i in range(0, len(images), batch_size)]).cpu()


@torch.no_grad()
def zero_shot(model: nn.Module, tokenizer: Any, mean: Sequence[float], std: Sequence[float], images: torch.Tensor,
              labels: dict[str, torch.Tensor], batch_size: int = 512) -> dict[str, float]:
    """Zero-shot accuracy per concept: the argmax over the concept's :func:`probe_captions`.

    ``labels`` maps concept names (keys of :data:`PROBES`; ``digit_value`` reads the ``digit`` labels) to value
    indices; every concept with labels is reported.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats = _image_features(model, images, mean, std, batch_size)
    out: dict[str, float] = {}
    for concept in PROBES:
        target = labels.get("digit" if concept == "digit_value" else concept)
        if target is None:
            continue
        text = model.encode_text(tokenizer(probe_captions(concept)).to(device), normalize=True).cpu()
        out[concept] = float(((feats @ text.T).argmax(1) == target.cpu()).float().mean())
    model.train(was_training)
    return out


def zero_shot_world(model: nn.Module, tokenizer: Any, mean: Sequence[float], std: Sequence[float],
                    n: int | None = None) -> dict[str, float]:
    """Zero-shot accuracy per concept on the evaluation images (:func:`evaluation_images`, or the first ``n``)."""
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size)
    images, attrs = evaluation_images(size, n=n)
    return zero_shot(model, tokenizer, mean, std, images, attrs)


def zero_shot_accuracy(
    model: nn.Module,
    tokenizer: Any,
    mean: Sequence[float],
    std: Sequence[float],
    images: torch.Tensor | None = None,
    digits: torch.Tensor | None = None,
    colors: torch.Tensor | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """Colour and digit zero-shot accuracy on plain-background images (default :func:`heldout_images`).

    Keys ``colour`` (8-way, :data:`COLOR_PROBE`), ``digit`` (10-way, :data:`DIGIT_PROBE`) and ``digit_value``
    (10-way, :data:`DIGIT_VALUE_PROBE`). For the four world concepts see :func:`zero_shot_world`.
    """
    if images is None:
        images, digits, colors = heldout_images(IMAGE_SIZE)
    if digits is None or colors is None:
        raise ValueError("zero_shot_accuracy: pass digits and colors labels together with images")
    acc = zero_shot(model, tokenizer, mean, std, images, {"digit": digits, "color": colors}, batch_size)
    return {"colour": acc["color"], "digit": acc["digit"], "digit_value": acc["digit_value"]}
