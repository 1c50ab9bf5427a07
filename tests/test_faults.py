"""Faults in the middle of a run: a non-finite batch, a signal outside the training steps, a power loss after a
rename, CUDA randomness across a resume; and what a finished run keeps on disk."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from debias.cli import main
from debias.errors import TrainingInterrupted
from debias.recipe import load_recipe
from debias.train.loop import Trainer

RECIPE = "recipes/colored_digits.toml"
TINY = ["train.epochs=2", "data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2",
        "matching.num_images=64", "explain.control_draws=1", "train.batch_size=32", "model.name=resnet10t"]


def _tensors(tree, prefix=""):
    """Every tensor of a nested dict / list (a method's state), keyed by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree.detach().cpu().clone()}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, sub in items for k, v in _tensors(sub, f"{prefix}/{key}").items()}


def _state(t: Trainer) -> dict[str, torch.Tensor]:
    """The model's weights and buffers, the optimizer's moments and the method's state."""
    return {**_tensors(t.net.state_dict(), "net"), **_tensors(t.method.state_dict(), "method"),
            **_tensors(t.optimizer.state_dict()["state"], "optimizer")}


def _metrics_without_timing(path: Path) -> dict:
    m = json.loads(path.read_text())
    m.pop("timing")
    return m


@pytest.mark.parametrize("method", [
    ["train.method=groupdro"],
    ["train.method=concept", "concept.unlabeled_batch_size=8", "concept.joint_decay=0.9", "concept.adversary_weight=1"],
], ids=["groupdro", "concept"])
def test_a_nonfinite_batch_is_skipped_before_any_state_changes(tmp_path, method):
    """One NaN pixel in one training image makes the whole step's loss NaN (BatchNorm's batch statistics spread it).
    The skipped step must leave everything as it was: GroupDRO's group weights, the concept method's running joint
    and adversary, BatchNorm's running statistics, the weights; the later steps train normally, and
    metrics.json counts the one skipped step."""
    recipe = load_recipe(RECIPE, TINY + method + ["train.skip_nonfinite=true", "selection.track_concepts=false"])
    t = Trainer(recipe, tmp_path / "run", progress=False)
    bad_step = t.steps_per_epoch + 1  # in the second epoch: every method state has been updated before
    step = t.train_step
    seen = {}

    def step_with_a_nan(batch):
        if t.step != bad_step:
            return step(batch)
        images = batch["images"].clone()
        images[0, 0, 0, 0] = float("nan")  # a real NaN through the real model
        seen["before"] = _state(t)
        terms = step({**batch, "images": images})
        seen["after"] = _state(t)
        seen["terms"] = terms
        return terms

    t.train_step = step_with_a_nan
    metrics = t.fit()
    assert seen["terms"] == {} and t.skipped_steps == [bad_step]
    assert metrics["timing"]["skipped_steps"] == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["timing"]["skipped_steps"] == 1
    before, after = seen["before"], seen["after"]
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"state changed by the skipped step: {changed[:5]}"
    assert any(k.startswith("method/") for k in before)  # q, or the joint and the adversary, were compared
    final = _state(t)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert all(m["accuracy"] is not None and 0 <= m["accuracy"] <= 1 for m in metrics["splits"].values())


def _signal_in(t: Trainer, name: str, when) -> None:
    """Send SIGTERM to this process at the start of ``t.<name>`` when ``when()`` holds (a real signal, taken by the
    trainer's handler)."""
    original = getattr(t, name)

    def wrapped(*args, **kwargs):
        if when():
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    setattr(t, name, wrapped)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "ref"
    recipe = load_recipe(RECIPE, TINY)
    Trainer(recipe, out, progress=False).fit()
    return recipe, out


@pytest.mark.parametrize("phase", ["track", "explain"])
def test_a_signal_during_tracking_or_final_evaluation_stops_the_run(tmp_path, reference, phase):
    """SIGTERM during the per-epoch tracking stops the run right after that epoch's checkpoint; during the final
    evaluation it stops before metrics.json and ``done`` are written. Either way the run exits as stopped (143), and
    the same command resumes it to the result of a run never stopped."""
    recipe, ref = reference
    run = tmp_path / "run"
    t = Trainer(recipe, run, progress=False)
    _signal_in(t, phase, lambda: phase == "explain" or t.epoch == 1)  # tracking: the first of two epochs
    caught = []
    old = signal.signal(signal.SIGTERM, lambda *a: caught.append(a))  # a signal the trainer ignores lands here
    try:
        with pytest.raises(TrainingInterrupted) as stopped:
            t.fit()
    finally:
        signal.signal(signal.SIGTERM, old)
    assert stopped.value.exit_code == 143 and "resume with the same command" in str(stopped.value)
    assert not caught
    assert not (run / "done").exists() and not (run / "metrics.json").exists()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    epoch = 1 if phase == "track" else 2
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (epoch, 0, epoch * t.steps_per_epoch)
    Trainer(recipe, run, progress=False).fit()
    assert (run / "done").exists()
    assert _metrics_without_timing(run / "metrics.json") == _metrics_without_timing(ref / "metrics.json")


def test_a_finished_run_keeps_no_training_state_and_each_pick_once(tmp_path, reference, capsys):
    """A finished run deletes its resumable checkpoint.pt (``--keep-training-state`` keeps it); a selection rule's
    pick of the last epoch is model.safetensors, not a copy, and two rules' picks of one epoch share a file.
    metrics.json names each pick's file; the run is still reported as finished and ``debias explain`` reads it."""
    recipe, run = reference
    m = json.loads((run / "metrics.json").read_text())
    assert (run / "done").exists() and not (run / "checkpoint.pt").exists()
    files = {rule: pick["weights"] for rule, pick in m["selection"].items()}
    assert set(files) >= {"val_accuracy", "worst_group"}
    for rule, pick in m["selection"].items():
        assert (run / pick["weights"]).is_file(), rule
        if pick["epoch"] == recipe.train.epochs:  # the final model: its figures are the final evaluation's
            assert pick["weights"] == "model.safetensors"
            assert pick["splits"] == {k: v for k, v in m["splits"].items() if k != "train"}
    weights_on_disk = sorted(p.name for p in run.glob("best_*.safetensors"))
    assert weights_on_disk == sorted({f for f in files.values() if f != "model.safetensors"})
    assert len(weights_on_disk) == len({p["epoch"] for p in m["selection"].values()} - {recipe.train.epochs})
    assert main(["train", RECIPE, "--out", str(run), "--no-progress", "--set", *TINY]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main(["explain", RECIPE, "--checkpoint", str(run), "--out", str(tmp_path / "explained"), "--no-progress",
                 "--set", *TINY]) == 0
    assert (tmp_path / "explained" / "explain.json").exists()
    kept = tmp_path / "kept"
    assert main(["train", RECIPE, "--out", str(kept), "--no-progress", "--keep-training-state", "--set", *TINY,
                 "train.epochs=1"]) == 0
    assert (kept / "done").exists() and (kept / "checkpoint.pt").exists()
    assert not list(kept.glob("best_*.safetensors"))  # one epoch: every pick is the final model


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="reads open file names from Linux /proc")
def test_an_atomic_write_syncs_its_directory_after_the_rename(tmp_path, monkeypatch):
    """The rename of an atomic write reaches the disk only when its directory is fsynced: without that a power loss
    can bring back the old file (or none) after the new one was reported written."""
    from debias import io

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    io.atomic_write_json(tmp_path / "sub" / "metrics.json", {"a": 1})
    assert json.loads((tmp_path / "sub" / "metrics.json").read_text()) == {"a": 1}
    assert synced[-1] == str(tmp_path / "sub")  # the directory, after the file's own data
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / "sub" / ".metrics.json."))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoints_carry_the_cuda_generator(tmp_path):
    """Augmentations draw on the CUDA generator: a resumed run must continue its sequence. A checkpoint written on
    the CPU loads on CUDA (the generator is left as seeded) and one written on CUDA loads on the CPU."""
    cuda = load_recipe(RECIPE, TINY + ["train.device=cuda"])
    t = Trainer(cuda, tmp_path / "cuda", progress=False)
    torch.rand(100, device=t.device)  # the generator moved on from its seed
    t.save_checkpoint()
    expected = torch.rand(100, device=t.device)
    torch.rand(1000, device=t.device)
    resumed = Trainer(cuda, tmp_path / "cuda", progress=False)
    resumed.load_checkpoint()
    assert torch.equal(torch.rand(100, device=t.device), expected)
    cpu = load_recipe(RECIPE, TINY + ["train.device=cpu"])
    on_cpu = Trainer(cpu, tmp_path / "cuda", progress=False)
    on_cpu.load_checkpoint()  # a CUDA checkpoint on the CPU
    on_cpu.save_checkpoint()
    Trainer(cuda, tmp_path / "cuda", progress=False).load_checkpoint()  # and back
