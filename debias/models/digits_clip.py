"""The "digits CLIP": a small open_clip CLIP trained by the project, the offline default CLIP model.

What it is
    An open_clip ``CLIP`` with a ``ModifiedResNet`` image tower (``patch_size`` null in the config) at 32 px and a
    small causal text transformer, built through open_clip's own config mechanism (``local-dir:`` schema) and
    tokenised with open_clip's bundled BPE ``SimpleTokenizer`` (vocabulary 49,408, works offline). It is trained
    with open_clip's ``ClipLoss`` on a synthetic captioned corpus of coloured digits, so that the whole project can
    graft, explain and debias CNNs without downloading any pretrained CLIP.

The corpus
    Every training image is a grayscale base digit from the *held-in* split of scikit-learn's bundled digits
    (:func:`heldout_split` holds out a fixed, seeded 20 % of the 1,797 base images for evaluation), coloured with a
    palette colour drawn independently of the digit (:data:`debias.data.colors.PALETTE`), lightly augmented by a
    small random affine (rotation, scale, translation) at 32 px, RGB in [0, 1]. Each image gets one caption from a
    colour-only, a digit-only or a combined template (:data:`COLOR_TEMPLATES`, :data:`DIGIT_TEMPLATES`,
    :data:`JOINT_TEMPLATES`). The single-attribute probes :data:`COLOR_PROBE`, :data:`DIGIT_PROBE` and
    :data:`DIGIT_VALUE_PROBE` (the paper's wording) are among the training templates, so they work zero-shot.
    A batch never holds the same caption twice: in a contrastive loss an identical caption on two images is a
    positive and a negative at once (a false negative that fights the positive).

Why batches of one or two colours (:data:`COLOURS_PER_BATCH`)
    With every colour in every batch, training learns colour in a hundred steps and then never learns digits:
    colour alone separates most in-batch pairs, the text tower ends up ignoring the digit words (all digit captions
    collapse to one embedding: cosine 1.000 between "the digit one" and "the digit seven") and digit zero-shot stays
    at chance (0.10 after 1,500 steps at batch 128). A quarter of the batches therefore hold a single colour and a
    quarter two colours, where colour cannot tell the pairs apart and the digit is the only signal; the other half
    hold all eight and keep the 8-way colour contrast. With this, digits take off after ~300 steps.

Why the token embedding is stored compactly
    ``vocab_size`` stays 49,408 so that open_clip's stock tokenizer works unchanged, but the full token embedding
    alone would take 49,408 x width x 4 bytes (25 MB at width 128), and the corpus uses only a few dozen tokens:
    every other row never receives a gradient and carries no information. Training therefore runs with a compact
    ``nn.Embedding`` over the corpus vocabulary (sorted token ids, so that the end-of-text token keeps the largest
    id and open_clip's ``argmax`` pooling is unchanged, and faster: AdamW does not sweep 6 M dead entries), and the
    weights file stores just those rows (``token_embedding.rows``) plus their token ids (``token_embedding.index``).
    On load the full 49,408-row matrix is rebuilt with the unused rows set to zero and loaded strictly into the
    model that ``open_clip.create_model("local-dir:<folder>", load_weights=False)`` builds from the shipped
    ``open_clip_config.json``. The shipped model is therefore bit-for-bit the trained one on every corpus caption;
    words outside the corpus vocabulary (:func:`corpus_vocabulary`) embed to zero and mean nothing to this model.
    ``load_weights=False`` is needed because open_clip's own loader would try to load the compact file strictly
    and fail with a shape mismatch (loudly, never silently).

Use
    ``clip = load_digits_clip()`` gives a :class:`DigitsClip`: ``clip.model`` (open_clip ``CLIP``, eval, frozen),
    ``clip.tokenizer``, ``clip.mean`` / ``clip.std`` / ``clip.image_size``, and helpers ``clip.encode_images(rgb01)``
    and ``clip.encode_texts(captions)`` that return L2-normalised embeddings. :func:`zero_shot_accuracy` gives the
    colour / digit zero-shot figures on held-out images (:func:`heldout_images`).

Shipped folder (``debias/models/assets/digits_clip/``)
    ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg`` with the normalisation mean/std),
    ``digits_clip.safetensors`` (fp32 weights, compact token embedding), ``digits_clip.safetensors.sha256``
    (checked on every load) and ``training.json`` (zero-shot figures, steps, seed, wall time).
    Regenerate it with ``python tools/train_digits_clip.py``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from debias.data.colors import DIGIT_WORDS, PALETTE, colorize
from debias.data.digits_base import load_base_digits

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "digits_clip"
"""The shipped model folder (open_clip ``local-dir:`` format)."""
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "digits_clip.safetensors"
CHECKSUM_FILE = WEIGHTS_FILE + ".sha256"
TRAINING_FILE = "training.json"
REGENERATE_HINT = "regenerate with python tools/train_digits_clip.py"

IMAGE_SIZE = 32
CONTEXT_LENGTH = 16

DIGITS_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}
"""open_clip model config (the shape of open_clip's ``model_configs/*.json``). ``patch_size`` null selects
open_clip's ``ModifiedResNet`` (CLIP's RN50 design: 3-conv stem, anti-aliased bottlenecks, attention pooling) with
widths 16-32-64-128 (x4 expansion, 512 channels into the attention pool) at 32 px."""

SPLIT_SEED = 20240607
"""Seed of the fixed held-in / held-out split of the base images; independent of the training seed on purpose, so
that every trained model is evaluated on the same held-out images."""
HELDOUT_FRACTION = 0.2

COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)

COLOR_PROBE = "a photo of a {color} digit."
"""Colour-only concept probe, used for the 8-way colour zero-shot figure."""
DIGIT_PROBE = "a photo of the digit {word}."
"""Digit-only concept probe, used for the 10-way digit zero-shot figure."""
DIGIT_VALUE_PROBE = "a photo of a digit with the value {n}."
"""Digit-only concept probe in the paper's wording; reported as ``digit_value``."""

