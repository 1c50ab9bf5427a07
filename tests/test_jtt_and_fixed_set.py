"""A biased training set is a fixed set of examples (colours drawn once per seed, only the jitter fresh each epoch),
and JTT as published: the error set is the identification model's misclassified examples, and the final model is
trained from its initial weights on the upweighted set; a run resumed in that second stage carries on."""
import copy
import json
from pathlib import Path

import pytest
import torch

from debias.data import load_dataset
from debias.data.colored_digits import load as load_colored_digits
from debias.models.standalone import StandaloneModel
from debias.recipe import DataCfg, load_recipe
from debias.train.loop import Trainer
from test_mnist import write_fake_mnist

RECIPE = "recipes/colored_digits.toml"
TINY = ["data.train_copies=2", "data.eval_copies=1", "data.unlabeled_copies=2", "matching.num_images=64",
        "explain.control_draws=1", "train.batch_size=32", "model.name=resnet10t", "data.bias=0.9"]
JTT = TINY + ["train.method=jtt", "jtt.first_epochs=1", "train.epochs=2"]
FIRST = 1
"""jtt.first_epochs above: the identification model trains epoch 0; the final model epochs 1 and 2."""


# ------------------------------------------------------------------------------------ a fixed training set

def _same_examples_across_epochs(make) -> None:
    """``make(augment)`` loads a training split at bias < 1: its labels and attributes are those of epoch 0 in every
    epoch; with jitter the images change, without it they do not (the jitter is all that changes)."""
    jittered, plain = make(True), make(False)
    labels, attrs, first = jittered.labels.clone(), jittered.attrs.clone(), jittered.images[:].clone()
    plain_first = plain.images[:].clone()
    assert (attrs != labels).any() and (attrs == labels).any(), "a bias < 1 split has both kinds of example"
    for epoch in (1, 2, 5):
        jittered.set_epoch(epoch)
        plain.set_epoch(epoch)
        assert torch.equal(jittered.labels, labels) and torch.equal(jittered.attrs, attrs), epoch
        assert not torch.equal(jittered.images[:], first), epoch  # a fresh jitter
        assert torch.equal(plain.images[:], plain_first), epoch  # nothing else is fresh
        assert torch.equal(plain.attrs, attrs)  # jitter or not, the same examples
    # the colour seen in the pixels is the example's attribute (all ink in its colour's channel)
    for split in (jittered, plain):
        ink = split.images[:].sum(dim=(2, 3))
        assert torch.equal(ink.argmax(1), split.attrs)


def test_digits_training_split_keeps_its_colours_across_epochs():
    _same_examples_across_epochs(lambda augment: load_colored_digits(
        DataCfg(bias=0.7, colors=["red", "green", "blue"], train_copies=3, augment=augment), seed=1).splits["train"])


def test_mnist_training_split_keeps_its_colours_across_epochs(tmp_path):
    root = write_fake_mnist(tmp_path)

    def make(augment: bool):
        recipe = load_recipe("recipes/colored_mnist_paper.toml", [
            f'data.root="{root}"', "data.train_per_class=40", "data.test_per_class=20", "data.image_size=32",
            "data.bias=0.7", "data.train_copies=2", f"data.augment={str(augment).lower()}"])
        return load_dataset(recipe).splits["train"]
    _same_examples_across_epochs(make)


def test_unaugmented_training_split_is_the_jitter_free_render_of_the_same_examples():
    cfg = DataCfg(bias=0.7, train_copies=2)
    train = load_colored_digits(cfg, seed=3).splits["train"]
    plain = load_colored_digits(DataCfg(bias=0.7, train_copies=2, augment=False), seed=3).splits["train"]
    train.set_epoch(4)
    same = train.unaugmented()
    assert torch.equal(same.images, plain.images) and torch.equal(same.attrs, plain.attrs)
    assert same.render is None and torch.equal(train.attrs, same.attrs)


# ------------------------------------------------------------------------------------ JTT as published

@pytest.fixture(scope="module")
def jtt_run(tmp_path_factory) -> dict:
    """One JTT run, watched at the stage change: the identification model's weights just before it, and the model,
    optimizer and schedule just after."""
    recipe = load_recipe(RECIPE, JTT)
    out = tmp_path_factory.mktemp("jtt") / "run"
    t = Trainer(recipe, out, progress=False)
    seen: dict = {}
    start = t.method.on_epoch_start

    def watch(epoch: int) -> None:
        if epoch == FIRST:
            seen["identification"] = copy.deepcopy(t.net.state_dict())
            seen["best_before"] = sorted(p.name for p in out.glob("best_*.safetensors"))
        start(epoch)
        if epoch == FIRST:
            seen["stage2_start"] = copy.deepcopy(t.net.state_dict())
            seen["optimizer_state"] = len(t.optimizer.state)
            seen["scheduler_step"] = t.scheduler.last_epoch
            seen["weights"] = t.method.sample_weights().clone()
            seen["errors"] = t.method.errors.clone()
            seen["best_after"] = dict(t.best)
    t.method.on_epoch_start = watch
    metrics = t.fit()
    return {"recipe": recipe, "out": out, "metrics": metrics, **seen}


