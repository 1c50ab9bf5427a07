"""tools/sweep.py with worker processes: runs land where the compare expects them; a failed run is named."""
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = ["train.epochs=1", "data.train_copies=1", "data.eval_copies=1", "matching.num_images=64",
        "explain.control_draws=1", "model.name=resnet10t", "train.batch_size=32"]


@pytest.mark.slow  # a whole-tool run of six trainings (about 55 s); the default suite keeps within 10 min
def test_parallel_sweep_runs_compares_and_names_failures(tmp_path):
    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "0", "1", "--jobs", "2",
                           "--out", str(out), "--set", *TINY], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "compare" / "compare.json").read_text())["rows"]
    assert sorted(r["seed"] for r in rows) == [0, 1]
    assert all((out / f"erm_bias1.0_seed{s}" / "done").exists() for s in (0, 1))
    assert "dominant concept" in (out / "logs" / "erm_bias1.0_seed0.log").read_text()  # the run's output, logged
    assert not any((out / f"erm_bias1.0_seed{s}" / "checkpoint.pt").exists() for s in (0, 1))  # a finished run drops it
    dropped = subprocess.run([sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "0", "--jobs", "2",
                              "--out", str(tmp_path / "dropped"), "--drop-training-state", "--set", *TINY],
                             capture_output=True, text=True)
    assert dropped.returncode == 0, dropped.stderr
    run = tmp_path / "dropped" / "erm_bias1.0_seed0"
    assert not (run / "checkpoint.pt").exists()
    assert (run / "model.safetensors").exists() and (run / "metrics.json").exists()
    assert (tmp_path / "dropped" / "compare" / "compare.json").exists()
    # the compare's goal and reference pass through; finished runs are skipped, a bad reference is named afterwards
    again = [sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "0", "0", "--out",
             str(tmp_path / "dropped"), "--goal", "test=0", "--set", *TINY]  # a seed given twice is one run
    counted = subprocess.run([*again, "--reference", "erm"], capture_output=True, text=True)
    assert counted.returncode == 0 and "skip" in counted.stdout, counted.stderr
    (group,) = json.loads((tmp_path / "dropped" / "compare" / "compare.json").read_text())["groups"]
    assert group["goal"] == {"thresholds": {"test": 0.0}, "met": 1, "n": 1, "seeds_met": [0]}
    unmatched = subprocess.run([*again, "--reference", "concept"], capture_output=True, text=True)
    assert unmatched.returncode == 2 and "the compare did not" in unmatched.stderr
    assert "--reference 'concept' must match exactly one group" in unmatched.stderr
    early = subprocess.run([sys.executable, "tools/sweep.py", "--methods", "erm", "--out", str(tmp_path / "never"),
                            "--goal", "test"], capture_output=True, text=True)
    assert early.returncode == 2 and "--goal 'test': expected SPLIT=MIN" in early.stderr
    assert not (tmp_path / "never").exists()
    # every run's recipe is checked before the first run starts; a finished run of another recipe is not reused
    for sets, needle in ((["bogus=1"], "unknown recipe key 'bogus'"),
                         (["train.lr=0.01"], "holds a finished run of a different recipe (differs in train.lr)")):
        refused = subprocess.run([sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "1", "0", "--jobs",
                                  "2", "--out", str(tmp_path / "dropped"), "--set", *TINY, *sets],
                                 capture_output=True, text=True)
        assert refused.returncode == 2 and needle in refused.stderr, refused.stderr
        assert not (tmp_path / "dropped" / "erm_bias1.0_seed1").exists()
    for attempt in (1, 2):  # a run's log keeps every attempt, each under its own header
        bad = subprocess.run([sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "0", "--jobs", "2",
                              "--out", str(tmp_path / "bad"), "--set", *TINY, "model.checkpoint=/nonexistent/w.pth"],
                             capture_output=True, text=True)
        assert bad.returncode == 1 and "erm_bias1.0_seed0" in bad.stderr and "no compare written" in bad.stderr
        log = (tmp_path / "bad" / "logs" / "erm_bias1.0_seed0.log").read_text()
        assert log.count("debias train: error") == log.count("=== ") == attempt, log
        assert "/nonexistent/w.pth" in log


