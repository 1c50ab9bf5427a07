"""Training the digits CLIP (:mod:`debias.models.digits_clip`) on a captioned corpus of the world of nuisances.

The corpus
    Every training image is a world image (:func:`debias.data.world.render`) of a base digit from the *pretraining
    pool* (:func:`debias.data.base_pool.pretraining_pool`; the evaluation pool is never seen), with its colour
    (:data:`debias.data.colors.PALETTE`), background (:data:`debias.data.world.BACKGROUNDS`) and marker
    (:data:`debias.data.world.MARKERS`) drawn independently of the digit and of each other, and a small random
    affine of the digit (:func:`debias.data.shifts.random_affine`). Each image gets one caption that names a random
    non-empty subset of its four attributes (each named independently with :data:`NAME_PROBS`), built from a
    subject (:data:`SUBJECT_TEMPLATES`), a background phrase ``on {background}`` and a marker phrase ``with
    {marker}``, with or without the prefix ``a photo of``: "a photo of a red five on grass with a small square.",
    "a photo of a digit on brick.", "the digit seven with no marker.". The single-attribute probes
    (:data:`debias.models.digits_clip.PROBES`: "a photo of a red digit.", "a photo of the digit five.", "a photo of
    a digit with the value 5.", "a photo of a digit on grass.", "a photo of a digit with a small ring.") are among
    the captions the grammar produces, so each concept works zero-shot alone.

The loss: contrastive with every true caption a positive
    A caption that names only some attributes is true of every image in the batch that shares those attributes
    ("a photo of a digit on grass." fits every grass image). Treating those as negatives (open_clip's ``ClipLoss``
    with one positive per row) pushes apart pairs that the caption describes correctly. :func:`multi_positive_loss`
    therefore uses soft targets: image -> text, uniform over the captions true of the image; text -> image, uniform
    over the images the caption is true of. With it a batch may hold the same caption twice.

Why batches with few values of an attribute (:data:`VALUES_PER_BATCH`)
    With every colour in every batch, colour separates most in-batch pairs so easily that the text tower learns
    colour words only and the digit words collapse to one embedding (digit zero-shot at chance, 0.10 after 1,500
    steps at batch 128, measured on the colour-only corpus). Each batch therefore draws, per attribute, ``k`` of its
    values (``k`` uniform over the attribute's tuple) and takes its images' values from those: in a batch of one
    colour or one background, that attribute cannot tell the pairs apart and the other attributes are the only
    signal, while the full batches keep the full contrast. Digits always use all ten. Independent draws alone are
    not enough for the digit: a batch where colour, background and marker are all constant comes up once in 48, and
    with them (1,000 steps at batch 64) the world corpus gave colour 0.998, background 0.73, marker 0.87 and digit
    0.106 zero-shot, with every digit caption at cosine 0.9999 to every other and image features that carry no
    digit (nearest-centroid 0.10). A quarter of the batches (:data:`DIGIT_ONLY_BATCHES`) therefore hold one colour,
    one background and one marker, where the digit is the only signal.

Why the token embedding is stored compactly: see :mod:`debias.models.digits_clip`. Training runs with an
``nn.Embedding`` over the corpus vocabulary (sorted ids, so the end-of-text token stays the argmax that open_clip
pools at; AdamW never sweeps 49,408 dead rows) and scatters it back into the full matrix before saving.
"""
from __future__ import annotations

import itertools
import json
import math
import platform
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from debias.data import world
from debias.data.base_pool import POOL_SEED, evaluation_pool, pretraining_pool
from debias.data.colors import DIGIT_WORDS
from debias.data.digits_base import load_base_digits

from . import digits_clip as dc

ATTRIBUTES: tuple[str, ...] = ("digit", "color", "background", "marker")

