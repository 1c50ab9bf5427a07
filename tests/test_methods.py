"""Training methods: the penalty's behaviour, GroupDRO's weights, each method end to end on a tiny budget."""
import json

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from debias.cli import main
from debias.compare import _matches, compare_runs, mcnemar_exact
from debias.methods import METHODS
from debias.methods.augment import permute_channels, random_grayscale
from debias.methods.concept import mutual_information_of_joint, soft_mutual_information

TINY = ["train.epochs=1", "data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2",
        "matching.num_images=64", "explain.control_draws=1", "train.batch_size=32", "model.name=resnet10t",
        "concept.unlabeled_batch_size=8", "jtt.first_epochs=1", "train.epochs=2"]
MI_ALONE = ["concept.adversary_weight=0", "concept.pseudo_label_weight=0", "concept.joint_decay=0"]
"""The default recipe's `concept` without its adversary, self-training and running joint: the MI penalty alone, so a
test can add up the loss from the terms it checks."""


def test_penalty_zero_when_independent_and_large_when_equal():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (512,), generator=g)
    c = torch.randint(0, 2, (512,), generator=g)
    p_ind = torch.nn.functional.one_hot(y, 2).float() * 0.9 + 0.05
    q_ind = torch.nn.functional.one_hot(c, 2).float() * 0.9 + 0.05
    assert soft_mutual_information(p_ind, q_ind) < 0.01
    p_eq = torch.nn.functional.one_hot(y, 2).float()
    mi = soft_mutual_information(p_eq, p_eq)
    assert abs(mi - torch.log(torch.tensor(2.0))) < 0.01  # H(y) for a balanced binary label
    assert soft_mutual_information(torch.full((8, 2), 0.5), q_ind[:8]) < 1e-6  # a constant prediction


