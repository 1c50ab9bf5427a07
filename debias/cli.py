"""Command line: ``debias train | explain | compare | recipe``; ``main(argv)`` takes the arguments as a list.

Errors the user can fix (bad recipe, missing file) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DebiasError, TrainingInterrupted


def _add_recipe_args(p: argparse.ArgumentParser, progress: bool = True) -> None:
    p.add_argument("recipe", help="recipe TOML file, e.g. recipes/colored_digits.toml")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override recipe keys (values are TOML literals); repeatable")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")


DESCRIPTION = """\
Train image classifiers that do not lean on spurious concepts, and say in words which concept a model leans on
(its CNN grafted into CLIP's image tower, read with CLIP's text tower)."""

EPILOG = """\
examples:
  debias train recipes/colored_digits.toml --out runs/erm
  debias train recipes/colored_digits.toml --method concept --out runs/concept
  debias compare runs/erm runs/concept --out runs/compare
  debias recipe recipes/colored_digits.toml --set data.bias=0.99   # every key, its meaning and default

Bad input (a recipe key, a missing file) prints one line and exits with code 2; a run stopped by Ctrl-C or
SIGTERM keeps a checkpoint and resumes with the same command."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("debias")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="debias", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a standalone model with a method, evaluate and explain it")
    _add_recipe_args(p)
    p.add_argument("--method", help="training method (overrides train.method)")
    p.add_argument("--out", required=True, help="run directory (an unfinished run there is resumed)")
    p.add_argument("--force", action="store_true", help="retrain even if --out holds a finished or unfinished run")
    p.add_argument("--keep-training-state", action="store_true",
                   help="keep checkpoint.pt (optimizer and method state, the largest file) once the run has finished")
    p = sub.add_parser("explain", help="explain a trained run's model with the grafted CLIP")
    _add_recipe_args(p)
    p.add_argument("--checkpoint", required=True, help="a train run directory")
    p.add_argument("--out", required=True, help="directory for explain.json and the plot")
    p = sub.add_parser("compare", help="before/after tables and plots across run directories")
    p.add_argument("runs", nargs="+", help="train run directories")
    p.add_argument("--out", required=True, help="directory for compare.json, report.md and plots")
    p.add_argument("--goal", nargs="+", default=[], metavar="SPLIT=MIN",
                   help="count the seeds meeting every threshold at once, e.g. test=0.99 shifted=0.95 swapped=0.95")
    p.add_argument("--reference", metavar="SETTING",
                   help="the group every other is compared with seed by seed, named by its method or setting parts, "
                        "e.g. erm or concept.unlabeled_batch_size=16")
    p = sub.add_parser("recipe", help="print a resolved recipe: every key with its meaning, default and choices")
    _add_recipe_args(p, progress=False)
    return parser


def _recipe(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .recipe_doc import describe_recipe

    print(describe_recipe(load_recipe(args.recipe, args.overrides), args.recipe), end="")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .io import check_writable
    from .preflight import check_inputs
    from .recipe import load_recipe

    overrides = list(args.overrides) + ([f"train.method={args.method}"] if args.method else [])
    recipe = load_recipe(args.recipe, overrides)
    check_inputs(recipe)  # every missing file named at once, before any data or model is loaded
    from .train.loop import Trainer

    from .distributed import shutdown_distributed

    out = Path(args.out)
    try:  # under torchrun (WORLD_SIZE > 1) the Trainer joins the process group; only rank 0 writes and prints
        trainer = Trainer(recipe, out, progress=not args.no_progress, keep_training_state=args.keep_training_state)
        check_writable(out)
        metrics = trainer.fit(force=args.force)
    finally:
        shutdown_distributed()
    if not trainer.dist.is_main:
        return 0
    if metrics.get("already_finished"):
        print(f"run {out} is already finished (pass --force to retrain); its results:")
    _print_summary(metrics, out)
    return 0


def _print_summary(metrics: dict, out: Path) -> None:
    print(f"run directory: {out}")
    for name, m in metrics["splits"].items():
        print(f"  {name:<10} accuracy {m['accuracy']:.3f}   worst group {m['worst_group_accuracy']:.3f}")
    ex = metrics["explain"]
    from .explain import summary_lines

    for line in summary_lines(ex):
        print(line)


def _explain(args: argparse.Namespace) -> int:
    from .commands import explain_run

    explain_run(args.recipe, args.overrides, Path(args.checkpoint), Path(args.out), progress=not args.no_progress)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare_runs, parse_goal

    compare_runs([Path(r) for r in args.runs], Path(args.out), reference=args.reference, goal=parse_goal(args.goal))
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train, "explain": _explain, "compare": _compare, "recipe": _recipe}[args.command](args)
    except TrainingInterrupted as exc:  # stopped by a signal, resumable: the signal's exit code, not bad input's
        print(f"debias {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except DebiasError as exc:
        print(f"debias {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"debias {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
