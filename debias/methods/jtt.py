"""``jtt``: Just Train Twice (Liu et al. 2021), no group labels used."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DebiasError, RecipeError
from ..recipe_fields import _choices, _range
from .base import Method, MethodContext

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass
class JTTCfg:
    """Just Train Twice (Liu et al. 2021): an ERM model trained for ``first_epochs`` names the training examples it
    gets wrong (the error set); they are then drawn ``upweight`` times as often."""

    first_epochs: int = field(default=2, metadata=_range(1, None))
    """Epochs of the identification model: ERM under ``train.epochs``' learning-rate schedule, stopped there."""
    upweight: float = field(default=20.0, metadata=_range(1.0, None))
    """How many times as often an error-set example is drawn as any other (the paper's lambda_up)."""
    variant: str = field(default="retrain", metadata=_choices("retrain", "continue"))
    """``retrain`` (the paper's): after the identification model's ``first_epochs`` epochs, the model is
    re-initialised (the seed's initial weights, a fresh optimizer and learning-rate schedule) and trained for
    ``train.epochs`` epochs on the upweighted set, so the run takes ``first_epochs + train.epochs`` epochs and the
    final model never saw the identification model's training. ``continue``: the same model keeps training, upweighted
    from epoch ``first_epochs`` to ``train.epochs`` (a cheaper variant, not the published method)."""


def validate(recipe: "Recipe") -> None:
    """With ``train.method = 'jtt'``: the upweighted stage must run, inside the learning-rate schedule."""
    t, jtt = recipe.train, recipe.jtt
    if t.method == "jtt" and jtt.variant == "continue" and jtt.first_epochs >= t.epochs:
        raise RecipeError(f"jtt.first_epochs = {jtt.first_epochs} with train.epochs = {t.epochs} and "
                          "jtt.variant = 'continue': the upweighted stage would never run (plain ERM); expected "
                          "jtt.first_epochs < train.epochs")
    if t.method == "jtt" and jtt.variant == "retrain" and jtt.first_epochs > t.epochs:
        raise RecipeError(f"jtt.first_epochs = {jtt.first_epochs} with train.epochs = {t.epochs}: the "
                          "identification model is ERM under train.epochs' learning-rate schedule, which has ended "
                          "by then; expected jtt.first_epochs <= train.epochs")


class JTT(Method):
    """Just Train Twice (Liu et al. 2021). No group labels are used.

    Stage 1: ERM for ``jtt.first_epochs`` epochs (the identification model). Its error set is the training examples
    it misclassifies, read on the examples without augmentation jitter (``Split.unaugmented``): the training split is
    a fixed set of examples, so an index names the same example, with the same spurious attribute, in every epoch.
    Stage 2 (``jtt.variant = "retrain"``, the paper's): the model restarts from its initial weights with a fresh
    optimizer and schedule (``ctx.restart``, the trainer's ``reset_model_and_optimizer``) and trains
    ``train.epochs`` epochs with each error example drawn ``jtt.upweight`` times as often (``len(train)`` weighted
    draws with replacement per epoch: the upsampled set's composition at an ERM epoch's length). ``"continue"``: the
    identification model itself keeps training, upweighted, up to ``train.epochs``. The error set and the variant
    are method state, so a run resumed in stage 2 neither identifies nor restarts again.
    """

    name = "jtt"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.cfg = ctx.recipe.jtt
        self.errors: torch.Tensor | None = None
        """Per training example (its index in the training split): misclassified by the identification model."""

    def extra_epochs(self) -> int:
        return self.cfg.first_epochs if self.cfg.variant == "retrain" else 0

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == self.cfg.first_epochs and self.errors is None:
            self.errors = self.error_set()
            if self.cfg.variant == "retrain":
                self.ctx.restart()

    def error_set(self) -> torch.Tensor:
        """The training examples the model as it is now misclassifies (a boolean per example)."""
        from ..evaluate import predict

        split = self.ctx.bundle.splits["train"].unaugmented()
        preds = predict(self.ctx.net, split, self.ctx.device)
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


Config = JTTCfg
METHOD = JTT