def test_running_joint_surrogate_has_the_gradient_of_the_running_mutual_information():
    """``concept.joint_decay = d``: the step's surrogate mean_i p_i^T PMI q_i, with PMI taken from the updated running
    joint ``d * previous + (1 - d) * batch``, moves the logits exactly as that joint's MI does, scaled by 1 / (1 - d)
    (a per-batch step size), and its value equals the MI of the batch's joint when previous = batch."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 2, generator=g, requires_grad=True)
    q = torch.softmax(torch.randn(16, 2, generator=g) * 3, -1)
    previous = torch.softmax(torch.randn(4, generator=g), 0).reshape(2, 2)
    d = 0.9
    p = logits.softmax(-1)
    joint = d * previous + (1 - d) * p.T @ q / len(q)
    mi, _ = mutual_information_of_joint(joint)
    (grad_mi,) = torch.autograd.grad(mi, logits, retain_graph=True)
    _, pmi = mutual_information_of_joint(joint.detach())
    surrogate = (p * (q @ pmi.T)).sum(1).mean()
    (grad_surrogate,) = torch.autograd.grad(surrogate, logits)
    assert torch.allclose(grad_surrogate * (1 - d), grad_mi, atol=1e-6)
    assert grad_mi.abs().max() > 1e-4  # not a vacuous comparison
    batch_joint = (p.T @ q / len(q)).detach()
    value, pmi_b = mutual_information_of_joint(batch_joint)
    assert value == pytest.approx(float(soft_mutual_information(p.detach(), q)), abs=1e-6)
    assert float((p.detach() * (q @ pmi_b.T)).sum(1).mean()) == pytest.approx(float(value), abs=1e-6)


def test_groupdro_weights_move_toward_worst_group(tmp_path):
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    recipe = load_recipe("recipes/colored_digits.toml", TINY + ["data.bias=0.8", "train.method=groupdro",
                                                                 "groupdro.eta=0.5"])
    t = Trainer(recipe, tmp_path, progress=False)
    split = t.bundle.splits["train"]
    n_attrs = len(split.attr_names)
    # a batch whose minority group (8 on red) the fresh model gets wrong more often after a few ERM-free steps
    idx = torch.arange(len(split))
    batch = {"images": split.images[idx], "labels": split.labels[idx], "attrs": split.attrs[idx]}
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(t.model(batch["images"]), batch["labels"], reduction="none")
    groups = batch["labels"] * n_attrs + batch["attrs"]
    present = groups.unique()
    per_group = {int(g): float(losses[groups == g].mean()) for g in present}
    worst = max(per_group, key=per_group.get)
    before = t.method.q.clone()
    t.method.loss_terms({k: v for k, v in batch.items()}, 0)
    t.method.commit()  # what the trainer does once the loss is finite
    after = t.method.q
    assert after[worst] > before[worst]
    assert after[worst] == after[present].max()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_end_to_end(tmp_path, method):
    out = tmp_path / method
    code = main(["train", "recipes/colored_digits.toml", "--method", method, "--out", str(out), "--no-progress",
                 "--set", *TINY])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method
    assert set(m["splits"]) >= {"test", "shifted", "swapped", "grayscale"}
    assert set(m["selection"]) == {"val_accuracy", "dominance", "worst_group"}
    # jtt trains its identification model (jtt.first_epochs = 1) before the train.epochs of its final model
    assert len(m["history"]) == (3 if method == "jtt" else 2)
    # selection.track_every = 4 (the default) is more than the run's epochs: the last epoch alone is scored
    assert [h["epoch"] for h in m["history"] if "dominance_margin" in h] == [len(m["history"])]
    assert m["history"][0]["oracle_split"] == "shifted" and 0 <= m["history"][0]["oracle_accuracy"] <= 1
    assert (out / "done").exists() and (out / "model.safetensors").exists()


def test_augment_transforms_draw_once_per_image_and_match_torchvision():
    """The batched channel permutation and grayscale: each image its own draw, the same result as torchvision's
    per-image transforms for that draw."""
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(0)
    images = torch.rand(256, 3, 8, 8)
    permuted = permute_channels(images)
    orders = set()
    for x, y in zip(images, permuted):  # every output channel is one input channel, each used once
        order = [int((x - c).abs().flatten(1).sum(1).argmin()) for c in y]
        assert sorted(order) == [0, 1, 2] and torch.equal(y, TF.permute_channels(x, order))
        orders.add(tuple(order))
    assert len(orders) == 6  # all six orders occur in 256 draws (a shared draw would give one)
    gray = random_grayscale(images, p=0.5)
    is_gray = (gray[:, 0] == gray[:, 1]).flatten(1).all(1) & (gray[:, 1] == gray[:, 2]).flatten(1).all(1)
    assert 80 < int(is_gray.sum()) < 176  # Binomial(256, 0.5): outside this range with probability < 1e-4
    assert torch.allclose(gray[is_gray], TF.rgb_to_grayscale(images[is_gray], num_output_channels=3))
    assert torch.equal(gray[~is_gray], images[~is_gray])
    assert torch.equal(random_grayscale(images, p=0.0), images) and random_grayscale(images, p=1.0).std(1).max() == 0


def test_concept_without_unlabeled_stream_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "recipes/colored_digits.toml", "--method", "concept", "--out", str(out), "--no-progress",
                 "--set", *TINY, "data.split_fractions.unlabeled=0.0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.split_fractions.unlabeled" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_concept_with_a_stream_batch_larger_than_the_stream_fails_cleanly(tmp_path, capsys):
    """No full stream batch can be drawn from a smaller stream: a clear error before training, not a hang."""
    out = tmp_path / "run"
    code = main(["train", "recipes/colored_digits.toml", "--method", "concept", "--out", str(out), "--no-progress",
                 "--set", *TINY, "concept.unlabeled_batch_size=71"])  # TINY's stream: 70 images
    assert code == 2
    err = capsys.readouterr().err
    assert "concept.unlabeled_batch_size = 71" in err and "only 70 images" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_compare_json_matches_runs(tmp_path):
    runs = []
    for method, seed in (("erm", 0), ("erm", 1)):
        out = tmp_path / f"{method}{seed}"
        assert main(["train", "recipes/colored_digits.toml", "--method", method, "--out", str(out),
                     "--no-progress", "--set", *TINY, f"seed={seed}", "train.epochs=1"]) == 0
        runs.append(out)
    result = compare_runs(runs, tmp_path / "cmp")
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    for row, run in zip(saved["rows"], runs):
        metrics = json.loads((run / "metrics.json").read_text())
        assert row["run"] == str(run) and row["seed"] == metrics["seed"] and row["method"] == metrics["method"]
        assert row["splits"] == metrics["splits"]
        assert row["dominant_concept"] == metrics["explain"]["dominant_concept"]
        # one epoch: the oracle's only epoch is the final model, evaluated the same way at the end
        assert row["oracle"] == {"split": "shifted", "epoch": 1,
                                 "accuracy": metrics["splits"]["shifted"]["accuracy"]}
    (group,) = saved["groups"]
    assert group["setting"] == "bias=1.0" and group["seeds"] == [0, 1]
    accs = [json.loads((r / "metrics.json").read_text())["splits"]["shifted"]["accuracy"] for r in runs]
    assert group["splits"]["shifted"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert (tmp_path / "cmp" / "report.md").exists() and (tmp_path / "cmp" / "accuracy_by_split.png").exists()


def test_compare_never_averages_runs_trained_differently(tmp_path):
    """Runs of one method that differ in a recipe value other than the seed are separate groups, the value named,
    ordered by the value's number (8 before 32, which plain string order reverses). A run written before a recipe key
    existed (its recipe lacks the key) groups with runs holding the key's default, and so does a run holding a removed
    key at the value every run now has."""
    runs = []
    for seed, batch in ((0, 32), (1, 32), (0, 8)):
        out = tmp_path / f"erm{seed}_b{batch}"
        assert main(["train", "recipes/colored_digits.toml", "--method", "erm", "--out", str(out), "--no-progress",
                     "--set", *TINY, f"seed={seed}", "train.epochs=1", f"train.batch_size={batch}"]) == 0
        runs.append(out)
    older = json.loads((runs[1] / "metrics.json").read_text())
    assert older["recipe"]["concept"].pop("pseudo_label_threshold") == 0.95  # as written before that key was added
    older["recipe"]["concept"]["adversary_memory"] = 0  # a key removed since, at the value every run now has
    (runs[1] / "metrics.json").write_text(json.dumps(older))
    result = compare_runs(runs, tmp_path / "cmp")
    b8, b32 = "bias=1.0,train.batch_size=8", "bias=1.0,train.batch_size=32"
    assert [(g["setting"], g["seeds"]) for g in result["groups"]] == [(b8, [0]), (b32, [0, 1])]
    assert [r["setting"] for r in result["rows"]] == [b32, b32, b8]  # rows keep the order they were given in
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert report.index(f"| erm | {b8} | 1 |") < report.index(f"| erm | {b32} | 2 |")


def test_compare_counts_the_goal_and_pairs_seeds_against_a_reference(tmp_path):
    """``--goal``: the seeds meeting every threshold at once, per group; ``--reference``: per-seed differences of every
    other group against it (mean +- standard error over the shared seeds) and the exact McNemar test on the goal."""
    runs, metrics = {}, {}
    for lr in ("0.001", "0.01"):
        for seed in (0, 1):
            out = tmp_path / f"erm{seed}_lr{lr}"
            assert main(["train", "recipes/colored_digits.toml", "--method", "erm", "--out", str(out),
                         "--no-progress", "--set", *TINY, f"seed={seed}", "train.epochs=1", f"train.lr={lr}"]) == 0
            runs[lr, seed] = out
            metrics[lr, seed] = json.loads((out / "metrics.json").read_text())["splits"]
    shifted = sorted(m["shifted"]["accuracy"] for m in metrics.values())
    goal = {"test": 0.0, "shifted": shifted[-1]}  # the best run meets it; the worst (a different value) does not
    assert shifted[0] < shifted[-1]
    cmp = tmp_path / "cmp"
    assert main(["compare", *map(str, runs.values()), "--out", str(cmp), "--reference", "train.lr=0.001",
                 "--goal", "test=0.0", f"shifted={shifted[-1]!r}"]) == 0
    saved = json.loads((cmp / "compare.json").read_text())
    meets = {k: m["shifted"]["accuracy"] >= goal["shifted"] for k, m in metrics.items()}
    groups = {g["setting"]: g for g in saved["groups"]}
    ref, other = groups["bias=1.0,train.lr=0.001"], groups["bias=1.0,train.lr=0.01"]
    for lr, g in (("0.001", ref), ("0.01", other)):
        assert g["goal"] == {"thresholds": goal, "met": meets[lr, 0] + meets[lr, 1], "n": 2,
                             "seeds_met": [s for s in (0, 1) if meets[lr, s]]}
    assert "paired" not in ref and other["paired"]["reference"] == "erm bias=1.0,train.lr=0.001"
    assert other["paired"]["seeds"] == [0, 1]
    for split in ("test", "shifted", "swapped", "grayscale"):
        diffs = [metrics["0.01", s][split]["accuracy"] - metrics["0.001", s][split]["accuracy"] for s in (0, 1)]
        assert other["paired"]["splits"][split] == pytest.approx(
            {"mean": sum(diffs) / 2, "se": abs(diffs[0] - diffs[1]) / 2, "n": 2})
    only_here = sum(meets["0.01", s] and not meets["0.001", s] for s in (0, 1))
    only_ref = sum(meets["0.001", s] and not meets["0.01", s] for s in (0, 1))
    assert other["paired"]["goal"] == {"only_here": only_here, "only_reference": only_ref,
                                       "mcnemar_p": mcnemar_exact(only_here, only_ref)}
    report = (cmp / "report.md").read_text()
    assert "## Seeds meeting the goal" in report and "Per-seed differences against erm bias=1.0,train.lr=0.001" in report
    assert (cmp / "paired_differences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_groups_take_every_members_splits_and_concepts(tmp_path):
    """A split or concept only some members have (runs written by an older version) is averaged over those members,
    whichever member comes first."""
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"erm{seed}")
        assert main(["train", "recipes/colored_digits.toml", "--method", "erm", "--out", str(runs[-1]),
                     "--no-progress", "--set", *TINY, f"seed={seed}", "train.epochs=1"]) == 0
    first = json.loads((runs[0] / "metrics.json").read_text())
    del first["splits"]["grayscale"], first["explain"]["scores"]["digit"], first["explain"]["representation"]["digit"]
    (runs[0] / "metrics.json").write_text(json.dumps(first))
    second = json.loads((runs[1] / "metrics.json").read_text())
    (group,) = compare_runs(runs, tmp_path / "cmp")["groups"]
    assert group["splits"]["grayscale"]["accuracy"] == {
        "mean": second["splits"]["grayscale"]["accuracy"], "std": 0.0, "n": 1}
    assert group["scores"]["digit"] == {"mean": second["explain"]["scores"]["digit"], "std": 0.0, "n": 1}
    assert group["representation"]["digit"]["n"] == 1 and group["scores"]["color"]["n"] == 2
    assert list(group["splits"])[:4] == ["test", "shifted", "swapped", "grayscale"]


def test_reference_names_a_list_value_as_the_setting_prints_it():
    """A list value stays one token: its commas and spaces do not split it, its spacing and quotes may differ."""
    groups = [{"method": "erm", "setting": f"bias=1.0,data.colors={colors!r},train.lr=0.001"}
              for colors in (["red", "green"], ["blue", "yellow"])]
    for reference in ("colors=['red', 'green']", 'erm, data.colors=["red","green"] train.lr=0.001',
                      "bias=1.0,colors=[ 'red' ,'green' ]"):
        assert [_matches(reference, g) for g in groups] == [True, False], reference
    assert [_matches("colors=['red']", g) for g in groups] == [False, False]
    assert [_matches("erm bias=1.0", g) for g in groups] == [True, True]


def test_mcnemar_exact_is_scipys_two_sided_binomial_test():
    from scipy.stats import binomtest

    for a, b in ((0, 3), (0, 5), (3, 4), (1, 9), (7, 2), (12, 0)):
        assert mcnemar_exact(a, b) == pytest.approx(binomtest(a, a + b, 0.5).pvalue)
    assert mcnemar_exact(0, 0) == 1.0


def test_compare_goal_and_reference_fail_cleanly(tmp_path, capsys):
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"erm{seed}")
        assert main(["train", "recipes/colored_digits.toml", "--method", "erm", "--out", str(runs[-1]),
                     "--no-progress", "--set", *TINY, f"seed={seed}", "train.epochs=1"]) == 0
    capsys.readouterr()
    cmp = tmp_path / "cmp"
    cases = [(["--goal", "test"], "--goal 'test': expected SPLIT=MIN"),
             (["--goal", "test=1.5"], "--goal 'test=1.5': expected SPLIT=MIN with MIN an accuracy in [0, 1]"),
             (["--goal", "test=0.99", "test=0.9"], "--goal 'test=0.9': split 'test' is given twice (also "
                                                   "test=0.99); give each split once"),
             (["--goal", "nosuch=0.5"], f"--goal names split 'nosuch', which {runs[0] / 'metrics.json'} does not"),
             (["--reference", "train.lr=0.5"], "--reference 'train.lr=0.5' must match exactly one group, none does; "
                                               "the groups are: erm bias=1.0")]
    for extra, message in cases:
        assert main(["compare", *map(str, runs), "--out", str(cmp), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (cmp / "compare.json").exists()


def test_graft_read_once_per_matching(tmp_path):
    """The stream is read through the graft once per matching and the predictions are what the graft says for the
    model of that moment; they are method state."""
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    recipe = load_recipe("recipes/colored_digits.toml", TINY + ["train.method=concept"])
    t = Trainer(recipe, tmp_path / "match", progress=False)
    t.epoch = 0
    t.method.on_epoch_start(0)
    q = t.method.graft_q
    stream = t.bundle.unlabeled
    assert q.shape == (len(stream), len(recipe.data.colors)) and t.method.graft_q_epoch == t.matching_epoch == 0
    assert torch.allclose(q.sum(1), torch.ones(len(q)), atol=1e-5)
    t.net.eval()
    with torch.no_grad():
        _, taps = t.net(stream.images[:8], taps=True)
        direct = t.method._softmax(t.graft(stream.images[:8], taps), t.clip.encode_text(t.method.concept.captions))
    assert torch.allclose(q[:8], direct.cpu(), atol=1e-5)
    t.method.on_epoch_start(0)  # same matching: not read again
    assert t.method.graft_q is q
    restored = Trainer(recipe, tmp_path / "restored", progress=False).method
    restored.load_state_dict(t.method.state_dict())
    assert torch.equal(restored.graft_q, q) and restored.graft_q_epoch == 0


def test_concept_dominance_is_tracked_every_n_epochs_and_after_the_last(tmp_path):
    """``selection.track_every = 2`` over 3 epochs scores epochs 2 and 3 (the last), and the dominance rule picks
    among them; the other epochs still record validation accuracy."""
    out = tmp_path / "run"
    assert main(["train", "recipes/colored_digits.toml", "--out", str(out), "--no-progress", "--set", *TINY,
                 "train.epochs=3", "selection.track_every=2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert [h["epoch"] for h in m["history"] if "dominant_concept" in h] == [2, 3]
    assert all("val_accuracy" in h for h in m["history"])
    assert m["selection"]["dominance"]["epoch"] in (2, 3)


def test_rematch_schedule_holds_the_penalty_graft_while_the_tracking_rematches(tmp_path):
    """``concept.rematch_every`` decides when the penalty's graft is matched again, with the per-epoch tracking on
    as well (it matches the model every epoch for the dominance): with 0 the penalty keeps the first graft; with 1 it
    takes the tracking's matching of the same model, without matching it a second time. A checkpoint holds the
    penalty's own matching when it is older than the trainer's, and a resumed method rebuilds that graft."""
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    def trainer(every: int, name: str) -> Trainer:
        recipe = load_recipe("recipes/colored_digits.toml", TINY + [
            "train.method=concept", f"concept.rematch_every={every}",
            "selection.track_concepts=true"])
        return Trainer(recipe, tmp_path / name, progress=False)

    for every in (0, 1):
        t = trainer(every, f"every{every}")
        t.epoch = 0
        t.method.on_epoch_start(0)
        first = t.method.graft
        assert first is t.graft and t.method.graft_epoch == t.matching_epoch == 0
        images, labels, attrs = next(iter(t.train_loader(0)))
        t.train_step({"images": images, "labels": labels, "attrs": attrs})
        t.step, t.epoch = 1, 1
        t.rematch()  # what the end-of-epoch tracking does with the trained model
        tracked, matching = t.graft, t.matching
        assert tracked is not first and t.matching_epoch == 1
        t.method.on_epoch_start(1)
        assert t.matching is matching  # never a second matching of the same model
        if every == 0:
            assert t.method.graft is first and t.method.graft_epoch == 0
            state = t.method.state_dict()
            restored = trainer(every, "restored").method
            restored.load_state_dict(state)
            assert restored.graft_epoch == 0
            saved, rebuilt = first.matching.state_dict(), restored.graft.matching.state_dict()
            assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)
        else:
            assert t.method.graft is tracked and t.method.graft_epoch == 1
            assert "graft_matching" not in t.method.state_dict()  # the trainer's checkpoint holds it


def test_a_trailing_batch_of_one_image_is_skipped(tmp_path):
    """BatchNorm cannot take batch statistics of one image: a training split that leaves one image after its last
    full batch trains without it (and the step count says so) instead of failing in every epoch's last step."""
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    n = len(Trainer(load_recipe("recipes/colored_digits.toml", TINY), tmp_path / "n", progress=False)
            .bundle.splits["train"])
    for method in ("erm", "jtt"):  # a shuffled split, and a weighted sampler
        t = Trainer(load_recipe("recipes/colored_digits.toml", TINY + [f"train.batch_size={n - 1}",
                                                                      f"train.method={method}"]),
                    tmp_path / method, progress=False)
        batches = list(t.train_loader(0))
        assert t.steps_per_epoch == len(batches) == 1 and len(batches[0][1]) == n - 1
        images, labels, attrs = batches[0]
        assert t.train_step({"images": images, "labels": labels, "attrs": attrs})["loss"] > 0