@pytest.mark.slow  # a whole-tool run (about 13-22 s); the default suite keeps within 10 min
def test_bench_step_times_settings_side_by_side_and_names_a_bad_entry():
    """tools/bench_step.py: NAME@key=value entries add overrides to one entry; every entry gets a row (its stream
    batch named), the first is the ratio's base; a bad override names its entry and the key."""
    tiny = [*TINY, "concept.unlabeled_batch_size=8"]
    done = subprocess.run([sys.executable, "tools/bench_step.py", "--steps", "2", "--warmup", "0", "--methods", "erm",
                           "concept", "concept@concept.unlabeled_batch_size=16", "concept@concept.rematch_every=0",
                           "--set", *tiny], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"erm", "concept", "concept@concept.unlabeled_batch_size=16", "concept@concept.rematch_every=0"}
    # the once-per-epoch work: none for erm, or for a graft matched once before training; matching + reading else
    assert float(rows["erm"][4]) == float(rows["concept@concept.rematch_every=0"][4]) == 0 < float(rows["concept"][4])
    assert [rows[m][0] for m in ("erm", "concept", "concept@concept.unlabeled_batch_size=16")] == ["-", "8", "16"]
    assert float(rows["erm"][2]) == 1.0 and rows["erm"][3] == "1.00-1.00"  # the base against itself
    for m, row in rows.items():  # each ratio inside its own interval
        lo, hi = map(float, row[3].split("-"))
        assert lo <= float(row[2]) <= hi, (m, row)
    bad = subprocess.run([sys.executable, "tools/bench_step.py", "--steps", "1", "--warmup", "0", "--methods", "erm",
                          "concept@concept.bogus=1", "--set", *tiny], capture_output=True, text=True)
    assert bad.returncode == 2 and "'concept@concept.bogus=1'" in bad.stderr and "bogus" in bad.stderr


@pytest.mark.slow  # whole training runs (about 20-40 s); the default suite keeps within 10 min
def test_bench_epoch_times_whole_runs_in_rounds_and_names_a_bad_entry():
    """tools/bench_epoch.py: every entry trains once a round; its epoch is the run's train_s over train.epochs, the
    ratio is taken within each round (the base's are all 1.00) and the median over rounds printed beside them."""
    tiny = [*TINY, "concept.unlabeled_batch_size=8", "train.epochs=1"]
    done = subprocess.run([sys.executable, "tools/bench_epoch.py", "--recipe", "recipes/colored_digits.toml",
                           "--rounds", "2", "--methods", "erm", "concept", "--set", *tiny],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("round ") == 4 and "1 epochs, batch" in done.stdout
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"erm", "concept"}
    assert rows["erm"][2:] == ["1.00", "1.00", "1.00"]
    per_round = [float(x) for x in rows["concept"][3:]]
    assert len(per_round) == 2 and min(per_round) <= float(rows["concept"][2]) <= max(per_round)
    bad = subprocess.run([sys.executable, "tools/bench_epoch.py", "--recipe", "recipes/colored_digits.toml",
                          "--methods", "erm", "concept@concept.bogus=1", "--set", *tiny], capture_output=True, text=True)
    assert bad.returncode == 2 and "'concept@concept.bogus=1'" in bad.stderr and "round" not in bad.stderr


@pytest.mark.parametrize("tool, args, named", [
    ("bench_step.py", ["--steps", "0"], "--steps 0"),
    ("bench_epoch.py", ["--rounds", "0"], "--rounds 0"),
    ("bench_throughput.py", ["--steps", "0"], "--steps 0"),
    ("bench_matching.py", ["--sizes", "0", "8"], "--sizes 0 8"),
    ("bench_matching.py", ["--sizes", "1"], "--sizes 1: expected counts of at least 8"),
    ("bench_matching.py", ["--sizes", "8", "--model", "nosuchnet"], "'nosuchnet': not a timm model"),
])
def test_benchmarks_refuse_bad_input_with_a_message(tool, args, named):
    """A benchmark given nothing to time, or a model that does not exist, exits 2 naming the value, without a
    traceback (an empty list of times used to end in statistics' 'no median for empty data')."""
    done = subprocess.run([sys.executable, f"tools/{tool}", *args], capture_output=True, text=True)
    assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow  # a whole-tool run (about 13-22 s); the default suite keeps within 10 min
