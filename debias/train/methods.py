"""Training methods behind one interface (DomainBed's shape): every method is ERM plus something.

A method turns a batch into named loss terms; the trainer owns backward, the optimizer, AMP and DDP, so every
method gets them for free. ``loss_terms`` returns tensors with a ``loss`` entry (what is optimised) and any
parts worth logging (``nll``, ``penalty`` ...).
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ..errors import DebiasError, did_you_mean

if TYPE_CHECKING:
    from ..concepts import ConceptSet
    from .loop import Trainer

METHODS: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


class Method:
    """Base: plain empirical risk minimisation."""

    name = "base"
    needs_unlabeled = False
    """True when the method draws batches from the unlabeled stream (the trainer then provides them)."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self._staged: dict[str, Any] = {}

    def stage(self, **updates: Any) -> None:
        """Hold state updates that ``loss_terms`` computed from the batch (GroupDRO's weights, a running joint, a
        memory of features) until the trainer has seen the step's loss finite: ``commit`` then sets them as
        attributes, ``discard`` drops them, so a skipped step leaves the method's state as it was. ``loss_terms``
        must change no state of its own directly."""
        self._staged.update(updates)

    def commit(self) -> None:
        for name, value in self._staged.items():
            setattr(self, name, value)
        self._staged = {}

    def discard(self) -> None:
        self._staged = {}

    def loss_terms(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        logits = self.trainer.model(batch["images"])
        nll = self.task_loss(logits, batch["labels"])
        return {"loss": nll, "nll": nll}

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy on labelled images, with the recipe's ``train.label_smoothing``."""
        return F.cross_entropy(logits, labels, reduction=reduction,
                               label_smoothing=self.trainer.recipe.train.label_smoothing)

    def sample_weights(self) -> torch.Tensor | None:
        """Per-example sampling weights for the training split (None = uniform shuffling)."""
        return None

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for methods with stages (JTT's second phase)."""

    def extra_epochs(self) -> int:
        """Epochs the method trains before ``train.epochs`` begin over from a restarted model (JTT's first stage,
        which ends with ``trainer.reset_model_and_optimizer()``); 0 for a single stage."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Method state that a resumed run needs (GroupDRO's weights, JTT's error set)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters of the method's own (an adversary): the trainer optimises them with the model's,
        as a second group with the same learning rate and schedule, and averages their gradients over processes."""
        return []


@register("erm")
class ERM(Method):
    """Cross-entropy on the training batch."""


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


def confident_self_training(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``logits`` (N, K) against their own detached argmax, averaged over the rows predicted with
    probability >= ``threshold`` (0 when none is); also returns how many rows counted."""
    confidence, pseudo = logits.detach().float().softmax(-1).max(1)
    keep = (confidence >= threshold).float()
    ce = F.cross_entropy(logits.float(), pseudo, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1.0), keep.sum()


def logit_correlation(logits: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared Pearson correlation over a batch between the CNN's class logits (N, K), centred over the
    classes, and the concept's soft prediction ``q`` (N, C); 0 when uncorrelated, 1 when linearly dependent.

    Unlike the mutual information of the softmax, it does not fade when the prediction saturates: a colour term
    that a confident shape term hides from the probabilities still shows in the logits (and flips swapped images).
    A column that is constant over the batch counts as uncorrelated.
    """
    z = logits.float() - logits.float().mean(1, keepdim=True)
    z, q = z - z.mean(0), q.float() - q.float().mean(0)
    cov = z.T @ q / z.shape[0]
    scale = torch.outer(z.pow(2).mean(0).sqrt(), q.pow(2).mean(0).sqrt())
    corr = torch.where(scale > eps, cov / scale.clamp_min(eps), torch.zeros_like(cov))
    return corr.pow(2).mean()


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


@register("concept")
class ConceptPenalty(Method):
    """Task loss + weight * soft MI between the CNN's class prediction and the spurious concept's caption
    prediction on the unlabeled stream (images whose spurious attribute varies independently of the label).

    The concept prediction is detached: it is a measurement, not a path for gradients. On biased training
    batches the spurious score is a function of the label, so the penalty is computed on the stream only.
    """

    needs_unlabeled = True

    def __init__(self, trainer: "Trainer"):
        super().__init__(trainer)
        bundle, cfg = trainer.bundle, trainer.recipe.concept
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
        spurious = [c for c in trainer.concepts if c.role == "spurious"]
        if not spurious:
            raise DebiasError("train.method = 'concept' needs a spurious concept: set concepts.spurious")
        self.concept = spurious[0]
        self.core: ConceptSet | None = None
        if cfg.core_weight > 0:
            core = [c for c in trainer.concepts if c.role == "core" and c.attribute == "label"]
            if not core:
                raise DebiasError("concept.core_weight > 0 needs a core concept with one caption per class: set "
                                  "concepts.core to a concept of the label (coloured digits: 'digit')")
            self.core = core[0]
        self.cfg = cfg
        self.cached_q: torch.Tensor | None = None
        self.cached_core: torch.Tensor | None = None
        self.graft_q: torch.Tensor | None = None
        self.graft_core: torch.Tensor | None = None
        """With ``core_weight > 0``: the core concept's caption prediction of the stream, read with ``graft_q``."""
        self.graft_q_epoch = -1
        """The matching epoch ``graft_q`` was read with (``graft_read = 'match'``)."""
        self.graft = None
        """``source = 'graft'``: the graft the penalty reads, rebuilt on ``rematch_every``'s schedule. The trainer's
        own graft (``trainer.graft``) follows the per-epoch tracking, which re-matches every epoch: it is shared
        when both are due at once (the same model), never read in between."""
        self.graft_epoch = -1
        """The epoch of the matching ``graft`` was built from (-1: none yet)."""
        self.joint: torch.Tensor | None = None
        """``joint_decay > 0``: the running joint distribution of class and concept predictions on the stream."""
        self.adversary: torch.nn.Module | None = None
        self.adversary_memory: list[tuple[torch.Tensor, torch.Tensor]] = []
        """The last ``adversary_memory`` stream batches' detached features and concept predictions, oldest first."""
        if cfg.adversary_weight > 0:
            width = trainer.net.pre_logits_width
            self.adversary = torch.nn.Sequential(
                torch.nn.Linear(width, cfg.adversary_hidden), torch.nn.ReLU(),
                torch.nn.Linear(cfg.adversary_hidden, len(self.concept.captions))).to(trainer.device)

    def _cache_q(self) -> torch.Tensor:
        """Concept predictions that do not change during training (plain CLIP, or the true attribute); with
        ``core_weight``, the core concept's (plain CLIP, or the true class) in ``cached_core`` alongside."""
        if self.cached_q is None:
            stream = self.trainer.bundle.unlabeled
            n_values = len(self.concept.captions)
            if self.cfg.source == "labels":
                self.cached_q = F.one_hot(stream.attrs.clamp(max=n_values - 1), n_values).float()
                if self.core is not None:
                    self.cached_core = F.one_hot(stream.labels, len(self.core.captions)).float()
            else:
                self.cached_q, self.cached_core = self._read_stream(self.trainer.clip.encode_image)
        return self.cached_q

    def _stream_predictions(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole stream's spurious and (with ``core_weight``) core caption predictions, as last read through the
        graft or cached from plain CLIP or the true values: one place, so neither is read before it is filled."""
        if self.cfg.source == "graft":
            return self.graft_q, self.graft_core
        return self._cache_q(), self.cached_core

    def _softmax(self, emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return (self.trainer.clip.logit_scale / self.cfg.temperature * emb.float() @ text.T).softmax(-1)

    def on_epoch_start(self, epoch: int) -> None:
        every, trainer = self.cfg.rematch_every, self.trainer
        if self.cfg.source != "graft":
            return
        if self.graft is None or (every and epoch % every == 0 and self.graft_epoch != epoch):
            if trainer.graft is None or trainer.matching_step != trainer.step:
                trainer.rematch()  # else the end-of-epoch tracking has just matched this very model: shared
            self.graft, self.graft_epoch = trainer.graft, trainer.matching_epoch
        if self.cfg.graft_read == "match" and self.graft_q_epoch != self.graft_epoch:
            self.graft_q, self.graft_core = self._read_stream_through_graft()
            self.graft_q_epoch = self.graft_epoch

    def _caption_predictions(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The spurious and (with ``core_weight``) core concept's caption predictions of image embeddings."""
        encode = self.trainer.clip.encode_text
        core = None if self.core is None else self._softmax(emb, encode(self.core.captions))
        return self._softmax(emb, encode(self.concept.captions)), core

    @torch.no_grad()
    def _read_stream(self, encode: Callable[[torch.Tensor], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption predictions of the whole unlabeled stream from ``encode`` (images -> CLIP embeddings): the
        spurious concept's, and the core concept's with ``core_weight`` (else None)."""
        stream = self.trainer.bundle.unlabeled
        chunks, core_chunks = [], []
        for start in range(0, len(stream), 256):
            q, core = self._caption_predictions(encode(stream.images[start:start + 256].to(self.trainer.device)))
            chunks.append(q.cpu())
            if core is not None:
                core_chunks.append(core.cpu())
        return torch.cat(chunks), (torch.cat(core_chunks) if core_chunks else None)

    def _read_stream_through_graft(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stream's caption predictions through the graft, with the model as it is now (in eval mode)."""
        trainer, net = self.trainer, self.trainer.net
        training = net.training
        net.eval()
        out = self._read_stream(lambda images: self.graft(images, net(images, taps=True)[1]))
        net.train(training)
        return out

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.adversary is None else list(self.adversary.parameters())

    def state_dict(self) -> dict[str, Any]:
        state = {} if self.joint is None else {"joint": self.joint.detach().cpu().clone()}
        if self.adversary is not None:
            state["adversary"] = {k: v.detach().cpu().clone() for k, v in self.adversary.state_dict().items()}
            if self.adversary_memory:
                state["adversary_memory"] = [[f.cpu().clone(), q.cpu().clone()] for f, q in self.adversary_memory]
        if self.graft_q is not None:
            state.update(graft_q=self.graft_q.clone(), graft_q_epoch=torch.tensor(self.graft_q_epoch))
        if self.graft_core is not None:
            state["graft_core"] = self.graft_core.clone()
        if self.graft is not None:
            state["graft_epoch"] = torch.tensor(self.graft_epoch)
            if self.graft is not self.trainer.graft:  # an older matching than the trainer's: the checkpoint's own
                state["graft_matching"] = self.graft.matching.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "joint" in state:
            self.joint = state["joint"].clone()
        if "adversary" in state and self.adversary is not None:
            self.adversary.load_state_dict(state["adversary"])
            device = self.trainer.device
            self.adversary_memory = [(f.to(device), q.to(device)) for f, q in state.get("adversary_memory", [])]
        if "graft_q" in state:
            self.graft_q = state["graft_q"].clone()
            self.graft_q_epoch = int(state["graft_q_epoch"])
        if "graft_core" in state:
            self.graft_core = state["graft_core"].clone()
        if "graft_epoch" in state:  # the trainer's own matching is restored first: shared, or this one's older own
            trainer = self.trainer
            self.graft_epoch = int(state["graft_epoch"])
            if "graft_matching" in state:
                from ..explain import build_graft
                from ..surgery.matching import Matching

                matching = Matching.from_state_dict(state["graft_matching"], trainer.net.tap_names,
                                                    trainer.recipe.matching.selection)
                self.graft = build_graft(trainer.clip, matching, trainer.recipe).to(trainer.device)
            elif trainer.graft is None:  # a method state loaded without a trainer checkpoint: matched when needed
                self.graft_epoch = -1
            elif trainer.matching_epoch == self.graft_epoch:
                self.graft = trainer.graft
            else:
                raise DebiasError(f"the checkpoint's concept state names the matching of epoch {self.graft_epoch}, "
                                  f"which it does not hold (the trainer's is of epoch {trainer.matching_epoch}); "
                                  "start the run again with --force")

    def _loss_rows(self, local: int) -> int:
        """How many of this process's ``local`` stream rows carry the losses: those among the first
        ``stream_loss_rows`` of the global batch (this process holds rows rank, rank + world, ...)."""
        k = self.cfg.stream_loss_rows
        return local if k == 0 else len(range(self.trainer.dist.rank, k, self.trainer.dist.world))

    def _with_self_training(self, nll: torch.Tensor, stream_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The task loss with the stream self-training term added once it has started, and its logged parts."""
        trainer, cfg = self.trainer, self.cfg
        if cfg.pseudo_label_weight == 0 or trainer.step < cfg.pseudo_label_start * trainer.total_steps:
            return nll, {}
        pseudo, kept = confident_self_training(stream_logits, cfg.pseudo_label_threshold)
        return nll + cfg.pseudo_label_weight * pseudo, {"pseudo_label": pseudo, "pseudo_label_kept": kept}

    def _adversary_loss(self, features: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The adversary's cross-entropy against the concept prediction, averaged over this batch's rows and those
        of the memory (``adversary_memory``); the batch's features get that loss's gradient reversed, scaled so that
        the CNN receives ``-adversary_weight`` times the gradient of the batch's rows' mean loss, memory or not."""
        memory = self.adversary_memory
        rows = len(features) + sum(len(f) for f, _ in memory)
        scale = self.cfg.adversary_weight * rows / len(features)
        ce = -(q * self.adversary(reverse_gradient(features, scale)).log_softmax(-1)).sum(1)
        # no gradient reaches the CNN through the memory: its features are detached
        loss = ce.mean() if not memory else (ce.sum() - sum((old_q * self.adversary(old).log_softmax(-1)).sum()
                                                            for old, old_q in memory)) / rows
        if self.cfg.adversary_memory:
            self.stage(adversary_memory=[*memory, (features.detach(), q.detach())][-self.cfg.adversary_memory:])
        return loss

    def loss_terms(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        model, trainer = self.trainer.model, self.trainer
        images_u, index_u = trainer.next_unlabeled()
        n = batch["images"].shape[0]
        x = torch.cat([batch["images"], images_u])
        graft_step = self.cfg.source == "graft" and self.cfg.graft_read == "step"
        if self.cfg.source == "graft" and self.graft is None:  # a checkpoint written before the method kept its own
            self.graft, self.graft_epoch = trainer.graft, trainer.matching_epoch
        if self.cfg.source == "graft" and not graft_step and self.graft_q is None:
            # a checkpoint written before the stream was read (an older version)
            (self.graft_q, self.graft_core), self.graft_q_epoch = self._read_stream_through_graft(), self.graft_epoch
        # one forward (DDP's, when distributed); its taps feed the per-step graft read and the adversary
        logits, taps = model(x, taps=True) if graft_step or self.adversary is not None else (model(x), None)
        rows = self._loss_rows(len(images_u))
        if rows < len(images_u):  # the ablation: the other stream rows only shaped the batch statistics
            logits, images_u, index_u = logits[:n + rows], images_u[:rows], index_u[:rows]
            taps = None if taps is None else {name: v[:n + rows] for name, v in taps.items()}
        if graft_step:
            with torch.no_grad():
                q, core_q = self._caption_predictions(self.graft(images_u, {k: v[n:].detach()
                                                                            for k, v in taps.items()}))
        else:
            q_all_stream, core_all_stream = self._stream_predictions()
            q = q_all_stream[index_u].to(x.device)
            core_q = None if core_all_stream is None else core_all_stream[index_u].to(x.device)
        nll = self.task_loss(logits[:n], batch["labels"])
        # several processes: the MI of the global unlabeled batch (rows gathered, gradients routed back)
        q_all = trainer.dist.gather_rows(q.float())
        task, extra = self._with_self_training(nll, logits[n:])
        if self.cfg.dependence == "logit_corr":
            penalty = objective = logit_correlation(trainer.dist.gather_rows(logits[n:].float()), q_all)
        else:
            p_all = trainer.dist.gather_rows(logits[n:].float().softmax(-1))
            if self.cfg.joint_decay > 0:
                with torch.no_grad():
                    batch_joint = p_all.detach().T @ q_all / len(q_all)
                    d = self.cfg.joint_decay
                    joint = batch_joint if self.joint is None else d * self.joint.to(x.device) + (1 - d) * batch_joint
                    self.stage(joint=joint)
                    penalty, pmi = mutual_information_of_joint(joint)
                # the running joint's MI, carried by this batch's rows: mean_i p_i^T PMI q_i has that MI as its
                # expected value and, scaled by 1 / (1 - d) to a per-batch step, its gradient w.r.t. the batch's logits
                objective = (p_all * (q_all @ pmi.T)).sum(1).mean()
            else:
                penalty = objective = soft_mutual_information(p_all, q_all)
        loss = task + self.cfg.weight * objective
        if core_q is not None:  # distillation of the core concept's caption prediction on the stream
            core = F.cross_entropy(logits[n:].float(), core_q.float())  # probabilities as the target
            loss, extra = loss + self.cfg.core_weight * core, {**extra, "core": core}
        if self.adversary is not None:  # its own loss on this process's stream rows; the trainer averages its grads
            features = trainer.net.pre_logits(taps[trainer.net.tap_names[-1]][n:]).float()  # what the head reads
            adversary = self._adversary_loss(features, q.float())
            loss, extra = loss + adversary, {**extra, "adversary": adversary}
        return {"loss": loss, "nll": nll, "penalty": penalty, **extra}


@register("groupdro")
class GroupDRO(Method):
    """Group DRO (Sagawa et al. 2020, Algorithm 1): exponentiated-gradient weights ``q`` on the per-group losses.
    Uses the training group labels, so it is the oracle upper bound among the baselines.

    Each step, as in the authors' code (``LossComputer.compute_robust_loss``, kohpangwei/group_DRO): the mean loss of
    every group in the batch (0 for a group the batch lacks), ``q_g <- q_g * exp(eta * loss_g)``, ``q`` normalised to
    sum 1, and the loss ``sum_g q_g * loss_g`` with the updated ``q``, not renormalised over the groups present (a
    group the batch lacks adds nothing, and its weight only shrinks by the normalisation). Several processes: the
    group losses are those of the global batch (per-group loss sums and counts summed over processes), so every
    process updates the same ``q`` (the checkpoint's), and the gradient is that of the global batch's loss.
    """

    def __init__(self, trainer: "Trainer"):
        super().__init__(trainer)
        b = trainer.bundle
        self.n_attrs = len(b.attr_names)
        self.q = torch.full((b.num_classes * self.n_attrs,), 1.0 / (b.num_classes * self.n_attrs))

    def loss_terms(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        logits = self.trainer.model(batch["images"])
        losses = self.task_loss(logits, batch["labels"], reduction="none").float()
        groups = batch["labels"] * self.n_attrs + batch["attrs"]
        k = len(self.q)
        sums = losses.new_zeros(k).index_add(0, groups, losses)
        counts = torch.bincount(groups, minlength=k).to(losses)
        # summed over processes (differentiably: DDP's mean of the processes' gradients is the global batch's)
        sums, counts = self.trainer.dist.sum_over_ranks(torch.stack([sums, counts]))
        group_loss = sums / counts.clamp_min(1.0)  # the global batch's group means; 0 for a group it lacks
        q = self.q.to(logits.device) * torch.exp(self.trainer.recipe.groupdro.eta * group_loss.detach())
        q = q / q.sum()
        self.stage(q=q.detach().cpu())  # ``self.q`` changes only when the step is taken
        loss = (q * group_loss).sum()
        return {"loss": loss, "nll": losses.mean(), "worst_group_loss": group_loss.detach()[counts > 0].max()}

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = state["q"].clone()


@register("jtt")
class JTT(Method):
    """Just Train Twice (Liu et al. 2021). No group labels are used.

    Stage 1: ERM for ``jtt.first_epochs`` epochs (the identification model). Its error set is the training examples
    it misclassifies, read on the examples without augmentation jitter (``Split.unaugmented``): the training split is
    a fixed set of examples, so an index names the same example, with the same spurious attribute, in every epoch.
    Stage 2 (``jtt.variant = "retrain"``, the paper's): the model restarts from its initial weights with a fresh
    optimizer and schedule (``Trainer.reset_model_and_optimizer``) and trains ``train.epochs`` epochs with each error
    example drawn ``jtt.upweight`` times as often (``len(train)`` weighted draws with replacement per epoch: the
    upsampled set's composition at an ERM epoch's length). ``"continue"``: the identification model itself keeps
    training, upweighted, up to ``train.epochs``. The error set and the variant are method state, so a run resumed
    in stage 2 neither identifies nor restarts again.
    """

    def __init__(self, trainer: "Trainer"):
        super().__init__(trainer)
        self.cfg = trainer.recipe.jtt
        self.errors: torch.Tensor | None = None
        """Per training example (its index in the training split): misclassified by the identification model."""

    def extra_epochs(self) -> int:
        return self.cfg.first_epochs if self.cfg.variant == "retrain" else 0

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == self.cfg.first_epochs and self.errors is None:
            self.errors = self.error_set()
            if self.cfg.variant == "retrain":
                self.trainer.reset_model_and_optimizer()

    def error_set(self) -> torch.Tensor:
        """The training examples the model as it is now misclassifies (a boolean per example)."""
        from ..evaluate import predict

        trainer = self.trainer
        split = trainer.bundle.splits["train"].unaugmented()
        preds = predict(trainer.net, split, trainer.device)
        return (preds != split.labels).cpu()

    def sample_weights(self) -> torch.Tensor | None:
        if self.errors is None:
            return None
        return 1.0 + (self.cfg.upweight - 1.0) * self.errors.float()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.errors is None else {"errors": self.errors.clone(), "variant": self.cfg.variant}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "errors" in state and state.get("variant", "continue") != self.cfg.variant:
            raise DebiasError(f"the checkpoint's JTT error set was found with jtt.variant = "
                              f"{state.get('variant', 'continue')!r} (a checkpoint without the key predates the "
                              f"'retrain' variant), not {self.cfg.variant!r}; resume with that variant, or start the "
                              "run again with --force")
        self.errors = state.get("errors")


@register("reweight")
class Reweight(Method):
    """Group-balanced sampling: every (label, attribute) group present in training is drawn equally often."""

    def sample_weights(self) -> torch.Tensor | None:
        groups = self.trainer.bundle.splits["train"].groups
        counts = torch.bincount(groups).float()
        return 1.0 / counts[groups]


def _v2():
    """torchvision's transforms, imported when an augmentation is built (the import costs seconds, and recipe
    validation, which reads this module's names, must stay fast)."""
    import torchvision.transforms.v2 as T

    return T


def permute_channels(images: torch.Tensor) -> torch.Tensor:
    """Each image of an (N, C, H, W) batch with its channels in an order of its own (torchvision's
    ``RandomChannelPermutation``, one draw per image, in a few batched operations on the batch's device)."""
    order = torch.rand(images.shape[:2], device=images.device).argsort(1)
    return images[torch.arange(len(images), device=images.device)[:, None], order]


def random_grayscale(images: torch.Tensor, p: float) -> torch.Tensor:
    """Each image of an RGB batch turned gray with probability ``p`` (torchvision's ``RandomGrayscale``, one draw
    per image, batched); the gray images keep three channels."""
    pick = torch.rand(len(images), device=images.device) < p
    # every image converted, then chosen by a mask: no data-dependent shape (``images[pick]`` waits for the device)
    gray = _v2().functional.rgb_to_grayscale(images, num_output_channels=3)
    return torch.where(pick[:, None, None, None], gray, images)


def _per_image(transform):
    return lambda images: torch.stack([transform(img) for img in images])


AUGMENTATIONS = {  # each takes the recipe's augment section and returns a function of a batch
    "channel_permutation": lambda cfg: permute_channels,
    "grayscale": lambda cfg: partial(random_grayscale, p=cfg.grayscale_p),
    "color_jitter": lambda cfg: _per_image(_v2().ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.2)),
}


@register("augment")
class Augment(Method):
    """ERM on training images passed through recipe-given colour transforms, one draw per image: shows when plain
    augmentation against a known nuisance already suffices. Channel permutation and grayscale run batched on the
    batch's device (per image they cost ten times an ERM step on a GPU); colour jitter is torchvision's, per image."""

    def __init__(self, trainer: "Trainer"):
        super().__init__(trainer)
        cfg = trainer.recipe.augment
        self.transforms = [AUGMENTATIONS[name](cfg) for name in cfg.transforms]

    def loss_terms(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        images = batch["images"]
        for transform in self.transforms:
            images = transform(images)
        logits = self.trainer.model(images)
        nll = self.task_loss(logits, batch["labels"])
        return {"loss": nll, "nll": nll}


def build_method(name: str, trainer: "Trainer") -> Method:
    if name not in METHODS:
        raise DebiasError(f"train.method = {name!r}: expected one of {sorted(METHODS)}{did_you_mean(name, METHODS)}")
    return METHODS[name](trainer)
