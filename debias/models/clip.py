"""CLIP loading (open_clip) and the stage-by-stage view of its ResNet image tower that surgery needs.

Two sources behind one loader: the shipped digits CLIP (offline default) and any open_clip ResNet config
(``RN50-quickgelu`` with OpenAI weights from a local file or the hub cache; ``random`` weights for tests).
CLIP always sees its own preprocessing (resize to its image size, its own mean/std) while the standalone
model keeps its own; both are fed the same [0, 1] images.
"""
from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from ..errors import DebiasError, did_you_mean
from ..recipe import ClipCfg
from .hub import find_clip_weights, is_torchscript_archive, torchscript_message

CLIP_STAGES = ("layer1", "layer2", "layer3", "layer4")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipModel(nn.Module):
    """A frozen open_clip model with a ``ModifiedResNet`` image tower, exposed stage by stage.

    ``visual.stem`` is a method of ``ModifiedResNet`` (not a module), so the stages are run here by hand:
    ``stem -> layer1..layer4 -> attnpool``.
    """

    def __init__(self, model: nn.Module, tokenizer, mean: tuple, std: tuple, name: str):
        super().__init__()
        if not isinstance(getattr(model, "visual", None), ModifiedResNet):
            raise DebiasError(f"clip.name = {name!r}: the graft needs a ResNet image tower (ModifiedResNet); "
                              f"use one of {resnet_clip_names()}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.image_size = int(model.visual.image_size if isinstance(model.visual.image_size, int)
                              else model.visual.image_size[0])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def train(self, mode: bool = True) -> "ClipModel":
        """CLIP stays in eval mode (frozen BatchNorm statistics) whatever the caller does."""
        return super().train(False)

    @property
    def visual(self) -> ModifiedResNet:
        return self.model.visual

    def stage_channels(self) -> dict[str, int]:
        return {s: getattr(self.visual, s)[-1].conv3.out_channels for s in CLIP_STAGES}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB images -> CLIP input: resized (bicubic) to CLIP's size and normalised with its mean/std."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).clamp(0, 1)
        return (images - self.mean) / self.std

    def stages(self, images: torch.Tensor, upto: str = "layer4") -> dict[str, torch.Tensor]:
        """Stage outputs ``layer1..upto`` of the image tower for [0, 1] images."""
        x = self.visual.stem(self.preprocess(images))
        out = {}
        for name in CLIP_STAGES:
            x = getattr(self.visual, name)(x)
            out[name] = x
            if name == upto:
                break
        return out

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Attention pooling of a layer4 map -> normalised image embedding."""
        return F.normalize(self.visual.attnpool(x), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(images)["layer4"])

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Normalised text embeddings, cached per caption list (CLIP is frozen)."""
        key = tuple(captions)
        if key not in self._text_cache:
            device = self.mean.device
            tokens = self.tokenizer(list(captions)).to(device)
            self._text_cache[key] = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return self._text_cache[key]

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().clamp(max=100))


def resnet_clip_names() -> list[str]:
    return ["digits"] + [n for n in open_clip.list_models() if n.startswith("RN")]


def load_clip(cfg: ClipCfg, device: torch.device | str = "cpu") -> ClipModel:
    """Load the CLIP named by the recipe. Offline, a missing weights file is a clear error saying how to provide it."""
    if cfg.name == "digits":
        from .digits_clip import load_digits_clip

        loaded = load_digits_clip(device=device, path=cfg.pretrained or None)  # a regenerated copy, if given
        return ClipModel(loaded.model, loaded.tokenizer, loaded.mean, loaded.std, "digits").to(device)
    if cfg.name not in open_clip.list_models():
        raise DebiasError(f"clip.name = {cfg.name!r}: not an open_clip model{did_you_mean(cfg.name, resnet_clip_names())}"
                          f"; ResNet CLIPs: {resnet_clip_names()}")
    pretrained = cfg.pretrained or "openai"
    tokenizer = open_clip.get_tokenizer(cfg.name)
    if pretrained == "random":
        model = open_clip.create_model(cfg.name, pretrained=None, device=device)
    else:
        checkpoint = resolve_clip_weights(cfg.name, pretrained, cfg.cache_dir)
        try:
            model = open_clip.create_model(cfg.name, pretrained=checkpoint, device=device,
                                           cache_dir=cfg.cache_dir or None)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise DebiasError(f"clip.pretrained = {checkpoint!r}: could not load weights into {cfg.name}: "
                              f"{str(exc).splitlines()[0][:300]}") from None
    pcfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(pcfg.get("mean", OPENAI_MEAN))
    std = tuple(pcfg.get("std", OPENAI_STD))
    return ClipModel(model, tokenizer, mean, std, cfg.name).to(device)


def resolve_clip_weights(name: str, pretrained: str, cache_dir: str = "") -> str:
    """A local weights file for ``name``: the path itself, or the hub-cache file of a pretrained tag.

    Never downloads: the cache is read with the hub offline, and a miss says where to put the file.
    """
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not Path(pretrained).is_file():
            raise DebiasError(f"clip.pretrained = {pretrained!r}: weights file not found; download the "
                              f"{name} weights on a connected machine and give the local path")
        if is_torchscript_archive(pretrained):
            raise DebiasError(torchscript_message(pretrained))
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise DebiasError(f"clip.pretrained = {pretrained!r}: not a file and not a tag for {name}; "
                          f"available tags: {tags}")
    pcfg = open_clip.get_pretrained_cfg(name, pretrained)
    return find_clip_weights(name, pretrained, pcfg.get("hf_hub", ""), cache_dir, pcfg.get("url", ""))
