"""The benchmark's tables (method variants, nuisance-aware transforms, goals) and its run plan.

A **variant** is a name and the ``--set`` overrides it adds on top of a recipe; a **row** is the backbone a run
starts from: ``finetuned`` (the recipe's ``model.checkpoint``) or ``scratch`` (``model.checkpoint = ""``). A recipe
without a checkpoint (``colored_digits``) has the ``scratch`` row only. Every run of the plan is one
``debias train`` command whose output goes to ``OUT/runs/<recipe>/<variant>/<row>/seed<S>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DebiasError, did_you_mean

REPO = Path(__file__).resolve().parents[2]
"""The source tree's root (``recipes/`` is read from there)."""

DEFAULT_RECIPES = ["colored_digits", "textured_digits", "marked_digits", "two_nuisances"]
DEFAULT_SEEDS = [0, 1, 2]


@dataclass(frozen=True)
class Variant:
    """One method variant of the benchmark: ``overrides`` go on top of the recipe (after the user's ``--set``)."""

    name: str
    overrides: tuple[str, ...]
    uses_group_labels: bool = False
    """Trains with the training set's group labels: an oracle, reported apart from the label-free variants."""
    knows_nuisance: bool = False
    """Is given the nuisance (a transform chosen for the recipe's spurious concepts): marked in the report."""
    description: str = ""


NUISANCE_TRANSFORMS: dict[str, tuple[str, ...]] = {
    "color": ("channel_permutation", "grayscale"),
}
"""Spurious concept -> the ``augment`` transforms that remove it. ``augment_nuisance`` runs on a recipe only when
every spurious concept of it has an entry here; elsewhere it is skipped with a note (no transform removes a
background or a corner marker)."""

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("erm", ("train.method=erm",), description="plain empirical risk minimisation"),
    Variant("concept_graft", ("train.method=concept", "concept.source=graft"),
            description="the concept penalty read through the graft"),
    Variant("concept_clip", ("train.method=concept", "concept.source=clip"),
            description="the concept penalty read by plain CLIP on the image"),
    Variant("groupdro", ("train.method=groupdro",), uses_group_labels=True,
            description="Group DRO on the training group labels"),
    Variant("jtt", ("train.method=jtt",), description="Just Train Twice"),
    Variant("reweight", ("train.method=reweight",), uses_group_labels=True,
            description="group-balanced sampling on the training group labels"),
    Variant("augment_generic", ("train.method=augment",
                                'augment.transforms=["random_resized_crop", "hflip", "color_jitter"]'),
            description="what a user tries without knowing the nuisance: crop, flip, colour jitter"),
    Variant("augment_nuisance", ("train.method=augment",), knows_nuisance=True,
            description="transforms chosen for the recipe's spurious concepts (NUISANCE_TRANSFORMS)"),
    Variant("leace", ("train.method=leace",),
            description="LEACE erasure of the penultimate features against the caption-predicted concept"),
]}
"""Every variant of the benchmark, in report order. ``augment_nuisance``'s transforms are added per recipe
(:func:`variant_overrides`)."""

GOALS: dict[str, dict[str, float]] = {
    "colored_digits": {"shifted": 0.967, "swapped": 0.962},
    "textured_digits": {"test": 0.98, "shifted": 0.90, "swapped": 0.85},
    "marked_digits": {"test": 0.98, "shifted": 0.90, "swapped": 0.85},
    "two_nuisances": {"shifted": 0.85, "swapped_*": 0.85},
}
"""Recipe name -> minimum accuracy per split, every threshold at once (a goal is met by a run, or by a mean over
seeds, when all are). ``swapped_*``: every ``swapped_<concept>`` split of the run, each (at least one must exist)."""


def goal_thresholds(recipe: str, splits) -> dict[str, float]:
    """The goal of ``recipe`` for a run with these split names, ``swapped_*`` expanded; {} for a recipe without a
    goal. A split the goal names that the run lacks keeps its threshold (the goal is then not met)."""
    out: dict[str, float] = {}
    for split, threshold in GOALS.get(recipe, {}).items():
        if split.endswith("*"):
            matched = [s for s in splits if s.startswith(split[:-1])]
            out.update({s: threshold for s in matched} or {split: threshold})
        else:
            out[split] = threshold
    return out


def meets(thresholds: dict[str, float], accuracy: dict[str, float]) -> bool | None:
    """Whether every threshold is met by ``accuracy`` (split -> accuracy); None without thresholds."""
    if not thresholds:
        return None
    return all(accuracy.get(s) is not None and accuracy[s] >= t for s, t in thresholds.items())


