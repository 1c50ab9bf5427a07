"""Robustness evaluation: accuracy per split and per group, worst-group accuracy."""
from __future__ import annotations

import torch
from sklearn.metrics import accuracy_score
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from .data.splits import Split
from .distributed import Dist


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, device: torch.device, batch_size: int = 256,
            dist: Dist | None = None) -> torch.Tensor:
    """Predicted class of every image of ``split``.

    A DistributedDataParallel wrapper is looked through (evaluation needs no gradient sync, and the wrapper's
    forward is a collective). ``dist``: each process predicts a contiguous block and the blocks are gathered,
    so every process returns all predictions.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    was_training = model.training
    model.eval()
    preds = []
    n = len(split)
    sharded = dist is not None and dist.active
    data = Subset(split, range(*dist.block(n))) if sharded else split
    for images, _, _ in DataLoader(data, batch_size=batch_size, shuffle=False):
        preds.append(model(images.to(device)).argmax(1).cpu())
    model.train(was_training)
    out = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return dist.gather_blocks(out, n) if sharded else out


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


def evaluate_splits(model: torch.nn.Module, splits: dict[str, Split], device: torch.device,
                    dist: Dist | None = None) -> dict[str, dict]:
    """Metrics of every split; with ``dist`` the predictions are computed in blocks and gathered on all ranks."""
    return {name: split_metrics(predict(model, split, device, dist=dist), split) for name, split in splits.items()}
