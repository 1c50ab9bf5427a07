"""``debias compare``: before/after tables and plots across run directories (mean +- std over seeds)."""
from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from . import io
from .data.registry import dataset
from .errors import DebiasError
from .recipe import DataCfg, Recipe, flatten_recipe, retired_keys

SPLIT_ORDER = ("test", "shifted", "swapped", "grayscale", "val")


def variant(metrics: dict[str, Any]) -> str:
    """Method name with the options that make it a different method (the concept source)."""
    method = metrics.get("method", "?")
    recipe = metrics.get("recipe", {})
    if method == "concept":
        return f"concept[{recipe.get('concept', {}).get('source', 'graft')}]"
    return method


def setting(metrics: dict[str, Any]) -> str:
    """The settings a sweep varies: the dataset's ``SETTING_KEYS`` (the bias for rendered datasets: a folder
    dataset's images fix their own, and ``data.bias`` is not read), and the penalty weight for ``concept``."""
    recipe = metrics.get("recipe", {})
    data = recipe.get("data", {})
    keys = dataset(data.get("name", DataCfg.name)).SETTING_KEYS
    parts = [f"{key}={data.get(key)}" for key in keys]
    if metrics.get("method") == "concept":
        parts.append(f"weight={recipe.get('concept', {}).get('weight')}")
    return ",".join(parts)


_IN_SETTING = {"seed", "data.bias", "concept.weight"}  # the seed is averaged over; the other two are in setting()


def settings(metrics: list[dict[str, Any]]) -> list[str]:
    """Each run's :func:`setting`, plus every other recipe value that differs between runs of the same method
    variant (``train.epochs=16``, ...), so that runs trained differently are never averaged as one. A key a run's
    recipe lacks (the run was written before the key existed) counts as the key's default, which every new key
    keeps to the behaviour from before it."""
    defaults, retired = flatten_recipe(Recipe().to_dict()), retired_keys()
    flats = [{k: v for k, v in {**defaults, **flatten_recipe(m.get("recipe", {}))}.items()
              if k not in retired or v != retired[k]} for m in metrics]  # a removed key at its value: as now
    variants = [variant(m) for m in metrics]
    varying: dict[str, list[str]] = {}
    for var in set(variants):
        members = [f for f, v in zip(flats, variants) if v == var]
        keys = set().union(*members) - _IN_SETTING
        varying[var] = sorted(k for k in keys if len({repr(f.get(k)) for f in members}) > 1)
    return [",".join(filter(None, [setting(m)] + [f"{k}={f.get(k)}" for k in varying[v]]))
            for m, f, v in zip(metrics, flats, variants)]


_NUMBER = re.compile(r"(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)")


def natural_key(text: str) -> list[str | float]:
    """Sort key that orders the numbers inside a setting by value, so ``batch_size=24`` comes before
    ``batch_size=128`` (plain string order puts 128 first). ``re.split`` with one group alternates text and number,
    so two keys always compare text with text and number with number."""
    return [float(part) if i % 2 else part for i, part in enumerate(_NUMBER.split(text))]


def _load_run(run: Path) -> dict[str, Any]:
    if not run.is_dir():
        raise DebiasError(f"{run}: not a run directory")
    path = run / "metrics.json"
    metrics = io.read_json(path)
    if not isinstance(metrics, dict):
        raise DebiasError(f"{path}: expected a JSON object (a `debias train` run's metrics), got "
                          f"{type(metrics).__name__}")
    for key in ("method", "seed", "splits", "explain"):
        if key not in metrics:
            raise DebiasError(f"{path}: missing key {key!r}; is it a `debias train` run?")
    _check_metrics(path, metrics)
    return metrics