def resolve_recipe(name: str) -> tuple[str, Path]:
    """``NAME`` -> (recipe name, file): a file stem in ``recipes/`` or a path to a TOML file (its stem names it)."""
    path = Path(name)
    if path.suffix == ".toml" or "/" in name:
        if not path.is_file():
            raise DebiasError(f"--recipes {name!r}: no such recipe file")
        return path.stem, path
    shipped = REPO / "recipes" / f"{name}.toml"
    if not shipped.is_file():
        known = sorted(p.stem for p in (REPO / "recipes").glob("*.toml"))
        raise DebiasError(f"--recipes {name!r}: not a recipe in {REPO / 'recipes'} nor a file; expected one of "
                          f"{', '.join(known)} or a path{did_you_mean(name, known)}")
    return name, shipped


def check_variants(names: list[str]) -> None:
    """Every name is a variant of :data:`VARIANTS` whose method :data:`debias.methods.METHODS` holds."""
    from ..methods import METHODS

    for name in names:
        if name not in VARIANTS:
            raise DebiasError(f"--methods {name!r}: not a benchmark variant; expected one of "
                              f"{', '.join(VARIANTS)}{did_you_mean(name, VARIANTS)}")
        method = next(o.partition("=")[2] for o in VARIANTS[name].overrides if o.startswith("train.method="))
        if method not in METHODS:
            raise DebiasError(f"--methods {name}: its method train.method = {method!r} is not in debias.methods."
                              f"METHODS ({', '.join(METHODS)}); leave the variant out until the method exists")


def variant_overrides(variant: Variant, spurious: list[str]) -> tuple[list[str] | None, str]:
    """The variant's overrides for a recipe with these spurious concepts, or (None, why it does not run there)."""
    if variant.name != "augment_nuisance":
        return list(variant.overrides), ""
    lacking = [c for c in spurious if c not in NUISANCE_TRANSFORMS]
    if lacking or not spurious:
        return None, (f"augment_nuisance skipped: no transform removes {', '.join(lacking) or 'a nuisance'} "
                      f"(transforms exist for {', '.join(NUISANCE_TRANSFORMS)})")
    transforms = list(dict.fromkeys(t for c in spurious for t in NUISANCE_TRANSFORMS[c]))
    return [*variant.overrides, "augment.transforms=[" + ", ".join(f'"{t}"' for t in transforms) + "]"], ""


@dataclass
class Run:
    """One run of the plan: where it writes and the ``debias train`` arguments that make it."""

    recipe: str
    recipe_path: Path
    variant: str
    row: str
    seed: int
    dir: Path
    overrides: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.recipe}/{self.variant}/{self.row}/seed{self.seed}"

    def command(self) -> list[str]:
        """``debias train`` arguments (for :func:`debias.cli.main`); the same command resumes an unfinished run."""
        return ["train", str(self.recipe_path), "--out", str(self.dir), "--no-progress", "--set", *self.overrides]


def rows_of(checkpoint: str, scratch: bool) -> list[tuple[str, list[str]]]:
    """The backbone rows of a recipe whose resolved ``model.checkpoint`` is ``checkpoint``: (row, overrides)."""
    if not checkpoint:
        return [("scratch", [])]
    return [("finetuned", [])] + ([("scratch", ['model.checkpoint=""'])] if scratch else [])


def plan_runs(recipes: list[str], variants: list[str], seeds: list[int], sets: list[str], scratch: bool,
              out: Path) -> tuple[list[Run], list[str]]:
    """Every run of the benchmark, each recipe checked (``load_recipe``) before any run starts, and the notes on
    variants that do not run on a recipe. A finished run of a different recipe in its directory is refused."""
    from ..recipe import load_recipe, require_same_recipe

    resolved = [resolve_recipe(r) for r in recipes]
    check_variants(variants)
    names = [n for n, _ in resolved]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DebiasError(f"--recipes: two recipes named {twice[0]!r}; their runs would share one directory")
    runs, notes = [], []
    for name, path in resolved:
        base = load_recipe(path, sets)
        for row, row_sets in rows_of(base.model.checkpoint, scratch):
            for vname in variants:
                extra, why = variant_overrides(VARIANTS[vname], list(base.concepts.spurious))
                if extra is None:
                    if row == rows_of(base.model.checkpoint, scratch)[0][0]:
                        notes.append(f"{name}: {why}")
                    continue
                for seed in dict.fromkeys(seeds):
                    overrides = [*sets, *extra, *row_sets, f"seed={seed}"]
                    d = out / "runs" / name / vname / row / f"seed{seed}"
                    try:
                        recipe = load_recipe(path, overrides)
                        if (d / "done").exists():
                            require_same_recipe(d, recipe, str(d))
                    except DebiasError as exc:
                        raise DebiasError(f"{name} / {vname} / {row} / seed {seed}: {exc}") from None
                    runs.append(Run(name, path, vname, row, seed, d, overrides))
    return runs, notes
