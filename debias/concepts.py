"""Concepts (named caption sets), concept scores of a grafted model, dominance and the random-matching control.

A concept has one caption per value of an attribute the images carry (``color``: the spurious attribute;
``digit``: the class label). Its **score** says how well the grafted embedding follows its captions, and is
normalised by what plain CLIP achieves on the same images:

    score = (zero-shot accuracy of the graft - chance) / (zero-shot accuracy of plain CLIP - chance)

so 1 means the graft reads the concept as well as CLIP itself, 0 means chance. Concepts whose captions CLIP
separates with different margins therefore compare fairly. The **dominant** concept has the highest score.
The paper's own read-out (per image, the caption whose similarity rose most after surgery votes for its
concept) is reported beside it as ``paper_votes``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.colors import DIGIT_WORDS
from .data.splits import DatasetBundle
from .errors import DebiasError
from .recipe import Recipe


@dataclass
class ConceptSet:
    name: str
    captions: list[str]
    attribute: str
    """``label`` (the class) or ``attr`` (the spurious attribute); caption ``i`` describes value ``i``."""
    role: str  # "core" | "spurious"


def build_concepts(recipe: Recipe, bundle: DatasetBundle) -> list[ConceptSet]:
    """Concepts of a recipe. For coloured digits, ``color`` and ``digit`` follow ``data.colors`` and ``data.classes``."""
    c = recipe.concepts
    defined: dict[str, tuple[list[str], str]] = {}
    if recipe.data.name in ("colored_digits", "colored_mnist"):
        defined["color"] = ([c.color_template.format(color=col) for col in recipe.data.colors], "attr")
        defined["digit"] = ([c.digit_template.format(word=DIGIT_WORDS[d], n=d) for d in recipe.data.classes], "label")
    for name, caps in c.captions.items():
        attribute = defined[name][1] if name in defined else ("attr" if name in c.spurious else "label")
        defined[name] = (list(caps), attribute)
    out = []
    for role, names in (("spurious", c.spurious), ("core", c.core)):
        for name in names:
            caps, attribute = defined[name]
            n_attr = len(bundle.attr_names) - (1 if recipe.data.name in ("colored_digits", "colored_mnist") else 0)
            n_values = len(bundle.class_names) if attribute == "label" else n_attr  # coloured digits add "gray"
            if len(caps) != n_values:
                raise DebiasError(f"concepts.captions.{name}: {len(caps)} captions for {n_values} "
                                  f"{'classes' if attribute == 'label' else 'attribute values'}; expected one each")
            out.append(ConceptSet(name, caps, attribute, role))
    return out


def _targets(concept: ConceptSet, labels: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    return labels if concept.attribute == "label" else attrs


@torch.no_grad()
def concept_accuracy(embeddings: torch.Tensor, text: torch.Tensor, targets: torch.Tensor) -> float:
    """Zero-shot accuracy of normalised image embeddings against caption embeddings."""
    valid = targets < text.shape[0]  # grayscale images have no colour caption
    if not valid.any():
        return float("nan")
    pred = (embeddings[valid] @ text.T).argmax(1)
    return float((pred == targets[valid].to(pred.device)).float().mean())


@dataclass
class ConceptReadout:
    """Per-concept zero-shot accuracy of the graft and of plain CLIP on the same images."""

    graft: dict[str, float]
    clip: dict[str, float]
    chance: dict[str, float]
    paper_votes: dict[str, float]

    def scores(self) -> dict[str, float]:
        out = {}
        for k in self.graft:
            headroom = self.clip[k] - self.chance[k]
            out[k] = (self.graft[k] - self.chance[k]) / headroom if headroom > 1e-6 else float("nan")
        return out


def read_concepts(graft_emb: torch.Tensor, clip_emb: torch.Tensor, labels: torch.Tensor, attrs: torch.Tensor,
                  concepts: list[ConceptSet], text: dict[str, torch.Tensor]) -> ConceptReadout:
    graft, clip, chance, gains = {}, {}, {}, {}
    for c in concepts:
        tgt = _targets(c, labels, attrs)
        graft[c.name] = concept_accuracy(graft_emb, text[c.name], tgt)
        clip[c.name] = concept_accuracy(clip_emb, text[c.name], tgt)
        chance[c.name] = 1.0 / len(c.captions)
        # the paper's per-image read-out: change in similarity after surgery, best caption of each concept
        gains[c.name] = ((graft_emb - clip_emb) @ text[c.name].T).max(1).values
    stacked = torch.stack([gains[c.name] for c in concepts], 1)
    winner = stacked.argmax(1)
    votes = {c.name: float((winner == i).float().mean()) for i, c in enumerate(concepts)}
    return ConceptReadout(graft, clip, chance, votes)


def dominant(scores: dict[str, float]) -> str:
    finite = {k: v for k, v in scores.items() if v == v}
    if not finite:
        return "none"
    return max(finite, key=finite.get)
