"""``concept``: the task loss plus the soft mutual information between the CNN's class prediction and the spurious
concept's caption prediction on the unlabeled stream (the project's method), with its optional terms: an adversary
on the features, self-training and core-concept distillation on the stream."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from ..errors import DebiasError, RecipeError
from ..recipe_fields import _choices, _range
from .base import Method, MethodContext

if TYPE_CHECKING:
    from ..concepts import ConceptSet
    from ..recipe import Recipe


@dataclass
class ConceptPenaltyCfg:
    """The ``concept`` method: task loss + weight * soft mutual information between the CNN's prediction and the
    spurious concept's caption prediction, on the unlabeled stream. With ``source = 'graft'`` the whole stream is
    read through the graft once per (re-)matching, with the model of that moment, and those predictions are kept
    until the next matching."""

    RETIRED: ClassVar[dict[str, Any]] = {"graft_read": "match", "temperature": 1.0, "dependence": "mi",
                                          "adversary_memory": 0, "stream_loss_rows": 0}
    """Keys this section no longer has, with the value every run now trains with: a recipe holding one at that
    value (a run directory's ``recipe.toml`` from before) loads without it; any other value is refused."""

    weight: float = field(default=1.0, metadata=_range(0.0, None))
    """Weight of the MI penalty in the loss (0: the other terms alone)."""
    source: str = field(default="graft", metadata=_choices("graft", "clip", "labels"))
    """Where the spurious concept's prediction comes from: the grafted CLIP (default), plain CLIP on the raw
    image, or the true attribute (an oracle, for ablation)."""
    unlabeled_batch_size: int = field(default=16, metadata=_range(2, None))
    """Stream images a step (the global batch on several processes), in the same forward as the training batch."""
    rematch_every: int = field(default=4, metadata=_range(0, None))
    """With ``source = 'graft'``: match the model to CLIP again for the penalty's graft, and read the stream through
    it, every N epochs (0 = only once, before training). The tracking (``selection.track_concepts``) matches every
    ``selection.track_every`` epochs for its own read-out whatever N is; the penalty shares that matching when both
    are due at once (the defaults, 4 and 4) and keeps its older graft between."""
    adversary_weight: float = field(default=0.0, metadata=_range(0.0, None))
    """An adversary on the features, added to the MI penalty: a small network trained alongside learns to
    predict the concept from the features the CNN's classifier reads (timm's pre-logits: the pooled last stage for
    a resnet) on the stream, and the CNN receives that loss's gradient reversed and times this weight (it is pushed
    to carry no concept information there). 0 = off; with ``weight = 0`` the adversary alone."""
    adversary_hidden: int = field(default=64, metadata=_range(1, None))
    """Width of the adversary's hidden layer."""
    joint_decay: float = field(default=0.0, metadata=_range(0.0, 1.0))
    """0 estimates the joint distribution of class and concept predictions on each stream batch alone; d > 0 keeps
    a running estimate ``d * previous + (1 - d) * batch`` (less sampling noise than one small batch; d = 0.9 spans
    about ten batches)."""
    pseudo_label_weight: float = field(default=0.0, metadata=_range(0.0, None))
    """Self-training on the stream: weight of the cross-entropy of each stream image's class logits against the
    model's own detached prediction, for the images predicted with at least ``pseudo_label_threshold``
    confidence, from ``pseudo_label_start`` (a fraction of the training steps) on. No labels are used. 0 = off."""
    pseudo_label_threshold: float = field(default=0.95, metadata=_range(0.0, 1.0))
    """The confidence a stream image's predicted class needs to count in self-training."""
    pseudo_label_start: float = field(default=0.5, metadata=_range(0.0, 1.0))
    """When self-training starts, as a fraction of the steps of ``train.epochs``."""
    combine: str = field(default="joint", metadata=_choices("joint", "sum"))
    """With several spurious concepts: ``joint`` penalises the MI between the class prediction and their joint
    caption prediction (per stream image, the outer product of the concepts' predictions: colour x background has
    four values), with one running joint and one adversary for that joint; ``sum`` adds each concept's own MI term
    and adversary. The joint sees a model that follows a combination of the concepts (red on brick or green on
    grass -> 5) that is independent of each concept alone, which no per-concept term can see. With one spurious
    concept both are that concept's term."""
    core_weight: float = field(default=0.0, metadata=_range(0.0, None))
    """Distillation of the core concept on the stream: weight of the cross-entropy of each stream image's class
    logits against the core concept's caption prediction (one caption per class, ``concepts.core``) from the same
    ``source``: the grafted CLIP reading the CNN (``graft``), plain CLIP on the raw image (``clip``: CLIP as a
    teacher), or the stream's true classes (``labels``: an oracle, supervised training on the stream; with
    ``weight = 0`` it measures what labelling the stream would give). 0 = off."""


def validate(recipe: "Recipe") -> None:
    """Checks of the ``[concept]`` section that involve several of its keys (run whatever the method)."""
    k = recipe.concept
    if k.joint_decay >= 1.0:
        raise RecipeError(f"concept.joint_decay = {k.joint_decay!r}: expected a value in [0, 1) (1 would never let the "
                          "running estimate move from the first batch)")


def soft_mutual_information(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mutual information (nats) between two soft predictions over a batch: ``p`` (N, K) and ``q`` (N, C).

    The joint is ``P(y, c) = mean_i p_i(y) q_i(c)``; zero when the two are independent over the batch, and
    ``H(y)`` when one is a function of the other.
    """
    return mutual_information_of_joint(p.T @ q / p.shape[0], eps)[0]


def mutual_information_of_joint(joint: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual information of a joint distribution (K, C) and its pointwise mutual information matrix."""
    marg = joint.sum(1, keepdim=True) @ joint.sum(0, keepdim=True)
    pmi = (joint + eps).log() - (marg + eps).log()
    return (joint * pmi).sum(), pmi


def joint_rows(qs: list[torch.Tensor]) -> torch.Tensor:
    """Per row, the outer product of several concepts' predictions ``(N, C1)``, ``(N, C2)``, ... flattened to
    ``(N, C1 * C2 * ...)``, the first concept's value varying slowest: the joint prediction of the concepts."""
    out = qs[0]
    for q in qs[1:]:
        out = (out[:, :, None] * q[:, None, :]).flatten(1)
    return out


def confident_self_training(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``logits`` (N, K) against their own detached argmax, averaged over the rows predicted with
    probability >= ``threshold`` (0 when none is); also returns how many rows counted."""
    confidence, pseudo = logits.detach().float().softmax(-1).max(1)
    keep = (confidence >= threshold).float()
    ce = F.cross_entropy(logits.float(), pseudo, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1.0), keep.sum()


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``-scale`` backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ReverseGradient.apply(x, scale)


class ConceptPenalty(Method):
    """Task loss + weight * the soft MI between the CNN's class prediction and the spurious concepts' caption
    prediction on the unlabeled stream (images whose spurious attributes vary independently of the label).

    Every spurious concept (``concepts.spurious``, in that order) has its own captions and its own caption
    predictions of the stream. The penalised *terms* are, with ``combine = 'joint'`` (default), one: the concepts'
    joint prediction (``joint_rows``), named ``color+background``; with ``combine = 'sum'``, one per concept, their
    MI terms and adversary losses added at the same weight. Each term has its own running joint (``joint_decay``)
    and, with ``adversary_weight``, its own adversary. Self-training (``pseudo_label_weight``) reads the model's own
    class predictions, no concept, so it is one term whatever the number of spurious concepts; core distillation
    (``core_weight``) reads the one core concept. Each concept's own MI is logged (``penalty/mi_<concept>``) either
    way; with ``joint`` it is the running joint's marginal, a measurement beside the penalised joint's.

    With one spurious concept the loss, its terms and the draws of random numbers are those of a one-concept run,
    and so is the checkpoint state: the keys ``joint``, ``adversary`` and ``graft_q``. A further concept's stream
    prediction adds ``graft_q/<concept>``; a further term's state ``joint/<term>`` and ``adversary/<term>``
    (``joint/background`` with ``sum``, ``joint/color+background`` with ``joint``, which has no ``joint`` key).

    The concept predictions are detached: they are a measurement, not a path for gradients. On biased training
    batches a spurious score is a function of the label, so the penalty is computed on the stream only.
    """

    name = "concept"
    needs_unlabeled = True

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        bundle, cfg = ctx.bundle, ctx.recipe.concept
        if bundle.unlabeled is None:
            raise DebiasError("train.method = 'concept' needs an unlabeled stream (images whose spurious attribute "
                              "varies independently of the label); this recipe has none: set "
                              "data.split_fractions.unlabeled > 0 (coloured digits: a fraction of the base images; "
                              "folder datasets: a fraction of the val rows) or, for a folder dataset, map a CSV split "
                              "value to 'unlabeled' in data.split_values")
        if cfg.unlabeled_batch_size > len(bundle.unlabeled):  # no full batch could ever be drawn
            raise DebiasError(f"concept.unlabeled_batch_size = {cfg.unlabeled_batch_size}: the unlabeled stream has "
                              f"only {len(bundle.unlabeled)} images; give a batch size of at most "
                              f"{len(bundle.unlabeled)} or a larger stream")
        if cfg.source == "labels":  # the oracle reads the stream's true attribute (and class, with core_weight)
            unknown = (bundle.unlabeled.attrs < 0) | ((bundle.unlabeled.labels < 0) & (cfg.core_weight > 0))
            if bool(unknown.any()):
                raise DebiasError(f"concept.source = 'labels' (an oracle) reads the unlabeled stream's true values, "
                                  f"but {int(unknown.sum())} of its {len(unknown)} rows have none in data.metadata; "
                                  "set concept.source = 'graft' or 'clip'")
        spurious = [c for c in ctx.concepts if c.role == "spurious"]
        if not spurious:
            raise DebiasError("train.method = 'concept' needs a spurious concept: set concepts.spurious")
        self.concepts: list[ConceptSet] = spurious
        """The penalised concepts: every spurious one, in ``concepts.spurious`` order."""
        self.concept = spurious[0]
        """The first spurious concept (a one-concept run's only one)."""
        self.combined = cfg.combine == "joint" and len(spurious) > 1
        """Several spurious concepts penalised as one joint concept (``combine = 'joint'``)."""
        names = [c.name for c in spurious]
        self.terms: list[str] = ["+".join(names)] if self.combined else names
        """The penalised terms' names: one per concept, or their joint's (``color+background``)."""
        widths = [len(c.captions) for c in spurious]
        self.term_widths: list[int] = [math.prod(widths)] if self.combined else widths
        """Each term's number of values (the joint's: the product of the concepts')."""
        self.core: ConceptSet | None = None
        if cfg.core_weight > 0:
            core = [c for c in ctx.concepts if c.role == "core" and c.attribute == "label"]
            if not core:
                raise DebiasError("concept.core_weight > 0 needs a core concept with one caption per class: set "
                                  "concepts.core to a concept of the label (coloured digits: 'digit')")
            self.core = core[0]
        self.cfg = cfg
        self.cached_qs: list[torch.Tensor] | None = None
        """``source = 'clip'`` or ``'labels'``: each spurious concept's prediction of the whole stream."""
        self.cached_core: torch.Tensor | None = None
        self.graft_qs: list[torch.Tensor] | None = None
        """``source = 'graft'``: each spurious concept's prediction of the whole stream, read through the graft."""
        self.graft_core: torch.Tensor | None = None
        """With ``core_weight > 0``: the core concept's caption prediction of the stream, read with ``graft_qs``."""
        self.graft_q_epoch = -1
        """The matching epoch ``graft_qs`` were read with."""
        self.joints: list[torch.Tensor] | None = None
        """``joint_decay > 0``: per term (``terms``), the running joint distribution of class and concept predictions
        on the stream."""
        self.adversaries: list[torch.nn.Module] = []
        """``adversary_weight > 0``: one adversary per term (``terms``), in that order."""
        if cfg.adversary_weight > 0:
            width = ctx.net.pre_logits_width
            self.adversaries = [torch.nn.Sequential(
                torch.nn.Linear(width, cfg.adversary_hidden), torch.nn.ReLU(),
                torch.nn.Linear(cfg.adversary_hidden, width_out)).to(ctx.device) for width_out in self.term_widths]

    @property
    def adversary(self) -> torch.nn.Module | None:
        """The first term's adversary (None: ``adversary_weight = 0``)."""
        return self.adversaries[0] if self.adversaries else None

    @property
    def graft_q(self) -> torch.Tensor | None:
        """The first spurious concept's prediction of the stream through the graft (None: not read yet)."""
        return None if self.graft_qs is None else self.graft_qs[0]

    @property
    def joint(self) -> torch.Tensor | None:
        """The first term's running joint (None: none yet)."""
        return None if self.joints is None else self.joints[0]

    def _key(self, key: str, i: int) -> str:
        """A state key of term ``i`` (``joint``, ``adversary``): the one-concept key for a per-concept first term,
        ``key/<term>`` otherwise."""
        return key if i == 0 and not self.combined else f"{key}/{self.terms[i]}"

    def _q_key(self, i: int) -> str:
        """The state key of spurious concept ``i``'s stream prediction: ``graft_q``, then ``graft_q/<concept>``."""
        return "graft_q" if i == 0 else f"graft_q/{self.concepts[i].name}"

    @property
    def graft(self):
        """``source = 'graft'``: the graft the penalty reads (the shared schedule's ``penalty_graft``), rebuilt on
        ``rematch_every``'s schedule; the per-epoch tracking's latest graft is shared when both are due at once."""
        return self.ctx.grafts.penalty_graft

    @property
    def graft_epoch(self) -> int:
        """The epoch of the matching ``graft`` was built from (-1: none yet)."""
        return self.ctx.grafts.penalty_epoch

    def _cache_qs(self) -> list[torch.Tensor]:
        """Concept predictions that do not change during training (plain CLIP, or the true attribute), one per
        spurious concept; with ``core_weight``, the core concept's (plain CLIP, or the true class) in
        ``cached_core`` alongside."""
        if self.cached_qs is None:
            stream = self.ctx.bundle.unlabeled
            if self.cfg.source == "labels":
                self.cached_qs = []
                for concept in self.concepts:
                    n_values = len(concept.captions)
                    values = stream.factors.get(concept.attribute, stream.attrs)  # the concept's own attribute
                    self.cached_qs.append(F.one_hot(values.clamp(max=n_values - 1), n_values).float())
                if self.core is not None:
                    self.cached_core = F.one_hot(stream.labels, len(self.core.captions)).float()
            else:
                self.cached_qs, self.cached_core = self._read_stream(self.ctx.clip.encode_image)
        return self.cached_qs

    def _cache_q(self) -> torch.Tensor:
        """The first spurious concept's cached prediction of the stream (see ``_cache_qs``)."""
        return self._cache_qs()[0]

    def _stream_predictions(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The whole stream's caption predictions of each spurious concept and (with ``core_weight``) of the core
        concept, as last read through the graft or cached from plain CLIP or the true values: one place, so
        neither is read before it is filled."""
        if self.cfg.source == "graft":
            return self.graft_qs, self.graft_core
        return self._cache_qs(), self.cached_core

    def _softmax(self, emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return (self.ctx.clip.logit_scale * emb.float() @ text.T).softmax(-1)

    def on_epoch_start(self, epoch: int) -> None:
        if self.cfg.source != "graft":
            return
        self.ctx.grafts.refresh_penalty(epoch, self.cfg.rematch_every)
        if self.graft_q_epoch != self.graft_epoch:
            self.graft_qs, self.graft_core = self._read_stream_through_graft()
            self.graft_q_epoch = self.graft_epoch

    def _caption_predictions(self, emb: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each spurious concept's and (with ``core_weight``) the core concept's caption predictions of image
        embeddings."""
        encode = self.ctx.clip.encode_text
        core = None if self.core is None else self._softmax(emb, encode(self.core.captions))
        return [self._softmax(emb, encode(c.captions)) for c in self.concepts], core

    @torch.no_grad()
    def _read_stream(self, encode: Callable[[torch.Tensor], torch.Tensor]
                     ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Caption predictions of the whole unlabeled stream from ``encode`` (images -> CLIP embeddings, computed
        once per image): each spurious concept's, and the core concept's with ``core_weight`` (else None)."""
        stream = self.ctx.bundle.unlabeled
        chunks: list[list[torch.Tensor]] = [[] for _ in self.concepts]
        core_chunks = []
        for start in range(0, len(stream), 256):
            qs, core = self._caption_predictions(encode(stream.images[start:start + 256].to(self.ctx.device)))
            for own, q in zip(chunks, qs):
                own.append(q.cpu())
            if core is not None:
                core_chunks.append(core.cpu())
        return [torch.cat(c) for c in chunks], (torch.cat(core_chunks) if core_chunks else None)

    def _read_stream_through_graft(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The stream's caption predictions through the graft, with the model as it is now (in eval mode)."""
        net = self.ctx.net
        training = net.training
        net.eval()
        out = self._read_stream(lambda images: self.graft(images, net(images, taps=True)[1]))
        net.train(training)
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for adversary in self.adversaries for p in adversary.parameters()]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for i, joint in enumerate(self.joints or []):
            state[self._key("joint", i)] = joint.detach().cpu().clone()
        for i, adversary in enumerate(self.adversaries):
            state[self._key("adversary", i)] = {k: v.detach().cpu().clone() for k, v in adversary.state_dict().items()}
        if self.graft_qs is not None:
            for i, q in enumerate(self.graft_qs):
                state[self._q_key(i)] = q.clone()
            state["graft_q_epoch"] = torch.tensor(self.graft_q_epoch)
        if self.graft_core is not None:
            state["graft_core"] = self.graft_core.clone()
        state.update(self.ctx.grafts.penalty_state_dict())  # the penalty's graft: its epoch, and its own older matching
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = [[self._key(k, i) for i in range(len(self.terms))] for k in ("joint", "adversary")]
        keys.append([self._q_key(i) for i in range(len(self.concepts))])
        for family, expected in zip(("joint", "adversary", "graft_q"), keys):
            if family == "adversary" and not self.adversaries:
                continue
            other = [k for k in state if (k == family or k.startswith(family + "/")) and k not in expected]
            if other:  # a term or concept this run does not have
                self._require_every(state, expected, other[0])
        joints, adversaries, graft_qs = ([k in state for k in ks] for ks in keys)
        if any(joints):
            self._require_every(state, keys[0])
            self.joints = [state[k].clone() for k in keys[0]]
        if any(adversaries) and self.adversaries:
            self._require_every(state, keys[1])
            for adversary, k in zip(self.adversaries, keys[1]):
                adversary.load_state_dict(state[k])
        if any(graft_qs):
            self._require_every(state, keys[2])
            self.graft_qs = [state[k].clone() for k in keys[2]]
            self.graft_q_epoch = int(state["graft_q_epoch"])
        if "graft_core" in state:
            self.graft_core = state["graft_core"].clone()
        # the trainer's checkpoint restored the latest matching first: shared, or the penalty's older own
        self.ctx.grafts.load_penalty_state(state)

    def _require_every(self, state: dict[str, Any], keys: list[str], extra: str | None = None) -> None:
        missing = [k for k in keys if k not in state]
        if missing or extra:
            found = f"has no {missing[0]!r}" if missing else f"has {extra!r}, which this run does not"
            raise DebiasError(f"the checkpoint's concept state {found}: it was written for other "
                              f"spurious concepts than concepts.spurious = {[c.name for c in self.concepts]!r} "
                              f"with concept.combine = {self.cfg.combine!r}")

    def _with_self_training(self, nll: torch.Tensor, stream_logits: torch.Tensor, step: int
                            ) -> tuple[torch.Tensor, dict]:
        """The task loss with the stream self-training term added once it has started, and its logged parts."""
        cfg = self.cfg
        if cfg.pseudo_label_weight == 0 or step < cfg.pseudo_label_start * self.ctx.total_steps:
            return nll, {}
        pseudo, kept = confident_self_training(stream_logits, cfg.pseudo_label_threshold)
        return nll + cfg.pseudo_label_weight * pseudo, {"pseudo_label": pseudo, "pseudo_label_kept": kept}

    def _adversary_loss(self, adversary: torch.nn.Module, features: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """An adversary's cross-entropy against its concept's prediction, averaged over this batch's rows; the
        features get that loss's gradient reversed and times ``adversary_weight`` on their way to the CNN."""
        # the weight times rows / rows: rounded as the figures in docs/RESULTS.md were
        scale = self.cfg.adversary_weight * len(features) / len(features)
        return (-(q * adversary(reverse_gradient(features, scale)).log_softmax(-1)).sum(1)).mean()

    def _penalty(self, p_all: torch.Tensor, q_all: torch.Tensor, previous: torch.Tensor | None, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One spurious concept's MI (logged), the objective whose gradient the loss takes, and its new running
        joint (None without ``joint_decay``)."""
        if self.cfg.joint_decay > 0:
            with torch.no_grad():
                batch_joint = p_all.detach().T @ q_all / len(q_all)
                d = self.cfg.joint_decay
                joint = batch_joint if previous is None else d * previous.to(device) + (1 - d) * batch_joint
                penalty, pmi = mutual_information_of_joint(joint)
            # the running joint's MI, carried by this batch's rows: mean_i p_i^T PMI q_i has that MI as its
            # expected value and, scaled by 1 / (1 - d) to a per-batch step, its gradient w.r.t. the batch's logits
            return penalty, (p_all * (q_all @ pmi.T)).sum(1).mean(), joint
        penalty = soft_mutual_information(p_all, q_all)
        return penalty, penalty, None

    @torch.no_grad()
    def _concept_mis(self, p_all: torch.Tensor, q_all: torch.Tensor, joint: torch.Tensor | None
                     ) -> dict[str, torch.Tensor]:
        """Each spurious concept's own MI with the class prediction, from the joint term's distribution (the running
        one with ``joint_decay``, else this batch's): its marginal over the other concepts."""
        if joint is None:
            joint = p_all.detach().T @ q_all / len(q_all)
        cube = joint.reshape(joint.shape[0], *(len(c.captions) for c in self.concepts))
        out = {}
        for axis, concept in enumerate(self.concepts, start=1):
            others = [a for a in range(1, cube.dim()) if a != axis]
            marginal = cube.sum(others) if others else cube
            out[f"penalty/mi_{concept.name}"] = mutual_information_of_joint(marginal)[0]
        return out

    def loss_terms(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        ctx = self.ctx
        images_u, index_u = ctx.next_unlabeled()
        n = batch["images"].shape[0]
        x = torch.cat([batch["images"], images_u])
        if self.cfg.source == "graft" and self.graft is None:  # a checkpoint written before the method kept its own
            ctx.grafts.share_latest_with_penalty()
        if self.cfg.source == "graft" and self.graft_qs is None:
            # a checkpoint written before the stream was read (an older version)
            (self.graft_qs, self.graft_core), self.graft_q_epoch = self._read_stream_through_graft(), self.graft_epoch
        # one forward (DDP's, when distributed); its taps feed the adversaries
        logits, taps = ctx.model(x, taps=True) if self.adversaries else (ctx.model(x), None)
        q_all_stream, core_all_stream = self._stream_predictions()
        qs = [q_stream[index_u].to(x.device) for q_stream in q_all_stream]
        core_q = None if core_all_stream is None else core_all_stream[index_u].to(x.device)
        nll = self.task_loss(logits[:n], batch["labels"])
        if self.combined:  # the concepts' joint prediction is the one penalised term
            qs = [joint_rows([q.float() for q in qs])]
        # several processes: the MI of the global unlabeled batch (rows gathered, gradients routed back)
        q_alls = [ctx.dist.gather_rows(q.float()) for q in qs]
        task, extra = self._with_self_training(nll, logits[n:], step)
        p_all = ctx.dist.gather_rows(logits[n:].float().softmax(-1))
        penalty = objective = None
        joints = []
        for i, (term, q_all) in enumerate(zip(self.terms, q_alls)):
            previous = None if self.joints is None else self.joints[i]
            mi, own_objective, joint = self._penalty(p_all, q_all, previous, x.device)
            penalty = mi if penalty is None else penalty + mi
            objective = own_objective if objective is None else objective + own_objective
            joints.append(joint)
            extra[f"penalty/mi_{term}"] = mi
        if self.combined:  # each concept's own MI: a marginal of the joint the penalty read, logged alone
            extra.update(self._concept_mis(p_all, q_alls[0], joints[0]))
        if self.cfg.joint_decay > 0:
            self.stage(joints=joints)
        loss = task + self.cfg.weight * objective
        if core_q is not None:  # distillation of the core concept's caption prediction on the stream
            core = F.cross_entropy(logits[n:].float(), core_q.float())  # probabilities as the target
            loss, extra = loss + self.cfg.core_weight * core, {**extra, "core": core}
        if self.adversaries:  # their own losses on this process's stream rows; the trainer averages their grads
            features = ctx.net.pre_logits(taps[ctx.net.tap_names[-1]][n:]).float()  # what the head reads
            adversary = None
            for name, own, q in zip(self.terms, self.adversaries, qs):
                term = self._adversary_loss(own, features, q.float())
                adversary = term if adversary is None else adversary + term
                extra[f"adversary/{name}"] = term
            loss, extra = loss + adversary, {**extra, "adversary": adversary}
        return {"loss": loss, "nll": nll, "penalty": penalty, **extra}


Config = ConceptPenaltyCfg
METHOD = ConceptPenalty
