"""The benchmark's baselines: generic augmentation (resized crop, flip, colour jitter) and ``leace`` (ERM, then LEACE
erasure of the spurious concepts from the penultimate features and the classifier refitted), each on a tiny budget."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from debias import io
from debias.cli import main
from debias.compare import _oracle
from debias.methods.augment import CROP_RATIO, crop_boxes, random_hflip, random_resized_crop, resized_crops
from debias.methods.leace import penultimate_features
from debias.models.standalone import StandaloneModel
from debias.recipe import load_recipe
from debias.train.loop import Trainer

TINY = ["train.epochs=1", "data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2",
        "matching.num_images=64", "explain.control_draws=1", "train.batch_size=32"]
GENERIC = 'augment.transforms=["random_resized_crop", "hflip", "color_jitter"]'
"""What the benchmark's generic augmentation sets (with ``train.method=augment``)."""


# ------------------------------------------------------------------------------------ generic augmentation

def test_resized_crop_draws_torchvision_boxes_and_matches_its_resampling():
    """Boxes within the image, area in [crop_scale, 1] of it, aspect ratio in [3/4, 4/3], one per image; the batched
    resampling equals torchvision's ``resized_crop`` of each box away from the box's outermost row and column."""
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(0)
    boxes = crop_boxes(512, 32, 32, (0.6, 1.0))
    top, left, h, w = boxes.T
    assert ((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32)).all()
    area, ratio = (h * w).double() / 32**2, w.double() / h
    assert area.min() > 0.55 and area.max() <= 1.0  # rounding to whole pixels moves the area a little
    assert ratio.min() >= CROP_RATIO[0] - 0.05 and ratio.max() <= CROP_RATIO[1] + 0.05
    assert len(set(map(tuple, boxes.tolist()))) > 400  # a draw per image, not one per batch
    assert len(set(top.tolist())) > 5 and len(set(left.tolist())) > 5
    # no candidate fits a 20 x 40 image at area >= 0.99: torchvision's fallback, the central crop at ratio 4/3
    assert crop_boxes(3, 20, 40, (0.99, 1.0), tries=1).tolist() == [[0, 6, 20, 27]] * 3
    images = torch.rand(16, 3, 32, 32)
    out = resized_crops(images, boxes[:16])
    for img, o, (t, l, bh, bw) in zip(images, out, boxes[:16].tolist()):
        ref = TF.resized_crop(img, t, l, bh, bw, [32, 32], antialias=True)
        assert torch.allclose(o[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5)
    whole = torch.tensor([[0, 0, 32, 32]] * 16)
    assert torch.allclose(resized_crops(images, whole), images, atol=1e-5)  # the whole image: unchanged


def test_generic_transforms_change_images_and_keep_shape_and_range():
    torch.manual_seed(1)
    images = torch.rand(200, 3, 32, 32)
    cropped = random_resized_crop(images, (0.6, 1.0))
    assert cropped.shape == images.shape and cropped.min() >= 0 and cropped.max() <= 1
    changed = (cropped - images).abs().flatten(1).amax(1) > 1e-4
    assert changed.float().mean() > 0.95  # a crop of the whole image (rare at this scale) leaves it as it was
    flipped = random_hflip(images)
    is_flipped = (flipped == images.flip(-1)).flatten(1).all(1)
    kept = (flipped == images).flatten(1).all(1)
    assert (is_flipped ^ kept).all() and 60 < int(is_flipped.sum()) < 140  # Binomial(200, 0.5)
    assert flipped.shape == images.shape


def test_generic_augmentation_trains_through_the_cli(tmp_path, capsys):
    """The benchmark's generic augmentation, as it sets it, on a world recipe; an unknown transform is one line."""
    out = tmp_path / "generic"
    assert main(["train", "recipes/textured_digits.toml", "--out", str(out), "--no-progress", "--set", *TINY,
                 "train.method=augment", GENERIC]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "augment" and m["recipe"]["augment"]["transforms"] == ["random_resized_crop", "hflip",
                                                                                  "color_jitter"]
    assert 0 <= m["splits"]["swapped"]["accuracy"] <= 1
    capsys.readouterr()
    assert main(["train", "recipes/textured_digits.toml", "--out", str(tmp_path / "bad"), "--no-progress",
                 "--set", "train.method=augment", 'augment.transforms=["hflp"]']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "augment.transforms" in err and "hflip" in err


# ------------------------------------------------------------------------------------ leace

LEACE = TINY + ["train.method=leace", "train.epochs=2", "selection.track_concepts=false"]
"""Two epochs of the fine-tuned backbone on textured_digits; the matching the erasure reads is made at its end."""


class _Stopped(Exception):
    pass


def _differences(a, b, path: str = "") -> list[str]:
    """The paths at which two JSON values differ, floats beyond a relative 1e-4 (a resumed run's weights may
    differ from the uninterrupted run's in the last bits: CPU kernels need not sum in the same order in another
    process); a short message where pytest's diff of large dicts takes a minute."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _metrics_without_timing(path: Path) -> dict:
    m = json.loads(path.read_text())
    m.pop("timing")
    return m


@pytest.fixture(scope="module")
def leace_run(tmp_path_factory):
    """One uninterrupted tiny ``leace`` run, the trainer kept."""
    recipe = load_recipe("recipes/textured_digits.toml", LEACE)
    out = tmp_path_factory.mktemp("leace") / "run"
    trainer = Trainer(recipe, out, progress=False)
    trainer.fit()
    return {"recipe": recipe, "out": out, "trainer": trainer}


def test_leace_erases_the_concept_on_the_stream_and_keeps_the_label(leace_run):
    """LEACE's guarantee on the data it was fitted to: no linear probe of the erased features predicts the erased
    concept (as captions predict it on the stream) better than a constant, where one of the raw features does;
    the refitted classifier, which reads nothing the eraser removes, still predicts the training labels."""
    t = leace_run["trainer"]
    method, stream = t.method, t.bundle.unlabeled
    raw = penultimate_features(t.net, stream.images, t.device)
    values = method.stream_values()[:, 0].numpy()
    majority = max((values == v).mean() for v in set(values.tolist()))
    assert majority < 0.75  # both values occur: the stream's background is independent of the label
    erased = method.erase(raw)
    raw_probe = LogisticRegression(max_iter=2000).fit(raw.numpy(), values).score(raw.numpy(), values)
    erased_probe = LogisticRegression(max_iter=2000).fit(erased.numpy(), values).score(erased.numpy(), values)
    assert raw_probe > 0.95 and erased_probe <= majority + 0.02, (raw_probe, erased_probe, majority)
    head = t.net.net.get_classifier()
    with torch.no_grad():  # the folded classifier ignores what the eraser removes: the same logits before and after
        assert torch.allclose(head(raw.float()), head(erased.float()), atol=1e-3)
    m = json.loads((leace_run["out"] / "metrics.json").read_text())
    assert m["method"] == "leace" and m["splits"]["train"]["accuracy"] > 0.9
    saved = io.load_tensors(leace_run["out"] / "model.safetensors")  # the run directory holds the erased model
    assert torch.equal(saved["net.fc.weight"], head.weight.detach().cpu())


def test_leace_selection_picks_only_the_erased_model(leace_run):
    """An earlier epoch's checkpoint is ERM's model before the erasure, not a leace model: every selection rule
    picks the final (erased) model, its figures are the final ones, no ``best_*`` file is left, and no epoch of
    the history is a best-epoch oracle candidate."""
    m = json.loads((leace_run["out"] / "metrics.json").read_text())
    assert set(m["selection"]) >= {"val_accuracy", "worst_group"}
    final = {k: v for k, v in m["splits"].items() if k != "train"}
    for rule, pick in m["selection"].items():
        assert pick["epoch"] == 2 and pick["weights"] == "model.safetensors", rule
        assert pick["splits"] == final, rule
    assert not list(leace_run["out"].glob("best_*.safetensors"))
    assert len(m["history"]) == 2 and all(row["discarded"] for row in m["history"])
    assert _oracle(m["history"]) is None
    # the rule's value is its figure in the last epoch's row (before the erasure)
    assert m["selection"]["val_accuracy"]["value"] == m["history"][-1]["val_accuracy"]


@pytest.mark.parametrize("where", ["training", "final_evaluation"])
def test_leace_resumed_equals_the_uninterrupted_run(leace_run, tmp_path, where):
    """Stopped during training, a run resumes and erases at its end; stopped during the final evaluation (after
    the erasure's checkpoint), it resumes with the erased model and the eraser from the checkpoint and does not
    erase again. Both end as the uninterrupted run."""
    recipe = leace_run["recipe"]
    run = tmp_path / "stopped"
    t = Trainer(recipe, run, progress=False)
    if where == "training":
        def stop(epoch: int) -> None:  # killed after the first epoch's checkpoint
            if epoch == 1:
                raise _Stopped
        t.method.on_epoch_start = stop
    else:
        def stop(*args, **kwargs):
            raise _Stopped
        t.finish = stop
    with pytest.raises(_Stopped):
        t.fit()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ("eraser_proj_left" in state["method"]) == (where == "final_evaluation")
    resumed = Trainer(recipe, run, progress=False)
    erase = resumed.method.on_train_end
    calls = []
    resumed.method.on_train_end = lambda: calls.append(erase()) or calls[-1]
    resumed.fit()
    assert calls == [where == "training"]  # True: it erased; False: the checkpoint's model was erased already
    weights, expected = (io.load_tensors(d / "model.safetensors") for d in (run, leace_run["out"]))
    assert all(torch.allclose(weights[k].float(), expected[k].float(), atol=1e-5) for k in expected)
    assert not _differences(_metrics_without_timing(run / "metrics.json"),
                            _metrics_without_timing(leace_run["out"] / "metrics.json"))


def test_leace_through_the_cli_and_explained(tmp_path, capsys):
    """A tiny ``leace`` run through the CLI, on two spurious concepts, then ``debias explain`` of its run directory
    (the erased classifier has the model's own shape); a recipe without an unlabeled stream is one line, exit 2."""
    out = tmp_path / "run"
    sets = [*TINY, "train.method=leace", "model.checkpoint=''", "leace.source=clip",
            "selection.track_concepts=false"]
    assert main(["train", "recipes/two_nuisances.toml", "--out", str(out), "--no-progress", "--set", *sets]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "leace" and m["recipe"]["leace"]["source"] == "clip"
    assert {"swapped_color", "swapped_background"} <= set(m["splits"])
    assert main(["explain", "recipes/two_nuisances.toml", "--set", *sets, "--checkpoint", str(out),
                 "--out", str(tmp_path / "explained")]) == 0
    explained = json.loads((tmp_path / "explained" / "explain.json").read_text())
    assert explained["scores"] == pytest.approx(m["explain"]["scores"])
    capsys.readouterr()
    assert main(["train", "recipes/textured_digits.toml", "--out", str(tmp_path / "none"), "--no-progress",
                 "--set", *TINY, "train.method=leace", "data.split_fractions.unlabeled=0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leace" in err and "data.split_fractions.unlabeled" in err
