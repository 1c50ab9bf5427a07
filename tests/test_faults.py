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
