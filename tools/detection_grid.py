"""Does the explanation separate a biased model from an unbiased one? A grid over graft configurations.

Trains ERM models on coloured digits with colour following the label (bias 1.0) and with random colours
(``--unbiased-bias``, default 0.5 = colour independent of the label for two colours), for several seeds and
class/colour pairs, then explains every model with each graft configuration and probe-image choice. Prints one
table: the dominant concept per model and configuration, the score margin (colour - digit), and whether the
configuration got every model right (biased -> colour, unbiased -> digit).

    python tools/detection_grid.py --out runs/detection
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from debias.cli import main as debias_main
from debias.errors import DebiasError
from debias.recipe import load_recipe, require_same_recipe

CONFIGS = {
    "swap l2-4 mean (default)": [],
    "swap l2-4 mean, train probe": ["matching.probe=train"],
    "swap l1-4 (paper)": ['graft.stages=["layer1", "layer2", "layer3", "layer4"]', "graft.unmatched=keep"],
    "swap l4 only": ['graft.stages=["layer4"]'],
    "swap l2-4 mutual>0.3 keep": ["matching.selection=mutual", "matching.threshold=0.3", "graft.unmatched=keep"],
    "swap l2-4 mutual>0.3 mean": ["matching.selection=mutual", "matching.threshold=0.3"],
    "stitch l2-4": ["graft.mode=stitch"],
}
# "swap l1-4" and "swap l4 only" equal the default with paper selection: every CLIP channel is swapped, so the
# embedding is a function of the layer4 swap alone (explain.json: graft.clip_computed_from = layer4)
DEFAULT_CONFIGS = ["swap l2-4 mean (default)", "swap l2-4 mean, train probe", "swap l2-4 mutual>0.3 mean",
                   "stitch l2-4"]
PAIRS = {"5/8 red/green": ["data.classes=[5, 8]", 'data.colors=["red", "green"]'],
         "3/6 blue/yellow": ["data.classes=[3, 6]", 'data.colors=["blue", "yellow"]']}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/colored_digits.toml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    p.add_argument("--unbiased-bias", type=float, default=0.5)
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not 0.0 <= args.unbiased_bias <= 1.0:
        p.error(f"--unbiased-bias {args.unbiased_bias}: expected a bias in [0, 1]")
    out = Path(args.out)
    results = []
    t0 = time.perf_counter()
    for pair in args.pairs:
        for kind, bias in (("biased", 1.0), ("unbiased", args.unbiased_bias)):
            for seed in args.seeds:
                base = args.overrides + PAIRS[pair] + [f"seed={seed}", f"data.bias={bias}"]
                run = out / f"{pair.split()[0].replace('/', '-')}_{kind}_seed{seed}"
                sets = [*base, "selection.track_concepts=false"]
                if not (run / "done").exists():
                    code = debias_main(["train", args.recipe, "--out", str(run), "--no-progress", "--set", *sets])
                    if code:
                        return code
                else:  # a finished run is reused only if it was trained with this recipe
                    try:
                        require_same_recipe(run, load_recipe(args.recipe, sets), "its run directory")
                    except DebiasError as e:
                        p.error(f"{run.name}: {e}")
                acc = json.loads((run / "metrics.json").read_text())["splits"]
                for cfg in args.configs:
                    ex_dir = run / "explain" / cfg.split(" (")[0].replace(" ", "_").replace(">", "gt")
                    if not (ex_dir / "explain.json").exists():
                        code = debias_main(["explain", args.recipe, "--checkpoint", str(run), "--out", str(ex_dir),
                                            "--no-progress", "--set", *base, *CONFIGS[cfg]])
                        if code:
                            return code
                    ex = json.loads((ex_dir / "explain.json").read_text())
                    results.append({"pair": pair, "kind": kind, "seed": seed, "config": cfg,
                                    "dominant": ex["dominant_concept"], "scores": ex["scores"],
                                    "control": ex["control"], "representation": ex["representation"],
                                    "clip_alignment": ex["clip_alignment"],
                                    "control_std": ex.get("control_std"), "control_draws": ex.get("control_draws"),
                                    "paper_votes": ex.get("paper_votes"),
                                    "shifted_acc": acc["shifted"]["accuracy"]})
    (out / "grid.json").write_text(json.dumps(results, indent=1))
    print(f"{'configuration':<30} {'pair':<16} {'kind':<9} " + " ".join(f"seed{s:<23}" for s in args.seeds)
          + " correct")
    verdict = {}
    for cfg in args.configs:
        for pair in args.pairs:
            for kind in ("biased", "unbiased"):
                rows = [r for r in results if r["config"] == cfg and r["pair"] == pair and r["kind"] == kind]
                want = "color" if kind == "biased" else "digit"
                ok = sum(r["dominant"] == want for r in rows)
                verdict.setdefault(cfg, []).append(ok == len(rows))
                cells = " ".join(f"{r['dominant'][:5]:<5} {r['scores']['color']:.2f}/{r['scores']['digit']:.2f}"
                                 f" r{r['representation']['color']:.2f}/{r['representation']['digit']:.2f}"
                                 for r in sorted(rows, key=lambda r: r["seed"]))
                print(f"{cfg:<30} {pair:<16} {kind:<9} {cells}  {ok}/{len(rows)}")
    print("\ncells: dominant concept, score colour/digit (decision alignment: NMI of the CNN's prediction with the "
          "graft's caption prediction), r = representation colour/digit (0 = chance, 1 = plain CLIP)")
    for cfg, oks in verdict.items():
        print(f"{cfg:<30} separates all models: {'yes' if all(oks) else 'no'}")
    print(f"grid wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
