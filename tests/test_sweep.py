"""tools/sweep.py with worker processes: runs land where the compare expects them; a failed run is named."""
import json
import subprocess
import sys

TINY = ["train.epochs=1", "data.train_copies=1", "data.eval_copies=1", "matching.num_images=64",
        "explain.control_draws=1", "model.name=resnet10t", "train.batch_size=32"]


def test_parallel_sweep_runs_compares_and_names_failures(tmp_path):
    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "0", "1", "--jobs", "2",
                           "--out", str(out), "--set", *TINY], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "compare" / "compare.json").read_text())["rows"]
    assert sorted(r["seed"] for r in rows) == [0, 1]
    assert all((out / f"erm_bias1.0_seed{s}" / "done").exists() for s in (0, 1))
    assert "dominant concept" in (out / "logs" / "erm_bias1.0_seed0.log").read_text()  # the run's output, logged
    assert all((out / f"erm_bias1.0_seed{s}" / "checkpoint.pt").exists() for s in (0, 1))  # kept by default
    dropped = subprocess.run([sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "0", "--jobs", "2",
                              "--out", str(tmp_path / "dropped"), "--drop-training-state", "--set", *TINY],
                             capture_output=True, text=True)
    assert dropped.returncode == 0, dropped.stderr
    run = tmp_path / "dropped" / "erm_bias1.0_seed0"
    assert not (run / "checkpoint.pt").exists()
    assert (run / "model.safetensors").exists() and (run / "metrics.json").exists()
    assert (tmp_path / "dropped" / "compare" / "compare.json").exists()
    # the compare's goal and reference pass through; finished runs are skipped, a bad reference is named afterwards
    again = [sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "0", "--out", str(tmp_path / "dropped"),
             "--goal", "test=0", "--set", *TINY]
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
    bad = subprocess.run([sys.executable, "tools/sweep.py", "--methods", "erm", "--seeds", "0", "--jobs", "2",
                          "--out", str(tmp_path / "bad"), "--set", *TINY, "bogus=1"], capture_output=True, text=True)
    assert bad.returncode == 1 and "erm_bias1.0_seed0" in bad.stderr and "no compare written" in bad.stderr
    assert "unknown recipe key 'bogus'" in (tmp_path / "bad" / "logs" / "erm_bias1.0_seed0.log").read_text()


def test_bench_step_times_settings_side_by_side_and_names_a_bad_entry():
    """tools/bench_step.py: NAME@key=value entries add overrides to one entry; every entry gets a row (its stream
    batch named), the first is the ratio's base; a bad override names its entry and the key."""
    tiny = [*TINY, "concept.unlabeled_batch_size=8"]
    done = subprocess.run([sys.executable, "tools/bench_step.py", "--steps", "2", "--warmup", "0", "--methods", "erm",
                           "concept", "concept@concept.unlabeled_batch_size=16", "--set", *tiny],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"erm", "concept", "concept@concept.unlabeled_batch_size=16"}
    assert [rows[m][0] for m in ("erm", "concept", "concept@concept.unlabeled_batch_size=16")] == ["-", "8", "16"]
    assert float(rows["erm"][2]) == 1.0
    bad = subprocess.run([sys.executable, "tools/bench_step.py", "--steps", "1", "--warmup", "0", "--methods", "erm",
                          "concept@concept.bogus=1", "--set", *tiny], capture_output=True, text=True)
    assert bad.returncode == 2 and "'concept@concept.bogus=1'" in bad.stderr and "bogus" in bad.stderr