COLOR_TEMPLATES: tuple[str, ...] = (COLOR_PROBE, "a {color} digit.", "a photo of a {color} number.")
DIGIT_TEMPLATES: tuple[str, ...] = (
    DIGIT_PROBE, DIGIT_VALUE_PROBE, "a photo of the number {n}.", "the digit {word}.", "a digit {n}.",
)
JOINT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {word}.", "a {color} digit {n}.", "a photo of the digit {word} in {color}.",
    "a photo of a {color} digit with the value {n}.", "a {color} {n}.", "a photo of the {color} digit {word}.",
)
TEMPLATE_GROUP_WEIGHTS: tuple[float, float, float] = (0.2, 0.3, 0.5)
"""How often a caption is colour-only, digit-only, combined. Digits are the harder attribute, so 80 % of the
captions name the digit; colour is learnt from 70 %."""

COLOURS_PER_BATCH: tuple[int, ...] = (1, 2, 8, 8)
"""Each batch draws its images from ``k`` random palette colours, ``k`` uniform over this tuple (so a quarter of the
batches hold one colour, a quarter two, half all eight). Why: with every
colour in every batch, colour separates the in-batch pairs so easily that the text tower learns to attend to colour
words only and the digit words collapse to one embedding (digit zero-shot stays at chance). In a batch of one or two
colours, colour cannot tell the pairs apart and the digit is the only signal, so both towers must learn it; the
all-colour batches keep the 8-way colour contrast."""

DEFAULT_STEPS = 2000
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-3


@dataclass(frozen=True)
class DigitsClip:
    """The loaded digits CLIP and what callers need to feed it.

    ``model`` is an open_clip ``CLIP`` in eval mode with ``requires_grad`` False; ``tokenizer`` is open_clip's
    ``SimpleTokenizer`` (context 16); images go in as RGB in [0, 1] at ``image_size`` px and are normalised with
    ``mean``/``std`` (per channel, the training corpus statistics) by :meth:`normalize`.
    """

    model: nn.Module
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    path: Path

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise RGB images ``(N, 3, H, W)`` in [0, 1] with the model's mean/std."""
        return _normalize(images, self.mean, self.std)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of RGB images ``(N, 3, H, W)`` in [0, 1]."""
        device = next(self.model.parameters()).device
        return self.model.encode_image(self.normalize(images.to(device)), normalize=True)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings of a list of captions."""
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(list(texts)).to(device), normalize=True)


# ----------------------------------------------------------------------------------------------------- data


