"""Sweep methods x seeds x bias on a recipe, then compare. Finished runs (a ``done`` marker) are skipped.

    python tools/sweep.py --bias 1.0 --out runs/sweep            # the 8 methods x 3 seeds at bias 1.0
    python tools/sweep.py --bias 1.0 0.99 --seeds 0 1 2 --out runs/sweep
    python tools/sweep.py --methods erm concept:graft --set concept.weight=2 --out runs/w2
    python tools/sweep.py --bias 1.0 --jobs 2 --out runs/sweep   # 2 runs at a time, 1 thread each (2 cores)

With ``--jobs N`` (N > 1) each run is a subprocess with ``cores // N`` torch threads and its log in ``OUT/logs``;
the small models here use a second core better as a second run than as a second thread.

A method ``concept:SOURCE`` is the concept method with ``concept.source = SOURCE``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from debias.cli import main as debias_main
from debias.compare import compare_runs

ALL_METHODS = ["erm", "concept:graft", "concept:clip", "concept:labels", "groupdro", "jtt", "reweight", "augment"]


def run_dir(out: Path, method: str, bias: float, seed: int) -> Path:
    return out / f"{method.replace(':', '-')}_bias{bias}_seed{seed}"


def _run_parallel(todo: list[tuple[Path, list[str]]], jobs: int, logs: Path) -> list[str]:
    """Run ``debias`` commands ``jobs`` at a time, each in a subprocess with its share of the cores."""
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))

    def one(item: tuple[Path, list[str]]) -> tuple[str, int, float]:
        d, cmd = item
        ts = time.perf_counter()
        with open(logs / f"{d.name}.log", "w") as log:
            code = subprocess.run([sys.executable, "-m", "debias", *cmd], stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode
        seconds = time.perf_counter() - ts
        print(f"{d.name}: exit {code} in {seconds:.0f} s" + ("" if code == 0 else f" (log: {logs / d.name}.log)"),
              flush=True)
        return d.name, code, seconds

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, todo))
    return [name for name, code, _ in results if code != 0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/colored_digits.toml")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bias", type=float, nargs="+", default=[1.0])
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1, in this process)")
    args = p.parse_args(argv)
    out = Path(args.out)
    runs, todo, t0 = [], [], time.perf_counter()
    for bias in args.bias:
        for method in args.methods:
            for seed in args.seeds:
                d = run_dir(out, method, bias, seed)
                runs.append(d)
                if (d / "done").exists():
                    print(f"skip {d} (done)")
                    continue
                name, _, source = method.partition(":")
                sets = args.overrides + [f"seed={seed}", f"data.bias={bias}"]
                if source:
                    sets.append(f"concept.source={source}")
                todo.append((d, ["train", args.recipe, "--method", name, "--out", str(d), "--no-progress",
                                 "--set", *sets]))
    if args.jobs <= 1:
        for d, cmd in todo:
            ts = time.perf_counter()
            code = debias_main(cmd)
            print(f"{d.name}: exit {code} in {time.perf_counter() - ts:.0f} s", flush=True)
            if code != 0:
                return code
    else:
        failed = _run_parallel(todo, args.jobs, out / "logs")
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}; no compare written", file=sys.stderr)
            return 1
    print(f"sweep wall time {time.perf_counter() - t0:.0f} s for {len(runs)} runs")
    compare_runs(runs, out / "compare")
    print((out / "compare" / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
