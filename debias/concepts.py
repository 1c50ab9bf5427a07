"""Concepts (named caption sets), concept scores of a grafted model, dominance and the random-matching control.

A concept has one caption per value of an attribute the images carry (``color``: the spurious attribute;
``digit``: the class label). Two read-outs of the grafted embedding:

- **score** (decides dominance): how strongly the CNN's *decision* follows the concept as the graft reads it,
  the normalised mutual information (scikit-learn's ``normalized_mutual_info_score``) between the CNN's
  predicted class and the graft's caption prediction (the caption with the highest cosine similarity), over
  images whose concepts vary independently of each other. 1: the CNN's decision is a function of the
  concept's caption reading; 0: independent of it. It needs no labels. The **dominant** concept has the
  highest score; ``none`` when the top two are within ``TIE`` (nothing can be told apart).
- **representation**: how well the grafted embedding follows the concept's captions at all, normalised by
  what plain CLIP achieves on the same images, so concepts with different CLIP margins compare fairly:

      representation = (zero-shot accuracy of the graft - chance) / (zero-shot accuracy of plain CLIP - chance)

  A CNN trained with random colours still carries colour in its features (representation near 1 for colour
  in every model we trained), so representation alone cannot say what the CNN relies on; it says what the
  CNN has, e.g. whether a debiased model still encodes the digit.

The paper's own read-out (per image, the caption whose similarity rose most after surgery votes for its
concept) is reported beside them as ``paper_votes``; it is not a verdict (docs/EXPLAIN.md says when it can be read).

The verdict is **behavioural** (``VERDICT_BASIS``): the random-matching control does not gate it. On the detection
grid a matching of random channels gives the same verdict in 15-60 % of draws, because a CNN that decides by colour
carries colour in most of its channels; the control says whether the *matching* carries a concept beyond chance
(``control_reach``, ``control_same_verdict``), not what the CNN relies on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.metrics import normalized_mutual_info_score

from .data.registry import dataset
from .data.splits import DatasetBundle
from .errors import DebiasError
from .recipe import Recipe


@dataclass
class ConceptSet:
    name: str
    captions: list[str]
    attribute: str
    """``label`` (the class), ``attr`` (the spurious attribute) or the name of one of a split's ``factors`` (a dataset
    of several attributes); caption ``i`` describes value ``i``."""
    role: str  # "core" | "spurious"


def build_concepts(recipe: Recipe, bundle: DatasetBundle) -> list[ConceptSet]:
    """Concepts of a recipe: the dataset's built-in ones (coloured digits: ``color`` and ``digit``, following
    ``data.colors`` and ``data.classes``), then ``concepts.captions`` (which override a built-in one's captions)."""
    c = recipe.concepts
    defined = dict(dataset(recipe.data.name).builtin_concepts(recipe.data, c))
    for name, caps in c.captions.items():
        attribute = defined[name][1] if name in defined else ("attr" if name in c.spurious else "label")
        defined[name] = (list(caps), attribute)
    out = []
    for role, names in (("spurious", c.spurious), ("core", c.core)):
        for name in names:
            caps, attribute = defined[name]
            n_values = (len(bundle.class_names) if attribute == "label" else len(bundle.factor_names[attribute])
                        if attribute in bundle.factor_names else len(bundle.captioned_attr_names))
            if len(caps) != n_values:
                raise DebiasError(f"concepts.captions.{name}: {len(caps)} captions for {n_values} "
                                  f"{'classes' if attribute == 'label' else 'attribute values'}; expected one each")
            out.append(ConceptSet(name, caps, attribute, role))
    return out


def _targets(concept: ConceptSet, labels: torch.Tensor, attrs: torch.Tensor,
             factors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    if concept.attribute == "label":
        return labels
    return (factors or {}).get(concept.attribute, attrs)


@torch.no_grad()
def concept_accuracy(embeddings: torch.Tensor, text: torch.Tensor, targets: torch.Tensor) -> float:
    """Zero-shot accuracy of normalised image embeddings against caption embeddings."""
    valid = (targets >= 0) & (targets < text.shape[0])  # grayscale: no colour caption; -1: value not known
    if not valid.any():
        return float("nan")
    pred = (embeddings[valid] @ text.T).argmax(1)
    return float((pred == targets[valid].to(pred.device)).float().mean())


TIE = 0.05
"""Scores closer than this do not name a dominant concept."""


def alignment(predictions: torch.Tensor, embeddings: torch.Tensor, text: torch.Tensor) -> float:
    """Normalised mutual information between class predictions and the caption each embedding is closest to.

    0 when either is constant (one class predicted for every image, or one caption read for every image): neither
    then follows the other. scikit-learn scores two constant labellings 1.0, a perfect agreement."""
    if len(predictions) == 0:
        return float("nan")
    captions = (embeddings @ text.T.to(embeddings.device)).argmax(1)
    if predictions.unique().numel() < 2 or captions.unique().numel() < 2:
        return 0.0
    return float(normalized_mutual_info_score(predictions.cpu().numpy(), captions.cpu().numpy()))


@dataclass
class ConceptReadout:
    """Per concept: decision alignment of the graft (and of plain CLIP), zero-shot accuracy of both."""

    graft: dict[str, float]
    clip: dict[str, float]
    chance: dict[str, float]
    paper_votes: dict[str, float]
    aligned: dict[str, float]
    clip_aligned: dict[str, float]

    def scores(self) -> dict[str, float]:
        """Decision alignment through the graft: the dominance score."""
        return dict(self.aligned)

    def representation(self) -> dict[str, float]:
        out = {}
        for k in self.graft:
            headroom = self.clip[k] - self.chance[k]
            out[k] = (self.graft[k] - self.chance[k]) / headroom if headroom > 1e-6 else float("nan")
        return out


def read_concepts(graft_emb: torch.Tensor, clip_emb: torch.Tensor, labels: torch.Tensor, attrs: torch.Tensor,
                  concepts: list[ConceptSet], text: dict[str, torch.Tensor],
                  predictions: torch.Tensor, factors: dict[str, torch.Tensor] | None = None) -> ConceptReadout:
    """``predictions``: the CNN's predicted class per image (labels, attributes and ``factors``, each attribute's
    value per image in a dataset of several, serve the accuracies only)."""
    graft, clip, chance, gains, aligned, clip_aligned = {}, {}, {}, {}, {}, {}
    for c in concepts:
        aligned[c.name] = alignment(predictions, graft_emb, text[c.name])
        clip_aligned[c.name] = alignment(predictions, clip_emb, text[c.name])
        tgt = _targets(c, labels, attrs, factors)
        graft[c.name] = concept_accuracy(graft_emb, text[c.name], tgt)
        clip[c.name] = concept_accuracy(clip_emb, text[c.name], tgt)
        chance[c.name] = 1.0 / len(c.captions)
        # the paper's per-image read-out: change in similarity after surgery, best caption of each concept
        gains[c.name] = ((graft_emb - clip_emb) @ text[c.name].T).max(1).values
    stacked = torch.stack([gains[c.name] for c in concepts], 1)
    winner = stacked.argmax(1)
    votes = {c.name: float((winner == i).float().mean()) for i, c in enumerate(concepts)}
    return ConceptReadout(graft, clip, chance, votes, aligned, clip_aligned)


def dominant(scores: dict[str, float], tie: float = TIE) -> str:
    """The concept with the highest score; ``none`` when no score is finite or the top two are within ``tie``."""
    finite = sorted(((v, k) for k, v in scores.items() if v == v), reverse=True)
    if not finite or (len(finite) > 1 and finite[0][0] - finite[1][0] < tie):
        return "none"
    return finite[0][1]


VERDICT_BASIS = "behaviour"
"""What ``dominant_concept`` rests on: the CNN's decisions on images whose concepts vary independently (decision
alignment through the graft); the random-matching control does not gate it (docs/EXPLAIN.md)."""


def control_reach(scores: dict[str, float], draws: list[dict[str, float]], tie: float = TIE) -> dict[str, float]:
    """Per concept, the fraction of random-matching draws whose score comes within ``tie`` of the real matching's:
    how often random channels read the concept as well as the matched ones (NaN without draws)."""
    out = {}
    for k, v in scores.items():
        vals = [d[k] for d in draws if d[k] == d[k]]
        out[k] = (sum(x >= v - tie for x in vals) / len(vals)) if vals and v == v else float("nan")
    return out

