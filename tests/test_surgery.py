import pytest
import torch
import torch.nn.functional as F

from debias.models.standalone import StandaloneModel
from debias.recipe import Recipe
from debias.surgery.graft import GraftedCLIP
from debias.surgery.matching import Matching, MatchingStats, StageMatch, random_matching, select_matches


def _brute(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    size = max(x.shape[-2:], y.shape[-2:], key=lambda s: s[0] * s[1])
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if x.shape[-2:] != size else x
    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False) if y.shape[-2:] != size else y
    a = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()
    b = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()
    a = (a - a.mean(0)) / a.std(0, unbiased=False)
    b = (b - b.mean(0)) / b.std(0, unbiased=False)
    return (a.T @ b / a.shape[0]).float()


@pytest.mark.parametrize("pair_sums", ["adjoint", "resize"])
def test_streaming_correlation_matches_brute_force(pair_sums):
    """Both ways of summing a pair on the larger grid give the correlations of the explicitly resized maps:
    a tap larger than the stage, a stage larger than the tap, equal grids, and grids that do not divide (7x7 and
    3x5 against 4x4: bilinear weights that are not a plain repeat, down in one axis and up in the other)."""
    g = torch.Generator().manual_seed(0)
    s = {"a": torch.randn(20, 3, 4, 4, generator=g) + 5, "b": torch.randn(20, 5, 2, 2, generator=g),
         "odd": torch.randn(20, 2, 7, 7, generator=g) * 2 + 1}
    c = {"layer1": torch.randn(20, 4, 4, 4, generator=g), "layer2": torch.randn(20, 6, 2, 2, generator=g),
         "flat": torch.randn(20, 3, 3, 5, generator=g) - 2}
    c["layer2"][:, 0] = F.avg_pool2d(s["a"][:, 1:2], 2)[:, 0] * 3 - 1  # one planted correlation
    stats = MatchingStats({k: v.shape[1] for k, v in s.items()}, {k: v.shape[1] for k, v in c.items()},
                          pair_sums=pair_sums)
    for i in range(0, 20, 7):  # uneven batches
        stats.update({k: v[i:i + 7] for k, v in s.items()}, {k: v[i:i + 7] for k, v in c.items()})
    for sk in s:
        for ck in c:
            assert torch.allclose(stats.correlation(sk, ck), _brute(s[sk], c[ck]), atol=1e-4), (sk, ck)
    # the per-pair moments of a resized map: its mean and spread on the larger grid (here layer2 onto a's 4x4)
    up = F.interpolate(c["layer2"], size=(4, 4), mode="bilinear", align_corners=False)
    flat = up.permute(0, 2, 3, 1).reshape(-1, 6).double()
    assert torch.allclose(stats.pair_y["a", "layer2"].mean(), flat.mean(0), atol=1e-5)
    assert torch.allclose(stats.pair_y["a", "layer2"].var(), flat.var(0, unbiased=False), atol=1e-5)
    for sk in s:  # per-channel statistics on the tap's own grid (shared with the pairs on that grid)
        flat = s[sk].permute(0, 2, 3, 1).reshape(-1, s[sk].shape[1]).double()
        mean, std = stats.native_stats("s", sk)
        assert torch.allclose(mean, flat.mean(0).float(), atol=1e-5)
        assert torch.allclose(std, flat.std(0, unbiased=False).float(), atol=1e-5)
    sizes = [t.numel() for t in stats.tensors()]
    stats.update(s, c)  # more images: the same statistics, no growth
    assert [t.numel() for t in stats.tensors()] == sizes
    m = select_matches(stats, "paper")
    assert m.stages["layer2"].tap[0] == 0 and m.stages["layer2"].channel[0] == 1
    assert m.stages["layer2"].corr[0] > 0.4  # pooled then upsampled: well above the noise
    assert all(st.fraction() == 1.0 for st in m.stages.values())


