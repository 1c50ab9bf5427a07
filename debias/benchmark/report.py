"""The benchmark's report: ``benchmark.json``, ``benchmark.md`` and ``<recipe>.png`` in the benchmark directory.

Read from the finished runs under ``OUT/runs/<recipe>/<variant>/<row>/seed<S>`` (a ``done`` marker and
``metrics.json``, as ``debias compare`` reads them), ``OUT/plan.json`` (the last launch's plan: the runs still
missing, the variants skipped) and ``OUT/launches.jsonl`` (the commit every launch ran at). The figures are the final
epoch's model (the selection rule, fixed before the run); the group-label oracles are reported apart: the variants
that train on group labels, and per variant the checkpoint picked by validation worst-group accuracy and the best
epoch on the oracle split.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

from .. import io
from ..compare import _load_run, _mean_std, _oracle
from ..errors import DebiasError
from ..recipe import flatten_recipe
from .plan import GOALS, REPO, VARIANTS, goal_thresholds, meets

ROWS = ("finetuned", "scratch")
ROW_TITLES = {"finetuned": "fine-tuned backbone (model.checkpoint = \"{checkpoint}\")",
              "scratch": 'from scratch (model.checkpoint = "")'}
SPLIT_FIRST = ("test", "shifted", "swapped")
HIDDEN = ("train",)
"""Splits kept in ``benchmark.json`` but left out of the tables and plots (the training set's own accuracy)."""


def git_commit(root: Path = REPO) -> dict[str, Any]:
    """The commit the source tree is at and whether it has uncommitted changes; ``hash`` None outside a git tree."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {"hash": None, "dirty": None}
    if head.returncode != 0:
        return {"hash": None, "dirty": None}
    return {"hash": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def split_order(names) -> list[str]:
    """test, shifted, swapped, then the other splits in name order (``swapped_<concept>``, grayscale, val)."""
    names = list(dict.fromkeys(names))
    return [s for s in SPLIT_FIRST if s in names] + sorted(s for s in names if s not in SPLIT_FIRST)


def _run_row(out: Path, d: Path, recipe: str, variant: str, row: str) -> dict[str, Any]:
    m = _load_run(d)
    splits = {s: {"accuracy": v["accuracy"], "worst_group_accuracy": v["worst_group_accuracy"]}
              for s, v in m["splits"].items()}
    shown = [v["worst_group_accuracy"] for s, v in splits.items()
             if s not in HIDDEN and s != "val" and v["worst_group_accuracy"] is not None]
    thresholds = goal_thresholds(recipe, splits)
    picked = m.get("selection", {}).get("worst_group")
    return {"recipe": recipe, "variant": variant, "row": row, "seed": m["seed"], "run": str(d.relative_to(out)),
            "method": m["method"], "splits": splits,
            "worst_group_accuracy": min(shown) if shown else None,
            "dominant_concept": m["explain"]["dominant_concept"],
            "goal_met": meets(thresholds, {s: v["accuracy"] for s, v in splits.items()}),
            "train_s": m.get("timing", {}).get("train_s"),
            "recipe_values": {k: v for k, v in flatten_recipe(m.get("recipe", {})).items() if k != "seed"},
            "oracle": {"worst_group_rule": ({"epoch": picked["epoch"],
                                             "splits": {s: v["accuracy"] for s, v in picked["splits"].items()}}
                                            if picked else None),
                       "best_epoch": _oracle(m.get("history", []))}}


def collect(out: Path) -> list[dict[str, Any]]:
    """Every finished run under ``out/runs`` (``<recipe>/<variant>/<row>/seed<S>`` with a ``done`` marker)."""
    rows = []
    for done in sorted((out / "runs").glob("*/*/*/seed*/done")):
        d = done.parent
        recipe, variant, row = d.parts[-4:-1]
        rows.append(_run_row(out, d, recipe, variant, row))
    return rows


def _order(recipes: list[str]):
    variants = list(VARIANTS)

    def key(r: dict[str, Any]):
        return (recipes.index(r["recipe"]) if r["recipe"] in recipes else len(recipes), r["recipe"],
                ROWS.index(r["row"]) if r["row"] in ROWS else len(ROWS), r["row"],
                variants.index(r["variant"]) if r["variant"] in variants else len(variants), r["variant"])
    return key


def aggregate(rows: list[dict[str, Any]], recipes: list[str]) -> list[dict[str, Any]]:
    """Per recipe x variant x row: mean and std over seeds of every split's accuracy and worst-group accuracy,
    the dominant concepts, the seeds meeting the goal and whether the means meet it."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in sorted(rows, key=_order(recipes)):
        groups.setdefault((r["recipe"], r["variant"], r["row"]), []).append(r)
    out = []
    for (recipe, variant, row), members in groups.items():
        names = split_order(s for r in members for s in r["splits"])
        splits = {s: {k: _mean_std([r["splits"][s][k] for r in members if s in r["splits"]])
                      for k in ("accuracy", "worst_group_accuracy")} for s in names}
        thresholds = goal_thresholds(recipe, names)
        info = VARIANTS.get(variant)

        def oracle_mean(pick) -> dict[str, float]:
            return _mean_std([pick(r) for r in members])

        keys = set().union(*(r["recipe_values"] for r in members))
        mixed = sorted(k for k in keys if len({repr(r["recipe_values"].get(k)) for r in members}) > 1)
        out.append({
            "recipe": recipe, "variant": variant, "row": row, "seeds": sorted(r["seed"] for r in members),
            "mixed_recipe_keys": mixed,
            "checkpoint": members[0]["recipe_values"].get("model.checkpoint", ""),
            "uses_group_labels": bool(info and info.uses_group_labels),
            "knows_nuisance": bool(info and info.knows_nuisance),
            "splits": splits,
            "worst_group_accuracy": _mean_std([r["worst_group_accuracy"] for r in members]),
            "dominant_concept": {c: sum(r["dominant_concept"] == c for r in members)
                                 for c in sorted({r["dominant_concept"] for r in members})},
            "goal": {"thresholds": thresholds,
                     "seeds_met": sorted(r["seed"] for r in members if r["goal_met"]),
                     "n": len(members),
                     "mean_met": meets(thresholds, {s: v["accuracy"]["mean"] for s, v in splits.items()})}
            if thresholds else None,
            "oracle": {
                "worst_group_rule_shifted": oracle_mean(
                    lambda r: (r["oracle"]["worst_group_rule"] or {}).get("splits", {}).get("shifted")),
                "best_epoch": oracle_mean(lambda r: (r["oracle"]["best_epoch"] or {}).get("accuracy")),
                "best_epoch_split": next((r["oracle"]["best_epoch"]["split"] for r in members
                                          if r["oracle"]["best_epoch"]), None)},
        })
    return out


def _read_plan(out: Path) -> dict[str, Any]:
    path = out / "plan.json"
    return io.read_json(path) if path.exists() else {}


def _read_launches(out: Path) -> list[dict[str, Any]]:
    path = out / "launches.jsonl"
    if not path.exists():
        return []
    launches = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                launches.append(json.loads(line))
            except json.JSONDecodeError:
                raise DebiasError(f"{path}: line {i + 1} is not JSON; expected one launch record a line") from None
    return launches


def build(out: Path, wall_s: float | None = None) -> dict[str, Any]:
    """The report's content (what ``benchmark.json`` holds)."""
    plan = _read_plan(out)
    recipes = plan.get("recipes", [])
    rows = sorted(collect(out), key=lambda r: (*_order(recipes)(r), r["seed"]))
    recipes = recipes + list(dict.fromkeys(r["recipe"] for r in rows if r["recipe"] not in recipes))
    groups = aggregate(rows, recipes)
    for r in rows:
        del r["recipe_values"]
    finished = {r["run"] for r in rows}
    launches = _read_launches(out)
    commits = list(dict.fromkeys(launch["commit"]["hash"] for launch in launches if launch.get("runs_started")))
    train_s = [r["train_s"] for r in rows if r["train_s"] is not None]
    return {
        "commit": git_commit(),
        "run_commits": commits,
        "launches": launches,
        "wall_s": wall_s,
        "launches_wall_s": sum(launch.get("wall_s") or 0.0 for launch in launches),
        "train_s_sum": sum(train_s),
        "selection": "final epoch",
        "recipes": recipes,
        "goals": {r: GOALS[r] for r in recipes if r in GOALS},
        "variants": {v.name: {"overrides": list(v.overrides), "uses_group_labels": v.uses_group_labels,
                              "knows_nuisance": v.knows_nuisance, "description": v.description}
                     for v in VARIANTS.values()},
        "notes": plan.get("notes", []),
        "missing": [k for k in plan.get("runs", []) if k not in finished],
        "runs": rows,
        "groups": groups,
    }


def _row_title(g: dict[str, Any]) -> str:
    return ROW_TITLES.get(g["row"], g["row"]).format(checkpoint=g.get("checkpoint", ""))


def _fmt(ms: dict[str, float] | None) -> str:
    if not ms or ms["n"] == 0 or ms["mean"] != ms["mean"]:
        return "-"
    return f"{ms['mean']:.3f} ± {ms['std']:.3f}" if ms["n"] > 1 else f"{ms['mean']:.3f}"


def _goal_text(goal: dict[str, float]) -> str:
    return ", ".join(f"{s} >= {t:g}" if not s.endswith("*") else f"every {s[:-1]}<concept> >= {t:g}"
                     for s, t in goal.items())


def _label(g: dict[str, Any]) -> str:
    return g["variant"] + (" (knows the nuisance)" if g["knows_nuisance"] else "")


def _table(groups: list[dict[str, Any]], splits: list[str]) -> list[str]:
    lines = ["| variant | seeds | " + " | ".join(splits) + " | worst-group | dominant concept | seeds meeting goal "
             "| goal met by the mean |", "|---|---|" + "---|" * len(splits) + "---|---|---|---|"]
    for g in groups:
        cells = [_fmt(g["splits"].get(s, {}).get("accuracy")) for s in splits]
        dom = ", ".join(f"{c} x{n}" for c, n in g["dominant_concept"].items())
        goal = g["goal"]
        met = f"{len(goal['seeds_met'])} / {goal['n']}" if goal else "-"
        mean_met = ("yes" if goal["mean_met"] else "no") if goal else "-"
        lines.append(f"| {_label(g)} | {len(g['seeds'])} | " + " | ".join(cells)
                     + f" | {_fmt(g['worst_group_accuracy'])} | {dom} | {met} | {mean_met} |")
    return lines


def render(result: dict[str, Any]) -> str:
    """``benchmark.md``: per recipe and backbone row, the label-free variants, then the group-label oracles."""
    c = result["commit"]
    commit = f"`{c['hash']}`" + (" (with uncommitted changes)" if c.get("dirty") else "") if c["hash"] else "unknown"
    lines = ["# Benchmark", "",
             f"Source tree at commit {commit} when this report was written.",
             ("Runs started at " + ", ".join(f"`{h}`" for h in result["run_commits"]) + "."
              + (" More than one commit: the runs are not one benchmark; rerun them at one commit."
                 if len(result["run_commits"]) > 1 else "")) if result["run_commits"] else "",
             "",
             f"{len(result['runs'])} runs finished" + (f", {len(result['missing'])} of the last plan missing"
                                                     if result["missing"] else "")
             + (f"; this invocation's wall time {result['wall_s']:.0f} s" if result["wall_s"] is not None else "")
             + f"; wall time over every launch {result['launches_wall_s']:.0f} s"
             + f"; training time summed over the runs {result['train_s_sum']:.0f} s.", "",
             "Figures: the final epoch's model (the selection rule, fixed before the runs); mean ± std over seeds. "
             "worst-group: the lowest group accuracy over the test and shift splits. A goal is met when every "
             "threshold is met at once.", ""]
    if result["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    for recipe in result["recipes"]:
        groups = [g for g in result["groups"] if g["recipe"] == recipe]
        if not groups:
            continue
        lines += [f"## {recipe}", ""]
        goal = result["goals"].get(recipe)
        lines += [f"Goal: {_goal_text(goal)}." if goal else "No goal set for this recipe.", ""]
        for row in dict.fromkeys(g["row"] for g in groups):
            members = [g for g in groups if g["row"] == row]
            splits = [s for s in split_order(s for g in members for s in g["splits"]) if s not in HIDDEN]
            free = [g for g in members if not g["uses_group_labels"]]
            labelled = [g for g in members if g["uses_group_labels"]]
            lines += [f"### {_row_title(members[0])}", ""]
            if free:
                lines += _table(free, splits) + [""]
            mixed = [g for g in members if g["mixed_recipe_keys"]]
            lines += [f"Warning: the {g['variant']} runs differ in more than the seed "
                      f"({', '.join(g['mixed_recipe_keys'][:5])}): their mean is not one setting's; rerun them with "
                      "one command." for g in mixed] + [""] * bool(mixed)
            lines += ["Group-label oracles, reported apart: variants trained on the training group labels, and per "
                      "variant the checkpoint validation worst-group accuracy picks and the best epoch on the "
                      "oracle split (recorded every epoch, used by no rule).", ""]
            if labelled:
                lines += _table(labelled, splits) + [""]
            split = next((g["oracle"]["best_epoch_split"] for g in members if g["oracle"]["best_epoch_split"]),
                         "shifted")
            lines += ["| variant | final epoch: shifted | worst-group rule: shifted | best epoch: " + split + " |",
                      "|---|---|---|---|"]
            for g in members:
                lines.append(f"| {_label(g)} | {_fmt(g['splits'].get('shifted', {}).get('accuracy'))} | "
                             f"{_fmt(g['oracle']['worst_group_rule_shifted'])} | {_fmt(g['oracle']['best_epoch'])} |")
            lines.append("")
    if result["missing"]:
        lines += ["## Runs of the last plan without results", ""] + [f"- {k}" for k in result["missing"]] + [""]
    return "\n".join(lines)


def _tick(g: dict[str, Any]) -> str:
    """A variant's label under its bars: name, marks, dominant concepts over the seeds, seeds meeting the goal."""
    lines = [g["variant"]] + (["(knows the nuisance)"] if g["knows_nuisance"] else []) + (
        ["(group labels)"] if g["uses_group_labels"] else [])
    lines.append(", ".join(f"{c} x{n}" for c, n in g["dominant_concept"].items()))
    if g["goal"]:
        lines.append(f"goal {len(g['goal']['seeds_met'])}/{g['goal']['n']}")
    return "\n".join(lines)


def plot_recipe(result: dict[str, Any], recipe: str, path: Path) -> None:
    """Every split's accuracy per variant (bars: mean over seeds, whiskers: std, dots: the seeds; a dashed line: the
    worst group, mean over seeds), one panel per backbone row; under each variant its dominant concepts and the
    seeds meeting the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import _save

    groups = [g for g in result["groups"] if g["recipe"] == recipe]
    rows = list(dict.fromkeys(g["row"] for g in groups))
    runs = [r for r in result["runs"] if r["recipe"] == recipe]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6.0, 1.3 * max(len([g for g in groups if g["row"] == row])
                                                                      for row in rows)), 3.6 * len(rows)),
                             squeeze=False, constrained_layout=True)
    for ax, row in zip(axes[:, 0], rows):
        members = [g for g in groups if g["row"] == row]
        splits = [s for s in split_order(s for g in members for s in g["splits"]) if s not in HIDDEN + ("val",)]
        width = 0.8 / max(1, len(splits))
        for i, s in enumerate(splits):
            offset = (i - (len(splits) - 1) / 2) * width
            acc = [g["splits"].get(s, {}).get("accuracy", {"mean": math.nan, "std": 0.0}) for g in members]
            bars = ax.bar([j + offset for j in range(len(members))], [a["mean"] for a in acc], width=width,
                          yerr=[a["std"] for a in acc], capsize=2, label=s)
            for j, g in enumerate(members):
                seeds = [r["splits"][s]["accuracy"] for r in runs
                         if r["row"] == row and r["variant"] == g["variant"] and s in r["splits"]]
                ax.plot([j + offset] * len(seeds), seeds, "o", markersize=2.5, color="black",
                        markerfacecolor=bars.patches[0].get_facecolor(), linewidth=0)
        ax.hlines([g["worst_group_accuracy"]["mean"] for g in members], [j - 0.42 for j in range(len(members))],
                  [j + 0.42 for j in range(len(members))], colors="black", linestyles="dashed", linewidth=1.2,
                  label="worst group")
        ax.set_xticks(range(len(members)), [_tick(g) for g in members], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy\n(mean, std, seeds)", fontsize=8)
        ax.set_title(f"{recipe}: {_row_title(members[0])}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


def write_report(out: Path, wall_s: float | None = None) -> dict[str, Any]:
    """Build the report from the runs in ``out`` and write ``benchmark.json``, ``benchmark.md`` and the PNGs."""
    result = build(out, wall_s)
    io.atomic_write_json(out / "benchmark.json", result)
    io.atomic_write_text(out / "benchmark.md", render(result))
    for recipe in result["recipes"]:
        if any(g["recipe"] == recipe for g in result["groups"]):
            plot_recipe(result, recipe, out / f"{recipe}.png")
    return result
