"""The trainer: one loop for every method, with checkpoints, TensorBoard, a progress bar and the final evaluation.

A run directory holds ``recipe.toml`` (resolved), ``model.safetensors`` + ``state.pt`` (last checkpoint),
``metrics.json``, ``tb/`` (TensorBoard events), plots, and a ``done`` marker once finished.
"""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from .. import io
from ..concepts import build_concepts
from ..data import load_dataset
from ..errors import DebiasError
from ..evaluate import evaluate_splits
from ..explain import compute_matching, explain_model, probe_split
from ..models.clip import load_clip
from ..models.standalone import StandaloneModel
from ..recipe import Recipe, recipe_to_toml
from .methods import build_method


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DebiasError(f"train.device = {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DebiasError(f"train.device = {name!r}: CUDA is not available on this machine; use 'auto' or 'cpu'")
    return device


def _cosine_with_warmup(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))
    return factor


class Trainer:
    """Trains the standalone model with the recipe's method, then evaluates and explains it."""

    def __init__(self, recipe: Recipe, out: str | Path, progress: bool = True):
        self.recipe = recipe
        self.out = Path(out)
        self.progress = progress
        self.device = resolve_device(recipe.train.device)
        seed_everything(recipe.seed)
        self.bundle = load_dataset(recipe)
        self.model = StandaloneModel(recipe.model.name, self.bundle.num_classes, recipe.model.pretrained,
                                     recipe.model.checkpoint).to(self.device)
        self._clip = None
        self.concepts = build_concepts(recipe, self.bundle)
        self.method = build_method(recipe.train.method, self)
        t = recipe.train
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.steps_per_epoch = max(1, -(-len(self.bundle.splits["train"]) // t.batch_size))
        total = self.steps_per_epoch * t.epochs
        warmup = int(round(t.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _cosine_with_warmup(total, warmup))
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self.writer: SummaryWriter | None = None

    @property
    def clip(self):
        """CLIP is loaded on first use (ERM training does not need it until the explanation)."""
        if self._clip is None:
            self._clip = load_clip(self.recipe.clip, self.device)
        return self._clip

    # ------------------------------------------------------------------------------------------- data
    def train_loader(self, epoch: int) -> DataLoader:
        split = self.bundle.splits["train"]
        split.set_epoch(epoch)
        gen = torch.Generator().manual_seed(self.recipe.seed * 7_919 + epoch)
        weights = self.method.sample_weights()
        if weights is not None:
            sampler = WeightedRandomSampler(weights.double(), num_samples=len(split), replacement=True, generator=gen)
            return DataLoader(split, batch_size=self.recipe.train.batch_size, sampler=sampler)
        return DataLoader(split, batch_size=self.recipe.train.batch_size, shuffle=True, generator=gen)

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        r = self.recipe
        self.out.mkdir(parents=True, exist_ok=True)
        io.atomic_write_text(self.out / "recipe.toml", recipe_to_toml(r))
        self.writer = SummaryWriter(str(self.out / "tb"))
        t0 = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch * r.train.epochs, initial=self.step, desc=f"train {r.train.method}",
                   unit="step", disable=not self.progress)
        for epoch in range(self.epoch, r.train.epochs):
            self.method.on_epoch_start(epoch)
            self.model.train()
            for images, labels, attrs in self.train_loader(epoch):
                batch = {"images": images.to(self.device), "labels": labels.to(self.device),
                         "attrs": attrs.to(self.device)}
                ts = time.perf_counter()
                terms = self.method.loss_terms(batch, self.step)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise DebiasError(f"non-finite loss at step {self.step} (epoch {epoch}): "
                                      + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.step_times.append(time.perf_counter() - ts)
                if self.step % r.train.log_every == 0:
                    for k, v in terms.items():
                        self.writer.add_scalar(f"train/{k}", float(v), self.step)
                    self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
            self.epoch = epoch + 1
            val = evaluate_splits(self.model, {"val": self.bundle.splits["val"]}, self.device)["val"]
            self.writer.add_scalar("val/accuracy", val["accuracy"], self.epoch)
            self.history.append({"epoch": self.epoch, "val_accuracy": val["accuracy"]})
            self.save_checkpoint()
        bar.close()
        train_s = time.perf_counter() - t0
        return self.finish(train_s)

    # ------------------------------------------------------------------------------------------- end of run
    def finish(self, train_s: float) -> dict[str, Any]:
        r = self.recipe
        splits = evaluate_splits(self.model, self.bundle.splits, self.device)
        for name, m in splits.items():
            self.writer.add_scalar(f"final/{name}/accuracy", m["accuracy"], self.epoch)
            self.writer.add_scalar(f"final/{name}/worst_group_accuracy", m["worst_group_accuracy"], self.epoch)
        explanation = self.explain()
        metrics = {
            "method": r.train.method,
            "seed": r.seed,
            "splits": splits,
            "explain": explanation,
            "timing": {"train_s": train_s,
                       "step_s_median": statistics.median(self.step_times) if self.step_times else 0.0,
                       "steps": self.step},
            "history": self.history,
            "recipe": r.to_dict(),
        }
        io.atomic_write_json(self.out / "metrics.json", metrics)
        from ..report import plot_concept_scores

        plot_concept_scores(explanation, self.out / "concept_scores.png",
                            title=f"{r.model.name} / {r.train.method} / bias {r.data.bias}")
        self.writer.close()
        io.atomic_write_text(self.out / io.DONE_MARKER, "finished\n")
        return metrics

    def explain(self) -> dict[str, Any]:
        r = self.recipe
        split_name = r.explain.split
        if split_name not in self.bundle.splits:
            raise DebiasError(f"explain.split = {split_name!r}: not a split of this dataset; "
                              f"splits: {sorted(self.bundle.splits)}")
        matching = compute_matching(self.model, self.clip, probe_split(r, self.bundle), r, self.device,
                                    self.progress)
        io.save_tensors(self.out / "matching.safetensors", matching.state_dict())
        return explain_model(self.model, self.clip, matching, r, self.bundle.splits[split_name], self.concepts,
                             self.device, self.progress)

    def save_checkpoint(self) -> None:
        io.save_tensors(self.out / "model.safetensors", self.model.state_dict(),
                        metadata={"model": self.recipe.model.name, "num_classes": str(self.bundle.num_classes),
                                  "classes": ",".join(self.bundle.class_names), "epoch": str(self.epoch)})
        io.save_state(self.out / "state.pt", {
            "epoch": self.epoch, "step": self.step,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "method": self.method.state_dict(), "history": self.history,
            "step_times": torch.tensor(self.step_times, dtype=torch.float64),
        })
