"""Regenerate the shipped digits CLIP (``debias/models/assets/digits_clip``) deterministically on the CPU.

    python tools/train_digits_clip.py                 # the shipped model (seed 0), < 10 min on 2 cores
    python tools/train_digits_clip.py --out /tmp/dc --steps 200

Prints a progress bar and the final zero-shot table (colour 8-way, digit 10-way) on the held-out images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from debias.models import digits_clip as dc  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults regenerate the shipped model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=dc.ASSET_DIR,
                   help="output folder (open_clip local-dir format); default: the shipped asset folder")
    p.add_argument("--seed", type=int, default=0, help="training seed (model init and data stream)")
    p.add_argument("--steps", type=int, default=dc.DEFAULT_STEPS, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=dc.DEFAULT_BATCH_SIZE, help="images (= unique captions) per step")
    p.add_argument("--lr", type=float, default=dc.DEFAULT_LR, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results are reproducible per count)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, write the folder, print the zero-shot table; exit status 1 if the targets are missed."""
    args = parse_args(argv)
    summary = dc.train_digits_clip(
        args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, num_threads=args.threads, progress=not args.no_progress,
    )
    zs = summary["zero_shot_heldout"]
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    print(f"\nwrote {args.out} ({size / 1e6:.2f} MB), sha256 {summary['weights_sha256'][:16]}..., "
          f"train {summary['train_wall_time_s']:.0f} s, total {summary['total_wall_time_s']:.0f} s")
    print(f"zero-shot on {summary['heldout_images']} held-out images (held-out base digits x 8 colours):")
    print(f"  {'probe':<12} {'classes':>7} {'accuracy':>9}  caption")
    rows = [("colour", 8, dc.COLOR_PROBE), ("digit", 10, dc.DIGIT_PROBE), ("digit_value", 10, dc.DIGIT_VALUE_PROBE)]
    for key, k, caption in rows:
        print(f"  {key:<12} {k:>7} {zs[key]:>9.4f}  {caption!r}")
    ok = zs["colour"] >= 0.99 and zs["digit"] >= 0.90
    print("targets (colour >= 0.99, digit >= 0.90):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