@pytest.mark.parametrize("method", ["erm", "groupdro"])
def test_label_smoothing_reaches_the_task_loss(tmp_path, method):
    """``train.label_smoothing = e``: the task loss is (1 - e) * cross-entropy + e * the mean over classes of
    -log p, per image (GroupDRO's group losses are built from those)."""
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    eps = 0.2
    recipe = load_recipe("recipes/colored_digits.toml",
                         TINY + [f"train.method={method}", f"train.label_smoothing={eps}"])
    t = Trainer(recipe, tmp_path, progress=False)
    split = t.bundle.splits["train"]
    batch = {"images": split.images[:16], "labels": split.labels[:16], "attrs": split.attrs[:16]}
    terms = t.method.loss_terms(batch, 0)
    with torch.no_grad():
        logp = t.model(batch["images"]).log_softmax(-1)
    smoothed = -(1 - eps) * logp.gather(1, batch["labels"][:, None])[:, 0] - eps * logp.mean(1)
    plain = -logp.gather(1, batch["labels"][:, None])[:, 0]
    assert float(terms["nll"].detach()) == pytest.approx(float(smoothed.mean()), rel=1e-5)
    assert float(terms["nll"].detach()) != pytest.approx(float(plain.mean()), rel=1e-3)
    if method == "groupdro":
        groups = batch["labels"] * t.method.n_attrs + batch["attrs"]
        worst = max(float(smoothed[groups == g].mean()) for g in groups.unique())
        assert float(terms["worst_group_loss"]) == pytest.approx(worst, rel=1e-5)


