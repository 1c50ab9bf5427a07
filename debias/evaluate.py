"""Robustness evaluation: accuracy per split and per group, worst-group accuracy."""
from __future__ import annotations

import torch
from sklearn.metrics import accuracy_score
from torch.utils.data import DataLoader

from .data.splits import Split


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    was_training = model.training
    model.eval()
    preds = []
    for images, _, _ in DataLoader(split, batch_size=batch_size, shuffle=False):
        preds.append(model(images.to(device)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def split_metrics(preds: torch.Tensor, split: Split) -> dict:
    """``{"accuracy", "worst_group_accuracy", "groups": {"5|red": acc, ...}}`` over groups present in the split."""
    y, g = split.labels.numpy(), split.groups.numpy()
    p = preds.numpy()
    names = split.group_names()
    groups = {}
    for gi in sorted(set(g.tolist())):
        sel = g == gi
        groups[names[gi]] = float(accuracy_score(y[sel], p[sel]))
    return {"accuracy": float(accuracy_score(y, p)), "worst_group_accuracy": min(groups.values()) if groups else 0.0,
            "groups": groups, "n": int(len(y))}


def evaluate_splits(model: torch.nn.Module, splits: dict[str, Split], device: torch.device) -> dict[str, dict]:
    return {name: split_metrics(predict(model, split, device), split) for name, split in splits.items()}