def heldout_split(
    n: int | None = None, seed: int = SPLIT_SEED, fraction: float = HELDOUT_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(held_in, held_out)`` of the base digits: a fixed seeded permutation, ``fraction`` held out.

    ``n`` defaults to the number of bundled base digits (1,797 -> 1,438 held in, 359 held out).
    """
    if n is None:
        n = len(load_base_digits(8)[1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = int(round(n * fraction))
    return perm[n_out:].sort().values, perm[:n_out].sort().values


def heldout_images(
    image_size: int = IMAGE_SIZE, n: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out evaluation images: every held-out base digit in every palette colour, no augmentation.

    Returns RGB images ``(M, 3, H, W)`` in [0, 1], digit labels 0..9 and colour labels (indices into
    :data:`COLOR_NAMES`). ``n`` keeps a seeded random subset of ``n`` images (e.g. for a fast test).
    """
    gray, digits = load_base_digits(image_size)
    _, out_idx = heldout_split(len(digits))
    gray, digits = gray[out_idx], digits[out_idx]
    images = torch.cat([colorize(gray, c) for c in COLOR_NAMES])
    colors = torch.arange(len(COLOR_NAMES)).repeat_interleave(len(digits))
    digits = digits.repeat(len(COLOR_NAMES))
    if n is not None:
        if not 0 < n <= len(images):
            raise ValueError(f"n={n} held-out images requested; expected 1..{len(images)}")
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        images, digits, colors = images[keep], digits[keep], colors[keep]
    return images, digits, colors


def _fill(template: str, color: int, digit: int) -> str:
    return template.format(color=COLOR_NAMES[color], word=DIGIT_WORDS[digit], n=digit)


def corpus_captions() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every caption the corpus can produce.

    Returns the unique captions, ``caption_index[t, color, digit]`` (index into the list for template ``t`` of
    ``COLOR_TEMPLATES + DIGIT_TEMPLATES + JOINT_TEMPLATES``) and the template group of each template (0 colour-only,
    1 digit-only, 2 combined).
    """
    templates = COLOR_TEMPLATES + DIGIT_TEMPLATES + JOINT_TEMPLATES
    groups = torch.tensor([0] * len(COLOR_TEMPLATES) + [1] * len(DIGIT_TEMPLATES) + [2] * len(JOINT_TEMPLATES))
    captions: dict[str, int] = {}
    index = torch.empty(len(templates), len(COLOR_NAMES), len(DIGIT_WORDS), dtype=torch.long)
    for t, template in enumerate(templates):
        for c in range(len(COLOR_NAMES)):
            for d in range(len(DIGIT_WORDS)):
                index[t, c, d] = captions.setdefault(_fill(template, c, d), len(captions))
    return list(captions), index, groups


def get_tokenizer(context_length: int = CONTEXT_LENGTH) -> Any:
    """open_clip's bundled BPE tokenizer (``SimpleTokenizer``; no download) at the digits CLIP's context length."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def corpus_vocabulary(tokenizer: Any | None = None) -> torch.Tensor:
    """Sorted token ids that occur in the tokenised corpus (incl. start/end-of-text and the padding id 0).

    These are the only token-embedding rows that training can change and that the weights file stores.
    """
    tokenizer = tokenizer or get_tokenizer()
    captions, _, _ = corpus_captions()
    return torch.unique(tokenizer(captions))


def _affine_augment(gray: torch.Tensor, gen: torch.Generator, max_rot: float = 12.0, max_scale: float = 0.1,
                    max_shift_px: float = 2.0) -> torch.Tensor:
    """Random small affine (rotation, isotropic scale, translation) of grayscale ``(B, H, W)``; zero fill."""
    b, h, _ = gray.shape
    u = torch.rand(b, 4, generator=gen) * 2 - 1
    angle = u[:, 0] * math.radians(max_rot)
    scale = 1 + u[:, 1] * max_scale
    shift = u[:, 2:] * (2 * max_shift_px / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [b, 1, h, h], align_corners=False)
    return F.grid_sample(gray.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).squeeze(1).clamp_(0, 1)


class CaptionedDigits:
    """The synthetic captioned corpus: an endless, seeded stream of batches without duplicate captions."""

    def __init__(self, tokenizer: Any, seed: int, image_size: int = IMAGE_SIZE,
                 group_weights: Sequence[float] = TEMPLATE_GROUP_WEIGHTS,
                 colours_per_batch: Sequence[int] = COLOURS_PER_BATCH) -> None:
        gray, digits = load_base_digits(image_size)
        in_idx, _ = heldout_split(len(digits))
        self.gray, self.digits = gray[in_idx], digits[in_idx]
        self.captions, self.caption_index, groups = corpus_captions()
        self.tokens = tokenizer(self.captions)
        weights = torch.tensor(group_weights, dtype=torch.float64)
        counts = torch.bincount(groups, minlength=3).double()
        self.template_probs = (weights / weights.sum())[groups] / counts[groups]
        self.rgb = torch.tensor([PALETTE[c] for c in COLOR_NAMES])
        self.colours_per_batch = tuple(colours_per_batch)
        if not self.colours_per_batch or not all(1 <= k <= len(COLOR_NAMES) for k in self.colours_per_batch):
            raise ValueError(f"colours_per_batch={colours_per_batch}; expected counts in 1..{len(COLOR_NAMES)}")
        used = self.caption_index[self.template_probs > 0][:, : min(self.colours_per_batch)]
        self.max_batch_size = int(torch.unique(used).numel())
        """Largest batch without duplicate captions (set by the batches with the fewest colours)."""
        self.gen = torch.Generator().manual_seed(seed)

    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std of the coloured held-in images (palette colours equally likely), to 4 decimals.

        Analytic, so it needs no sampling: for ``x = g * rgb_c``, ``E[x] = E[g] E[rgb_c]`` and
        ``E[x^2] = E[g^2] E[rgb_c^2]``.
        """
        g1, g2 = self.gray.double().mean(), (self.gray.double() ** 2).mean()
        r1, r2 = self.rgb.double().mean(0), (self.rgb.double() ** 2).mean(0)
        mean = g1 * r1
        std = (g2 * r2 - mean ** 2).sqrt()
        return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``(B, 3, H, W)`` in [0, 1], caption tokens ``(B, L)``, digit and colour labels; captions unique."""
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.max_batch_size} distinct captions available "
                             f"to a batch of {min(self.colours_per_batch)} colour(s); lower batch_size")
        k = self.colours_per_batch[int(torch.randint(len(self.colours_per_batch), (1,), generator=self.gen))]
        palette = torch.randperm(len(COLOR_NAMES), generator=self.gen)[:k]
        picks: list[torch.Tensor] = []
        seen: set[int] = set()
        n_have = 0
        while n_have < batch_size:
            m = 3 * batch_size
            img = torch.randint(len(self.digits), (m,), generator=self.gen)
            col = palette[torch.randint(k, (m,), generator=self.gen)]
            tpl = torch.multinomial(self.template_probs, m, replacement=True, generator=self.gen)
            cap = self.caption_index[tpl, col, self.digits[img]]
            keep = []
            for i, c in enumerate(cap.tolist()):
                if c not in seen and n_have + len(keep) < batch_size:
                    seen.add(c)
                    keep.append(i)
            keep_t = torch.tensor(keep, dtype=torch.long)
            picks.append(torch.stack([img[keep_t], col[keep_t], cap[keep_t]], 1))
            n_have += len(keep)
        img, col, cap = torch.cat(picks).unbind(1)
        gray = _affine_augment(self.gray[img], self.gen)
        images = gray.unsqueeze(1) * self.rgb[col].view(-1, 3, 1, 1)
        return images, self.tokens[cap], self.digits[img], col


