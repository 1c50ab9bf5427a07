"""Check ``train.sync_batchnorm`` on CUDA: the synchronised BatchNorm a multi-GPU run trains with.

    python tools/check_sync_batchnorm.py               # needs CUDA; 2+ GPUs for the two-process check
    python tools/check_sync_batchnorm.py --cpu-dry-run # the two-process path on the CPU (gloo, per-process BatchNorm):
                                                       # checks this script itself, without a GPU

With one GPU (world size 1; NCCL cannot run two processes on one GPU): the model converted as a synchronised run
converts it (timm's ``convert_sync_batchnorm``) keeps its state-dict keys and taps, trains a step on CUDA inside a
1-process NCCL group with the plain model's outputs and gradients, and its weights load into a plain model; the
trainer's plan for 2 CUDA processes is ``synchronized`` ('auto' and true) and ``per_process`` (false).

With two or more GPUs, additionally: ``torchrun --nproc_per_node=2`` of this script, where each process builds the
trainer of a tiny BatchNorm recipe (``test_resnet``), checks that its model was converted, and compares the first
step's gradient (DDP over the two halves of a global batch) with a plain model's on the whole batch: equal (up to
float rounding) with synchronised statistics, and clearly not with ``train.sync_batchnorm = false``; then trains one
epoch and checks that the run records ``"batchnorm": "synchronized"`` and that its weights load into a plain model.

Exit 0: every check passed (or skipped, said on the last line); 1: a check failed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from debias.distributed import Dist, convert_sync_batchnorm, plan_batchnorm  # noqa: E402
from debias.models.standalone import StandaloneModel  # noqa: E402

RECIPE = "recipes/colored_digits.toml"
TINY = ["data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2", "matching.num_images=64",
        "explain.control_draws=0", "train.batch_size=32", "train.epochs=1", "selection.track_concepts=false",
        "model.name=test_resnet", "train.method=erm"]
REL = 1e-3
"""Gradients agree when the largest difference is under this fraction of the largest reference gradient."""


def _grad_gap(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    diff = max(float((p.grad - r.grad).abs().max()) for p, r in zip(model.parameters(), reference.parameters()))
    return diff / max(float(r.grad.abs().max()) for r in reference.parameters())


def check_one_gpu() -> list[str]:
    """World size 1 on cuda:0; returns the failures."""
    failures = []
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    plain = StandaloneModel("test_resnet", 2).to(device)
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    if n_sync == 0:
        failures.append("no SyncBatchNorm layer after conversion")
    if list(synced.state_dict()) != list(plain.state_dict()) or synced.tap_names != plain.tap_names:
        failures.append("conversion changed the state-dict keys or the taps")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        x = torch.rand(16, 3, 32, 32, device=device)
        y = torch.randint(0, 2, (16,), device=device)
        for model in (plain, synced):
            model.train()
            F.cross_entropy(model(x), y).backward()
        gap = _grad_gap(synced, plain)
        print(f"1 GPU, world size 1: {n_sync} SyncBatchNorm layers; gradient gap to the plain model {gap:.2e}")
        if gap > REL:
            failures.append(f"world size 1: the converted model's gradient differs from the plain one ({gap:.2e})")
    finally:
        torch.distributed.destroy_process_group()
    fresh = StandaloneModel("test_resnet", 2)
    fresh.load_state_dict({k: v.cpu() for k, v in synced.state_dict().items()})
    cuda2 = Dist(rank=0, world=2, device=device)
    plans = {str(s): plan_batchnorm(s, cuda2, plain) for s in ("auto", True, False)}
    print(f"plan for 2 CUDA processes: {plans}")
    if plans != {"auto": "synchronized", "True": "synchronized", "False": "per_process"}:
        failures.append(f"plan for 2 CUDA processes: {plans}")
    return failures


def worker(out: Path) -> None:
    """One process of the two-process job: writes ``out/rank<r>.json``."""
    from debias.distributed import shutdown_distributed
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    torch.set_num_threads(1)
    seen = {}
    for setting in ("auto", "false"):
        recipe = load_recipe(RECIPE, [*TINY, f"train.sync_batchnorm={setting}"])
        t = Trainer(recipe, out / f"run_{setting}", progress=False)
        rank, world = t.dist.rank, t.dist.world
        reference = StandaloneModel(recipe.model.name, t.bundle.num_classes).to(t.device)
        reference.load_state_dict(t.net.state_dict())  # plain BatchNorm: the whole batch in one process
        split = t.bundle.splits["train"]
        images, labels = split.images[:32].to(t.device), split.labels[:32].to(t.device)
        F.cross_entropy(t.model(images[rank::world]), labels[rank::world]).backward()  # DDP: the mean of both
        F.cross_entropy(reference(images), labels).backward()
        seen[setting] = {"batchnorm": t.batchnorm, "device": str(t.device), "gap": _grad_gap(t.net, reference),
                         "sync_layers": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in t.net.modules())}
        t.optimizer.zero_grad(set_to_none=True)
        if setting == "auto":
            t.fit()
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    shutdown_distributed()


def check_two_processes(cpu: bool) -> list[str]:
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        if cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               __file__, "--worker", tmp], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            return [f"the two-process job failed (exit {proc.returncode}): {proc.stderr[-2000:]}"]
        expect = "per_process" if cpu else "synchronized"
        for r in range(2):
            seen = json.loads((Path(tmp) / f"rank{r}.json").read_text())
            auto, off = seen["auto"], seen["false"]
            print(f"rank {r} on {auto['device']}: auto -> {auto['batchnorm']} ({auto['sync_layers']} SyncBatchNorm "
                  f"layers), gradient gap to one process {auto['gap']:.2e}; false -> {off['batchnorm']}, gap "
                  f"{off['gap']:.2e}")
            if auto["batchnorm"] != expect or (auto["sync_layers"] > 0) != (not cpu):
                failures.append(f"rank {r}: sync_batchnorm = 'auto' gave {auto}, expected {expect}")
            if off["batchnorm"] != "per_process" or off["sync_layers"]:
                failures.append(f"rank {r}: sync_batchnorm = false gave {off}")
            if not cpu and auto["gap"] > REL:
                failures.append(f"rank {r}: synchronised gradient differs from one process's ({auto['gap']:.2e})")
            if off["gap"] < 10 * REL:
                failures.append(f"rank {r}: per-process statistics did not change the gradient ({off['gap']:.2e}): "
                                "the comparison cannot tell the two apart")
        metrics = json.loads((Path(tmp) / "run_auto" / "metrics.json").read_text())
        if metrics["distributed"].get("batchnorm") != expect:
            failures.append(f"metrics.json distributed = {metrics['distributed']}, expected batchnorm {expect}")
        from debias import io

        StandaloneModel("test_resnet", 2).load_state_dict(io.load_tensors(Path(tmp) / "run_auto" / "model.safetensors"))
        note, expected = proc.stderr.count("BatchNorm statistics are per process"), 2 if cpu else 1  # 'false' too
        print(f"per-process note printed {note} time(s) (expected {expected})")
        if note != expected:
            failures.append(f"the per-process note was printed {note} times")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the two-process path on the CPU (per-process BatchNorm) to check the script")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return 0
    if args.cpu_dry_run:
        failures = check_two_processes(cpu=True)
    elif not torch.cuda.is_available():
        print("skipped: no CUDA device (SyncBatchNorm runs on CUDA only); run this on a GPU machine")
        return 0
    else:
        failures = check_one_gpu()
        if torch.cuda.device_count() >= 2:
            failures += check_two_processes(cpu=False)
        else:
            print("two-process check skipped: 1 GPU (NCCL needs one GPU per process); the 1-GPU checks ran")
    for f in failures:
        print(f"FAILED: {f}")
    print("sync_batchnorm check: " + ("failed" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
