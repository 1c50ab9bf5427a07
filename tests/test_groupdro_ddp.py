"""GroupDRO as published, alone and on several processes; BatchNorm under DistributedDataParallel.

GroupDRO (Sagawa et al. 2020; the authors' ``LossComputer.compute_robust_loss``): the loss is ``sum_g q_g * loss_g``
with the updated weights, a group the batch lacks adding 0 (no renormalisation over the groups present); on several
processes the group losses are the global batch's, so every process holds the same ``q`` and the checkpoint that one.

The two-process checks run in one ``torchrun`` job (gloo on the CPU, one thread per process): this file is its
script (``python -m torch.distributed.run --nproc_per_node=2 tests/test_groupdro_ddp.py OUT``), each process writing
what it saw to ``OUT/rank<r>.json``.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm.layers
import torch
import torch.distributed
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/colored_digits.toml"
SMALL = ["data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2", "matching.num_images=64",
         "explain.control_draws=0", "train.batch_size=32", "train.epochs=1", "selection.track_concepts=false"]
GROUPDRO = [*SMALL, "model.name=test_convnext", "train.method=groupdro", "data.bias=0.8", "groupdro.eta=1.0"]
"""LayerNorm (no statistic across images), so a process's share of a batch gives each image the logits the whole
batch gives it; bias 0.8: four groups, two of them small; a large step size, so that q visibly moves."""


def _hand_groupdro(losses: torch.Tensor, groups: torch.Tensor, q: torch.Tensor, eta: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The published update and loss, written out: group means (0 for a group the batch lacks), q_g <- q_g *
    exp(eta * loss_g), normalised, and the loss sum_g q_g * loss_g with the new q."""
    group_loss = torch.stack([losses[groups == g].mean() if (groups == g).any() else losses.sum() * 0
                              for g in range(len(q))])
    new_q = q * torch.exp(eta * group_loss.detach())
    new_q = new_q / new_q.sum()
    return (new_q * group_loss).sum(), new_q


