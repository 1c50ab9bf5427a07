"""The standalone model: any timm CNN by name, giving logits and stage taps from one forward pass."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import DebiasError, did_you_mean


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
    """timm's ``create_model``; a local weights file goes through timm's pretrained loader, which adapts the
    classifier to ``num_classes``. Unknown names list the close ones."""
    if not timm.is_model(name.split(".")[0]) and not timm.is_model(name):
        close = did_you_mean(name, timm.list_models(), n=5)
        raise DebiasError(f"model.name = {name!r}: not a timm model{close}; see timm.list_models()")
    kwargs: dict = {"num_classes": num_classes}
    if checkpoint:
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
