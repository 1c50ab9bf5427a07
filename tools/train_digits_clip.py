"""Regenerate the shipped digits CLIP (``debias/models/assets/digits_clip``) deterministically on the CPU,
or print the zero-shot figures of a trained one.

    python tools/train_digits_clip.py                          # the shipped model (seed 0), 2 CPU threads
    python tools/train_digits_clip.py --out /tmp/dc --steps 200
    python tools/train_digits_clip.py --evaluate               # one JSON line: the shipped model's zero-shot
    python tools/train_digits_clip.py --evaluate --out /tmp/dc # ... of the model in /tmp/dc

Zero-shot figures are measured on the evaluation images (evaluation-pool digits, every attribute random) with the
single-attribute probes: colour 8-way, digit 10-way, background 4-way, marker 3-way. Exit status 1 when training
misses the targets (colour >= 0.99, digit >= 0.90, background >= 0.95, marker >= 0.90); 2 on a bad model folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from debias.errors import DebiasError  # noqa: E402
from debias.models import digits_clip as dc  # noqa: E402
from debias.models import digits_clip_train as dct  # noqa: E402

TARGETS = {"color": 0.99, "digit": 0.90, "background": 0.95, "marker": 0.90}
"""The zero-shot goals of the shipped model."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults regenerate the shipped model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=dc.ASSET_DIR,
                   help="model folder (open_clip local-dir format) to write, or to read with --evaluate; "
                        "default: the shipped asset folder")
    p.add_argument("--evaluate", action="store_true",
                   help="do not train: print one JSON line {\"zero_shot\": {...}} for the model in --out")
    p.add_argument("--seed", type=int, default=0, help="training seed (model init and data stream)")
    p.add_argument("--steps", type=int, default=dct.DEFAULT_STEPS, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=dct.DEFAULT_BATCH_SIZE, help="images (= captions) per step")
    p.add_argument("--lr", type=float, default=dct.DEFAULT_LR, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results are reproducible per count)")
    p.add_argument("--device", default="cpu", help="torch device to train on (the shipped model: cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def evaluate(folder: Path) -> dict[str, float]:
    """Zero-shot accuracy per concept of the model in ``folder`` on the evaluation images."""
    clip = dc.load_digits_clip(path=folder)
    acc = dc.zero_shot_world(clip.model, clip.tokenizer, clip.mean, clip.std)
    return {k: round(acc[k], 4) for k in ("color", "digit", "background", "marker", "digit_value")}


def main(argv: list[str] | None = None) -> int:
    """Train (or with ``--evaluate`` only measure) and print the zero-shot figures."""
    args = parse_args(argv)
    if args.evaluate:
        try:
            zs = evaluate(args.out)
        except (DebiasError, FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({"zero_shot": zs}))
        return 0
    summary = dct.train_digits_clip(
        args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, num_threads=args.threads, progress=not args.no_progress, device=args.device,
    )
    zs = summary["zero_shot"]
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    print(f"\nwrote {args.out} ({size / 1e6:.2f} MB), sha256 {summary['weights_sha256'][:16]}..., "
          f"train {summary['train_wall_time_s']:.0f} s (median step {summary['step_s_median']:.3f} s), "
          f"total {summary['total_wall_time_s']:.0f} s")
    print(f"zero-shot on {summary['evaluation_images']} evaluation images (evaluation-pool digits, random attributes):")
    print(f"  {'probe':<12} {'accuracy':>9}  caption")
    for key, caption in dc.PROBES.items():
        print(f"  {key:<12} {zs[key]:>9.4f}  {caption!r}")
    ok = all(zs[k] >= v for k, v in TARGETS.items())
    print("targets (" + ", ".join(f"{k} >= {v}" for k, v in TARGETS.items()) + "):", "met" if ok else "MISSED")
    print(json.dumps({"zero_shot": {k: round(zs[k], 4) for k in TARGETS}}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
