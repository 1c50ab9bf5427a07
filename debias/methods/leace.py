"""``leace``: a post-hoc, label-free baseline. The model trains exactly as ``erm``; after the last epoch the
penultimate features (what the linear classifier reads) are erased of every spurious concept with LEACE (Belrose et
al. 2023, "LEACE: Perfect linear concept erasure in closed form", the ``concept-erasure`` package), fitted on the
unlabeled stream against each image's caption-predicted concept value, and the classifier is refitted on the erased
features of the training set. No label of the stream and no group label is read.

The eraser and the refitted classifier are both affine, so their composition is one linear layer of the classifier's
own shape: it replaces the classifier's weights. The model keeps its architecture and its taps (the erasure acts
after the last stage), so evaluation, ``model.safetensors``, a resumed run and ``debias explain`` all read the erased
model as any other run's model, and the matching of the trained model to CLIP stays valid for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import DebiasError
from ..recipe_fields import _choices
from .base import Method, MethodContext

if TYPE_CHECKING:
    from ..data.splits import Split
    from ..models.standalone import StandaloneModel


@dataclass
class LeaceCfg:
    """The ``leace`` method: ERM, then LEACE erasure of the spurious concepts from the penultimate features (fitted on
    the unlabeled stream) and the classifier refitted on the erased features of the training set."""

    source: str = field(default="graft", metadata=_choices("graft", "clip", "labels"))
    """Where each stream image's value of a spurious concept comes from: the caption the grafted CLIP predicts
    reading the trained model (default, as ``concept.source``), the caption plain CLIP predicts from the raw image,
    or the stream's true attribute (an oracle, for ablation)."""


HEAD_C = 1.0
"""Inverse L2 strength of the refitted classifier (scikit-learn's ``C``), on standardised erased features."""

BATCH = 256
"""Images a forward when features and embeddings are read."""


@torch.no_grad()
def penultimate_features(net: "StandaloneModel", images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The features the classifier reads, ``(N, D)`` float64 on the CPU, in eval mode: timm's ``forward_features``
    then ``forward_head(pre_logits=True)`` (pooling, and the head's norm where it has one), as ``net(x)`` runs them."""
    training = net.training
    net.eval()
    out = []
    for start in range(0, len(images), BATCH):
        x = net.normalize(images[start:start + BATCH].to(device))
        out.append(net.net.forward_head(net.net.forward_features(x), pre_logits=True).double().cpu())
    net.train(training)
    return torch.cat(out)


@torch.no_grad()
def caption_values(net: "StandaloneModel", graft, clip, images: torch.Tensor, captions: list[list[str]],
                   device: torch.device) -> torch.Tensor:
    """``(N, concepts)``: for each image and each concept's captions, the index of the caption whose text embedding
    is most similar to the image's embedding: the graft's (``graft(images, taps)``, the model in eval mode), or
    plain CLIP's (``graft = None``). The caption prediction the ``concept`` method reads on the stream, at its
    argmax (the softmax at any temperature keeps the order)."""
    texts = [clip.encode_text(c).float() for c in captions]
    training = net.training
    net.eval()
    out = []
    for start in range(0, len(images), BATCH):
        x = images[start:start + BATCH].to(device)
        emb = (clip.encode_image(x) if graft is None else graft(x, net(x, taps=True)[1])).float()
        out.append(torch.stack([(emb @ text.T).argmax(1) for text in texts], 1).cpu())
    net.train(training)
    return torch.cat(out)


def fit_eraser(features: torch.Tensor, z: torch.Tensor):
    """A ``LeaceEraser`` of ``z`` (N, k) from ``features`` (N, D), in float64. ``constrain_cov_trace`` is off: it
    mixes in an orthogonal projection that no longer zeroes the cross-covariance on the fitting data, and the
    erasure is applied once, to a classifier refitted after it, where the stability it buys is not needed."""
    from concept_erasure import LeaceEraser

    return LeaceEraser.fit(features.double(), z.double(), constrain_cov_trace=False)


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A multinomial logistic regression (scikit-learn, L-BFGS, ``C = HEAD_C``) of ``labels`` on ``features``
    standardised per dimension, returned as the weights ``(K, D)`` and bias ``(K,)`` of a linear layer on the raw
    features (float64). Two classes: scikit-learn's single score ``s`` becomes the logits ``(-s/2, s/2)``, which
    give the same probabilities."""
    from sklearn.linear_model import LogisticRegression

    present = sorted(set(labels.tolist()))
    if present != list(range(num_classes)):
        raise DebiasError(f"train.method = 'leace': the training split holds classes {present} of "
                          f"{list(range(num_classes))}; refitting the classifier needs examples of every class")
    mean, std = features.mean(0), features.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a dimension constant on the training set
    fit = LogisticRegression(C=HEAD_C, max_iter=2000).fit(((features - mean) / std).numpy(), labels.numpy())
    coef, intercept = torch.from_numpy(fit.coef_).double(), torch.from_numpy(fit.intercept_).double()
    if num_classes == 2:
        coef, intercept = torch.cat([-coef, coef]) / 2, torch.cat([-intercept, intercept]) / 2
    weight = coef / std
    return weight, intercept - weight @ mean


def fold(eraser, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear layer ``x -> weight @ eraser(x) + bias`` as one weight and bias (the eraser is affine: read off
    at the origin and the unit vectors)."""
    d = weight.shape[1]
    basis = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)])
    out = eraser(basis) @ weight.T + bias
    return (out[1:] - out[:1]).T.contiguous(), out[0]