def test_jtt_upweights_exactly_what_the_identification_model_got_wrong(jtt_run):
    recipe = jtt_run["recipe"]
    model = StandaloneModel(recipe.model.name, 2)
    model.load_state_dict(jtt_run["identification"])
    model.eval()
    # the training examples, loaded again without jitter (the error set's reading of them)
    plain = load_recipe(RECIPE, JTT + ["data.augment=false"])
    examples = load_dataset(plain).splits["train"]
    with torch.no_grad():
        preds = torch.cat([model(examples.images[i:i + 256]).argmax(1) for i in range(0, len(examples), 256)])
    wrong = preds != examples.labels
    assert 0 < int(wrong.sum()) < len(wrong), "a vacuous check: the identification model got all or none right"
    assert torch.equal(jtt_run["errors"], wrong)
    upweight = recipe.jtt.upweight
    assert torch.equal(jtt_run["weights"], torch.where(wrong, torch.tensor(upweight), torch.tensor(1.0)))
    # the examples upweighted are fixed ones: the same attributes in the split the trainer drew from
    train = Trainer(recipe, jtt_run["out"].parent / "again", progress=False).bundle.splits["train"]
    train.set_epoch(2)
    assert torch.equal(train.attrs, examples.attrs) and torch.equal(train.labels, examples.labels)


def test_jtt_second_stage_starts_from_the_initial_model(jtt_run):
    recipe = jtt_run["recipe"]
    initial = Trainer(recipe, jtt_run["out"].parent / "initial", progress=False).net.state_dict()
    start = jtt_run["stage2_start"]
    assert start.keys() == initial.keys()
    assert all(torch.equal(start[k], initial[k]) for k in initial)
    assert not all(torch.equal(jtt_run["identification"][k], initial[k]) for k in initial)  # stage 1 did train
    assert jtt_run["optimizer_state"] == 0 and jtt_run["scheduler_step"] == 0  # fresh optimizer and schedule
    # the run takes first_epochs + train.epochs; no model from stage 1 is selected or the oracle's pick
    metrics = jtt_run["metrics"]
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]
    assert [bool(row.get("discarded")) for row in metrics["history"]] == [True, False, False]
    assert jtt_run["best_before"] and jtt_run["best_after"] == {}
    assert all(pick["epoch"] > FIRST for pick in metrics["selection"].values())


class _Stopped(Exception):
    pass


def _metrics_without_timing(path: Path) -> dict:
    m = json.loads(path.read_text())
    m.pop("timing")
    return m


@pytest.mark.parametrize("where", ["mid_stage2", "stage_boundary"])
def test_jtt_resumed_in_the_second_stage_equals_the_uninterrupted_run(jtt_run, tmp_path, where):
    """Stopped inside the second stage, a run resumes with the error set and the restarted model from its checkpoint:
    it neither identifies nor restarts again. Stopped at the stage boundary (the identification model's last
    checkpoint), it identifies and restarts on resuming, as the uninterrupted run did. Both end as that run."""
    recipe = jtt_run["recipe"]
    run = tmp_path / "stopped"
    t = Trainer(recipe, run, progress=False)
    if where == "mid_stage2":
        step = t.train_step

        def step_then_stop(batch):  # what SIGTERM after the second stage's second step does
            terms = step(batch)
            if t.step == t.steps_per_epoch * FIRST + 1:
                t.step, t.batch_in_epoch = t.step + 1, t.batch_in_epoch + 1
                t.save_checkpoint()
                raise _Stopped
            return terms
        t.train_step = step_then_stop
    else:
        start = t.method.on_epoch_start

        def stop_at_boundary(epoch: int) -> None:  # killed after the last identification epoch's checkpoint
            if epoch == FIRST:
                raise _Stopped
            start(epoch)
        t.method.on_epoch_start = stop_at_boundary
    with pytest.raises(_Stopped):
        t.fit()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ("errors" in state["method"]) == (where == "mid_stage2")
    resumed = Trainer(recipe, run, progress=False)
    calls = []
    restart, identify = resumed.reset_model_and_optimizer, resumed.method.error_set
    resumed.reset_model_and_optimizer = lambda: (calls.append("restart"), restart())[1]
    resumed.method.error_set = lambda: (calls.append("identify"), identify())[1]
    resumed.fit()
    assert calls == ([] if where == "mid_stage2" else ["identify", "restart"])
    assert torch.equal(resumed.method.errors, jtt_run["errors"])
    assert _metrics_without_timing(run / "metrics.json") == _metrics_without_timing(jtt_run["out"] / "metrics.json")


def test_jtt_continue_variant_keeps_training_the_same_model(tmp_path):
    """The continued-training variant, kept as an option: no restart, train.epochs epochs in all."""
    recipe = load_recipe(RECIPE, JTT + ["jtt.variant=continue"])
    t = Trainer(recipe, tmp_path / "run", progress=False)
    calls = []
    restart = t.reset_model_and_optimizer
    t.reset_model_and_optimizer = lambda: (calls.append("restart"), restart())[1]
    metrics = t.fit()
    assert calls == [] and len(metrics["history"]) == 2 and t.method.errors is not None
