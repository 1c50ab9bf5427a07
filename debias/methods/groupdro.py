"""``groupdro``: Group DRO (Sagawa et al. 2020), the oracle upper bound among the baselines."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..recipe_fields import _range
from .base import Method, MethodContext


@dataclass
class GroupDROCfg:
    """Group DRO (Sagawa et al. 2020): the loss is the group losses weighted by ``q``, which moves toward the worst
    group each step. Uses the training group labels."""

    eta: float = field(default=0.01, metadata=_range(0.0, None, lo_open=True))
    """Step size of the exponentiated-gradient update of the group weights (the paper's eta_q)."""


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

    name = "groupdro"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        b = ctx.bundle
        self.n_attrs = len(b.attr_names)
        self.q = torch.full((b.num_classes * self.n_attrs,), 1.0 / (b.num_classes * self.n_attrs))

    def loss_terms(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        logits = self.ctx.model(batch["images"])
        losses = self.task_loss(logits, batch["labels"], reduction="none").float()
        groups = batch["labels"] * self.n_attrs + batch["attrs"]
        k = len(self.q)
        sums = losses.new_zeros(k).index_add(0, groups, losses)
        counts = torch.bincount(groups, minlength=k).to(losses)
        # summed over processes (differentiably: DDP's mean of the processes' gradients is the global batch's)
        sums, counts = self.ctx.dist.sum_over_ranks(torch.stack([sums, counts]))
        group_loss = sums / counts.clamp_min(1.0)  # the global batch's group means; 0 for a group it lacks
        q = self.q.to(logits.device) * torch.exp(self.ctx.recipe.groupdro.eta * group_loss.detach())
        q = q / q.sum()
        self.stage(q=q.detach().cpu())  # ``self.q`` changes only when the step is taken
        loss = (q * group_loss).sum()
        return {"loss": loss, "nll": losses.mean(), "worst_group_loss": group_loss.detach()[counts > 0].max()}

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = state["q"].clone()


Config = GroupDROCfg
METHOD = GroupDRO
