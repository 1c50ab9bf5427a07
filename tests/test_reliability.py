"""Reliability: bad input gets one clear line and exit code 2 and writes nothing; unsafe checkpoints are refused;
killed runs resume to the same result."""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from debias.cli import main

RECIPE = "recipes/colored_digits.toml"
TINY = ["train.epochs=2", "data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=2",
        "matching.num_images=64", "explain.control_draws=1", "train.batch_size=32", "model.name=resnet10t"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "erm"
    # its resumable state kept: a copy without ``done`` stands for an unfinished run
    assert main(["train", RECIPE, "--out", str(out), "--no-progress", "--keep-training-state", "--set", *TINY,
                 "train.epochs=1"]) == 0
    return out


def _bad_inputs(tmp: Path, run: Path) -> list[tuple[str, list[str], str]]:
    syntax = tmp / "syntax.toml"
    syntax.write_text("seed = 0\n[data\nbias = 1.0\n")
    latin = tmp / "latin1.toml"
    latin.write_bytes("seed = 0 # caf\xe9\n".encode("latin-1"))
    a_file = tmp / "a_file"
    a_file.write_text("x")
    no_metrics = tmp / "empty_run"
    no_metrics.mkdir(exist_ok=True)
    corrupt = tmp / "corrupt_run"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "metrics.json").write_text("{not json")
    unfinished = tmp / "unfinished_run"  # a run stopped after its last checkpoint, before its end
    shutil.copytree(run, unfinished, dirs_exist_ok=True)
    (unfinished / "done").unlink(missing_ok=True)
    twin = tmp / "twin_run"  # the same run again under another name: the same method, setting and seed
    shutil.copytree(run, twin, dirs_exist_ok=True)
    mangled = tmp / "mangled_run"  # a metrics.json of the right keys with a wrong value inside
    shutil.copytree(run, mangled, dirs_exist_ok=True)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["splits"]["test"]["accuracy"] = "0.9"
    (mangled / "metrics.json").write_text(json.dumps(metrics))
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(bytes(range(100)))
    not_object = tmp / "null_run"
    not_object.mkdir(exist_ok=True)
    (not_object / "metrics.json").write_text("null")
    out = str(tmp / "out")
    t = ["train", RECIPE, "--out", out, "--no-progress", "--set"]
    return [
        ("toml syntax error", ["train", str(syntax), "--out", out], "line 2"),
        ("recipe not utf-8", ["train", str(latin), "--out", out], "latin1.toml"),
        ("missing recipe file", ["train", str(tmp / "nope.toml"), "--out", out], "nope.toml"),
        ("recipe is a directory", ["train", str(tmp), "--out", out], "is not a file"),
        ("unknown key, suggestion", t + ["data.biass=0.5"], "did you mean 'bias'"),
        ("unknown section", t + ["dataa.bias=0.5"], "did you mean 'data'"),
        ("wrong type", t + ['data.bias="high"'], "data.bias = 'high'"),
        ("bias above 1", t + ["data.bias=1.5"], "data.bias = 1.5"),
        ("bias below 0", t + ["data.bias=-0.1"], "data.bias = -0.1"),
        ("empty caption list", t + ["concepts.captions.color=[]"], "concepts.captions.color"),
        ("class not in dataset", t + ["data.classes=[5, 11]"], "11 is not a digit"),
        ("colour not in palette", t + ['data.colors=["red", "pink"]'], "'pink' is not in the palette"),
        ("undefined spurious concept", t + ['concepts.spurious=["texture"]'], "'texture' is not defined"),
        ("epochs zero", t + ["train.epochs=0"], "train.epochs = 0"),
        ("bad graft stage", t + ['graft.stages=["layer9"]'], "'layer9'"),
        ("bad selection", t + ["matching.selection=greedy"], "matching.selection = 'greedy'"),
        ("unknown method", t + ["train.method=ermm"], "did you mean 'erm'"),
        ("concept split not a split", t + [*TINY, "selection.concept_split=tset"], "selection.concept_split = 'tset'"),
        ("oracle split not a split", t + [*TINY, "selection.oracle_split=shfited"],
         "selection.oracle_split = 'shfited'"),
        ("unknown augmentation", t + ['augment.transforms=["solarise"]'], "'solarise'"),
        ("running joint that never moves", t + ["concept.joint_decay=1.0"], "concept.joint_decay = 1.0"),
        ("a removed key at another value than every run's", t + ["concept.stream_loss_rows=9"],
         "concept.stream_loss_rows = 9: this key was removed from the recipe; only 0"),
        ("another removed key", t + ["concept.adversary_memory=4"],
         "concept.adversary_memory = 4: this key was removed"),
        ("self-training threshold over 1", t + ["concept.pseudo_label_threshold=1.5"],
         "concept.pseudo_label_threshold = 1.5"),
        ("a removed choice", t + ["concept.dependence=logit_corr"],
         "concept.dependence = 'logit_corr': this key was removed from the recipe; only \"mi\""),
        ("split fractions over 1", t + ["data.split_fractions.train=0.9"], "sum to"),
        ("override without =", t + ["data.bias"], "expected key=value"),
        ("override bad literal", t + ["data.colors=[red"], "is not a TOML value"),
        ("unknown timm model", t + ["model.name=resnet19"], "model.name = 'resnet19'"),
        ("missing model weights file", t + ["model.checkpoint=/nonexistent/w.safetensors"], "/nonexistent/w.safetensors"),
        ("unknown open_clip model", t + ["clip.name=RN51"], "clip.name = 'RN51'"),
        ("missing clip weights file", t + ["clip.name=RN50-quickgelu", "clip.pretrained=/nope/RN50.pt"],
         "/nope/RN50.pt"),
        ("clip tag not cached", t + ["clip.name=RN50-quickgelu", "clip.pretrained=openai",
                                     f"clip.cache_dir={tmp / 'empty_cache'}"], "not in the local cache"),
        ("cuda on a CPU machine", t + ["train.device=cuda"], "train.device = 'cuda'")
        if not torch.cuda.is_available() else ("device typo", t + ["train.device=gpu"], "train.device = 'gpu'"),
        ("output not writable", ["train", RECIPE, "--out", str(a_file / "run"), "--no-progress", "--set", *TINY],
         "not writable"),
        ("explain: no such run", ["explain", RECIPE, "--checkpoint", str(tmp / "missing_run"), "--out", out],
         "missing_run"),
        ("explain: other model's checkpoint", ["explain", RECIPE, "--checkpoint", str(run), "--out", out, "--set",
                                              "model.name=resnet18"], "'resnet10t' model"),
        ("explain: other classes", ["explain", RECIPE, "--checkpoint", str(run), "--out", out, "--set",
                                   *TINY, "data.classes=[3, 6]"], "classes [5,8]"),
        ("resume with another recipe", ["train", RECIPE, "--out", str(unfinished), "--no-progress", "--set", *TINY,
                                        "train.epochs=1", "train.lr=0.01", "data.split_fractions.unlabeled=0.2",
                                        "data.split_fractions.train=0.3"],
         "differs in data.split_fractions, train.lr"),
        ("a device torch knows, this code does not", t + ["train.device=meta"], "train.device = 'meta'"),
        ("corrupt safetensors weights", t + [f"model.checkpoint={garbage}"], "garbage.safetensors"),
        ("selection split not a split", t + [*TINY, "selection.split=vall"], "selection.split = 'vall'"),
        ("explain split not a split", t + [*TINY, "explain.split=shfted"], "explain.split = 'shfted'"),
        ("no training split", t + ["data.split_fractions.train=0.0"], "data.split_fractions.train = 0.0"),
        ("training batch of one", t + ["train.batch_size=1"], "train.batch_size = 1"),
        ("seed out of range", t + ["seed=100000000000000000"], "seed = 100000000000000000"),
        ("caption template, unknown placeholder", t + ['concepts.color_template="a {colour} digit"'],
         "concepts.color_template = 'a {colour} digit': not a caption template"),
        ("caption template without placeholder", t + ['concepts.digit_template="a digit"'], "no placeholder"),
        ("no concept to score", t + ["concepts.spurious=[]", "concepts.core=[]"], "at least one concept"),
        ("captions repeated", t + ['concepts.captions.color=["a red one", "a red one"]'], "distinct captions"),
        ("graft stage repeated", t + ['graft.stages=["layer2", "layer2"]'], "distinct stages"),
        ("a model that cannot take the images", t + [*TINY, "model.name=vit_tiny_patch16_224"],
         "model.name = 'vit_tiny_patch16_224': the model cannot take this dataset's (32, 32) images"),
        ("jtt that never upweights", t + ["train.method=jtt", "jtt.variant=continue", "jtt.first_epochs=32"],
         "jtt.first_epochs = 32"),
        ("jtt identification past its schedule", t + ["train.method=jtt", "jtt.first_epochs=33"],
         "jtt.first_epochs = 33"),
        ("unknown jtt variant", t + ["train.method=jtt", "jtt.variant=restart"], "jtt.variant = 'restart'"),
        ("augment without transforms", t + ["train.method=augment", "augment.transforms=[]"], "no transform"),
        ("finished run of another recipe", ["train", RECIPE, "--out", str(run), "--no-progress", "--set", *TINY,
                                            "train.epochs=1", "data.bias=0.5"],
         "holds a finished run of a different recipe (differs in data.bias)"),
        ("explain: mutual selection that keeps no pair", ["explain", RECIPE, "--checkpoint", str(run), "--out", out,
                                                          "--no-progress", "--set", *TINY, "matching.selection=mutual",
                                                          "matching.threshold=1.0", 'graft.stages=["layer2"]'],
         "matching.threshold = 1.0: mutual selection kept no channel pair"),
        ("explain into a train run", ["explain", RECIPE, "--checkpoint", str(run), "--out", str(run), "--set", *TINY],
         "is a `debias train` run directory"),
        ("compare into a train run", ["compare", str(run), "--out", str(run)], "is a `debias train` run directory"),
        ("compare: a run given twice", ["compare", str(run), str(run), "--out", out], "given twice"),
        ("compare: the same seed twice", ["compare", str(run), str(twin), "--out", out],
         "the same method, setting and seed"),
        ("compare: a wrong value", ["compare", str(mangled), "--out", out],
         "splits.test.accuracy = '0.9': expected an accuracy in [0, 1]"),
        ("compare: metrics not an object", ["compare", str(not_object), "--out", out], "expected a JSON object"),
        ("compare: not a run", ["compare", str(no_metrics), "--out", out], "metrics.json"),
        ("compare: corrupt metrics", ["compare", str(corrupt), "--out", out], "not valid JSON"),
    ]