@pytest.mark.parametrize("model", ["resnet10t", "convnext_atto"])  # a pooled head, a head with its own norm
def test_adversary_learns_the_concept_and_its_gradient_reaches_the_features_reversed(tmp_path, model):
    """``concept.adversary_weight``: a small network learns the concept prediction from the features the CNN's
    classifier reads, on the stream; the CNN receives that loss's gradient times -weight (gradient reversal), the
    adversary its plain gradient; the loss adds it to the weighted MI. Its parameters are optimised with the
    model's and saved with the method."""
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    recipe = load_recipe("recipes/colored_digits.toml", TINY + ["train.method=concept", "concept.source=labels",
                                                                 "concept.adversary_weight=2", "concept.weight=0.5",
                                                                 f"model.name={model}"])
    t = Trainer(recipe, tmp_path, progress=False)
    adversary = t.method.adversary
    assert [p for g in t.optimizer.param_groups[1:] for p in g["params"]] == list(adversary.parameters())
    split = t.bundle.splits["train"]
    batch = {"images": split.images[:16], "labels": split.labels[:16], "attrs": split.attrs[:16]}
    stream_batch = t.next_unlabeled()
    t.next_unlabeled = lambda: stream_batch
    images_u, index_u = stream_batch
    q = t.method._cache_q()[index_u]
    terms = t.method.loss_terms(batch, 0)
    read = []  # what the classifier reads in a forward pass with the step's batch statistics
    hook = t.net.net.get_classifier().register_forward_pre_hook(lambda module, args: read.append(args[0]))
    t.model(torch.cat([batch["images"], images_u]), taps=True)
    hook.remove()
    features = read[0][16:]
    plain = -(q * adversary(features).log_softmax(-1)).sum(1).mean()  # the adversary's loss, nothing reversed
    assert float(terms["adversary"].detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    total = terms["nll"] + 0.5 * terms["penalty"] + terms["adversary"]
    assert float(terms["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    cnn, own = list(t.net.parameters()), list(adversary.parameters())
    on_adversary = torch.autograd.grad(terms["adversary"], cnn + own, retain_graph=True, allow_unused=True)
    expected = torch.autograd.grad(plain, cnn + own, allow_unused=True)
    reached = [i for i, g in enumerate(expected[:len(cnn)]) if g is not None and g.abs().max() > 0]
    assert len(reached) > len(cnn) // 2  # the features do receive a gradient from the adversary's loss
    for i in reached:  # reversed, times the weight
        assert torch.allclose(on_adversary[i], -2 * expected[i], rtol=1e-4, atol=1e-7)
    for got, want in zip(on_adversary[len(cnn):], expected[len(cnn):]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)  # the adversary itself learns the concept
    before = [p.detach().clone() for p in adversary.parameters()]
    t.train_step(batch)
    assert all(not torch.equal(b, p) for b, p in zip(before, adversary.parameters()))
    saved = t.method.state_dict()["adversary"]
    fresh = Trainer(recipe, tmp_path / "fresh", progress=False)
    assert not all(torch.equal(p.cpu(), saved[k]) for k, p in fresh.method.adversary.state_dict().items())
    fresh.method.load_state_dict(t.method.state_dict())
    assert all(torch.equal(p.cpu(), saved[k]) for k, p in fresh.method.adversary.state_dict().items())


def test_self_training_on_the_stream_counts_its_confident_predictions_from_its_start(tmp_path):
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    recipe = load_recipe("recipes/colored_digits.toml", TINY + MI_ALONE + [
        "train.method=concept", "concept.source=labels", "concept.pseudo_label_weight=2",
        "concept.pseudo_label_start=0.5"])
    t = Trainer(recipe, tmp_path, progress=False)
    split = t.bundle.splits["train"]
    batch = {"images": split.images[:16], "labels": split.labels[:16], "attrs": split.attrs[:16]}
    stream_batch = t.next_unlabeled()
    t.next_unlabeled = lambda: stream_batch  # every step below sees the same stream batch
    with torch.no_grad():  # its logits as the step computes them (train mode: the same batch statistics)
        logits = t.model(torch.cat([batch["images"], stream_batch[0]]))[16:]
    confidence, own = logits.softmax(-1).max(1)

    def terms_at(threshold: float) -> dict:
        t.method.cfg.pseudo_label_threshold = threshold
        return t.method.loss_terms(batch, t.step)

    assert "pseudo_label" not in terms_at(0.0)  # before its start: the plain concept loss
    t.step = t.steps_per_epoch * recipe.train.epochs // 2
    terms = terms_at(0.0)  # every row counts
    assert float(terms["pseudo_label_kept"]) == len(logits)
    assert float(terms["pseudo_label"].detach()) == pytest.approx(float(F.cross_entropy(logits, own)), rel=1e-4)
    total = terms["nll"] + 2 * terms["pseudo_label"] + terms["penalty"]
    assert float(terms["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    keep = confidence >= confidence.median()  # only the confident rows count
    assert 0 < int(keep.sum()) < len(keep)
    terms = terms_at(float(confidence.median()))
    assert float(terms["pseudo_label_kept"]) == int(keep.sum())
    expected = F.cross_entropy(logits[keep], own[keep])
    assert float(terms["pseudo_label"].detach()) == pytest.approx(float(expected), rel=1e-4)
    terms = terms_at(1.0)  # no prediction is certain: nothing counts and the term is 0
    assert float(terms["pseudo_label_kept"]) == 0 and float(terms["pseudo_label"].detach()) == 0


def test_stream_fit_reported_for_the_stream_method_only(tmp_path):
    """A run that trains against the unlabeled stream reports its accuracy on the stream (labels read for the
    report only), equal to predicting the stream with the saved model; compare shows it beside the shifted split."""
    from debias.commands import load_standalone_weights
    from debias.data import load_dataset
    from debias.evaluate import predict
    from debias.models.standalone import StandaloneModel
    from debias.recipe import load_recipe

    runs = {}
    for method in ("concept", "erm"):
        runs[method] = tmp_path / method
        assert main(["train", "recipes/colored_digits.toml", "--method", method, "--out", str(runs[method]),
                     "--no-progress", "--set", *TINY, "train.epochs=1"]) == 0
    m = json.loads((runs["concept"] / "metrics.json").read_text())
    assert "stream" not in json.loads((runs["erm"] / "metrics.json").read_text())
    recipe = load_recipe(str(runs["concept"] / "recipe.toml"), [])
    bundle = load_dataset(recipe)
    model = StandaloneModel(recipe.model.name, bundle.num_classes)
    load_standalone_weights(model, runs["concept"], recipe, bundle.class_names)
    preds = predict(model, bundle.unlabeled, torch.device("cpu"))
    stream = bundle.unlabeled
    assert m["stream"]["n"] == len(stream)
    assert m["stream"]["accuracy"] == pytest.approx(float((preds == stream.labels).float().mean()))
    assert set(m["stream"]["groups"]) == {"5|red", "5|green", "8|red", "8|green"}
    result = compare_runs([runs["concept"], runs["erm"]], tmp_path / "cmp")
    by_method = {g["method"]: g for g in result["groups"]}
    assert by_method["concept[graft]"]["stream"]["accuracy"]["mean"] == pytest.approx(m["stream"]["accuracy"])
    assert "stream" not in by_method["erm"]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## The penalty's own images vs fresh images" in report
    line = next(x for x in report.splitlines() if x.startswith("| concept[graft] |") and "±" not in x
                and f"{m['stream']['accuracy']:.3f}" in x)
    assert f"{m['splits']['shifted']['accuracy']:.3f}" in line


def test_core_distillation_targets_the_core_concept_of_each_source(tmp_path, capsys):
    """``concept.core_weight``: the cross-entropy of the stream's class logits against the core concept's caption
    prediction, from the true classes (``labels``, an oracle) or read through the graft with the spurious one."""
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    recipe = load_recipe("recipes/colored_digits.toml", TINY + MI_ALONE + [
        "train.method=concept", "concept.source=labels", "concept.core_weight=2"])
    t = Trainer(recipe, tmp_path / "labels", progress=False)
    split, stream = t.bundle.splits["train"], t.bundle.unlabeled
    batch = {"images": split.images[:16], "labels": split.labels[:16], "attrs": split.attrs[:16]}
    stream_batch = t.next_unlabeled()
    t.next_unlabeled = lambda: stream_batch
    with torch.no_grad():
        logits = t.model(torch.cat([batch["images"], stream_batch[0]]))[16:]
    terms = t.method.loss_terms(batch, t.step)
    expected = F.cross_entropy(logits, stream.labels[stream_batch[1]])
    assert float(terms["core"].detach()) == pytest.approx(float(expected), rel=1e-4)
    total = terms["nll"] + terms["penalty"] + 2 * terms["core"]
    assert float(terms["loss"].detach()) == pytest.approx(float(total.detach()), rel=1e-5)

    graft = Trainer(load_recipe("recipes/colored_digits.toml", TINY + ["train.method=concept",
                                                                         "concept.core_weight=1"]),
                    tmp_path / "graft", progress=False)
    graft.epoch = 0
    graft.method.on_epoch_start(0)
    core, stream = graft.method.graft_core, graft.bundle.unlabeled
    assert core.shape == (len(stream), 2) and torch.allclose(core.sum(1), torch.ones(len(core)), atol=1e-5)
    graft.net.eval()
    with torch.no_grad():
        _, taps = graft.net(stream.images[:8], taps=True)
        emb = graft.graft(stream.images[:8], taps)
        direct = graft.method._softmax(emb, graft.clip.encode_text(graft.method.core.captions))
    assert torch.allclose(core[:8], direct.cpu(), atol=1e-5)
    assert graft.method.core.captions == ["a photo of the digit five.", "a photo of the digit eight."]
    assert torch.equal(graft.method.state_dict()["graft_core"], core)

    out = tmp_path / "nocore"
    assert main(["train", "recipes/colored_digits.toml", "--method", "concept", "--out", str(out), "--no-progress",
                 "--set", *TINY, "concept.core_weight=1", "concepts.core=[]"]) == 2
    err = capsys.readouterr().err
    assert "concept.core_weight" in err and "concepts.core" in err and not out.exists()
    out = tmp_path / "trained"  # the core prediction read through the graft trains end to end, and is logged
    assert main(["train", "recipes/colored_digits.toml", "--method", "concept", "--out", str(out), "--no-progress",
                 "--set", *TINY, "concept.core_weight=1", "train.epochs=1"]) == 0
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/core")]
    assert logged and all(v > 0 for v in logged)
