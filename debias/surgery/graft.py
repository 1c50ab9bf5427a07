"""The graft ("network surgery"): CLIP's image tower with matched channels coming from the standalone model.

``swap`` (the paper's surgery): in each grafted stage, every matched CLIP channel is overwritten by its
standalone channel, z-scored on the probe set and rescaled to the CLIP channel's probe mean and std (resized
bilinearly to the stage's grid). Unmatched channels keep CLIP's own value (``keep``) or are fixed to their
probe mean (``mean``), so they carry no image information. ``stitch``: the whole stage is replaced by a linear
map (1x1 conv) of all standalone taps, fitted in closed form on the probe set.

CLIP is frozen and in eval mode; the output is differentiable with respect to the standalone model's taps.
When a grafted stage is fully determined by the standalone model (``stitch``, ``unmatched = "mean"``, or every
channel matched), nothing of CLIP before it can reach the embedding, so those stages are not computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DebiasError
from ..models.clip import CLIP_STAGES, ClipModel
from .matching import Matching


class GraftedCLIP(nn.Module):
    def __init__(self, clip: ClipModel, matching: Matching, stages: list[str], mode: str = "swap",
                 unmatched: str = "mean"):
        super().__init__()
        if mode not in ("swap", "stitch"):
            raise DebiasError(f"graft.mode = {mode!r}: expected 'swap' or 'stitch'")
        if unmatched not in ("mean", "keep"):
            raise DebiasError(f"graft.unmatched = {unmatched!r}: expected 'mean' or 'keep'")
        self.clip = clip
        self.matching = matching
        self.mode = mode
        self.unmatched = unmatched
        self.stages = [s for s in CLIP_STAGES if s in stages]
        self._plan: dict[str, list[tuple[str, str, str, str]]] = {}
        if mode == "stitch":
            missing = [c for c in self.stages if c not in matching.stitch]
            if missing:
                raise DebiasError(f"graft.mode = 'stitch': no stitch fit for stages {missing}; re-run matching")
        for c in self.stages:
            m = matching.stages[c]
            self.register_buffer(f"{c}_mean", matching.c_mean[c].view(1, -1, 1, 1).clone(), persistent=False)
            self.register_buffer(f"{c}_std", matching.c_std[c].view(1, -1, 1, 1).clone(), persistent=False)
            self.register_buffer(f"{c}_matched", m.matched.clone(), persistent=False)
            plan = []
            for t_idx, tap in enumerate(matching.taps):
                sel = m.tap == t_idx
                if not sel.any():
                    continue
                dst = torch.nonzero(sel).flatten()
                src = m.channel[dst]
                key = f"{c}__{tap.replace('.', '_')}"
                self.register_buffer(f"{key}_dst", dst, persistent=False)
                self.register_buffer(f"{key}_src", src, persistent=False)
                self.register_buffer(f"{key}_smean", matching.s_mean[tap][src].view(1, -1, 1, 1).clone(),
                                     persistent=False)
                self.register_buffer(f"{key}_sstd", matching.s_std[tap][src].view(1, -1, 1, 1).clone(),
                                     persistent=False)
                plan.append((tap, key, f"{key}_dst", f"{key}_src"))
            self._plan[c] = plan
            if mode == "stitch":
                w, b = matching.stitch[c]
                self.register_buffer(f"{c}_stitch_w", w.clone(), persistent=False)
                self.register_buffer(f"{c}_stitch_b", b.clone(), persistent=False)
        self.start = self._first_needed_stage()

    def _fully_determined(self, c: str) -> bool:
        return self.mode == "stitch" or self.unmatched == "mean" or bool(getattr(self, f"{c}_matched").all())

    def _first_needed_stage(self) -> str | None:
        """The last grafted stage whose output ignores CLIP's own input; CLIP before it is skipped."""
        for c in reversed(self.stages):
            if self._fully_determined(c):
                return c
        return None

    def train(self, mode: bool = True) -> "GraftedCLIP":
        super().train(mode)
        self.clip.train(False)
        return self

    def _stage_shape(self, c: str, batch: int, ref: torch.Tensor) -> tuple[int, int, int, int]:
        size = self.clip.image_size // {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}[c]
        return batch, getattr(self, f"{c}_mean").shape[1], size, size

    def _replace(self, c: str, x: torch.Tensor | None, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        ref = next(iter(taps.values()))
        shape = self._stage_shape(c, ref.shape[0], ref) if x is None else x.shape
        size = shape[-2:]
        if self.mode == "stitch":
            feats = torch.cat([F.interpolate(taps[t].float(), size=size, mode="bilinear", align_corners=False)
                               if tuple(taps[t].shape[-2:]) != tuple(size) else taps[t].float()
                               for t in self.matching.taps], 1)
            w, b = getattr(self, f"{c}_stitch_w"), getattr(self, f"{c}_stitch_b")
            return torch.einsum("oc,nchw->nohw", w, feats) + b.view(1, -1, 1, 1)
        mean, std = getattr(self, f"{c}_mean"), getattr(self, f"{c}_std")
        if self.unmatched == "keep" and x is not None:
            out = x.clone()
        else:
            out = mean.expand(shape).to(ref.dtype).clone()
        for tap, key, dst_name, src_name in self._plan[c]:
            src = taps[tap][:, getattr(self, src_name)]
            z = (src - getattr(self, f"{key}_smean")) / getattr(self, f"{key}_sstd")
            if tuple(z.shape[-2:]) != tuple(size):
                z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            dst = getattr(self, dst_name)
            out[:, dst] = (z * std[:, dst] + mean[:, dst]).to(out.dtype)
        return out

    def forward(self, images: torch.Tensor, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised image embedding of the grafted tower. ``images`` in [0, 1]; ``taps`` from the standalone model."""
        visual = self.clip.visual
        x: torch.Tensor | None = None
        started = self.start is None
        if started:
            x = visual.stem(self.clip.preprocess(images))
        for c in CLIP_STAGES:
            if not started:
                if c != self.start:
                    continue
                started = True
                x = self._replace(c, None, taps)
                continue
            x = getattr(visual, c)(x)
            if c in self.stages:
                x = self._replace(c, x, taps)
        return self.clip.head(x)

    def summary(self) -> dict:
        return {"mode": self.mode, "stages": self.stages, "unmatched": self.unmatched,
                "selection": self.matching.selection, "clip_computed_from": self.start or "stem",
                "matching": {c: s for c, s in self.matching.summary().items() if c in self.stages}}