def test_bench_matching_times_both_pair_sums_and_compares_their_channels():
    """tools/bench_matching.py: a row per (size, pair sums), the time ratio, and whether the adjoint sums select the
    channels the explicitly resized maps do (the same statistics up to float rounding)."""
    done = subprocess.run([sys.executable, "tools/bench_matching.py", "--sizes", "16", "--repeats", "1", "--model",
                           "resnet10t", "--batch-size", "8"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line.split()[:2] for line in done.stdout.splitlines() if line.split()[1:2] in (["adjoint"], ["resize"])]
    assert rows == [["16", "adjoint"], ["16", "resize"]]
    assert "16 images: resize / adjoint time" in done.stdout and "the same channels selected: yes" in done.stdout


def test_bench_throughput_prints_each_step_ratio_with_its_interval(tmp_path):
    """tools/bench_throughput.py, shrunk to the digits CLIP and a small model on CPU: the step ratio to the first
    method comes with its bootstrap interval (the base's own is 1.00-1.00), in the table and the JSON; the header
    names the model, CLIP and image size that ran, not the paper scale's."""
    done = subprocess.run([sys.executable, "tools/bench_throughput.py", "--precisions", "fp32", "--steps", "3",
                           "--json", str(tmp_path / "rows.json"), "--set", "data.image_size=32", "model.name=resnet10t",
                           'clip.name="digits"', 'clip.pretrained=""'], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("resnet10t + digits (model pretrained False, CLIP weights shipped), 32 px")
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["erm", "concept"]
    assert rows[0]["step_ratio_interval"] == [1.0, 1.0]
    lo, hi = rows[1]["step_ratio_interval"]
    assert lo <= rows[1]["step_ratio"] <= hi
    assert f"{lo:.2f}-{hi:.2f}" in done.stdout.splitlines()[-1]


def test_bench_step_ratio_interval_brackets_the_ratio_and_narrows_with_rounds():
    """The bootstrap interval of the step ratio: exact for noiseless times, around the ratio of medians for noisy
    ones, narrower with more rounds; unequal lists are refused with both lengths named."""
    spec = importlib.util.spec_from_file_location("bench_step", "tools/bench_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.ratio_interval([0.5] * 8, [0.65] * 8) == pytest.approx((1.3, 1.3))
    gen = torch.Generator().manual_seed(0)
    widths = []
    for rounds in (10, 200):
        base = (1 + 0.2 * torch.rand(rounds, generator=gen)).tolist()
        other = [1.25 * b * (1 + 0.1 * float(torch.rand(1, generator=gen))) for b in base]
        lo, hi = bench.ratio_interval(base, other)
        assert lo < statistics.median(other) / statistics.median(base) < hi
        assert 1.2 < lo and hi < 1.5
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    with pytest.raises(ValueError, match="got 3 and 2"):
        bench.ratio_interval([1.0] * 3, [1.0] * 2)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a reaper that a container may not have)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux /proc")
@pytest.mark.parametrize("how,jobs", [("ctrl-c", 2), ("sigkill", 2), ("ctrl-c", 1)])
def test_stopped_sweep_stops_its_workers_and_leaves_resumable_runs(tmp_path, how, jobs):
    """Ctrl-C (SIGINT to the sweep's process group) or SIGKILL to the sweep process alone: the runs in progress stop
    after a step (checkpoint written, said in the run's log), no queued run starts, and the workers exit. Without
    workers (--jobs 1) Ctrl-C stops the run in the sweep's own process the same way, exit 130."""
    out, stderr = tmp_path / "sweep", tmp_path / "stderr.txt"
    started = (0, 1) if jobs == 2 else (0,)
    with open(stderr, "w") as err:  # a file, not a pipe: workers left behind would hold a pipe open
        sweep = subprocess.Popen([sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "0", "1", "2", "3",
                                  "--jobs", str(jobs), "--out", str(out), "--set", *TINY, "train.epochs=200"],
                                 stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    workers = []
    try:
        deadline = time.monotonic() + 240
        while not all((out / f"erm_bias1.0_seed{s}" / "checkpoint.pt").exists() for s in started):
            assert sweep.poll() is None and time.monotonic() < deadline, "the runs never wrote a first checkpoint"
            time.sleep(0.5)
        workers = _children(sweep.pid)
        assert len(workers) >= (jobs > 1), "no worker processes found"
        if how == "ctrl-c":
            os.killpg(sweep.pid, signal.SIGINT)
            assert sweep.wait(timeout=120) == 130, stderr.read_text()
            assert "sweep interrupted" in stderr.read_text()
        else:
            sweep.kill()
            sweep.wait()
        deadline = time.monotonic() + 120
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_running(w) for w in workers), "worker processes outlived the sweep"
        for s in started:
            log = (out / "logs" / f"erm_bias1.0_seed{s}.log").read_text() if jobs > 1 else stderr.read_text()
            assert "stopped by SIG" in log and "resume with the same command" in log, log[-2000:]
            assert (out / f"erm_bias1.0_seed{s}" / "checkpoint.pt").exists()
            assert not (out / f"erm_bias1.0_seed{s}" / "done").exists()
        assert not any((out / f"erm_bias1.0_seed{s}").exists() for s in range(len(started), 4))  # not started
    finally:  # what a failure left behind would train on
        sweep.kill()
        sweep.wait()
        for w in filter(_running, workers):
            os.kill(w, signal.SIGKILL)