def test_bad_inputs_fail_cleanly(tmp_path, finished_run, capsys):
    cases = _bad_inputs(tmp_path, finished_run)
    assert len(cases) >= 25
    run_before = _snapshot(finished_run)
    for name, argv, needle in cases:
        before = _snapshot(tmp_path)
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert len(err.splitlines()) == 1, f"{name}: not one line: {err!r}"
        assert needle in err, f"{name}: {needle!r} not in {err!r}"
        assert "Traceback" not in err
        assert _snapshot(tmp_path) == before, f"{name}: something was written"
    assert _snapshot(finished_run) == run_before


def test_an_empty_graft_stops_training_with_its_reason(tmp_path, capsys):
    """A swap graft with no channel swapped is plain CLIP: the per-epoch dominance would describe CLIP, not the CNN.
    The run stops at its first matching (after the first epoch, with its checkpoint kept) with the reason."""
    code = main(["train", RECIPE, "--out", str(tmp_path / "run"), "--no-progress", "--set", *TINY,
                 "matching.selection=mutual", "matching.threshold=1.0", 'graft.stages=["layer2"]'])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "matching.threshold = 1.0: mutual selection kept no channel pair" in err


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(out / "checkpoint.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f, protocol=2)  # torch.save's protocol: the refusal, not a protocol warning
    code = main(["train", RECIPE, "--out", str(out), "--no-progress", "--set", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "refused to load" in err and "checkpoint.pt" in err
    assert not marker.exists()


def _metrics_without_timing(path: Path) -> dict:
    m = json.loads(path.read_text())
    m.pop("timing")
    return m


KILLS = 3
"""SIGKILLs at random points after the SIGTERM; each resumes from whatever the previous one left."""


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    args = [sys.executable, "-m", "debias", "train", RECIPE, "--no-progress", "--set", *TINY, "train.epochs=3",
            "train.method=concept", "concept.unlabeled_batch_size=8", "selection.track_concepts=true",
            "concept.joint_decay=0.9", "concept.adversary_weight=1", "concept.rematch_every=2"]
    # the running joint, the adversary and the penalty's graft (matched at epoch 0 and kept through
    # epoch 1 while the tracking matches every epoch) are method state a resumed run must restore
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    subprocess.run(args + ["--out", str(ref)], check=True, env=env, capture_output=True)
    duration = time.perf_counter() - t0
    run = tmp_path / "killed"
    rng = random.Random(0)
    # SIGTERM first: the run stops after the current step with a mid-epoch checkpoint and says how to resume.
    # The signal must land inside the training loop (the reference's train_s after tb/ appears); a signal that
    # lands before the handler is installed or after the loop ended (a slower or faster machine) is retried.
    train_s = json.loads((ref / "metrics.json").read_text())["timing"]["train_s"]
    for attempt in range(6):
        proc = subprocess.Popen(args + ["--out", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        while not (run / "tb").exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(0.1 + rng.uniform(0.1, 0.4) * train_s)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate()
        if proc.returncode == 143:  # 128 + SIGTERM: stopped after a step, not bad input (2)
            break
        shutil.rmtree(run)  # finished (0) or killed before the handler (-15): start over
    assert proc.returncode == 143, f"SIGTERM never landed inside training in 6 tries: exit {proc.returncode}, {err}"
    assert "SIGTERM" in err and "resume" in err
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] > 0
    kills, reads, resumed_at = 0, 0, []
    while kills < KILLS:
        proc = subprocess.Popen(args + ["--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.8) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for name in ("checkpoint.pt", "model.safetensors", "metrics.json"):
            path = run / name
            if path.exists():  # whatever a kill left behind must be whole
                reads += 1
                if name.endswith(".pt"):
                    resumed_at.append(int(torch.load(path, weights_only=True)["step"]))
                elif name.endswith(".safetensors"):
                    from safetensors.torch import load_file
                    load_file(str(path))
                else:
                    json.loads(path.read_text())
        if (run / "done").exists():  # finished before every kill landed: start over and keep killing
            shutil.rmtree(run)
    subprocess.run(args + ["--out", str(run)], check=True, env=env, capture_output=True)
    assert (run / "done").exists()
    assert kills == KILLS and reads >= 1
    print(f"\nkill-resume: uninterrupted run {duration:.1f} s; SIGTERM then {kills} SIGKILLs; checkpoint step after "
          f"each kill {resumed_at}; {reads} files read whole after kills")
    assert _metrics_without_timing(run / "metrics.json") == _metrics_without_timing(ref / "metrics.json")


class _Stopped(Exception):
    pass


def test_resume_after_an_epochs_last_step_keeps_the_penalty_graft(tmp_path):
    """A run stopped after an epoch's last step, before that epoch's end (where the tracking matches the model again),
    resumes with the penalty's own graft: with rematch_every = 2 the next epoch must still read the stream through the
    first epoch's graft, not the tracking's newer one (a resumed run did, and trained a different model)."""
    from debias.recipe import load_recipe
    from debias.train.loop import Trainer

    recipe = load_recipe(RECIPE, TINY + ["train.method=concept", "concept.unlabeled_batch_size=8",
                                         "concept.rematch_every=2", "selection.track_concepts=true"])
    Trainer(recipe, tmp_path / "ref", progress=False).fit()
    run = tmp_path / "stopped"
    t = Trainer(recipe, run, progress=False)
    step = t.train_step

    def step_then_stop(batch):  # what SIGTERM after epoch 0's last step does: a checkpoint, then out
        terms = step(batch)
        if t.step + 1 == t.steps_per_epoch:
            t.step, t.batch_in_epoch = t.step + 1, t.batch_in_epoch + 1
            t.save_checkpoint()
            raise _Stopped
        return terms

    t.train_step = step_then_stop
    with pytest.raises(_Stopped):
        t.fit()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["batch_in_epoch"] == t.steps_per_epoch
    Trainer(recipe, run, progress=False).fit()
    assert _metrics_without_timing(run / "metrics.json") == _metrics_without_timing(tmp_path / "ref" / "metrics.json")


def test_resume_after_the_last_epoch_evaluates_the_same_training_split(tmp_path):
    """A run stopped after its last epoch's checkpoint, before its metrics were written, resumes straight into the
    final evaluation; the training split (re-drawn each epoch) must be the last epoch's draw there too, as in a run
    that was never stopped, so every figure of metrics.json is the same."""
    args = ["train", RECIPE, "--no-progress", "--set", *TINY, "train.epochs=3", "train.method=concept",
            "concept.unlabeled_batch_size=8", "concept.adversary_weight=1"]  # a model that misreads some training images
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    run = tmp_path / "run"
    assert main(args + ["--out", str(run), "--keep-training-state"]) == 0
    (run / "done").unlink()  # as if killed during the final evaluation: the checkpoint is the last epoch's
    (run / "metrics.json").unlink()
    assert main(args + ["--out", str(run)]) == 0
    assert _metrics_without_timing(run / "metrics.json") == _metrics_without_timing(tmp_path / "ref" / "metrics.json")


def test_weights_files_are_byte_identical_for_identical_tensors_and_metadata(tmp_path):
    """safetensors writes the metadata in hash order (it changes between saves); ``save_tensors`` sorts it, so two
    identical runs write identical files, and the file still loads with its tensors and metadata."""
    from safetensors import safe_open

    from debias.io import load_tensors, save_tensors

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(3, dtype=torch.float16)}
    meta = {"model": "resnet18", "num_classes": "2", "classes": "5,8", "epoch": "3", "note": "très"}
    blobs = set()
    for i in range(6):
        save_tensors(tmp_path / f"{i}.safetensors", tensors, metadata=meta)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    loaded = load_tensors(tmp_path / "0.safetensors")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == meta