def _check_metrics(path: Path, m: dict[str, Any]) -> None:
    """The parts of a run's metrics.json the compare reads, with the types it reads them as: one error naming the
    file and the key, instead of a traceback from deep inside the tables."""
    def fail(key: str, expected: str) -> None:
        raise DebiasError(f"{path}: {key} = {_value_at(m, key)}: expected {expected}")

    def accuracy(key: str, value: Any, optional: bool = False) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            fail(key, "an accuracy in [0, 1]")

    def split_figures(key: str, figures: Any, keys: tuple[str, ...]) -> None:
        if not isinstance(figures, dict):
            fail(key, "an object of figures")
        for k in keys:
            if k not in figures:
                fail(f"{key}.{k}", "an accuracy in [0, 1] (missing)")
            accuracy(f"{key}.{k}", figures[k], optional=k == "worst_group_accuracy")

    if not isinstance(m["method"], str):
        fail("method", "a method name")
    if isinstance(m["seed"], bool) or not isinstance(m["seed"], int):
        fail("seed", "an integer")
    if not isinstance(m["splits"], dict) or not m["splits"]:
        fail("splits", "an object of splits, each with its accuracy")
    for name, figures in m["splits"].items():
        split_figures(f"splits.{name}", figures, ("accuracy", "worst_group_accuracy"))
    ex = m["explain"]
    if not isinstance(ex, dict) or not isinstance(ex.get("dominant_concept"), str):
        fail("explain", "an object with dominant_concept (a concept name) and scores")
    for key in ("scores", "control", "representation"):
        if not isinstance(ex.get(key, {}), dict):
            fail(f"explain.{key}", "an object of concept -> score")
    for key, kind in (("recipe", dict), ("selection", dict), ("history", list), ("timing", dict)):
        if not isinstance(m.get(key, kind()), kind):
            fail(key, f"a JSON {'object' if kind is dict else 'array'}")
    for rule, pick in m.get("selection", {}).items():
        if not isinstance(pick, dict) or "epoch" not in pick or not isinstance(pick.get("splits"), dict):
            fail(f"selection.{rule}", "an object with epoch and splits")
        for name, figures in pick["splits"].items():
            split_figures(f"selection.{rule}.splits.{name}", figures, ("accuracy",))
    for i, row in enumerate(m.get("history", [])):
        if not isinstance(row, dict) or "epoch" not in row:
            fail(f"history[{i}]", "an object with the epoch's figures")
        if row.get("oracle_accuracy") is not None:
            accuracy(f"history[{i}].oracle_accuracy", row["oracle_accuracy"])
    if m.get("stream") is not None:
        split_figures("stream", m["stream"], ("accuracy", "worst_group_accuracy"))