def _batch_lacking_a_group(split, size: int = 32) -> tuple[torch.Tensor, int, int]:
    """Indices of a training batch that lacks one group entirely and holds another only at even positions (the
    share of rank 0 of 2): the absent group, the group rank 1's share lacks."""
    groups = split.groups
    counts = torch.bincount(groups, minlength=len(split.class_names) * len(split.attr_names))
    small = [int(g) for g in counts.argsort() if counts[g] > 0]
    absent, rank0_only = small[0], small[1]
    rest = [i for i in range(len(groups)) if int(groups[i]) not in (absent, rank0_only)]
    only = [i for i in range(len(groups)) if int(groups[i]) == rank0_only][:size // 4]
    order, rest_iter = [], iter(rest)
    for pos in range(size):
        order.append(only[pos // 2] if pos % 2 == 0 and pos // 2 < len(only) else next(rest_iter))
    return torch.tensor(order), absent, rank0_only


def test_groupdro_loss_is_the_q_weighted_sum_over_groups_without_renormalising(tmp_path):
    """A batch that lacks a group: the loss is sum_g q_g * loss_g with the updated q (the lacking group adds 0 and
    the sum is not divided by the weight of the groups present), and the lacking group's weight is not raised by
    the step (only shrunk by the normalisation)."""
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    t = Trainer(load_recipe(RECIPE, [*GROUPDRO, "train.label_smoothing=0.1"]), tmp_path, progress=False)
    split = t.bundle.splits["train"]
    idx, absent, _ = _batch_lacking_a_group(split)
    batch = {"images": split.images[idx], "labels": split.labels[idx], "attrs": split.attrs[idx]}
    q0 = torch.arange(1.0, len(t.method.q) + 1)  # unequal, so that renormalising over the present groups shows
    q0 /= q0.sum()
    t.method.q = q0.clone()
    terms = t.method.loss_terms(batch, 0)
    t.method.commit()  # the trainer commits a finite step's state
    with torch.no_grad():
        losses = F.cross_entropy(t.model(batch["images"]), batch["labels"], reduction="none", label_smoothing=0.1)
    groups = batch["labels"] * t.method.n_attrs + batch["attrs"]
    assert not (groups == absent).any() and len(groups.unique()) == 3
    loss, q = _hand_groupdro(losses, groups, q0, 1.0)
    assert float(terms["loss"].detach()) == pytest.approx(float(loss), rel=1e-5)
    renormalised = float(loss) / float(q[groups.unique()].sum())  # the sum over the present groups' weights
    assert float(terms["loss"].detach()) != pytest.approx(renormalised, rel=1e-3)
    assert torch.allclose(t.method.q, q, rtol=1e-6, atol=0)
    assert float(t.method.q[absent]) < float(q0[absent])  # exp(eta * 0) = 1, then normalised: it only shrinks
    worst = max(float(losses[groups == g].mean()) for g in groups.unique())
    assert float(terms["worst_group_loss"]) == pytest.approx(worst, rel=1e-5)


def test_sync_batchnorm_is_decided_by_the_setting_the_processes_and_the_device():
    """``train.sync_batchnorm``: one process never converts; several on CUDA synchronise unless false; several on
    the CPU keep per-process statistics ('auto', false), and true there is refused (torch's SyncBatchNorm needs
    CUDA), whatever the model. A model without BatchNorm has nothing to decide."""
    from debias.distributed import Dist, plan_batchnorm
    from debias.errors import DebiasError
    from debias.models.standalone import StandaloneModel

    bn, ln = StandaloneModel("test_resnet", 2), StandaloneModel("test_convnext", 2)
    cpu2, cuda2 = Dist(rank=0, world=2), Dist(rank=0, world=2, device=torch.device("cuda", 0))
    for setting in ("auto", True, False):
        assert plan_batchnorm(setting, Dist(), bn) is None  # one process
        assert plan_batchnorm(setting, Dist(device=torch.device("cuda", 0)), bn) is None
    assert plan_batchnorm("auto", cuda2, bn) == plan_batchnorm(True, cuda2, bn) == "synchronized"
    assert plan_batchnorm(False, cuda2, bn) == "per_process"
    assert plan_batchnorm("auto", cpu2, bn) == plan_batchnorm(False, cpu2, bn) == "per_process"
    assert plan_batchnorm("auto", cpu2, ln) is plan_batchnorm("auto", cuda2, ln) is None
    for model in (bn, ln):
        with pytest.raises(DebiasError, match=r"train.sync_batchnorm = true: .*CUDA only.* 2 processes train on "
                                              r"the CPU; set it to 'auto' or false"):
            plan_batchnorm(True, cpu2, model)


def test_sync_batchnorm_recipe_key_takes_auto_true_or_false():
    from debias.errors import DebiasError
    from debias.recipe import load_recipe

    assert load_recipe(RECIPE).train.sync_batchnorm == "auto"
    assert load_recipe(RECIPE, ["train.sync_batchnorm=true"]).train.sync_batchnorm is True
    assert load_recipe(RECIPE, ["train.sync_batchnorm=false"]).train.sync_batchnorm is False
    with pytest.raises(DebiasError, match=r"train.sync_batchnorm = 'yes': expected one of \['auto', true, false\]"):
        load_recipe(RECIPE, ["train.sync_batchnorm=yes"])
    with pytest.raises(DebiasError, match=r"train.sync_batchnorm = 1: expected true or false or a string"):
        load_recipe(RECIPE, ["train.sync_batchnorm=1"])


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])  # torch's BatchNorm2d, timm's BatchNormAct2d
def test_sync_batchnorm_conversion_keeps_names_taps_weights_and_outputs(name):
    """The converted model (what a CUDA run trains) has the plain model's state-dict keys, taps and eval outputs,
    its checkpoint loads into a plain model, and timm's norm + activation layers keep their activation."""
    from debias.distributed import convert_sync_batchnorm
    from debias.models.standalone import StandaloneModel

    torch.manual_seed(0)
    plain = StandaloneModel(name, 2).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before, taps_before = plain(x, taps=True)
    keys = list(plain.state_dict())
    synced = convert_sync_batchnorm(copy.deepcopy(plain)).eval()
    layers = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert layers and all(isinstance(m, torch.nn.SyncBatchNorm) for m in layers)
    if name == "test_efficientnet":
        assert any(isinstance(m, timm.layers.SyncBatchNormAct) for m in layers)
    assert list(synced.state_dict()) == keys and synced.tap_names == plain.tap_names
    with torch.no_grad():
        after, taps_after = synced(x, taps=True)
    assert torch.equal(before, after) and all(torch.equal(taps_before[k], taps_after[k]) for k in taps_before)
    fresh = StandaloneModel(name, 2).eval()
    fresh.load_state_dict(synced.state_dict())  # a checkpoint of a synchronised run, read by a plain model
    with torch.no_grad():
        assert torch.equal(fresh(x), before)


# ------------------------------------------------------------------------------------------- two processes
def _worker(out: Path) -> None:
    """One process of the two-process job (see the module docstring)."""
    from debias.distributed import shutdown_distributed
    from debias.errors import DebiasError
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    torch.set_num_threads(1)
    seen: dict = {}
    try:  # sync_batchnorm = true on the CPU: refused before training
        Trainer(load_recipe(RECIPE, [*SMALL, "model.name=test_resnet", "train.sync_batchnorm=true"]),
                out / "refused", progress=False)
        seen["refused"] = None
    except DebiasError as exc:
        seen["refused"] = str(exc)
    t = Trainer(load_recipe(RECIPE, [*SMALL, "model.name=test_resnet"]), out / "auto", progress=False)
    seen["auto"] = {"batchnorm": t.batchnorm,
                    "synced_layers": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in t.net.modules())}

    # GroupDRO: the first step on a global batch that lacks a group, one group on rank 0 only
    recipe = load_recipe(RECIPE, GROUPDRO)
    t = Trainer(recipe, out / "groupdro", progress=False, keep_training_state=True)
    rank, world = t.dist.rank, t.dist.world
    split = t.bundle.splits["train"]
    idx, _, _ = _batch_lacking_a_group(split)
    images, labels, attrs = split.images[idx], split.labels[idx], split.attrs[idx]
    reference = copy.deepcopy(t.net)
    q0 = t.method.q.clone()
    terms = t.method.loss_terms({"images": images[rank::world], "labels": labels[rank::world],
                                 "attrs": attrs[rank::world]}, 0)
    t.method.commit()  # the trainer commits a finite step's state
    terms["loss"].backward()  # through DistributedDataParallel: the processes' gradients averaged
    losses = F.cross_entropy(reference(images), labels, reduction="none",
                             label_smoothing=recipe.train.label_smoothing)
    loss, q = _hand_groupdro(losses, labels * t.method.n_attrs + attrs, q0, recipe.groupdro.eta)
    loss.backward()
    grad_diff = max(float((p.grad - r.grad).abs().max()) for p, r in zip(t.net.parameters(), reference.parameters()))
    grad_scale = max(float(r.grad.abs().max()) for r in reference.parameters())
    seen["first_step"] = {"loss": float(terms["loss"].detach()), "hand_loss": float(loss.detach()),
                          "q": t.method.q.tolist(), "hand_q": q.tolist(),
                          "grad_diff": grad_diff, "grad_scale": grad_scale}
    t.optimizer.zero_grad(set_to_none=True)
    t.method.q = q0
    t.fit()
    seen["q"] = t.method.q.tolist()
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    shutdown_distributed()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_processes_share_groupdro_q_and_refuse_cpu_sync_batchnorm(tmp_path):
    """Two processes (torchrun, gloo): GroupDRO's first step has the loss, the q and the gradient of the global batch
    (group means over both shares, a group present on one process only counted once), every process ends the run
    with the same q, and the checkpoint holds it; sync_batchnorm = true is refused on the CPU, and 'auto' keeps
    per-process statistics and says so once."""
    from debias.io import load_state

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for seen in ranks:
        assert seen["refused"] is not None and "train.sync_batchnorm = true" in seen["refused"]
        assert "CUDA only" in seen["refused"]
        assert seen["auto"] == {"batchnorm": "per_process", "synced_layers": 0}
    assert proc.stderr.count("BatchNorm statistics are per process") == 1  # rank 0's note, once
    for seen in ranks:
        step = seen["first_step"]
        assert step["loss"] == pytest.approx(step["hand_loss"], rel=1e-5)
        assert step["q"] == pytest.approx(step["hand_q"], rel=1e-5)
        assert step["grad_diff"] <= 1e-4 * step["grad_scale"], step
    assert ranks[0]["first_step"]["q"] == ranks[1]["first_step"]["q"]
    q_ckpt = load_state(tmp_path / "groupdro" / "checkpoint.pt")["method"]["q"].tolist()
    assert ranks[0]["q"] == ranks[1]["q"] == q_ckpt
    assert max(q_ckpt) - min(q_ckpt) > 0.01  # the weights moved: the comparison is not between two uniform q
    metrics = json.loads((tmp_path / "groupdro" / "metrics.json").read_text())
    assert metrics["distributed"] == {"world_size": 2, "backend": "gloo"}  # no BatchNorm in test_convnext


if __name__ == "__main__":  # one process of the torchrun job
    _worker(Path(sys.argv[1]))
