"""Training throughput (images per second) of ``erm`` against ``concept`` at the paper's scale, fp32 and bf16.

The paper's architectures with random weights (so nothing is downloaded): a timm ``resnet50`` trained with an open_clip
``RN50-quickgelu`` as the grafted CLIP, 224 px images (the bundled coloured digits, upsampled). Each (method,
precision) gets its own Trainer built from the recipe plus overrides; the two methods' steps alternate (erm, concept,
erm, ...) on the same fixed training batch so both see the same machine state; one step is the full
``Trainer.train_step`` (forward under autocast, backward, optimizer and schedule; for ``concept`` also the
unlabeled-stream batch, the graft's forward and the penalty). Images per second count the training batch only (the
concept method's unlabeled batch, ``concept.unlabeled_batch_size`` images, is extra work it does per step). The
step ratio to the first method carries a 95% bootstrap interval over the interleaved rounds (``tools/bench_step.py``'s
``ratio_interval``).

    python tools/bench_throughput.py                                  # CUDA: batch 128, fp32 and bf16
    python tools/bench_throughput.py --batch-size 64 --channels-last --steps 50
    python tools/bench_throughput.py --batch-size 2 --unlabeled-batch-size 2 --steps 2 --warmup 1   # CPU smoke run

Without CUDA the defaults shrink to a smoke run (batch 2, 2 timed steps) so that it at least runs on a laptop.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from debias.recipe import load_recipe  # noqa: E402
from debias.train.loop import Trainer  # noqa: E402
from tools.bench_step import ratio_interval  # noqa: E402

PAPER_SCALE = ["data.image_size=224", "data.train_copies=1", "data.eval_copies=1", "data.unlabeled_copies=1",
               "model.name=resnet50", "model.pretrained=false", 'clip.name="RN50-quickgelu"',
               'clip.pretrained="random"', 'graft.stages=["layer1", "layer2", "layer3", "layer4"]']


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/colored_digits.toml", help="a recipe with an unlabeled stream")
    p.add_argument("--methods", nargs="+", default=["erm", "concept"], help="the first is the baseline of the ratio")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=128 if cuda else 2, help="training batch (train.batch_size)")
    p.add_argument("--unlabeled-batch-size", type=int, default=32 if cuda else 2,
                   help="concept.unlabeled_batch_size")
    p.add_argument("--steps", type=int, default=30 if cuda else 2, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed steps per method first")
    p.add_argument("--matching-images", type=int, default=256 if cuda else 8,
                   help="probe images for the concept method's matching (setup only, not timed)")
    p.add_argument("--channels-last", action="store_true", help="train.channels_last = true")
    p.add_argument("--device", default="auto", help="train.device")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="further recipe overrides (applied last)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--batch-size", args.batch_size, 1)):
        if value < least:
            p.error(f"{flag} {value}: expected at least {least}")
    return args


def build(args: argparse.Namespace, method: str, precision: str, tmp: str) -> Trainer:
    overrides = PAPER_SCALE + [
        f"train.method={method}", f"train.precision={precision}", f"train.batch_size={args.batch_size}",
        f"concept.unlabeled_batch_size={max(2, args.unlabeled_batch_size)}", f"train.device={args.device}",
        f"matching.num_images={max(8, args.matching_images)}", f"matching.batch_size={min(64, args.batch_size)}",
        f"train.channels_last={str(args.channels_last).lower()}", *args.overrides]
    t = Trainer(load_recipe(args.recipe, overrides), f"{tmp}/{method}-{precision}", progress=False)
    t.method.on_epoch_start(0)  # the concept method matches and builds its graft here, as in training
    return t


def fixed_batch(t: Trainer, size: int) -> dict[str, torch.Tensor]:
    split = t.bundle.splits["train"]
    idx = torch.arange(size) % len(split)
    return {"images": split.images[idx], "labels": split.labels[idx], "attrs": split.attrs[idx]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_throughput.")
    rows = []
    for precision in args.precisions:
        trainers = {m: build(args, m, precision, tmp) for m in args.methods}
        any_t = next(iter(trainers.values()))
        batch = fixed_batch(any_t, args.batch_size)
        times: dict[str, list[float]] = {m: [] for m in trainers}
        for i in range(args.warmup + args.steps):
            for m, t in trainers.items():
                b = {k: v.to(t.device, non_blocking=True) for k, v in batch.items()}
                if t.device.type == "cuda":
                    torch.cuda.synchronize(t.device)
                t0 = time.perf_counter()
                t.train_step(b)
                if t.device.type == "cuda":
                    torch.cuda.synchronize(t.device)
                if i >= args.warmup:
                    times[m].append(time.perf_counter() - t0)
        base = statistics.median(times[args.methods[0]])
        for m in args.methods:
            med = statistics.median(times[m])
            rows.append({"method": m, "precision": precision, "batch": args.batch_size,
                         "unlabeled_batch": trainers[m].recipe.concept.unlabeled_batch_size
                         if trainers[m].method.needs_unlabeled else 0,
                         "step_s_median": med, "images_per_s": args.batch_size / med, "step_ratio": med / base,
                         "step_ratio_interval": ratio_interval(times[args.methods[0]], times[m])})
        device, recipe = any_t.device, any_t.recipe
        del trainers, any_t
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    weights = "random weights" if not recipe.model.pretrained and recipe.clip.pretrained == "random" else (
        f"model pretrained {recipe.model.pretrained}, CLIP weights {recipe.clip.pretrained or 'shipped'}")
    print(f"{recipe.model.name} + {recipe.clip.name} ({weights}), {recipe.data.image_size} px, device {device} "
          f"({name}), torch {torch.__version__}, "
          f"channels_last {args.channels_last}, {args.steps} timed steps after {args.warmup} warm-up, interleaved")
    print(f"{'method':<10} {'precision':<9} {'batch':>5} {'+unlab':>6} {'median step s':>14} {'images/s':>9} "
          f"{'step x ' + args.methods[0]:>10} {'95% interval':>13}")
    for r in rows:
        lo, hi = r["step_ratio_interval"]
        print(f"{r['method']:<10} {r['precision']:<9} {r['batch']:>5} {r['unlabeled_batch']:>6} "
              f"{r['step_s_median']:>14.4f} {r['images_per_s']:>9.1f} {r['step_ratio']:>10.2f} "
              f"{f'{lo:.2f}-{hi:.2f}':>13}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "device_name": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
