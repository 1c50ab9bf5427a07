"""Sweep methods x seeds x bias on a recipe, then compare. Finished runs (a ``done`` marker) are skipped.

    python tools/sweep.py --bias 1.0 --out runs/sweep            # the 8 methods x 3 seeds at bias 1.0
    python tools/sweep.py --bias 1.0 0.99 --seeds 0 1 2 --out runs/sweep
    python tools/sweep.py --methods erm concept:graft --set concept.weight=2 --out runs/w2

A method ``concept:SOURCE`` is the concept method with ``concept.source = SOURCE``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from debias.cli import main as debias_main
from debias.compare import compare_runs

ALL_METHODS = ["erm", "concept:graft", "concept:clip", "concept:labels", "groupdro", "jtt", "reweight", "augment"]


def run_dir(out: Path, method: str, bias: float, seed: int) -> Path:
    return out / f"{method.replace(':', '-')}_bias{bias}_seed{seed}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/colored_digits.toml")
    p.add_argument("--methods", nargs="+", default=ALL_METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bias", type=float, nargs="+", default=[1.0])
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    runs, t0 = [], time.perf_counter()
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
                ts = time.perf_counter()
                code = debias_main(["train", args.recipe, "--method", name, "--out", str(d), "--no-progress",
                                    "--set", *sets])
                print(f"{d.name}: exit {code} in {time.perf_counter() - ts:.0f} s", flush=True)
                if code != 0:
                    return code
    print(f"sweep wall time {time.perf_counter() - t0:.0f} s for {len(runs)} runs")
    compare_runs(runs, out / "compare")
    print((out / "compare" / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
