"""Training methods behind one interface (DomainBed's shape): every method is ERM plus something.

A method turns a batch into named loss terms; the trainer owns backward, the optimizer, AMP and DDP, so every
method gets them for free. ``loss_terms`` returns tensors with a ``loss`` entry (what is optimised) and any
parts worth logging (``nll``, ``penalty`` ...).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ..errors import DebiasError, did_you_mean

if TYPE_CHECKING:
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

    def loss_terms(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        logits = self.trainer.model(batch["images"])
        nll = F.cross_entropy(logits, batch["labels"])
        return {"loss": nll, "nll": nll}

    def sample_weights(self) -> torch.Tensor | None:
        """Per-example sampling weights for the training split (None = uniform shuffling)."""
        return None

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for methods with stages (JTT's second phase)."""

    def state_dict(self) -> dict[str, Any]:
        """Method state that a resumed run needs (GroupDRO's weights, JTT's error set)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@register("erm")
class ERM(Method):
    """Cross-entropy on the training batch."""


def build_method(name: str, trainer: "Trainer") -> Method:
    if name not in METHODS:
        raise DebiasError(f"train.method = {name!r}: expected one of {sorted(METHODS)}{did_you_mean(name, METHODS)}")
    return METHODS[name](trainer)
