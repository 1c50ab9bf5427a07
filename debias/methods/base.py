"""The method interface (DomainBed's shape: every method is ERM plus something) and the context a method sees.

A method turns a batch into named loss terms; the trainer owns backward, the optimizer, AMP and DDP, so every
method gets them for free. ``loss_terms`` returns tensors with a ``loss`` entry (what is optimised) and any
parts worth logging (``nll``, ``penalty`` ...). A method reads the run through a :class:`MethodContext`, never the
trainer itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..concepts import ConceptSet
    from ..data import DatasetBundle
    from ..distributed import Dist
    from ..models.standalone import StandaloneModel
    from ..recipe import Recipe
    from .graft_schedule import GraftSchedule


@dataclass
class MethodContext:
    """What a method may read and call: the run's pieces, never the trainer.

    ``step`` and ``epoch`` are the trainer's counters as they are now (read through ``clock``); ``total_steps`` is
    the length of one learning-rate schedule (``train.epochs``)."""

    recipe: "Recipe"
    bundle: "DatasetBundle"
    """The dataset: splits, the unlabeled stream, class and attribute names."""
    model: torch.nn.Module
    """What training forwards call: the plain model, or its DistributedDataParallel wrapper."""
    net: "StandaloneModel"
    """The plain standalone model (its taps, its pre-logits, evaluation)."""
    device: torch.device
    dist: "Dist"
    concepts: list["ConceptSet"]
    clip: Any
    total_steps: int
    grafts: "GraftSchedule"
    """The matchings of the model to CLIP and their grafts, shared with the per-epoch tracking."""
    next_unlabeled: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    """The next batch of the unlabeled stream: this process's images and their indices in the stream."""
    restart: Callable[[], None]
    """Start training over from the initial weights with a fresh optimizer and schedule (JTT's second stage)."""
    clock: Callable[[], tuple[int, int]]
    """The trainer's (epoch, step) now."""

    @property
    def epoch(self) -> int:
        return self.clock()[0]

    @property
    def step(self) -> int:
        return self.clock()[1]


class Method:
    """Base: plain empirical risk minimisation."""

    name = "base"
    needs_unlabeled = False
    """True when the method draws batches from the unlabeled stream (the trainer then provides them)."""

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
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
        logits = self.ctx.model(batch["images"])
        nll = self.task_loss(logits, batch["labels"])
        return {"loss": nll, "nll": nll}

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy on labelled images, with the recipe's ``train.label_smoothing``."""
        return F.cross_entropy(logits, labels, reduction=reduction,
                               label_smoothing=self.ctx.recipe.train.label_smoothing)

    def sample_weights(self) -> torch.Tensor | None:
        """Per-example sampling weights for the training split (None = uniform shuffling)."""
        return None

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for methods with stages (JTT's second phase)."""

    def extra_epochs(self) -> int:
        """Epochs the method trains before ``train.epochs`` begin over from a restarted model (JTT's first stage,
        which ends with ``ctx.restart()``); 0 for a single stage."""
        return 0

    def on_train_end(self) -> bool:
        """Hook after the last epoch (its checkpoint written), before the final evaluation: a post-hoc step on the
        trained model (``leace``'s erasure). True when it changed the model: the trainer then writes the checkpoint
        and ``model.safetensors`` again, so the evaluation, a resumed run and ``debias explain`` read the changed
        model. A run resumed after that checkpoint calls it again: the method's state says the step is done (and
        it returns False)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Method state that a resumed run needs (GroupDRO's weights, JTT's error set)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters of the method's own (an adversary): the trainer optimises them with the model's,
        as a second group with the same learning rate and schedule, and averages their gradients over processes."""
        return []