class Leace(Method):
    """ERM; at the end of training, LEACE erasure of the spurious concepts from the penultimate features and the
    classifier refitted on the erased training features, folded into the classifier's weights."""

    name = "leace"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        if ctx.bundle.unlabeled is None:
            raise DebiasError("train.method = 'leace' needs an unlabeled stream (images whose spurious attribute "
                              "varies independently of the label), where the eraser is fitted; this recipe has none: "
                              "set data.split_fractions.unlabeled > 0 (coloured digits: a fraction of the base images; "
                              "folder datasets: a fraction of the val rows) or, for a folder dataset, map a CSV split "
                              "value to 'unlabeled' in data.split_values")
        self.cfg = ctx.recipe.leace
        self.concepts = [c for c in ctx.concepts if c.role == "spurious"]
        if not self.concepts:
            raise DebiasError("train.method = 'leace' needs a spurious concept to erase: set concepts.spurious")
        if self.cfg.source == "labels":
            stream = ctx.bundle.unlabeled
            unknown = sum(int((self._true_values(c) < 0).sum()) for c in self.concepts)
            if unknown:
                raise DebiasError(f"leace.source = 'labels' (an oracle) reads the unlabeled stream's true values, but "
                                  f"{unknown} of its {len(stream)} rows' values are unknown; set leace.source = "
                                  "'graft' or 'clip'")
        head = ctx.net.net.get_classifier()
        if not isinstance(head, torch.nn.Linear) or head.bias is None:
            raise DebiasError(f"model.name = {ctx.recipe.model.name!r}: train.method = 'leace' refits a linear "
                              f"classifier with a bias, and this model's is a {type(head).__name__}; pick a CNN "
                              "such as resnet18, resnet50 or convnext_tiny")
        self.eraser = None
        """The fitted ``LeaceEraser`` once training has ended (None before)."""

    def _true_values(self, concept) -> torch.Tensor:
        stream = self.ctx.bundle.unlabeled
        return stream.factors.get(concept.attribute, stream.attrs)

    def stream_values(self) -> torch.Tensor:
        """Each stream image's value of every spurious concept, ``(N, concepts)``: its predicted caption (the
        grafted CLIP's reading of the model as it is now, or plain CLIP's), or its true value with
        ``source = 'labels'``."""
        ctx = self.ctx
        if self.cfg.source == "labels":
            return torch.stack([self._true_values(c) for c in self.concepts], 1)
        if self.cfg.source == "graft":
            ctx.grafts.current()  # the matching of the trained model (the last epoch's tracking made it, or made now)
        return caption_values(ctx.net, ctx.grafts.graft if self.cfg.source == "graft" else None, ctx.clip,
                              ctx.bundle.unlabeled.images, [c.captions for c in self.concepts], ctx.device)

    def one_hot(self, values: torch.Tensor) -> torch.Tensor:
        """``(N, sum of caption counts)``: each concept's values one-hot, side by side (LEACE erases them jointly)."""
        return torch.cat([F.one_hot(v, len(c.captions)) for v, c in zip(values.T, self.concepts)], 1).double()

    def erase(self, features: torch.Tensor) -> torch.Tensor:
        """Features with the spurious concepts erased (after ``on_train_end``)."""
        return self.eraser(features.double())

    @torch.no_grad()
    def on_train_end(self) -> bool:
        if self.eraser is not None:  # a resumed run whose checkpoint holds the erased model already
            return False
        ctx = self.ctx
        stream = ctx.bundle.unlabeled
        z = self.one_hot(self.stream_values())
        self.eraser = fit_eraser(penultimate_features(ctx.net, stream.images, ctx.device), z)
        train = ctx.bundle.splits["train"].unaugmented()  # the examples without this epoch's jitter
        erased = self.erase(penultimate_features(ctx.net, train.images, ctx.device))
        weight, bias = fold(self.eraser, *fit_head(erased, train.labels, ctx.bundle.num_classes))
        head = ctx.net.net.get_classifier()
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))
        return True

    def state_dict(self) -> dict[str, Any]:
        if self.eraser is None:
            return {}
        e = self.eraser
        return {"eraser_proj_left": e.proj_left.clone(), "eraser_proj_right": e.proj_right.clone(),
                "eraser_bias": e.bias.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "eraser_proj_left" in state:
            from concept_erasure import LeaceEraser

            self.eraser = LeaceEraser(state["eraser_proj_left"].clone(), state["eraser_proj_right"].clone(),
                                      state["eraser_bias"].clone())


Config = LeaceCfg
METHOD = Leace
