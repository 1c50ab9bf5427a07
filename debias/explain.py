"""The explanation pipeline: match on probe images, graft, read concepts, and compare with random matchings."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .concepts import VERDICT_BASIS, ConceptSet, control_reach, dominant, read_concepts
from .data.splits import DatasetBundle, Split
from .distributed import Dist
from .errors import DebiasError
from .models.clip import ClipModel
from .models.standalone import StandaloneModel
from .recipe import Recipe
from .surgery.graft import GraftedCLIP
from .surgery.matching import Matching, MatchingStats, random_matching, select_matches


def probe_split(recipe: Recipe, bundle: DatasetBundle) -> Split:
    """Images the matching runs on: the biased training images, or images whose attribute varies independently."""
    if recipe.matching.probe == "train":
        return bundle.splits["train"]
    split = bundle.probe_independent or bundle.unlabeled
    if split is None:
        raise DebiasError("matching.probe = 'independent' needs images whose spurious attribute varies "
                          "independently of the label (an unlabeled stream); this dataset has none, "
                          "set matching.probe = 'train' (or give the dataset a stream: see "
                          "data.split_fractions.unlabeled, and data.split_values for folder datasets)")
    return split


def _batches(split: Split, batch_size: int, limit: int, first: int = 0):
    n = min(limit, len(split))
    for start in range(first, n, batch_size):
        yield split.images[start:min(start + batch_size, n)]


def _shard(n: int, dist: Dist | None) -> tuple[int, int, bool]:
    """This process's block ``[lo, hi)`` of ``n`` images and whether the work is split across processes (only
    when every process gets at least one image; otherwise every process does all of it)."""
    if dist is None or not dist.active or n < dist.world:
        return 0, n, False
    lo, hi = dist.block(n)
    return lo, hi, True


@torch.no_grad()
def compute_matching(model: StandaloneModel, clip: ClipModel, split: Split, recipe: Recipe,
                     device: torch.device, progress: bool = True, reduce=None, dist: Dist | None = None,
                     pair_sums: str = "adjoint") -> Matching:
    """Stream the probe images through both models and select matched channels (memory independent of N).

    ``reduce`` (optional) sums the statistics across processes before selection. ``dist`` (several processes,
    identical models): each process streams a contiguous block of the probe images, with rank 0's moment shifts
    (set by its first batch and broadcast before the others accumulate), and the sums are all-reduced, so every
    process selects the same matching, the one a single process would (up to float rounding). ``pair_sums``:
    how a pair of maps on different grids is summed (``MatchingStats``; ``resize`` is the benchmark's reference).
    """
    m = recipe.matching
    taps = m.standalone_taps or model.tap_names
    stitch_stages = tuple(recipe.graft.stages) if recipe.graft.mode == "stitch" else ()
    bad = [t for t in taps if t not in model.tap_channels]
    if bad:
        raise DebiasError(f"matching.standalone_taps = {taps!r}: {bad} are not taps of {model.name}; "
                          f"its taps are {model.tap_names}")
    stats = MatchingStats({t: model.tap_channels[t] for t in taps}, clip.stage_channels(), stitch_stages, pair_sums)
    training = model.training
    model.eval()
    n = min(m.num_images, len(split))
    lo, hi, sharded = _shard(n, dist)
    bar = tqdm(total=hi - lo, desc="matching", unit="img", disable=not progress, leave=False)

    def accumulate(images: torch.Tensor) -> None:
        images = images.to(device)
        _, s_taps = model(images, taps=True)
        stats.update({t: s_taps[t] for t in stats.standalone}, clip.stages(images))
        bar.update(images.shape[0])

    batches = _batches(split, m.batch_size, hi, first=lo)
    if sharded:  # rank 0's first batch sets the shifts every process accumulates with
        first = next(batches)
        if dist.is_main:
            accumulate(first)
        stats.sync_shifts(dist.broadcast_, device)
        if not dist.is_main:
            accumulate(first)
    for images in batches:
        accumulate(images)
    bar.close()
    model.train(training)
    if sharded:
        stats.all_reduce(dist.all_reduce_)
    if reduce is not None:
        reduce(stats)
    matching = select_matches(stats, m.selection, m.threshold, stages=None,
                              stitch_ridge=recipe.graft.stitch_ridge if stitch_stages else None)
    if recipe.graft.mode == "swap" and not any(bool(matching.stages[c].matched.any()) for c in recipe.graft.stages):
        # a swap graft with nothing swapped is plain CLIP: its scores would describe CLIP, not the CNN
        best = max(float(stats.correlation(s, c).max()) for s in stats.standalone for c in recipe.graft.stages)
        raise DebiasError(f"matching.threshold = {m.threshold}: mutual selection kept no channel pair in "
                          f"graft.stages {list(recipe.graft.stages)} (highest correlation {best:.3f}), so the "
                          "grafted model would be plain CLIP; lower the threshold or use matching.selection = "
                          "'paper'")
    return matching


def build_graft(clip: ClipModel, matching: Matching, recipe: Recipe) -> GraftedCLIP:
    g = recipe.graft
    return GraftedCLIP(clip, matching, g.stages, g.mode, g.unmatched)


@torch.no_grad()
def embed(model: StandaloneModel, graft: GraftedCLIP, clip: ClipModel, split: Split, device: torch.device,
          batch_size: int = 256, limit: int | None = None, dist: Dist | None = None,
          clip_emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grafted and plain-CLIP embeddings of a split and the model's predicted classes (with ``dist``: each
    process embeds a block, all gathered). ``clip_emb``: the plain-CLIP embeddings of these images, already
    computed (CLIP is fixed), returned as they are instead of encoding the images again."""
    training = model.training
    model.eval()
    g_out, c_out, p_out = [], [], []
    n = len(split) if limit is None else min(limit, len(split))
    lo, hi, sharded = _shard(n, dist)
    for images in _batches(split, batch_size, hi, first=lo):
        images = images.to(device)
        logits, taps = model(images, taps=True)
        g_out.append(graft(images, taps).float().cpu())
        if clip_emb is None:
            c_out.append(clip.encode_image(images).float().cpu())
        p_out.append(logits.argmax(1).float().cpu())
    model.train(training)
    g, p = torch.cat(g_out), torch.cat(p_out)
    if clip_emb is None:
        clip_emb = dist.gather_blocks(torch.cat(c_out), n) if sharded else torch.cat(c_out)
    if sharded:
        g, p = dist.gather_blocks(g, n), dist.gather_blocks(p.unsqueeze(1), n).squeeze(1)
    return g, clip_emb, p.long()


def text_embeddings(clip: ClipModel, concepts: list[ConceptSet]) -> dict[str, torch.Tensor]:
    return {c.name: clip.encode_text(c.captions).cpu() for c in concepts}


@torch.no_grad()
def explain_model(model: StandaloneModel, clip: ClipModel, matching: Matching, recipe: Recipe, split: Split,
                  concepts: list[ConceptSet], device: torch.device, progress: bool = True,
                  control_draws: int | None = None, dist: Dist | None = None,
                  limit: int | None = None, clip_cache: dict | None = None) -> dict:
    """Concept scores of the grafted model on ``split``, the dominant concept and the random-matching control.

    ``dist``: the embeddings are computed in blocks across processes and gathered, so every process returns the
    same result. ``clip_cache`` (a dict the caller keeps): plain-CLIP embeddings of the split, computed on the
    first call and reused by later ones (the trainer explains the same images every epoch)."""
    text = text_embeddings(clip, concepts)
    graft = build_graft(clip, matching, recipe).to(device)
    limit = limit or recipe.explain.num_images or None
    key = (split.name, split.epoch, len(split), limit)  # a split re-drawn each epoch has new images
    cached = clip_cache.get(key) if clip_cache is not None else None
    g_emb, c_emb, preds = embed(model, graft, clip, split, device, limit=limit, dist=dist, clip_emb=cached)
    if clip_cache is not None:
        clip_cache[key] = c_emb
    n = len(preds)
    labels, attrs = split.labels[:n], split.attrs[:n]
    factors = {k: v[:n] for k, v in split.factors.items()}
    readout = read_concepts(g_emb, c_emb, labels, attrs, concepts, text, preds, factors)
    scores = readout.scores()
    draws, rep_draws = [], []
    gen = torch.Generator().manual_seed(recipe.seed + 12345)
    draws_wanted = recipe.explain.control_draws if control_draws is None else control_draws
    for _ in tqdm(range(draws_wanted), desc="control", leave=False, disable=not progress):
        rand = random_matching(matching, model.tap_channels, gen)
        rg = build_graft(clip, rand, recipe).to(device)
        rg_emb, _, _ = embed(model, rg, clip, split, device, limit=limit, dist=dist, clip_emb=c_emb)
        r = read_concepts(rg_emb, c_emb, labels, attrs, concepts, text, preds, factors)
        draws.append(r.scores())
        rep_draws.append(r.representation())

    def mean_std(ds: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
        mean = {c.name: (sum(d[c.name] for d in ds) / len(ds)) if ds else float("nan") for c in concepts}
        std = {c.name: (torch.tensor([d[c.name] for d in ds]).std().item() if len(ds) > 1 else 0.0)
               for c in concepts}
        return mean, std

    control, control_std = mean_std(draws)
    rep_control, _ = mean_std(rep_draws)
    verdict = dominant(scores)
    clip_verdict = dominant(readout.clip_aligned)
    return {
        "dominant_concept": verdict,
        "verdict_basis": VERDICT_BASIS,
        "scores": scores,
        "control": control,
        "control_std": control_std,
        "control_min": {c.name: min(d[c.name] for d in draws) if draws else float("nan") for c in concepts},
        "control_max": {c.name: max(d[c.name] for d in draws) if draws else float("nan") for c in concepts},
        "control_draws": len(draws),
        "control_reach": control_reach(scores, draws),
        "control_same_verdict": (sum(dominant(d) == verdict for d in draws) / len(draws)) if draws else float("nan"),
        "score_kind": "decision alignment: NMI(CNN prediction, graft caption prediction)",
        "clip_scores": readout.clip_aligned,
        "clip_dominant_concept": clip_verdict,
        "representation": readout.representation(),
        "representation_control": rep_control,
        "clip_alignment": readout.clip_aligned,
        "graft_accuracy": readout.graft,
        "clip_accuracy": readout.clip,
        "chance": readout.chance,
        "paper_votes": readout.paper_votes,
        "paper_votes_kind": "per image, the concept of the caption whose cosine similarity rose most from plain CLIP "
                            "to the graft, as a fraction of images (the paper's read-out; not the verdict, see "
                            "docs/EXPLAIN.md)",
        "roles": {c.name: c.role for c in concepts},
        "captions": {c.name: c.captions for c in concepts},
        "split": split.name,
        "num_images": n,
        "graft": graft.summary(),
        "probe": recipe.matching.probe,
    }


def summary_lines(ex: dict) -> list[str]:
    """The explanation in a few printed lines: the verdict's scores beside plain CLIP's, the control and the paper's
    per-image vote. Explanations written before these keys existed print what they have."""
    def fmt(d: dict | None) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in (d or {}).items() if isinstance(v, (int, float)))

    lines = [f"decision alignment through the graft (the verdict's scores): {fmt(ex['scores'])}"]
    if ex.get("clip_scores") is not None:
        lines.append(f"  plain CLIP on the image: {fmt(ex['clip_scores'])} -> {ex.get('clip_dominant_concept')}")
    n = ex.get("control_draws", 0)
    if n:
        lo, hi = ex.get("control_min", {}), ex.get("control_max", {})
        ctl = ", ".join(f"{k} {v:.2f}" + (f" [{lo[k]:.2f}-{hi[k]:.2f}]" if k in lo and k in hi else "")
                        for k, v in ex["control"].items())
        lines.append(f"  random matching ({n} draws, mean [range]): {ctl}")
    if ex.get("paper_votes") is not None:
        lines.append(f"  the paper's per-image vote (not a verdict, docs/EXPLAIN.md): {fmt(ex['paper_votes'])}")
    lines.append(f"representation (1 = as well as plain CLIP): {fmt(ex.get('representation'))}")
    lines.append(f"dominant concept: {ex['dominant_concept']}" + verdict_note(ex))
    return lines


def verdict_note(ex: dict) -> str:
    """What the verdict rests on, and the warnings a reader needs: plain CLIP disagreeing, random matchings agreeing."""
    notes = []
    clip = ex.get("clip_dominant_concept")
    if clip is not None and clip != ex["dominant_concept"]:
        notes.append(f"plain CLIP on the image says {clip}: the graft reads the CNN's own features, so a caption set "
                     "can follow its decision through them; prefer plain CLIP's verdict")
    same = ex.get("control_same_verdict")
    if isinstance(same, (int, float)) and same == same and ex.get("control_draws"):
        notes.append(f"{same:.0%} of {ex['control_draws']} random matchings give the same verdict")
    basis = ex.get("verdict_basis")
    head = f" ({basis}: what the CNN's decisions follow)" if basis else ""
    return head + "".join(f"\n  note: {n}" for n in notes)

