"""The standalone model: any timm CNN by name, giving logits and stage taps from one forward pass."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import timm
import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import DebiasError, did_you_mean
from .backbone import is_shipped, pretrained_overlay, shipped_weights


class StandaloneModel(nn.Module):
    """A timm CNN that takes images in [0, 1] and normalises them with its own pretrained mean/std.

    ``forward(x)`` gives logits; ``forward(x, taps=True)`` (or ``forward_taps(x)``) gives logits and the stage
    outputs (the taps matched against CLIP), using timm's ``forward_intermediates`` + ``forward_head`` so nothing
    runs twice. The taps path is a ``forward`` argument so that it also runs through DistributedDataParallel's
    forward (which only wraps ``forward``) when training on several processes.
    """

    def __init__(self, name: str, num_classes: int, pretrained: bool = False, checkpoint: str = ""):
        super().__init__()
        self.name = name
        self.net = create_timm_model(name, num_classes, pretrained, checkpoint)
        if not hasattr(self.net, "forward_intermediates"):
            raise DebiasError(f"model.name = {name!r}: this timm model has no forward_intermediates; "
                              "pick a CNN such as resnet18, resnet50 or convnext_tiny")
        cfg = self.net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1),
                             persistent=False)
        self.tap_names: list[str] = [info["module"] for info in self.net.feature_info]
        self.tap_channels: dict[str, int] = {info["module"]: info["num_chs"] for info in self.net.feature_info}
        self.num_classes = num_classes

    @torch.no_grad()
    def check_input(self, image: torch.Tensor) -> None:
        """Fail with a clear error, before any training, when this model cannot take the dataset's images or its
        stage taps are not feature maps (the graft correlates ``(N, C, H, W)`` maps with CLIP's ResNet stages).
        One forward of one image in eval mode: no random numbers drawn, no BatchNorm statistics moved."""
        training = self.training
        self.eval()
        try:
            taps = self(image[None].to(self.mean.device), taps=True)[1]
        except (AssertionError, RuntimeError, ValueError) as e:
            raise DebiasError(f"model.name = {self.name!r}: the model cannot take this dataset's "
                              f"{tuple(image.shape[-2:])} images ({str(e).splitlines()[0]}); pick a CNN such as "
                              "resnet18, resnet50 or convnext_tiny") from None
        finally:
            self.train(training)
        flat = [t for t, v in taps.items() if v.dim() != 4]
        if flat:
            raise DebiasError(f"model.name = {self.name!r}: its taps {flat} are not (N, C, H, W) feature maps, which "
                              "the graft needs; pick a CNN such as resnet18, resnet50 or convnext_tiny")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, taps: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits, or ``(logits, {tap name: stage output})`` when ``taps``."""
        if not taps:
            return self.net(self.normalize(x))
        final, intermediates = self.net.forward_intermediates(self.normalize(x))
        logits = self.net.forward_head(final)
        return logits, dict(zip(self.tap_names, intermediates))

    @property
    def pre_logits_width(self) -> int:
        """Width of :meth:`pre_logits`'s features."""
        return getattr(self.net, "head_hidden_size", None) or self.net.num_features

    def pre_logits(self, last_tap: torch.Tensor) -> torch.Tensor:
        """The features the classifier reads, from the last tap: timm's ``forward_head(pre_logits=True)`` (global
        pooling, and the head's norm where it has one, as in convnext). The last tap is the final feature map that
        ``forward_intermediates`` hands the head for the resnet and convnext families."""
        return self.net.forward_head(last_tap, pre_logits=True)

    def forward_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and taps (same as ``self(x, taps=True)``; kept for callers holding the unwrapped model)."""
        return self(x, taps=True)


def create_timm_model(name: str, num_classes: int, pretrained: bool, checkpoint: str) -> nn.Module:
    """timm's ``create_model``; a local weights file, or a shipped backbone named by ``checkpoint``
    (:mod:`debias.models.backbone`, checksum verified), goes through timm's pretrained loader, which adapts the
    classifier to ``num_classes``. Unknown names list the close ones."""
    if not timm.is_model(name.split(".")[0]) and not timm.is_model(name):
        close = did_you_mean(name, timm.list_models(), n=5)
        raise DebiasError(f"model.name = {name!r}: not a timm model{close}; see timm.list_models()")
    kwargs: dict = {"num_classes": num_classes}
    if is_shipped(checkpoint):
        kwargs.update(pretrained=True, pretrained_cfg_overlay=pretrained_overlay(shipped_weights(checkpoint, name)))
    elif checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise DebiasError(f"model.checkpoint = {checkpoint!r}: file not found; give the path of a local "
                              "weights file (.safetensors, .pth or .bin) for this timm model")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    elif pretrained:
        kwargs["pretrained"] = True
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:  # the last: a corrupt .safetensors file
        if pretrained and not checkpoint:
            raise DebiasError(f"model.pretrained = true for {name!r}: weights are not in the local cache and "
                              f"cannot be downloaded ({type(exc).__name__}); set model.checkpoint to a local "
                              "weights file or put them in the Hugging Face cache (HF_HOME)") from None
        raise DebiasError(f"model {name!r} could not be created from {checkpoint or 'scratch'}: {exc}") from None


def load_fitting_weights(model: nn.Module, state: Mapping[str, torch.Tensor], meta: Mapping[str, str],
                         model_name: str, class_names: list[str], path: str | Path,
                         require_meta: bool = False) -> None:
    """Load a checkpoint's weights ``state`` into ``model`` (the recipe's ``model_name`` on ``class_names``), after
    checking that they fit, with a one-line :class:`DebiasError` naming ``path`` when not: the model name and class
    list the checkpoint's ``meta`` records (``require_meta``: it must record both), then every key and shape."""
    recorded = meta.get("model"), meta.get("classes")
    if require_meta and None in recorded:
        raise DebiasError(f"{path}: the checkpoint records no model name or class list; expected a checkpoint "
                          f"of {model_name!r} on classes [{','.join(class_names)}] written by `debias train`")
    if recorded[0] and recorded[0] != model_name:
        raise DebiasError(f"{path}: checkpoint is a {recorded[0]!r} model but the recipe's model.name is "
                          f"{model_name!r}")
    if recorded[1] and recorded[1] != ",".join(class_names):
        raise DebiasError(f"{path}: checkpoint was trained on classes [{recorded[1]}] but the recipe has "
                          f"[{','.join(class_names)}] (data.classes)")
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if bad or missing or unexpected:
        detail = bad[:3] if bad else [f"missing {missing[:3]}"] if missing else [f"unexpected {unexpected[:3]}"]
        raise DebiasError(f"{path}: checkpoint does not fit {model_name} with {len(class_names)} classes "
                          f"({'; '.join(detail)})")
    model.load_state_dict(state)
