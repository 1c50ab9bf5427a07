"""Step time of each method against ERM on the same model and batch, measured side by side in one run.

The trainers are built from the same recipe and seed; steps alternate between methods (A, B, A, B, ...) so
both see the same machine state. Prints median seconds per step and the ratio to ERM with a 95% bootstrap interval
(rounds resampled with replacement, each round's steps kept together, so the interval carries the step-to-step
noise of this run; it cannot carry a change of machine state between runs). Then eight epoch ends and starts in a
row, as in training: at each end the concept tracking (matching + explanation for the dominance record, on the
epochs ``selection.track_every`` makes due; the validation accuracy is not counted), at each start the method's own
once-per-epoch work (for ``concept``: re-matching, unless the tracking has just matched the same model, and reading
the unlabeled stream through the graft, on the epochs ``concept.rematch_every`` makes due). Both are averaged per
epoch; the epoch ratio spreads them over an epoch's steps and the tracking share is the tracking's part of the epoch.

    python tools/bench_step.py                          # erm vs concept (graft) on the default recipe
    python tools/bench_step.py --methods erm concept --steps 30 --set concept.source=clip
    # settings side by side: NAME@key=value@key=value adds overrides to one entry only
    python tools/bench_step.py --recipe recipes/colored_digits_concept.toml --methods erm \
        concept@concept.unlabeled_batch_size=16 concept@concept.unlabeled_batch_size=32 concept
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from debias.errors import DebiasError
from debias.recipe import Recipe, load_recipe
from debias.train.loop import NullWriter, Trainer

TRACK_EPOCHS = 4
"""Per-epoch figures are averaged over twice this many epoch ends and starts (two periods of the default
``selection.track_every`` and ``concept.rematch_every``)."""


def ratio_interval(base: list[float], other: list[float], level: float = 0.95, draws: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of ``median(other) / median(base)`` over interleaved rounds: round ``i`` holds
    ``base[i]`` and ``other[i]``, and each draw resamples rounds (pairs) with replacement. Seeded: the same times
    give the same interval."""
    if len(base) != len(other) or not base:
        raise ValueError(f"ratio_interval: expected two equally long, non-empty lists of times, got {len(base)} and "
                         f"{len(other)}")
    b, o = torch.tensor(base, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    idx = torch.randint(len(b), (draws, len(b)), generator=torch.Generator().manual_seed(seed))
    # the 0.5 quantile, not torch.median: for an even count it is statistics.median's mean of the two middle values
    ratios = o[idx].quantile(0.5, dim=1) / b[idx].quantile(0.5, dim=1)
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def entry_recipe(path: str, entry: str, overrides: list[str]) -> Recipe:
    """The recipe of one ``--methods`` entry, ``NAME`` or ``NAME@key=value@key=value``: the method, the shared
    ``--set`` overrides, then the entry's own."""
    method, *extra = entry.split("@")
    return load_recipe(path, overrides + extra + [f"train.method={method}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/colored_digits.toml")
    p.add_argument("--methods", nargs="+", default=["erm", "concept"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps {args.steps} --warmup {args.warmup}: expected at least 1 timed step and no negative warm-up")
    trainers = {}
    tmp = tempfile.mkdtemp(prefix="bench_step.")
    if len(set(args.methods)) < len(args.methods):
        p.error(f"--methods {' '.join(args.methods)}: an entry is repeated; give each one once")
    for i, entry in enumerate(args.methods):
        try:
            recipe = entry_recipe(args.recipe, entry, args.overrides)
            t = Trainer(recipe, f"{tmp}/{i}_{recipe.train.method}", progress=False)
        except DebiasError as e:
            print(f"bench_step: --methods entry {entry!r}: {e}", file=sys.stderr)
            return 2
        if trainers and recipe.train.batch_size != next(iter(trainers.values())).recipe.train.batch_size:
            p.error(f"--methods entry {entry!r} sets train.batch_size = {recipe.train.batch_size}: every entry "
                    "must train on the same batch (set it with --set for all)")
        t.method.on_epoch_start(0)  # the concept method matches and builds its graft here, as in training
        trainers[entry] = t
    any_t = next(iter(trainers.values()))
    bs = any_t.recipe.train.batch_size
    split = any_t.bundle.splits["train"]
    batch = {"images": split.images[:bs], "labels": split.labels[:bs], "attrs": split.attrs[:bs]}
    times: dict[str, list[float]] = {m: [] for m in trainers}
    for i in range(args.warmup + args.steps):
        for m, t in trainers.items():
            b = {k: v.to(t.device) for k, v in batch.items()}
            t0 = time.perf_counter()
            t.train_step(b)
            if t.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[m].append(time.perf_counter() - t0)
    epoch_work: dict[str, list[float]] = {m: [] for m in trainers}
    tracking: dict[str, list[float]] = {m: [] for m in trainers}
    for m, t in trainers.items():
        t.writer = NullWriter()
    for epoch in range(1, 2 * TRACK_EPOCHS + 1):  # epoch ends and starts in a row, as in training
        for m, t in trainers.items():
            t.epoch, t.step = epoch, t.step + 1  # the next epoch end, with a model not matched yet (it trained)
            before = t.tracking_s
            t.track()  # the concept part is timed by the trainer (validation accuracy is not counted)
            tracking[m].append(t.tracking_s - before)
            t0 = time.perf_counter()
            t.method.on_epoch_start(epoch)
            if t.device.type == "cuda":
                torch.cuda.synchronize()
            epoch_work[m].append(time.perf_counter() - t0)
    base = statistics.median(times[args.methods[0]])
    spe = any_t.steps_per_epoch
    base_epoch = base * spe + statistics.mean(epoch_work[args.methods[0]]) + statistics.mean(tracking[args.methods[0]])
    r = any_t.recipe
    print(f"model {r.model.name}, batch {bs}, concept source {r.concept.source}, device {any_t.device}, "
          f"threads {torch.get_num_threads()}, {args.steps} steps each, interleaved; {spe} steps per epoch; "
          f"tracking every {r.selection.track_every} epochs "
          f"({'on' if r.selection.track_concepts else 'off'}), per-epoch figures averaged over {2 * TRACK_EPOCHS}")
    width = max(12, *(len(m) for m in args.methods))
    print(f"{'method':<{width}} {'stream batch':>12} {'median s/step':>14} {'ratio':>7} {'95% interval':>13} "
          f"{'per-epoch work s':>17} {'tracking s':>11} {'epoch ratio':>12} {'tracking share':>15}")
    for m, t in trainers.items():
        med, work, track = statistics.median(times[m]), statistics.mean(epoch_work[m]), statistics.mean(tracking[m])
        stream = t.recipe.concept.unlabeled_batch_size if t.method.needs_unlabeled else "-"
        lo, hi = ratio_interval(times[args.methods[0]], times[m])
        epoch_s = med * spe + work + track
        print(f"{m:<{width}} {stream:>12} {med:>14.4f} {med / base:>7.2f} {f'{lo:.2f}-{hi:.2f}':>13} {work:>17.3f} "
              f"{track:>11.3f} {epoch_s / base_epoch:>12.2f} {track / epoch_s:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
