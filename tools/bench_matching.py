"""Matching cost vs probe-set size: peak memory and time for N probe images (default 1,000 and 4,000), with the
pairs of maps on different grids summed through the resize's adjoint (``adjoint``, the default) and by building the
resized maps (``resize``, the reference), side by side.

Each (size, pair sums) runs in a fresh subprocess so its peak resident memory (VmHWM) is its own; a subprocess
times ``--repeats`` matchings and reports the median. Prints a table, the time ratio ``resize / adjoint`` per size
and whether the two select the same channels.

    python tools/bench_matching.py                 # digits CLIP + resnet18 at 32 px, 1000 vs 4000 images
    python tools/bench_matching.py --sizes 1000 4000 --model resnet18 --batch-size 128 --repeats 5
    python tools/bench_matching.py --sizes 512 --pair-sums adjoint   # one way only
    # the paper's scale, as a Waterbirds run matches: the recipe's models with random weights, its image size and
    # matching batch; two sizes give the cost of each further 100 probe images
    python tools/bench_matching.py --recipe recipes/waterbirds.toml --sizes 64 128 --pair-sums adjoint --repeats 1

With ``--recipe`` the standalone model, CLIP, image size and matching settings are the recipe's (``--set`` overrides
them; ``--model`` and ``--batch-size`` too when given), with random weights (``model.pretrained = false``,
``clip.pretrained = "random"`` for an open_clip CLIP), so nothing is read from the hub. The probe images are the
coloured digits, resized to the image size (the cost does not depend on what the images show).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from debias.errors import DebiasError


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def bench_recipe(recipe_path: str | None, overrides: list[str], model_name: str | None, batch_size: int | None):
    """The recipe the benchmark matches with: the default (the digits CLIP, ``resnet18`` at 32 px) or ``recipe_path``
    with random weights; ``--set``, ``--model`` and ``--batch-size`` on top."""
    from debias.recipe import Recipe, load_recipe

    if recipe_path is None:
        recipe = Recipe()
        recipe.model.name = model_name or "resnet18"
        recipe.matching.batch_size = batch_size or 128
        return recipe
    sets = ["model.pretrained=false"]
    recipe = load_recipe(recipe_path, sets + overrides)
    if recipe.clip.name != "digits":
        recipe = load_recipe(recipe_path, sets + ['clip.pretrained="random"'] + overrides)
    if model_name:
        recipe.model.name = model_name
    if batch_size:
        recipe.matching.batch_size = batch_size
    return recipe


def child(n: int, recipe_path: str | None, overrides: list[str], model_name: str | None, batch_size: int | None,
          pair_sums: str, repeats: int) -> dict:
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from debias.data.colors import colorize
    from debias.data.digits_base import load_base_digits
    from debias.data.shifts import random_affine
    from debias.data.splits import Split
    from debias.explain import compute_matching
    from debias.models.clip import load_clip
    from debias.models.standalone import StandaloneModel

    torch.manual_seed(0)
    recipe = bench_recipe(recipe_path, overrides, model_name, batch_size)
    recipe.matching.num_images = n
    gray, digits = load_base_digits(32)
    reps = -(-n // len(gray))
    gray = gray.repeat(reps, 1, 1)[:n]
    gen = torch.Generator().manual_seed(0)
    colors = ["red", "green", "blue", "yellow"]
    pick = torch.randint(len(colors), (n,), generator=gen)
    images = torch.stack([colorize(g, colors[int(c)]) for g, c in zip(gray, pick)])
    images = random_affine(images, gen)
    size = recipe.data.image_size
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    split = Split("probe", images, (digits.repeat(reps)[:n] == 8).long(), pick, ["5", "8"], colors + ["gray"])
    model = StandaloneModel(recipe.model.name, 2).eval()
    clip = load_clip(recipe.clip)
    rss_before = _vm("VmRSS")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matching = compute_matching(model, clip, split, recipe, torch.device("cpu"), progress=False,
                                    pair_sums=pair_sums)
        times.append(time.perf_counter() - t0)
    weights = "model random weights, CLIP " + ("random weights" if recipe.clip.pretrained == "random" else
                                                "weights " + (recipe.clip.pretrained or "shipped"))
    return {"n": n, "pair_sums": pair_sums, "model": recipe.model.name, "clip": recipe.clip.name, "weights": weights,
            "image_size": size, "batch_size": recipe.matching.batch_size, "seconds": statistics.median(times),
            "rss_before_mb": rss_before,
            "peak_rss_mb": _vm("VmHWM"), "images_mb": images.numel() * 4 / 2**20,
            "corr_mean_layer2": matching.summary()["layer2"]["corr_mean"],
            "selected": {c: [m.tap.tolist(), m.channel.tolist()] for c, m in matching.stages.items()},
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--recipe", help="match with this recipe's models (random weights), image size and matching "
                   "settings; default: resnet18 x the digits CLIP at 32 px")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="recipe overrides")
    p.add_argument("--model", help="the standalone timm model (default: the recipe's, or resnet18)")
    p.add_argument("--batch-size", type=int, help="matching batch (default: the recipe's, or 128)")
    p.add_argument("--pair-sums", nargs="+", default=["adjoint", "resize"], choices=["adjoint", "resize"])
    p.add_argument("--repeats", type=int, default=3, help="matchings timed per subprocess (the median is reported)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.pair_sums = list(dict.fromkeys(args.pair_sums))  # each way once
    batch = [1 if args.batch_size is None else args.batch_size]
    for flag, values, least in (("--sizes", args.sizes, 8), ("--batch-size", batch, 1),
                                ("--repeats", [args.repeats], 1)):
        if min(values) < least:  # 8 probe images: the least a recipe's matching.num_images takes
            p.error(f"{flag} {' '.join(map(str, values))}: expected counts of at least {least}")
    if args.overrides and not args.recipe:
        p.error(f"--set {' '.join(args.overrides)}: give the recipe it overrides with --recipe")
    if args.child:
        try:
            print(json.dumps(child(args.child, args.recipe, args.overrides, args.model, args.batch_size,
                                   args.pair_sums[0], args.repeats)))
        except DebiasError as e:
            print(e, file=sys.stderr)
            return 2
        return 0
    rows = []
    for n in args.sizes:
        for mode in args.pair_sums:
            cmd = [sys.executable, __file__, "--child", str(n), "--pair-sums", mode, "--repeats", str(args.repeats)]
            for flag, value in (("--recipe", args.recipe), ("--model", args.model), ("--batch-size", args.batch_size)):
                if value:
                    cmd += [flag, str(value)]
            if args.overrides:
                cmd += ["--set", *args.overrides]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:  # the measuring child failed: its own error, not a traceback of this process
                print(f"bench_matching: measuring {n} images ({mode}) failed (exit {out.returncode}):\n"
                      f"{out.stderr.strip()}", file=sys.stderr)
                return out.returncode
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r0 = rows[0]
    print(f"matching {r0['model']} x {r0['clip']} CLIP ({r0['weights']}), "
          f"{r0['image_size']} px, batch {r0['batch_size']}, median of {args.repeats} matchings, "
          f"{rows[0]['threads']} threads; the probe images themselves are held in memory by this benchmark (column "
          "images MB), the matching statistics are not")
    print(f"{'images':>8} {'pair sums':>9} {'seconds':>9} {'s/100 img':>9} {'RSS before MB':>14} {'peak RSS MB':>12} "
          f"{'peak-before':>12} {'images MB':>10}")
    for r in rows:
        print(f"{r['n']:>8} {r['pair_sums']:>9} {r['seconds']:>9.2f} {100 * r['seconds'] / r['n']:>9.2f} "
              f"{r['rss_before_mb']:>14.0f} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] - r['rss_before_mb']:>12.0f} "
              f"{r['images_mb']:>10.1f}")
    for n in args.sizes:
        by_mode = {r["pair_sums"]: r for r in rows if r["n"] == n}
        if len(by_mode) == 2:
            a, b = by_mode["adjoint"], by_mode["resize"]
            same = a["selected"] == b["selected"]
            print(f"{n} images: resize / adjoint time {b['seconds'] / a['seconds']:.2f}x; "
                  f"the same channels selected: {'yes' if same else 'NO'}")
    if len(args.sizes) >= 2:
        for mode in args.pair_sums:
            mine = [r for r in rows if r["pair_sums"] == mode]
            a, b = mine[0], mine[-1]
            print(f"{mode}: time ratio {b['seconds'] / a['seconds']:.2f} for {b['n'] / a['n']:.1f}x images; "
                  f"matching memory (peak - before) ratio "
                  f"{(b['peak_rss_mb'] - b['rss_before_mb']) / max(1e-9, a['peak_rss_mb'] - a['rss_before_mb']):.2f}")
            if b["n"] > a["n"]:  # the cost of further images, without the fixed cost (first batch, selection)
                per_100 = 100 * (b["seconds"] - a["seconds"]) / (b["n"] - a["n"])
                print(f"{mode}: each further 100 images {per_100:.1f} s "
                      f"and {100 * (b['peak_rss_mb'] - a['peak_rss_mb']) / (b['n'] - a['n']):+.0f} MB of peak memory "
                      f"({100 * (b['images_mb'] - a['images_mb']) / (b['n'] - a['n']):.0f} MB of it the probe images "
                      "this benchmark holds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
