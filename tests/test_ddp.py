"""Two processes (torchrun, DistributedDataParallel over gloo on the CPU) against one, same global batch.

Run with ``-s`` to see both runs' figures side by side.

Tolerances, and why:
- ``test_convnext`` (LayerNorm: no statistic across images inside the network) with the ``concept`` method: the two
  runs compute the same gradient for every step (measured at the first step: 1.7e-6 relative): each process takes
  half of each global batch, DDP averages the two half-batch cross-entropy means (= the global mean when the halves
  are equal; the last batch of an epoch, 15 = 8 + 7 images, weighs them 1/16 and 1/14 instead of 1/15), and the
  penalty's mutual information is computed on the gathered global unlabeled batch. Otherwise only float summation
  order differs (the all-reduce, the batch split); Adam can amplify such noise on near-zero gradients, so after a
  few steps weights differ by ~1e-4 and an image on the decision boundary may flip. Allowed: 0.05 on every accuracy,
  worst-group accuracy, concept score and control; the dominant concept must agree.
- ``test_resnet`` (BatchNorm) with ``erm`` (learning rate 0.01, so that one epoch learns the colour): each process
  normalises with the statistics of its half batch (16 images instead of 32; SyncBatchNorm has no CPU kernel),
  which changes the gradient itself (by tens of percent at initialisation); the two runs are different but equally
  valid trainings. Allowed: 0.25 on accuracies and scores on this tiny budget, where a colour-led model is near 1.0
  on the biased splits and at chance elsewhere; the one-draw random-matching controls are printed, not compared
  (one random graft of a different model).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

from debias.cli import main
from debias.io import load_state

ROOT = Path(__file__).resolve().parent.parent
BASE = ["data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2", "matching.num_images=64",
        "explain.control_draws=1", "train.batch_size=32", "concept.unlabeled_batch_size=8"]
CASES = {  # overrides, tolerance, whether the random-matching controls (one draw) are compared, figures left out
    "layernorm_concept": (["model.name=test_convnext", "train.method=concept", "train.epochs=2"], 0.05, True, ()),
    # the adversary's parameters sit outside DDP: the trainer averages their gradients over the processes
    "layernorm_concept_adversary": (["model.name=test_convnext", "train.method=concept", "train.epochs=2",
                                     "concept.weight=0", "concept.adversary_weight=1"], 0.05, True, ()),
    # BatchNorm normalises with each process's share of the batch, so the two runs train slightly different models.
    # This one reads colour (swapped 0.000 in both); its digit score, how the graft's digit captions happen to line
    # up with a colour-reading CNN, is no stable function of that behaviour: 0.84 vs 0.58 with every accuracy
    # identical, on the 2-core CI machine of 2026-11-27. Accuracies, the colour score and the verdict are compared.
    "batchnorm_erm": (["model.name=test_resnet", "train.method=erm", "train.epochs=1", "train.lr=0.01"], 0.25, False,
                      ("score/digit",)),
}


def _figures(metrics: dict) -> dict[str, float]:
    """Accuracy and worst-group accuracy per split, concept scores and controls (NaN, stored as null, kept NaN)."""
    out = {}
    for split, m in metrics["splits"].items():
        out[f"{split}/accuracy"] = m["accuracy"]
        out[f"{split}/worst_group"] = m["worst_group_accuracy"]
    for name, v in metrics["explain"]["scores"].items():
        out[f"score/{name}"] = v
        out[f"control/{name}"] = metrics["explain"]["control"][name]
    return {k: float("nan") if v is None else float(v) for k, v in out.items()}


def _print_side_by_side(case: str, one: dict, two: dict) -> None:
    print(f"\n[{case}] figures, 1 process vs 2 processes (torchrun, gloo):")
    print(f"  {'figure':<26} {'1 proc':>8} {'2 proc':>8} {'diff':>8}")
    f1, f2 = _figures(one), _figures(two)
    for k in f1:
        print(f"  {k:<26} {f1[k]:>8.4f} {f2[k]:>8.4f} {abs(f1[k] - f2[k]):>8.4f}")
    print(f"  dominant concept: {one['explain']['dominant_concept']} vs {two['explain']['dominant_concept']}; "
          f"train time {one['timing']['train_s']:.1f} s vs {two['timing']['train_s']:.1f} s, "
          f"steps {one['timing']['steps']} vs {two['timing']['steps']}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_match_one_process(tmp_path, case):
    overrides, tol, controls, unstable = CASES[case]
    torch.set_num_threads(1)  # as torchrun gives each of its processes; OpenMP spin-waits badly on busy cores
    args = ["train", "recipes/colored_digits.toml", "--no-progress", "--set", *BASE, *overrides]
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one_dir)]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "debias", *args, "--out", str(two_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # only rank 0 prints
    one = json.loads((one_dir / "metrics.json").read_text())
    two = json.loads((two_dir / "metrics.json").read_text())
    _print_side_by_side(case, one, two)
    batchnorm = {"batchnorm": "per_process"} if "model.name=test_resnet" in overrides else {}
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", **batchnorm} and "distributed" not in one
    assert proc.stderr.count("BatchNorm statistics are per process") == (1 if batchnorm else 0)
    assert (two_dir / "done").exists() and (two_dir / "model.safetensors").exists()
    assert not list(two_dir.glob(".*.tmp"))  # no half-written file from a second writer
    assert one["timing"]["steps"] == two["timing"]["steps"]  # the same global batches
    assert set(one["selection"]) == set(two["selection"])
    for split in one["splits"]:
        assert one["splits"][split]["n"] == two["splits"][split]["n"]  # gathered predictions cover the split
    if "concept.adversary_weight=1" in overrides:  # the adversary (outside DDP) got the global batch's gradient
        a1, a2 = (load_state(d / "checkpoint.pt")["method"]["adversary"] for d in (one_dir, two_dir))
        diff = max(float((a1[k] - a2[k]).abs().max()) for k in a1)
        print(f"  adversary weights, largest difference: {diff:.2e}")
        assert diff < 1e-3
    f1, f2 = _figures(one), _figures(two)
    keys = [k for k in f1 if (controls or not k.startswith("control/")) and k not in unstable]
    # a worst group holds ~18 images here, so one flipped boundary image moves it by 0.056: allow twice the tolerance
    limit = {k: 2 * tol if k.endswith("worst_group") else tol for k in keys}
    bad = {k: (f1[k], f2[k]) for k in keys
           if not abs(f1[k] - f2[k]) <= limit[k] and not (f1[k] != f1[k] and f2[k] != f2[k])}
    assert not bad, f"figures differ by more than the tolerance ({tol}; worst groups {2 * tol}): {bad}"
    assert one["explain"]["dominant_concept"] == two["explain"]["dominant_concept"]