def _value_at(m: dict[str, Any], key: str) -> str:
    """The value at a dotted key (``splits.test.accuracy``, ``history[2]``) as short text, for an error."""
    value: Any = m
    for part in re.split(r"\.|(?=\[)", key):
        if part.startswith("["):
            value = value[int(part[1:-1])] if isinstance(value, list) else None
        else:
            value = value.get(part) if isinstance(value, dict) else None
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mean_std(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def _oracle(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch with the best accuracy on ``selection.oracle_split`` (recorded, never used for selection); epochs of
    a model the run restarted from (JTT's identification model, ``"discarded"``) are no candidates."""
    rows = [h for h in history if h.get("oracle_accuracy") is not None and not h.get("discarded")]
    if not rows:
        return None
    best = max(rows, key=lambda h: (h["oracle_accuracy"], h["epoch"]))
    return {"split": best["oracle_split"], "epoch": best["epoch"], "accuracy": best["oracle_accuracy"]}


def parse_goal(items: list[str]) -> dict[str, float]:
    """``["test=0.99", "swapped=0.95"]`` -> ``{"test": 0.99, "swapped": 0.95}``: the minimum accuracy per split."""
    goal = {}
    for item in items:
        split, sep, value = item.partition("=")
        try:
            threshold = float(value)
        except ValueError:
            threshold = float("nan")
        if not sep or not split or not 0 <= threshold <= 1:
            raise DebiasError(f"--goal {item!r}: expected SPLIT=MIN with MIN an accuracy in [0, 1], e.g. "
                              "test=0.99 shifted=0.95")
        if split in goal:  # the later value would silently win
            raise DebiasError(f"--goal {item!r}: split {split!r} is given twice (also {split}={goal[split]:g}); "
                              "give each split once")
        goal[split] = threshold
    return goal


def _label(group: dict[str, Any]) -> str:
    return f"{group['method']} {group['setting']}"


def _reference_tokens(reference: str) -> list[str]:
    """``reference`` split at the commas and spaces outside brackets and quotes, so that a list value stays one
    token: ``"erm colors=['red', 'green']"`` -> ``["erm", "colors=['red','green']"]`` (spaces dropped)."""
    tokens, current, depth, quote = [], "", 0, ""
    for ch in reference:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif depth == 0 and (ch == "," or ch.isspace()):
            tokens.append(current)
            current = ""
            continue
        current += ch
    return [_squeeze(t) for t in tokens + [current] if t.strip()]


def _squeeze(text: str) -> str:
    """Spaces dropped and double quotes read as single, as a setting prints list values (Python's repr)."""
    return re.sub(r"\s+", "", text).replace('"', "'")


def _matches(reference: str, group: dict[str, Any]) -> bool:
    """Every part of ``reference`` (split at commas and spaces outside brackets) is one of the group's parts: its
    method, or one of its setting's ``key=value`` parts, where ``unlabeled_batch_size=16`` also matches
    ``concept.unlabeled_batch_size=16`` and a list value may be written with or without spaces, in either quotes."""
    parts = [_squeeze(p) for p in [group["method"], *_SETTING_PARTS.split(group["setting"])]]
    return all(any(p == token or p.endswith("." + token) for p in parts) for token in _reference_tokens(reference))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a binomial test at one half)."""
    n, k = only_a + only_b, min(only_a, only_b)
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n)


def _meets(row: dict[str, Any], goal: dict[str, float]) -> bool:
    return all(row["splits"][s]["accuracy"] >= t for s, t in goal.items())


def _add_goal(rows: list[dict[str, Any]], groups: list[dict[str, Any]], by_key: dict, goal: dict[str, float]
              ) -> None:
    for r in rows:
        absent = [s for s in goal if s not in r["splits"]]
        if absent:
            raise DebiasError(f"--goal names split {absent[0]!r}, which {Path(r['run']) / 'metrics.json'} does not "
                              f"have; its splits are {', '.join(r['splits'])}")
        r["meets_goal"] = _meets(r, goal)
    for g in groups:
        members = by_key[g["method"], g["setting"]]
        g["goal"] = {"thresholds": dict(goal), "met": sum(r["meets_goal"] for r in members), "n": len(members),
                     "seeds_met": sorted(r["seed"] for r in members if r["meets_goal"])}


def _add_paired(groups: list[dict[str, Any]], by_key: dict, reference: str, goal: dict[str, float] | None) -> None:
    """Per-seed differences of every group against the reference group, over the seeds both hold."""
    refs = [g for g in groups if _matches(reference, g)]
    if len(refs) != 1:
        found = "none does" if not refs else f"{len(refs)} do: " + "; ".join(_label(g) for g in refs)
        raise DebiasError(f"--reference {reference!r} must match exactly one group, {found}; the groups are: "
                          + "; ".join(_label(g) for g in groups))
    (ref,) = refs
    ref_rows = {r["seed"]: r for r in by_key[ref["method"], ref["setting"]]}
    for g in groups:
        if g is ref:
            continue
        rows = {r["seed"]: r for r in by_key[g["method"], g["setting"]]}
        seeds = sorted(set(rows) & set(ref_rows))
        paired: dict[str, Any] = {"reference": _label(ref), "seeds": seeds, "splits": {}}
        for s in g["splits"]:
            diffs = [rows[k]["splits"][s]["accuracy"] - ref_rows[k]["splits"][s]["accuracy"]
                     for k in seeds if s in rows[k]["splits"] and s in ref_rows[k]["splits"]]
            if diffs:
                se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
                paired["splits"][s] = {"mean": float(np.mean(diffs)), "se": se, "n": len(diffs)}
        if goal is not None:
            only_here = sum(rows[k]["meets_goal"] and not ref_rows[k]["meets_goal"] for k in seeds)
            only_ref = sum(ref_rows[k]["meets_goal"] and not rows[k]["meets_goal"] for k in seeds)
            paired["goal"] = {"only_here": only_here, "only_reference": only_ref,
                              "mcnemar_p": mcnemar_exact(only_here, only_ref)}
        g["paired"] = paired


def compare_runs(runs: list[Path], out: Path, reference: str | None = None,
                 goal: dict[str, float] | None = None) -> dict[str, Any]:
    """Rows per run and groups (mean +- std over seeds per method and setting). ``goal`` (minimum accuracy per split)
    counts the seeds meeting every threshold at once; ``reference`` (see :func:`_matches`) names one group against
    which every other group gets per-seed differences (mean +- standard error over the seeds both hold) and, with a
    goal, the seeds meeting it in one group only, with the exact McNemar p-value."""
    if (out / "metrics.json").exists():  # its concept_scores.png and the rest are that run's own
        raise DebiasError(f"--out {str(out)!r} is a `debias train` run directory (it holds metrics.json); give the "
                          "compare a folder of its own")
    seen: dict[Path, Path] = {}
    for run in runs:
        if run.resolve() in seen:
            raise DebiasError(f"{run}: given twice (also as {seen[run.resolve()]}); give each run once, or its seed "
                              "would be counted twice")
        seen[run.resolve()] = run
    rows = []
    loaded = [_load_run(run) for run in runs]
    for run, m, sett in zip(runs, loaded, settings(loaded)):
        rows.append({"run": str(run), "method": m["method"], "variant": variant(m), "setting": sett,
                     "seed": m["seed"], "splits": m["splits"], "dominant_concept": m["explain"]["dominant_concept"],
                     "scores": m["explain"].get("scores", {}), "control": m["explain"].get("control", {}),
                     "representation": m["explain"].get("representation", {}),
                     "selection": {k: {"epoch": v["epoch"], "splits": {s: {"accuracy": x["accuracy"]}
                                                                      for s, x in v["splits"].items()}}
                                   for k, v in m.get("selection", {}).items()},
                     "oracle": _oracle(m.get("history", [])),
                     "stream": ({k: m["stream"][k] for k in ("accuracy", "worst_group_accuracy")}
                                if m.get("stream") else None),
                     "timing": m.get("timing", {})})
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        twin = next((o for o in by_key[r["variant"], r["setting"]] if o["seed"] == r["seed"]), None)
        if twin is not None:  # two runs of one recipe: their mean would count one seed twice
            raise DebiasError(f"{r['run']} and {twin['run']}: the same method, setting and seed "
                              f"({r['variant']}, {r['setting']}, seed {r['seed']}); compare one of them")
        by_key[r["variant"], r["setting"]].append(r)
    groups = []
    for (var, sett), members in sorted(by_key.items(), key=lambda kv: (kv[0][0], natural_key(kv[0][1]))):
        # every member's splits and concepts, not the first member's alone (runs of older versions may lack some;
        # each mean counts the members that have it, its n says how many)
        present = set().union(*(r["splits"] for r in members))
        split_names = [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))
        concepts = {key: list(dict.fromkeys(c for r in members for c in r[key]))
                    for key in ("scores", "representation")}
        g = {"method": var, "setting": sett, "n_runs": len(members), "seeds": sorted(r["seed"] for r in members),
             "splits": {s: {"accuracy": _mean_std([r["splits"][s]["accuracy"] for r in members if s in r["splits"]]),
                            "worst_group_accuracy": _mean_std([r["splits"][s]["worst_group_accuracy"]
                                                               for r in members if s in r["splits"]])}
                        for s in split_names},
             "scores": {c: _mean_std([r["scores"].get(c) for r in members]) for c in concepts["scores"]},
             "representation": {c: _mean_std([r["representation"].get(c) for r in members])
                                for c in concepts["representation"]},
             "dominant_concept": {d: sum(r["dominant_concept"] == d for r in members)
                                  for d in sorted({r["dominant_concept"] for r in members})}}
        if all(r["stream"] for r in members):
            g["stream"] = {k: _mean_std([r["stream"][k] for r in members])
                           for k in ("accuracy", "worst_group_accuracy")}
        groups.append(g)
    if goal:
        _add_goal(rows, groups, by_key, goal)
    if reference is not None:
        _add_paired(groups, by_key, reference, goal or None)
    result = {"rows": rows, "groups": groups}
    io.check_writable(out)
    io.atomic_write_json(out / "compare.json", result)
    io.atomic_write_text(out / "report.md", render_report(result))
    plot_compare(result, out)
    return result


def _fmt(ms: dict[str, float]) -> str:
    if ms["n"] == 0:
        return "-"
    return f"{ms['mean']:.3f} ± {ms['std']:.3f}" if ms["n"] > 1 else f"{ms['mean']:.3f}"


def render_report(result: dict[str, Any]) -> str:
    groups = result["groups"]
    if not groups:
        return "# debias compare\n\nNo runs.\n"
    splits = [s for s in SPLIT_ORDER if any(s in g["splits"] for g in groups)]
    lines = ["# debias compare", "", f"{len(result['rows'])} runs; mean ± std over seeds.", "",
             "## Accuracy per split", "",
             "| method | setting | seeds | " + " | ".join(splits) + " | dominant concept |",
             "|---|---|---|" + "---|" * len(splits) + "---|"]
    for g in groups:
        cells = [_fmt(g["splits"][s]["accuracy"]) if s in g["splits"] else "-" for s in splits]
        dom = ", ".join(f"{k} x{v}" for k, v in g["dominant_concept"].items())
        lines.append(f"| {g['method']} | {g['setting']} | {len(g['seeds'])} | " + " | ".join(cells) + f" | {dom} |")
    lines += _goal_lines(groups) + _paired_lines(groups, splits)
    lines += ["", "## Worst-group accuracy", "", "| method | setting | " + " | ".join(splits) + " |",
              "|---|---|" + "---|" * len(splits)]
    for g in groups:
        cells = [_fmt(g["splits"][s]["worst_group_accuracy"]) if s in g["splits"] else "-" for s in splits]
        lines.append(f"| {g['method']} | {g['setting']} | " + " | ".join(cells) + " |")
    concepts = sorted({c for g in groups for c in g["scores"]})
    for key, title in (("scores", "Concept scores of the final model: decision alignment (NMI of the CNN's "
                                  "prediction with the graft's caption prediction; decides dominance)"),
                       ("representation", "Concept representation of the final model (0 = chance, 1 = plain CLIP)")):
        lines += ["", f"## {title}", "",
                  "| method | setting | " + " | ".join(concepts) + " |", "|---|---|" + "---|" * len(concepts)]
        for g in groups:
            vals = g.get(key, {})
            lines.append(f"| {g['method']} | {g['setting']} | " + " | ".join(
                _fmt(vals[c]) if c in vals else "-" for c in concepts) + " |")
    fitted = [g for g in groups if g.get("stream")]
    if fitted:
        ref = "shifted" if all("shifted" in g["splits"] for g in fitted) else None
        lines += ["", "## The penalty's own images vs fresh images", "",
                  "The unlabeled stream's labels are withheld from the method and read for this table only. Stream "
                  "accuracy above the accuracy on fresh images under the same shift means the penalty was fitted on "
                  "the stream's images more than it generalised.", "",
                  "| method | setting | stream | stream worst-group"
                  + (f" | {ref} | {ref} worst-group |" if ref else " |"),
                  "|---|---|---|---|" + ("---|---|" if ref else "")]
        for g in fitted:
            cells = [_fmt(g["stream"]["accuracy"]), _fmt(g["stream"]["worst_group_accuracy"])]
            if ref:
                cells += [_fmt(g["splits"][ref]["accuracy"]), _fmt(g["splits"][ref]["worst_group_accuracy"])]
            lines.append(f"| {g['method']} | {g['setting']} | " + " | ".join(cells) + " |")
    sel_rows = [r for r in result["rows"] if r.get("selection")]
    if sel_rows:
        lines += ["", "## Checkpoint selection (shifted accuracy of the checkpoint each rule picked)", "",
                  "oracle: the best shifted accuracy over the epochs (recorded every epoch, used by no rule).", "",
                  "| run | method | seed | " + " | ".join(["val_accuracy", "dominance", "worst_group", "oracle"])
                  + " |", "|---|---|---|---|---|---|---|"]
        for r in sel_rows:
            cells = []
            for rule in ("val_accuracy", "dominance", "worst_group"):
                pick = r["selection"].get(rule)
                acc = pick["splits"].get("shifted", {}).get("accuracy") if pick else None
                cells.append(f"{acc:.3f} (ep {pick['epoch']})" if acc is not None else "-")
            o = r.get("oracle")
            cells.append(f"{o['accuracy']:.3f} (ep {o['epoch']})" if o and o["split"] == "shifted" else "-")
            lines.append(f"| {Path(r['run']).name} | {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _goal_lines(groups: list[dict[str, Any]]) -> list[str]:
    if not groups[0].get("goal"):
        return []
    goal = " and ".join(f"{s} >= {t:g}" for s, t in groups[0]["goal"]["thresholds"].items())
    paired = any(g.get("paired", {}).get("goal") for g in groups)
    lines = ["", "## Seeds meeting the goal", "", f"Goal: {goal}, at once.", "",
             "| method | setting | met |" + (" only here | only in the reference | exact McNemar p |" if paired else ""),
             "|---|---|---|" + ("---|---|---|" if paired else "")]
    for g in groups:
        cells = [f"{g['goal']['met']} / {g['goal']['n']}"]
        if paired:
            pg = g.get("paired", {}).get("goal")
            cells += ([str(pg["only_here"]), str(pg["only_reference"]), f"{pg['mcnemar_p']:.3f}"] if pg
                      else ["(reference)", "", ""])
        lines.append(f"| {g['method']} | {g['setting']} | " + " | ".join(cells) + " |")
    return lines


def _paired_lines(groups: list[dict[str, Any]], splits: list[str]) -> list[str]:
    others = [g for g in groups if g.get("paired")]
    if not others:
        return []
    lines = ["", f"## Per-seed differences against {others[0]['paired']['reference']}", "",
             "Accuracy of each group minus the reference's on the same seed; mean ± standard error over the seeds "
             "both hold.", "", "| method | setting | shared seeds | " + " | ".join(splits) + " |",
             "|---|---|---|" + "---|" * len(splits)]
    for g in others:
        cells = []
        for s in splits:
            d = g["paired"]["splits"].get(s)
            cells.append("-" if d is None else f"{d['mean']:+.3f} ± {d['se']:.3f}" if d["n"] > 1 else f"{d['mean']:+.3f}")
        lines.append(f"| {g['method']} | {g['setting']} | {len(g['paired']['seeds'])} | " + " | ".join(cells) + " |")
    return lines


_SETTING_PARTS = re.compile(r",(?=[A-Za-z_][\w.]*=)")
"""The commas between a setting's ``key=value`` parts (not those inside a list or table value)."""


def _short(part: str) -> str:
    key, _, value = part.partition("=")
    return f"{key.rsplit('.', 1)[-1]}={value}"


def plot_compare(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _save

    groups = result["groups"]
    if not groups:
        return
    splits = [s for s in SPLIT_ORDER if any(s in g["splits"] for g in groups) and s != "val"]
    # one setting per line, without its recipe section (concept.adversary_weight=1.0 -> adversary_weight=1.0)
    labels = ["\n".join([g["method"]] + [_short(p) for p in _SETTING_PARTS.split(g["setting"]) if p]) for g in groups]
    per_group = max(1.2, 0.095 * max(len(line) for label in labels for line in label.splitlines()))
    width = 0.8 / max(1, len(splits))
    fig, ax = plt.subplots(figsize=(max(6, per_group * len(groups)), 3.8))
    for i, s in enumerate(splits):
        xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(groups))]
        means = [g["splits"].get(s, {}).get("accuracy", {}).get("mean", np.nan) for g in groups]
        stds = [g["splits"].get(s, {}).get("accuracy", {}).get("std", 0.0) for g in groups]
        ax.bar(xs, means, width=width, yerr=stds, capsize=2, label=s)
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=len(splits))
    _save(fig, out / "accuracy_by_split.png")

    concepts = sorted({c for g in groups for c in g["scores"]})
    fig, ax = plt.subplots(figsize=(max(6, per_group * len(groups)), 3.4))
    width = 0.8 / max(1, len(concepts))
    for i, c in enumerate(concepts):
        xs = [j + (i - (len(concepts) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [g["scores"].get(c, {}).get("mean", np.nan) for g in groups], width=width,
               yerr=[g["scores"].get(c, {}).get("std", 0.0) for g in groups], capsize=2, label=c)
    ax.set_xticks(range(len(groups)), labels, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("concept score of the final model")
    ax.set_title("concept scores: ERM (before) vs each method (after)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, out / "concept_scores.png")

    others = [(g, label) for g, label in zip(groups, labels) if g.get("paired")]
    if others:  # --reference: each group's per-seed differences from the reference, mean +- standard error
        fig, ax = plt.subplots(figsize=(max(6, per_group * len(others)), 3.6))
        width = 0.8 / max(1, len(splits))
        for i, s in enumerate(splits):
            xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(others))]
            diffs = [g["paired"]["splits"].get(s, {}) for g, _ in others]
            ax.bar(xs, [d.get("mean", np.nan) for d in diffs], width=width, yerr=[d.get("se", 0.0) for d in diffs],
                   capsize=2, label=s)
        ax.set_xticks(range(len(others)), [label for _, label in others], fontsize=7)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel("accuracy minus the reference's\n(same seed; mean ± s.e.)")
        ax.set_title(f"against {others[0][0]['paired']['reference']}", fontsize=8)
        ax.legend(fontsize=7, ncol=len(splits))
        _save(fig, out / "paired_differences.png")
