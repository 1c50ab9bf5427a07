"""Regenerate the shipped pretrained backbone (``debias/models/assets/backbone``, ``model.checkpoint =
"digits-world"``) on the CPU, or print the per-attribute accuracy of a trained one.

    python tools/pretrain_backbone.py                           # the shipped backbone (seed 0), 2 CPU threads
    python tools/pretrain_backbone.py --out /tmp/bb --steps 20
    python tools/pretrain_backbone.py --evaluate                # one JSON line: the shipped backbone's accuracy
    python tools/pretrain_backbone.py --evaluate --out /tmp/bb  # ... of the backbone in /tmp/bb

A timm resnet10t learns, on 32 px world renders of pretraining-pool digits with every attribute random, to predict
the digit (10), colour (8), background (4) and marker (3) from its pooled features (:mod:`debias.models.
backbone_train`). Accuracy is measured on renders of the evaluation-pool digits (every attribute random, no
jitter). Exit status 2 on a bad model folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from debias.data.base_pool import pretraining_pool  # noqa: E402
from debias.errors import DebiasError  # noqa: E402
from debias.models import backbone as bb  # noqa: E402
from debias.models import backbone_train as bt  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults regenerate the shipped backbone."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=bb.ASSET_DIR,
                   help="folder to write (or to read with --evaluate); default: the shipped asset folder")
    p.add_argument("--evaluate", action="store_true",
                   help="do not train: print one JSON line {\"accuracy\": {...}} for the backbone in --out")
    p.add_argument("--seed", type=int, default=0, help="training seed (model init and data stream)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None,
                        help=f"optimisation steps (default {bt.DEFAULT_STEPS})")
    length.add_argument("--epochs", type=float, default=None,
                        help="passes over the pretraining pool (converted to steps of --batch-size images)")
    p.add_argument("--batch-size", type=int, default=bt.DEFAULT_BATCH_SIZE, help="images per step")
    p.add_argument("--lr", type=float, default=bt.DEFAULT_LR, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of the steps)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Pretrain (or with ``--evaluate`` only measure) and print the per-attribute accuracy as one JSON line."""
    args = parse_args(argv)
    if args.evaluate:
        try:
            acc = bt.evaluate(bt.load_pretrained(args.out))
        except DebiasError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({"accuracy": acc}))
        return 0
    steps = args.steps if args.steps is not None else bt.DEFAULT_STEPS
    if args.epochs is not None:
        steps = max(1, round(args.epochs * len(pretraining_pool()) / args.batch_size))
    s = bt.pretrain(args.out, steps=steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    warmup=args.warmup, seed=args.seed, num_threads=args.threads, progress=not args.no_progress)
    print(f"\nwrote {args.out} ({s['weights_bytes'] / 1e6:.2f} MB weights), sha256 {s['weights_sha256'][:16]}..., "
          f"{s['steps']} steps in {s['train_wall_time_s']:.0f} s (median step {s['step_s_median']:.3f} s) on "
          f"{s['machine']}")
    print(json.dumps({"accuracy": s["evaluation_accuracy"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