def test_mutual_selection_is_stricter():
    g = torch.Generator().manual_seed(1)
    s = {"a": torch.randn(30, 4, 4, 4, generator=g)}
    c = {"layer1": torch.randn(30, 6, 4, 4, generator=g)}
    c["layer1"][:, 2] = s["a"][:, 3] + 0.1 * torch.randn(30, 4, 4, generator=g)
    stats = MatchingStats({"a": 4}, {"layer1": 6})
    stats.update(s, c)
    paper = select_matches(stats, "paper")
    mutual = select_matches(stats, "mutual", threshold=0.5)
    assert paper.stages["layer1"].matched.sum() == 6
    assert mutual.stages["layer1"].matched.tolist() == [False, False, True, False, False, False]
    assert mutual.stages["layer1"].channel[2] == 3


def _empty_matching(clip, taps, channels) -> Matching:
    stages = {c: StageMatch(torch.full((n,), -1), torch.full((n,), -1), torch.zeros(n))
              for c, n in clip.stage_channels().items()}
    return Matching(taps, stages, {t: torch.zeros(channels[t]) for t in taps},
                    {t: torch.ones(channels[t]) for t in taps},
                    {c: torch.zeros(n) for c, n in clip.stage_channels().items()},
                    {c: torch.ones(n) for c, n in clip.stage_channels().items()})


def test_graft_equals_plain_clip_when_nothing_is_swapped(tiny_clip):
    model = StandaloneModel("resnet10t", 2).eval()
    x = torch.rand(4, 3, 32, 32)
    _, taps = model.forward_taps(x)
    graft = GraftedCLIP(tiny_clip, _empty_matching(tiny_clip, model.tap_names, model.tap_channels),
                        ["layer1", "layer2", "layer3", "layer4"], unmatched="keep")
    assert torch.allclose(graft(x, taps), tiny_clip.encode_image(x), atol=1e-6)


def _real_matching(model, clip, selection="paper", stitch=()):
    stats = MatchingStats(model.tap_channels, clip.stage_channels(), stitch)
    with torch.no_grad():
        x = torch.rand(16, 3, 32, 32)
        stats.update(model.forward_taps(x)[1], clip.stages(x))
    return select_matches(stats, selection, stitch_ridge=1e-3 if stitch else None)


def test_gradient_reaches_standalone_model_and_clip_stays_frozen(tiny_clip):
    model = StandaloneModel("resnet10t", 2)
    matching = _real_matching(model, tiny_clip)
    for mode in ("swap", "stitch"):
        m = _real_matching(model, tiny_clip, stitch=("layer2", "layer3", "layer4")) if mode == "stitch" else matching
        graft = GraftedCLIP(tiny_clip, m, ["layer2", "layer3", "layer4"], mode=mode)
        graft.train()
        assert not tiny_clip.training and not tiny_clip.visual.training
        model.zero_grad()
        x = torch.rand(4, 3, 32, 32)
        _, taps = model.forward_taps(x)
        emb = graft(x, taps)
        emb.sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), mode
        assert all(p.grad is None for p in tiny_clip.parameters())