SUBJECT_TEMPLATES: dict[tuple[bool, bool], tuple[str, ...]] = {
    (False, False): ("a digit",),
    (False, True): ("a {color} digit", "a {color} number"),
    (True, False): ("the digit {word}", "a digit with the value {n}", "the number {n}", "a digit {n}"),
    (True, True): ("a {color} {word}", "the {color} digit {word}", "a {color} digit with the value {n}",
                   "a {color} {n}"),
}
"""Subject phrases keyed by (names the digit, names the colour)."""
PHOTO_PREFIX = "a photo of "
PREFIX_PROB = 0.75
"""How often a caption starts with ``a photo of`` (every probe does)."""
NAME_PROBS: dict[str, float] = {"digit": 0.75, "color": 0.5, "background": 0.5, "marker": 0.5}
"""Probability that a caption names each attribute (independently; an empty draw names the digit)."""
VALUES_PER_BATCH: dict[str, tuple[int, ...]] = {
    "color": (1, 2, 8, 8), "background": (1, 2, 4, 4), "marker": (1, 3, 3),
}
"""Per attribute, how many of its values a batch draws from (uniform over the tuple); see the module docstring."""
COLOURS_PER_BATCH: tuple[int, ...] = VALUES_PER_BATCH["color"]
DIGIT_ONLY_BATCHES = 0.25
"""Share of batches in which colour, background and marker are each one value, so the digit is the only signal."""

DEFAULT_STEPS = 4000
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-3


def caption_for(digit: int, color: int, background: int, marker: int, named: Sequence[bool], template: int,
                prefix: bool) -> str:
    """The caption of an image naming the attributes flagged in ``named`` (order of :data:`ATTRIBUTES`).

    ``template`` picks among the subject templates (modulo their number).
    """
    name_digit, name_color, name_bg, name_marker = (bool(v) for v in named)
    subjects = SUBJECT_TEMPLATES[(name_digit, name_color)]
    text = subjects[template % len(subjects)].format(
        color=world.COLOR_NAMES[color] if color < len(world.COLOR_NAMES) else "", word=DIGIT_WORDS[digit], n=digit)
    if name_bg:
        text += " on " + dc.BACKGROUND_WORDS[world.BACKGROUNDS[background]]
    if name_marker:
        text += " with " + dc.MARKER_WORDS[world.MARKERS[marker]]
    return (PHOTO_PREFIX if prefix else "") + text + "."


@lru_cache(maxsize=1)
def corpus_caption_list() -> tuple[str, ...]:
    """Every caption the corpus can produce (sorted), probes included."""
    out: set[str] = set()
    n_tpl = max(len(v) for v in SUBJECT_TEMPLATES.values())
    for d, c, b, m in itertools.product(range(10), range(len(world.COLOR_NAMES)), range(len(world.BACKGROUNDS)),
                                        range(len(world.MARKERS))):
        for named in itertools.product((False, True), repeat=4):
            if not any(named):
                continue
            for t in range(n_tpl):
                for prefix in (False, True):
                    out.add(caption_for(d, c, b, m, named, t, prefix))
    return tuple(sorted(out))


def corpus_captions() -> tuple[list[str], dict[str, int]]:
    """The corpus captions and a caption -> row index."""
    captions = list(corpus_caption_list())
    return captions, {c: i for i, c in enumerate(captions)}


@lru_cache(maxsize=2)
def _corpus_tokens(context_length: int) -> torch.Tensor:
    return dc.get_tokenizer(context_length)(list(corpus_caption_list()))


def corpus_tokens(context_length: int = dc.CONTEXT_LENGTH) -> torch.Tensor:
    """The tokenised corpus captions ``(len(corpus_caption_list()), context_length)`` (computed once per length)."""
    return _corpus_tokens(context_length).clone()


def corpus_vocabulary(tokenizer: Any | None = None) -> torch.Tensor:
    """Sorted token ids that occur in the tokenised corpus (incl. start/end-of-text and the padding id 0)."""
    if tokenizer is None:
        return torch.unique(_corpus_tokens(dc.CONTEXT_LENGTH))
    return torch.unique(tokenizer(list(corpus_caption_list())))


