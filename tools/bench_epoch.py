"""Epoch time of each method against the first, end to end: whole training runs, one at a time, in rounds.

Each round trains every entry once (same recipe and seed, in the order given, nothing in parallel) and reads the
run's ``train_s`` (``metrics.json``: the training loop from its first epoch to its last, with the data loading, the
per-epoch validation and concept tracking, the checkpoint writes and the method's own per-epoch work; not the final
evaluation and explanation). An epoch is ``train_s`` over ``train.epochs``; the ratio to the first entry is taken
within each round, so both runs of a ratio saw the same machine state, and the median over rounds is printed with
each round's. ``tools/bench_step.py`` splits the same epoch into its parts (step, the method's per-epoch work, the
tracking) on one model; this is the whole of it as a user's run pays it.

    python tools/bench_epoch.py --recipe recipes/textured_digits.toml --methods erm concept --rounds 3
    # a shorter budget, and settings side by side (NAME@key=value@key=value adds overrides to one entry only)
    python tools/bench_epoch.py --set train.epochs=8 --methods erm concept concept@concept.unlabeled_batch_size=24
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch

from bench_step import entry_recipe  # tools/, the script's own directory
from debias.errors import DebiasError
from debias.train.loop import Trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/textured_digits.toml")
    p.add_argument("--methods", nargs="+", default=["erm", "concept"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: expected at least 1")
    if len(set(args.methods)) < len(args.methods):
        p.error(f"--methods {' '.join(args.methods)}: an entry is repeated; give each one once")
    recipes = {}
    for entry in args.methods:  # every entry's recipe checked before the first run starts
        try:
            recipes[entry] = entry_recipe(args.recipe, entry, args.overrides)
        except DebiasError as e:
            print(f"bench_epoch: --methods entry {entry!r}: {e}", file=sys.stderr)
            return 2
    epoch_s: dict[str, list[float]] = {m: [] for m in recipes}
    step_s: dict[str, list[float]] = {m: [] for m in recipes}
    for rnd in range(args.rounds):
        for entry, recipe in recipes.items():
            with tempfile.TemporaryDirectory(prefix="bench_epoch.") as tmp:  # a run's weights, gone once timed
                try:
                    t = Trainer(recipe, f"{tmp}/run", progress=False)
                    timing = t.fit()["timing"]
                except DebiasError as e:
                    print(f"bench_epoch: --methods entry {entry!r}: {e}", file=sys.stderr)
                    return 2
            epoch_s[entry].append(timing["train_s"] / recipe.train.epochs)
            step_s[entry].append(timing["step_s_median"])
            print(f"round {rnd + 1}/{args.rounds} {entry}: {timing['train_s']:.1f} s, "
                  f"{epoch_s[entry][-1]:.3f} s an epoch", file=sys.stderr, flush=True)
    base = args.methods[0]
    r = next(iter(recipes.values()))
    print(f"recipe {args.recipe}, model {r.model.name}, {r.train.epochs} epochs, batch {r.train.batch_size}, "
          f"device {t.device}, threads {torch.get_num_threads()}, {args.rounds} rounds of whole runs one at a time")
    width = max(12, *(len(m) for m in args.methods))
    print(f"{'method':<{width}} {'median s/epoch':>15} {'median s/step':>14} {'epoch ratio':>12} "
          f"{'per round':>20}")
    for m in recipes:
        ratios = [e / b for e, b in zip(epoch_s[m], epoch_s[base])]
        print(f"{m:<{width}} {statistics.median(epoch_s[m]):>15.3f} {statistics.median(step_s[m]):>14.4f} "
              f"{statistics.median(ratios):>12.2f} {' '.join(f'{x:.2f}' for x in ratios):>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