def test_swap_rescales_to_clip_statistics(tiny_clip):
    """With only layer4 grafted, the layer4 map fed to attnpool is the rescaled standalone map."""
    model = StandaloneModel("resnet10t", 2).eval()
    matching = _real_matching(model, tiny_clip)
    graft = GraftedCLIP(tiny_clip, matching, ["layer4"], unmatched="mean")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        _, taps = model.forward_taps(x)
        out = graft._replace("layer4", None, taps)
        st = matching.stages["layer4"]
        j = 0
        tap = matching.taps[int(st.tap[j])]
        src = taps[tap][:, int(st.channel[j])]
        z = (src - matching.s_mean[tap][st.channel[j]]) / matching.s_std[tap][st.channel[j]]
        z = F.interpolate(z[:, None], size=out.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        expect = z * matching.c_std["layer4"][j] + matching.c_mean["layer4"][j]
    assert torch.allclose(out[:, j], expect, atol=1e-5)
    assert graft.start == "layer4"  # CLIP before layer4 cannot reach the embedding and is skipped


@pytest.mark.parametrize("selection", ["paper", "mutual"])
def test_random_control_keeps_counts_per_stage(tiny_clip, selection):
    """The control swaps as many CLIP channels per stage as the matching, at random positions, each fed a valid
    channel of a tap the matching uses. Under ``paper`` every CLIP channel is matched, so the count alone says
    nothing: the ``mutual`` case, where most CLIP channels stay unmatched, is the one where a wrong count shows."""
    model = StandaloneModel("resnet10t", 2)
    m = _real_matching(model, tiny_clip, selection=selection)
    r = random_matching(m, model.tap_channels, torch.Generator().manual_seed(0))
    n = {c: s.tap.shape[0] for c, s in m.stages.items()}
    counts = {c: int(s.matched.sum()) for c, s in m.stages.items()}
    if selection == "paper":
        assert counts == n  # the paper: each CLIP channel takes its best standalone channel
    else:
        assert all(0 < k < n[c] for c, k in counts.items() if k) and 0 < sum(counts.values()) < sum(n.values())
    used = {int(t) for s in m.stages.values() for t in s.tap[s.matched]}
    for c in m.stages:
        mine = r.stages[c]
        assert int(mine.matched.sum()) == counts[c], c
        assert {int(t) for t in mine.tap[mine.matched]} <= used, c
        for t, ch in zip(mine.tap[mine.matched].tolist(), mine.channel[mine.matched].tolist()):
            assert 0 <= ch < model.tap_channels[m.taps[t]], (c, t, ch)
        assert bool((mine.channel[~mine.matched] == -1).all()), c
    assert any(not torch.equal(r.stages[c].channel, m.stages[c].channel) for c in m.stages)
    if selection == "mutual":  # the swapped positions themselves are drawn, not copied from the matching
        assert any(not torch.equal(r.stages[c].matched, m.stages[c].matched) for c in m.stages if counts[c])


def test_recipe_graft_defaults():
    r = Recipe()
    assert r.graft.mode == "swap" and r.graft.stages == ["layer2", "layer3", "layer4"] and r.graft.unmatched == "mean"


def test_explain_reuses_plain_clip_embeddings_without_changing_the_result(tiny_clip):
    import json

    from debias.concepts import ConceptSet
    from debias.data.splits import Split
    from debias.explain import explain_model

    torch.manual_seed(0)
    model = StandaloneModel("resnet10t", 2).eval()
    split = Split("probe", torch.rand(24, 3, 32, 32), torch.arange(24) % 2, (torch.arange(24) // 2) % 2,
                  ["five", "eight"], ["red", "green"])
    concepts = [ConceptSet("digit", ["a five", "an eight"], "label", "core"),
                ConceptSet("color", ["a red digit", "a green digit"], "attr", "spurious")]
    matching, recipe = _real_matching(model, tiny_clip), Recipe()
    args = (model, tiny_clip, matching, recipe, split, concepts, torch.device("cpu"))
    plain = explain_model(*args, progress=False, control_draws=2)
    cache: dict = {}
    first = explain_model(*args, progress=False, control_draws=2, clip_cache=cache)
    again = explain_model(*args, progress=False, control_draws=2, clip_cache=cache)
    same = [json.dumps(r, sort_keys=True) for r in (plain, first, again)]  # NaN-safe equality
    assert same[0] == same[1] == same[2]
    (key, emb), = cache.items()
    assert torch.allclose(emb, tiny_clip.encode_image(split.images), atol=1e-6)
    cache[key] = torch.randn_like(emb)  # what is cached is what is used (plain CLIP's zero-shot reading)
    assert explain_model(*args, progress=False, control_draws=0, clip_cache=cache)["clip_accuracy"] != \
        plain["clip_accuracy"]
    # a split re-drawn for a new epoch (the training split as the probe) is encoded again
    redrawn = torch.rand(24, 3, 32, 32)
    split.render = lambda epoch: (redrawn, split.labels, split.attrs)
    split.set_epoch(1)
    fresh = explain_model(*args, progress=False, control_draws=0)
    assert json.dumps(explain_model(*args, progress=False, control_draws=0, clip_cache=cache), sort_keys=True) == \
        json.dumps(fresh, sort_keys=True)