class WorldCorpus:
    """The captioned world corpus: an endless, seeded stream of batches (images, caption tokens, attributes)."""

    def __init__(self, context_length: int, seed: int, image_size: int = dc.IMAGE_SIZE,
                 values_per_batch: dict[str, Sequence[int]] | None = None,
                 name_probs: dict[str, float] | None = None, digit_only: float = DIGIT_ONLY_BATCHES) -> None:
        self.pool = pretraining_pool()
        _, labels = load_base_digits(8)
        self.digits = labels[self.pool]
        self.image_size = image_size
        self.values_per_batch = {k: tuple(v) for k, v in (values_per_batch or VALUES_PER_BATCH).items()}
        sizes = {"color": len(world.COLOR_NAMES), "background": len(world.BACKGROUNDS), "marker": len(world.MARKERS)}
        for key, ks in self.values_per_batch.items():
            if key not in sizes or not ks or not all(1 <= k <= sizes[key] for k in ks):
                raise ValueError(f"values_per_batch[{key!r}] = {ks}; expected counts in 1..{sizes.get(key)}")
        self.sizes = sizes
        probs = name_probs or NAME_PROBS
        self.name_probs = torch.tensor([probs[a] for a in ATTRIBUTES], dtype=torch.float64)
        self.captions, self.caption_row = corpus_captions()
        self.tokens = corpus_tokens(context_length)
        self.digit_only = float(digit_only)
        self.gen = torch.Generator().manual_seed(seed)

    def _values(self, key: str, n: int, single: bool = False) -> torch.Tensor:
        ks = (1,) if single else self.values_per_batch.get(key, (self.sizes[key],))
        k = ks[int(torch.randint(len(ks), (1,), generator=self.gen))]
        allowed = torch.randperm(self.sizes[key], generator=self.gen)[:k]
        return allowed[torch.randint(k, (n,), generator=self.gen)]

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``(B, 3, S, S)`` in [0, 1], caption tokens ``(B, L)``, attributes ``(B, 4)`` (order of
        :data:`ATTRIBUTES`) and the named-attribute mask ``(B, 4)`` of each caption."""
        pick = torch.randint(len(self.pool), (batch_size,), generator=self.gen)
        digit = self.digits[pick]
        single = bool(torch.rand(1, generator=self.gen, dtype=torch.float64) < self.digit_only)
        color, background, marker = (self._values(key, batch_size, single)
                                     for key in ("color", "background", "marker"))
        named = torch.rand(batch_size, 4, generator=self.gen, dtype=torch.float64) < self.name_probs
        named[~named.any(1), 0] = True
        template = torch.randint(1 << 16, (batch_size,), generator=self.gen)
        prefix = torch.rand(batch_size, generator=self.gen, dtype=torch.float64) < PREFIX_PROB
        attrs = torch.stack([digit, color, background, marker], 1)
        rows = [self.caption_row[caption_for(*a, named=nm, template=t, prefix=p)]
                for a, nm, t, p in zip(attrs.tolist(), named.tolist(), template.tolist(), prefix.tolist())]
        images = world.render(world.digit_layers(self.pool[pick], self.image_size), color, background, marker,
                              self.gen, jitter=True)
        return images, self.tokens[torch.tensor(rows)], attrs, named

    def pixel_stats(self, n: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std of the corpus images (a fixed-seed sample of ``n``, all values equally likely)."""
        gen = torch.Generator().manual_seed(POOL_SEED)
        pick = torch.randint(len(self.pool), (n,), generator=gen)
        draw = {k: torch.randint(self.sizes[k], (n,), generator=gen) for k in ("color", "background", "marker")}
        x = world.render(world.digit_layers(self.pool[pick], self.image_size), draw["color"], draw["background"],
                         draw["marker"], gen, jitter=True).double()
        mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
        return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def positives(attrs: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` bool: caption ``j`` (naming ``named[j]`` of ``attrs[j]``) is true of image ``i``."""
    same = attrs[:, None, :] == attrs[None, :, :]  # [i, j, a]
    return (same | ~named[None, :, :]).all(-1)


def multi_positive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                        pos: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss with soft targets: uniform over the true captions / the images a caption fits."""
    logits = logit_scale * image_features @ text_features.T
    target = pos.float()
    loss_i = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    loss_t = -(target / target.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return 0.5 * (loss_i + loss_t)


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
    out_dir: Path | str = dc.ASSET_DIR,
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
    device: str = "cpu",
) -> dict[str, Any]:
    """Train the digits CLIP from scratch on the world corpus and write the model folder to ``out_dir``.

    Deterministic on the CPU for a given seed, thread count and torch build (seeded model init and data stream).
    AdamW with open_clip's weight-decay groups, linear warmup (default 5 % of the steps) then cosine to zero
    (:func:`debias.train.schedule.warmup_cosine`), :func:`multi_positive_loss` with the learnt logit scale clamped at
    100 like open_clip. Returns the summary written to ``training.json`` (plus ``losses`` per step and
    ``step_s`` per step, only in the returned dict).
    """
    import open_clip
    from tqdm.auto import tqdm

    from ..train.schedule import warmup_cosine

    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps={steps}, batch_size={batch_size}; expected steps >= 1 and batch_size >= 2")
    cfg = json.loads(json.dumps(model_cfg or dc.DIGITS_CLIP_CFG))
    warmup = max(1, round(0.05 * steps)) if warmup is None else max(1, warmup)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    step_times: list[float] = []
    with _torch_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = dc.get_tokenizer(cfg["text_cfg"]["context_length"])
        data = WorldCorpus(cfg["text_cfg"]["context_length"], seed=seed, image_size=cfg["vision_cfg"]["image_size"])
        mean, std = data.pixel_stats()
        dc.write_config(out, cfg, mean, std)
        model = dc.create_model(out)
        model.train()

        vocab = torch.unique(data.tokens)
        remap = torch.zeros(cfg["text_cfg"]["vocab_size"], dtype=torch.long)
        remap[vocab] = torch.arange(len(vocab))
        full_embedding = model.token_embedding
        model.token_embedding = nn.Embedding(len(vocab), full_embedding.embedding_dim)
        with torch.no_grad():
            model.token_embedding.weight.copy_(full_embedding.weight[vocab])
        model.to(device)

        optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
        scheduler = warmup_cosine(optimizer, steps, warmup)
        losses: list[float] = []
        bar = tqdm(range(steps), desc="digits CLIP", disable=not progress, dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            images, tokens, attrs, named = data.batch(batch_size)
            image_features, text_features, logit_scale = model(
                dc.normalize(images.to(device), mean, std), remap[tokens].to(device))
            loss = multi_positive_loss(image_features, text_features, logit_scale, positives(attrs, named).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step_times.append(time.perf_counter() - t0)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        bar.close()

        model.cpu()
        with torch.no_grad():
            full_embedding.weight.zero_()
            full_embedding.weight[vocab] = model.token_embedding.weight
        model.token_embedding = full_embedding
        model.eval()
        train_time = time.perf_counter() - start
        digest = dc.save_weights(model, vocab, out)
        zero_shot = dc.zero_shot_world(model, tokenizer, mean, std) if evaluate else None
    summary = {
        "zero_shot": zero_shot,
        "zero_shot_probes": dict(dc.PROBES),
        "evaluation_images": dc.EVAL_RENDERS_PER_DIGIT * len(evaluation_pool()) if evaluate else None,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "num_threads": num_threads,
        "device": device,
        "pool_seed": POOL_SEED,
        "values_per_batch": {k: list(v) for k, v in data.values_per_batch.items()},
        "digit_only_batches": data.digit_only,
        "name_probs": dict(zip(ATTRIBUTES, data.name_probs.tolist())),
        "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        "logit_scale": round(model.logit_scale.detach().exp().item(), 3),
        "vocabulary_rows_stored": int(len(vocab)),
        "step_s_median": round(float(np.median(step_times)), 4),
        "train_wall_time_s": round(train_time, 1),
        "total_wall_time_s": round(time.perf_counter() - start, 1),
        "weights_sha256": digest,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    (out / dc.TRAINING_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {**summary, "losses": losses, "step_s": step_times}
