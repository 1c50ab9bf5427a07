"""tools/benchmark.py: a tiny benchmark writes its report and a rerun skips its finished runs; bad names exit 2 with
one line; submitit's local executor runs a run; the goal and variant tables."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from debias.benchmark import jobs, plan
from debias.errors import DebiasError

TINY = ["train.epochs=1", "data.train_copies=1", "data.eval_copies=1", "matching.num_images=64",
        "explain.control_draws=1", "model.name=resnet10t", "train.batch_size=32", "selection.track_concepts=false",
        "concept.unlabeled_batch_size=8", "explain.num_images=64", "data.unlabeled_copies=2", "concept.rematch_every=0"]
ARGS = ["--recipes", "colored_digits", "--methods", "erm", "concept_graft", "--seeds", "0", "--set", *TINY]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/benchmark.py", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One tiny benchmark (colored_digits, erm and concept_graft, one seed, one epoch), shared by the tests below."""
    out = tmp_path_factory.mktemp("benchmark") / "bench"
    return out, bench(*ARGS, "--out", str(out))


def test_tiny_benchmark_writes_the_report(tiny_bench):
    out, done = tiny_bench
    assert done.returncode == 0, done.stderr
    assert "[1/2] colored_digits/erm/scratch/seed0: ok" in done.stdout and "ETA" in done.stdout
    report = json.loads((out / "benchmark.json").read_text())
    assert {(r["variant"], r["row"], r["seed"]) for r in report["runs"]} == {("erm", "scratch", 0),
                                                                             ("concept_graft", "scratch", 0)}
    run = report["runs"][0]
    assert {"test", "shifted", "swapped"} <= set(run["splits"])
    assert run["dominant_concept"] in ("color", "digit", "none")
    assert 0 <= run["worst_group_accuracy"] <= run["splits"]["test"]["accuracy"]
    assert run["goal_met"] == (run["splits"]["shifted"]["accuracy"] >= 0.967
                               and run["splits"]["swapped"]["accuracy"] >= 0.962)
    group = report["groups"][0]
    assert group["goal"]["thresholds"] == {"shifted": 0.967, "swapped": 0.962} and group["goal"]["n"] == 1
    assert report["run_commits"] and report["commit"]["hash"] in report["run_commits"]
    md = (out / "benchmark.md").read_text()
    assert "Goal: shifted >= 0.967, swapped >= 0.962." in md and "| concept_graft | 1 |" in md
    assert "final epoch" in md and "Group-label oracles, reported apart" in md
    assert (out / "colored_digits.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_skips_finished_runs_and_the_report_rebuilds(tiny_bench):
    out, done = tiny_bench
    assert done.returncode == 0, done.stderr
    metrics = out / "runs" / "colored_digits" / "erm" / "scratch" / "seed0" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    again = bench(*ARGS, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skip colored_digits/") == 2 and "0 to run" in again.stdout
    assert metrics.stat().st_mtime_ns == before
    (out / "benchmark.md").unlink()
    rebuilt = bench("--report-only", "--out", str(out))
    assert rebuilt.returncode == 0 and (out / "benchmark.md").read_text().count("| erm |") == 2, rebuilt.stderr


@pytest.mark.parametrize("args, named", [
    (["--recipes", "no_such_recipe", "--methods", "erm"], "--recipes 'no_such_recipe': not a recipe"),
    (["--recipes", "colored_digits", "--methods", "ermm"], "--methods 'ermm': not a benchmark variant"),
    (["--recipes", "colored_digits", "--methods", "erm", "--set", "bogus=1"], "unknown recipe key 'bogus'"),
    (["--report-only"], "--report-only: no finished run"),
    pytest.param(["--recipes", "colored_digits", "--methods", "erm", "--launcher", "submitit"],
                 "--launcher submitit: no SLURM here", marks=pytest.mark.skipif(
                     shutil.which("srun") is not None, reason="a SLURM cluster: the launcher would submit")),
])
def test_bad_names_exit_2_with_one_line(tmp_path, args, named):
    done = bench(*args, "--out", str(tmp_path / "bench"))
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "bench").exists()


def test_a_variant_whose_method_is_not_registered_is_refused(monkeypatch):
    monkeypatch.setitem(plan.VARIANTS, "nomethod", plan.Variant("nomethod", ("train.method=nomethod",)))
    with pytest.raises(DebiasError, match="train.method = 'nomethod' is not in debias.methods.METHODS"):
        plan.check_variants(["erm", "nomethod"])


def test_goals_expand_every_swapped_concept_and_nuisance_augmentation_needs_a_transform():
    assert plan.goal_thresholds("two_nuisances", ["test", "shifted", "swapped", "swapped_color",
                                                  "swapped_background"]) == {
        "shifted": 0.85, "swapped_color": 0.85, "swapped_background": 0.85}
    assert plan.goal_thresholds("two_nuisances", ["shifted"]) == {"shifted": 0.85, "swapped_*": 0.85}  # not met
    assert plan.meets({"shifted": 0.85, "swapped_*": 0.85}, {"shifted": 0.9}) is False
    assert plan.meets({}, {"shifted": 0.9}) is None and plan.goal_thresholds("waterbirds", ["test"]) == {}
    sets, why = plan.variant_overrides(plan.VARIANTS["augment_nuisance"], ["color"])
    assert sets == ["train.method=augment", 'augment.transforms=["channel_permutation", "grayscale"]'] and not why
    sets, why = plan.variant_overrides(plan.VARIANTS["augment_nuisance"], ["color", "background"])
    assert sets is None and "no transform removes background" in why


def test_rows_follow_the_recipes_checkpoint(tmp_path):
    runs, notes = plan.plan_runs(["colored_digits", "marked_digits"], ["erm", "augment_nuisance"], [0, 0], [],
                                 True, tmp_path)
    assert [r.key for r in runs] == ["colored_digits/erm/scratch/seed0",
                                     "colored_digits/augment_nuisance/scratch/seed0",
                                     "marked_digits/erm/finetuned/seed0", "marked_digits/erm/scratch/seed0"]
    assert runs[-1].overrides[-2:] == ['model.checkpoint=""', "seed=0"]
    assert notes == ["marked_digits: augment_nuisance skipped: no transform removes marker (transforms exist for "
                     "color)"]


def test_submitit_local_executor_runs_one_tiny_run(tmp_path):
    out = tmp_path / "bench"
    done = bench("--launcher", "submitit-local", "--recipes", "colored_digits", "--methods", "erm", "--seeds", "0",
                 "--out", str(out), "--set", *TINY)
    assert done.returncode == 0, done.stderr
    assert (out / "runs" / "colored_digits" / "erm" / "scratch" / "seed0" / "done").exists()
    assert list(json.loads((out / "submitit" / "jobs.json").read_text())) == ["colored_digits/erm/scratch/seed0"]
    assert "debias train" in (out / "logs" / "colored_digits" / "erm" / "scratch" / "seed0.log").read_text()
    assert len(json.loads((out / "benchmark.json").read_text())["runs"]) == 1
    again = bench("--launcher", "submitit-local", "--recipes", "colored_digits", "--methods", "erm", "--seeds", "0",
                  "--out", str(out), "--set", *TINY)
    assert again.returncode == 0 and "skip colored_digits/erm/scratch/seed0 (done)" in again.stdout, again.stderr


def test_submitits_warning_signal_stops_a_run_as_sigterm_does():
    """A job's SIGUSR2 (submitit: time limit near, or preemption) becomes the SIGTERM the trainer stops on."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        jobs._stop_run(signal.SIGUSR2, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]


@pytest.mark.slow  # a whole-tool run (about 13-22 s); the default suite keeps within 10 min
def test_a_stopped_benchmark_resumes_its_unfinished_run(tmp_path):
    """SIGTERM to the benchmark stops the run in progress after its current step (exit 143, checkpoint written); the
    same command resumes that run rather than starting it again."""
    out = tmp_path / "bench"
    args = [sys.executable, "tools/benchmark.py", "--recipes", "colored_digits", "--methods", "erm", "--seeds", "0",
            "--out", str(out), "--set", *TINY, "train.epochs=2"]
    run = out / "runs" / "colored_digits" / "erm" / "scratch" / "seed0"
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoint.pt").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 143 and "benchmark interrupted" in err, err
    assert not (run / "done").exists() and (run / "checkpoint.pt").exists()
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 0 and "[1/1] colored_digits/erm/scratch/seed0: ok" in again.stdout, again.stderr
    log = (out / "logs" / "colored_digits" / "erm" / "scratch" / "seed0.log").read_text()
    assert "stopped by SIGTERM" in log and "resumed" in log and (run / "done").exists()
    launches = [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]
    assert [launch["interrupted"] for launch in launches] == [True, False]
