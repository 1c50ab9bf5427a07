"""The matchings of the model being trained to CLIP and the grafts built from them: one object that the trainer's
per-epoch tracking, the final explanation and the concept penalty share.

Two grafts are kept. The **latest** is the newest matching (with the epoch and step it was computed at): the
per-epoch tracking matches the model every epoch and reads it, and so does the final explanation. The **penalty's**
is the one ``concept`` (``source = 'graft'``) reads, rebuilt on ``concept.rematch_every``'s schedule: when both are
due at once it is the latest itself (the same model is never matched twice), in between it is an older one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..errors import DebiasError
from ..explain import build_graft, compute_matching, probe_split

if TYPE_CHECKING:
    import torch

    from ..data import DatasetBundle
    from ..distributed import Dist
    from ..models.standalone import StandaloneModel
    from ..recipe import Recipe
    from ..surgery.matching import Matching


class GraftSchedule:
    """The latest matching and graft, and the penalty's graft, with their state for checkpoints."""

    def __init__(self, net: "StandaloneModel", clip: Any, recipe: "Recipe", bundle: "DatasetBundle",
                 device: "torch.device", dist: "Dist", clock: Callable[[], tuple[int, int]]):
        self.net, self.clip, self.recipe, self.bundle, self.device, self.dist = net, clip, recipe, bundle, device, dist
        self.clock = clock
        """The trainer's (epoch, step) now: a matching is stamped with them."""
        self.matching: "Matching | None" = None
        self.graft = None
        self.epoch = -1
        """The epoch the latest matching was computed at (-1: none)."""
        self.step = -1
        """The training step the latest matching was computed at (a model matched once is not matched again)."""
        self.penalty_graft = None
        """The graft the concept penalty reads (None: not built yet)."""
        self.penalty_epoch = -1
        """The epoch of the matching ``penalty_graft`` was built from (-1: none yet)."""

    # ------------------------------------------------------------------------------------------- matching
    def _build(self, matching: "Matching"):
        return build_graft(self.clip, matching, self.recipe).to(self.device)

    def _restore(self, state: dict[str, Any]) -> "Matching":
        from ..surgery.matching import Matching

        return Matching.from_state_dict(state, self.net.tap_names, self.recipe.matching.selection)

    def rematch(self) -> None:
        """Match the current model to CLIP on the probe images and rebuild the latest graft."""
        self.matching = compute_matching(self.net, self.clip, probe_split(self.recipe, self.bundle), self.recipe,
                                         self.device, progress=False, dist=self.dist)
        self.graft = self._build(self.matching)
        self.epoch, self.step = self.clock()

    def current(self) -> "Matching":
        """The matching of the current epoch (the tracking's, the explanation's): matched now unless it is."""
        if self.epoch != self.clock()[0] or self.matching is None:
            self.rematch()
        return self.matching

    def refresh_penalty(self, epoch: int, every: int) -> None:
        """At the start of ``epoch``: give the penalty a graft of the model as it is now when it has none, or every
        ``every`` epochs (0: only the first); the latest matching is shared when it is of this very model."""
        if self.penalty_graft is None or (every and epoch % every == 0 and self.penalty_epoch != epoch):
            if self.graft is None or self.step != self.clock()[1]:
                self.rematch()  # else the end-of-epoch tracking has just matched this very model: shared
            self.penalty_graft, self.penalty_epoch = self.graft, self.epoch

    def share_latest_with_penalty(self) -> None:
        """The penalty reads the latest graft (a checkpoint written before the penalty kept its own)."""
        self.penalty_graft, self.penalty_epoch = self.graft, self.epoch

    def reset(self) -> None:
        """Forget every matching (the model restarted: JTT's second stage)."""
        self.matching = self.graft = self.penalty_graft = None
        self.epoch = self.step = self.penalty_epoch = -1

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The latest matching, for the trainer's checkpoint (keys ``matching``, ``matching_epoch``,
        ``matching_step``)."""
        return {"matching": self.matching.state_dict() if self.matching is not None else {},
                "matching_epoch": self.epoch, "matching_step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["matching"]:
            self.matching = self._restore(state["matching"])
            self.epoch = int(state["matching_epoch"])
            self.step = int(state.get("matching_step", -1))
            self.graft = self._build(self.matching)

    def penalty_state_dict(self) -> dict[str, Any]:
        """The penalty's graft, for the method's state: its epoch, and its matching when it is not the latest."""
        import torch

        if self.penalty_graft is None:
            return {}
        state: dict[str, Any] = {"graft_epoch": torch.tensor(self.penalty_epoch)}
        if self.penalty_graft is not self.graft:  # an older matching than the latest: the checkpoint's own
            state["graft_matching"] = self.penalty_graft.matching.state_dict()
        return state

    def load_penalty_state(self, state: dict[str, Any]) -> None:
        """Restore the penalty's graft (after ``load_state_dict``, whose latest it may share)."""
        if "graft_epoch" not in state:
            return
        self.penalty_epoch = int(state["graft_epoch"])
        if "graft_matching" in state:
            self.penalty_graft = self._build(self._restore(state["graft_matching"]))
        elif self.graft is None:  # a method state loaded without a trainer checkpoint: matched when needed
            self.penalty_epoch = -1
        elif self.epoch == self.penalty_epoch:
            self.penalty_graft = self.graft
        else:
            raise DebiasError(f"the checkpoint's concept state names the matching of epoch {self.penalty_epoch}, "
                              f"which it does not hold (the trainer's is of epoch {self.epoch}); "
                              "start the run again with --force")