# ---------------------------------------------------------------------------------------------------- model


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def _write_config(folder: Path, model_cfg: dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> None:
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


def _create_model(folder: Path, device: str | torch.device = "cpu") -> nn.Module:
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


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_weights(model: nn.Module, vocab: torch.Tensor, folder: Path) -> str:
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
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else ASSET_DIR
    verify_checksum(folder)
    model = _create_model(folder, device="cpu")
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
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return DigitsClip(model=model, tokenizer=tokenizer, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                      image_size=int(cfg["model_cfg"]["vision_cfg"]["image_size"]), path=folder)


# ------------------------------------------------------------------------------------------------- zero-shot


@torch.no_grad()
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
    """Zero-shot accuracy: colour 8-way with :data:`COLOR_PROBE`, digit 10-way with :data:`DIGIT_PROBE`.

    Also reports ``digit_value`` (10-way with :data:`DIGIT_VALUE_PROBE`, the paper's wording). ``images`` (RGB in
    [0, 1]) with ``digits`` / ``colors`` labels default to every held-out image (:func:`heldout_images`).
    """
    if images is None:
        images, digits, colors = heldout_images(IMAGE_SIZE)
    if digits is None or colors is None:
        raise ValueError("zero_shot_accuracy: pass digits and colors labels together with images")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probes = {
        "colour": [COLOR_PROBE.format(color=c) for c in COLOR_NAMES],
        "digit": [DIGIT_PROBE.format(word=w) for w in DIGIT_WORDS],
        "digit_value": [DIGIT_VALUE_PROBE.format(n=n) for n in range(10)],
    }
    text = {k: model.encode_text(tokenizer(v).to(device), normalize=True) for k, v in probes.items()}
    feats = torch.cat([model.encode_image(_normalize(images[i:i + batch_size].to(device), mean, std),
                                          normalize=True) for i in range(0, len(images), batch_size)])
    labels = {"colour": colors, "digit": digits, "digit_value": digits}
    out = {k: float(((feats @ text[k].T).argmax(1).cpu() == labels[k]).float().mean()) for k in probes}
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------- training


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's training recipe: no weight decay on gains, biases, norms, embeddings of 1 dim, logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def train_digits_clip(
    out_dir: Path | str = ASSET_DIR,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    warmup: int | None = None,
    weight_decay: float = 0.1,
    num_threads: int | None = 2,
    evaluate: bool = True,
    progress: bool = True,
    model_cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the digits CLIP from scratch on the synthetic corpus and write the shipped folder to ``out_dir``.

    Deterministic for a given seed, thread count and torch build (CPU; seeded model init and data stream).
    AdamW with open_clip's weight-decay groups, linear warmup (default 5 % of the steps) then cosine to zero,
    ``ClipLoss`` with the learnt logit scale clamped at 100 like open_clip. Returns the training summary that is
    also written to ``training.json`` (``losses`` per step only in the returned dict).
    """
    import open_clip
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    from ..train.schedule import warmup_cosine

    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps={steps}, batch_size={batch_size}; expected steps >= 1 and batch_size >= 2")
    cfg = json.loads(json.dumps(model_cfg or DIGITS_CLIP_CFG))
    warmup = max(1, round(0.05 * steps)) if warmup is None else max(1, warmup)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _torch_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = get_tokenizer(cfg["text_cfg"]["context_length"])
        data = CaptionedDigits(tokenizer, seed=seed, image_size=cfg["vision_cfg"]["image_size"])
        mean, std = data.pixel_stats()
        _write_config(out, cfg, mean, std)
        model = _create_model(out)
        model.train()

        # Compact token embedding over the corpus vocabulary (see module docstring); sorted ids keep EOT the argmax.
        vocab = torch.unique(data.tokens)
        remap = torch.zeros(cfg["text_cfg"]["vocab_size"], dtype=torch.long)
        remap[vocab] = torch.arange(len(vocab))
        full_embedding = model.token_embedding
        model.token_embedding = nn.Embedding(len(vocab), full_embedding.embedding_dim)
        with torch.no_grad():
            model.token_embedding.weight.copy_(full_embedding.weight[vocab])

        optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
        scheduler = warmup_cosine(optimizer, steps, warmup)
        loss_fn = ClipLoss()
        losses: list[float] = []
        bar = tqdm(range(steps), desc="digits CLIP", disable=not progress, dynamic_ncols=True)
        for step in bar:
            images, tokens, _, _ = data.batch(batch_size)
            image_features, text_features, logit_scale = model(_normalize(images, mean, std), remap[tokens])
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        bar.close()

        # Scatter the compact rows back into the full open_clip matrix (unused rows zero) and save.
        with torch.no_grad():
            full_embedding.weight.zero_()
            full_embedding.weight[vocab] = model.token_embedding.weight
        model.token_embedding = full_embedding
        model.eval()
        train_time = time.perf_counter() - start
        digest = _save_weights(model, vocab, out)
        zero_shot = zero_shot_accuracy(model, tokenizer, mean, std) if evaluate else None
    summary = {
        "zero_shot_heldout": zero_shot,
        "zero_shot_probes": {"colour": COLOR_PROBE, "digit": DIGIT_PROBE, "digit_value": DIGIT_VALUE_PROBE},
        "heldout_images": None if not evaluate else int(len(heldout_split()[1]) * len(COLOR_NAMES)),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "num_threads": num_threads,
        "split_seed": SPLIT_SEED,
        "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        "logit_scale": round(model.logit_scale.detach().exp().item(), 3),
        "vocabulary_rows_stored": int(len(vocab)),
        "train_wall_time_s": round(train_time, 1),
        "total_wall_time_s": round(time.perf_counter() - start, 1),
        "weights_sha256": digest,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
    }
    (out / TRAINING_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {**summary, "losses": losses}
