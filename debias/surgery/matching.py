"""Matching: streaming Pearson correlations between standalone taps and CLIP stages over a probe set.

For every pair (standalone tap, CLIP stage) both activation maps are resized (bilinear) to the larger of the
two grids, and every (image, position) is one sample. Only sums are kept (per channel: sum, sum of squares;
per pair: the cross-product matrix), so memory does not grow with the number of probe images and the
statistics of several processes add up (``all_reduce``). The resized map is never built: bilinear resizing is
a linear map ``R(y) = Wh y Ww^T`` whose rows sum to one, so the pair's sums on the larger grid follow from the
smaller map on its own grid (``sum R(y) = sum (R^T 1) y``, ``sum R(y)^2 = sum y (Wh^T Wh) y (Ww^T Ww)``, and the
cross products ``sum x R(y) = sum R^T(x) y``, the larger map projected down by the adjoint): a deep tap against an
early stage costs its small grid, not the large one (``pair_sums = "resize"`` builds the resized maps, the
reference the benchmark compares with). Per-channel mean and std on each tap's own grid are
kept for the graft's rescaling, and, for the ``stitch`` graft, the normal equations of a ridge regression from
all standalone taps to each CLIP stage.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import DebiasError


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize. A map larger than 1x1 is resized in channels-last layout: the same values as the default
    layout (the same four-tap sum per output), several times faster on CPU, and ``_flat`` of it is a view."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-1] * x.shape[-2] > 1:
        x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) samples, float32."""
    return x.float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])


_Memo = dict[tuple, tuple[torch.Tensor, ...]]


def _axis_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): the weights of ``F.interpolate``'s bilinear resize (``align_corners=False``) along one axis;
    row i says how much each input position gives output position i (every row sums to one)."""
    eye = torch.eye(n_in, dtype=torch.float32).reshape(n_in, 1, n_in, 1)
    return F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T.contiguous()


@functools.lru_cache(maxsize=64)
def _resize_weights(src: tuple[int, int], dst: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(wh, ww)`` with ``R(y) = wh @ y @ ww.T`` the bilinear resize from grid ``src`` to ``dst``, then ``R^T 1``
    (the weight of each source position in the resized map's sum) and the Gram factors ``wh.T @ wh``,
    ``ww.T @ ww`` (a resized map's sum of squares). Cached: a model's grids are the same for every batch (the
    tensors are only read)."""
    wh, ww = _axis_weights(src[0], dst[0]).to(device), _axis_weights(src[1], dst[1]).to(device)
    return wh, ww, torch.outer(wh.sum(0), ww.sum(0)), wh.T @ wh, ww.T @ ww


def _grid(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    return (a.shape[-2], a.shape[-1]) if a.shape[-2] * a.shape[-1] >= b.shape[-2] * b.shape[-1] else (b.shape[-2], b.shape[-1])


class _Moments:
    """Running first and second moments of the columns of sample matrices, shifted for numerical stability."""

    def __init__(self, channels: int):
        self.n = torch.zeros((), dtype=torch.float64)
        self.shift: torch.Tensor | None = None
        self.s = torch.zeros(channels, dtype=torch.float64)
        self.ss = torch.zeros(channels, dtype=torch.float64)

    def update(self, x: torch.Tensor, memo: _Memo | None = None, key=None) -> torch.Tensor:
        """Add the samples ``x`` (N, C); returns them centred by the shift.

        ``memo``: moments fed the same samples (same ``key``) with an equal shift share one centring and one sum
        (a tap is paired with several CLIP stages on the same grid)."""
        if self.shift is None:
            self.shift = x.mean(0).detach().to(torch.float32)

        def centred_sums() -> tuple[torch.Tensor, ...]:
            xc = x - self.shift.to(x.device)
            return xc, xc.sum(0).double(), (xc * xc).sum(0).double()

        return self._add(x.shape[0], centred_sums, memo, key)

    def update_resized(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], memo: _Memo | None = None,
                       key=None) -> torch.Tensor:
        """Add the samples of ``x`` (N, C, h, w) resized to a larger grid by ``weights`` (``_resize_weights``),
        without building the resized maps; returns ``x`` centred by the shift, on its own grid (centring commutes
        with the resize: its rows sum to one)."""
        wh, ww, wsum, gh, gw = weights
        count = x.shape[0] * wh.shape[0] * ww.shape[0]
        if self.shift is None:
            self.shift = ((x * wsum).sum((0, 2, 3)) / count).detach().to(torch.float32)

        def centred_sums() -> tuple[torch.Tensor, ...]:
            xc = x - self.shift.to(x.device).view(1, -1, 1, 1)
            return xc, (xc * wsum).sum((0, 2, 3)).double(), ((gh @ xc @ gw) * xc).sum((0, 2, 3)).double()

        return self._add(count, centred_sums, memo, key)

    def _add(self, count: int, centred_sums: Callable[[], tuple[torch.Tensor, ...]], memo: _Memo | None,
             key) -> torch.Tensor:
        """Add ``count`` samples whose centred values and sums ``centred_sums()`` gives, or the memo's, when moments
        with an equal shift were fed the same samples (same ``key``); returns the centred values."""
        hit = memo.get(key) if memo is not None else None
        if hit is not None and torch.equal(hit[0], self.shift):
            xc, s, ss = hit[1:]
        else:
            xc, s, ss = centred_sums()
            if memo is not None:
                memo[key] = (self.shift, xc, s, ss)
        self.n = self.n.to(xc.device) + count
        self.s = self.s.to(xc.device) + s
        self.ss = self.ss.to(xc.device) + ss
        return xc

    def mean(self) -> torch.Tensor:
        return self.s / self.n + self.shift.double().to(self.s.device)

    def var(self) -> torch.Tensor:
        return (self.ss / self.n - (self.s / self.n) ** 2).clamp_min(0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.n, self.s, self.ss]

    def shift_tensor(self, device: torch.device) -> torch.Tensor:
        """The shift, allocated as zeros (on ``device``) if no batch has set it yet: a buffer to broadcast into."""
        if self.shift is None:
            self.shift = torch.zeros(self.s.shape[0], dtype=torch.float32, device=device)
        return self.shift


class MatchingStats:
    """Streaming statistics for matching ``standalone`` taps to ``clip`` stages (dicts name -> channels)."""

    def __init__(self, standalone: dict[str, int], clip: dict[str, int], stitch_stages: tuple[str, ...] = (),
                 pair_sums: str = "adjoint"):
        if pair_sums not in ("adjoint", "resize"):
            raise DebiasError(f"pair_sums = {pair_sums!r}: expected 'adjoint' or 'resize'")
        self.pair_sums = pair_sums
        self.standalone = dict(standalone)
        self.clip = dict(clip)
        self.stitch_stages = tuple(stitch_stages)
        self.native = {("s", k): _Moments(c) for k, c in standalone.items()}
        self.native.update({("c", k): _Moments(c) for k, c in clip.items()})
        self.pair_x: dict[tuple[str, str], _Moments] = {}
        self.pair_y: dict[tuple[str, str], _Moments] = {}
        self.pair_xy: dict[tuple[str, str], torch.Tensor] = {}
        for s, cs in standalone.items():
            for c, cc in clip.items():
                self.pair_x[s, c] = _Moments(cs)
                self.pair_y[s, c] = _Moments(cc)
                self.pair_xy[s, c] = torch.zeros(cs, cc, dtype=torch.float64)
        total = sum(standalone.values())
        self.stitch_x = {c: _Moments(total) for c in self.stitch_stages}
        self.stitch_y = {c: _Moments(clip[c]) for c in self.stitch_stages}
        self.stitch_xx = {c: torch.zeros(total, total, dtype=torch.float64) for c in self.stitch_stages}
        self.stitch_xy = {c: torch.zeros(total, clip[c], dtype=torch.float64) for c in self.stitch_stages}
        self.num_images = 0

    @torch.no_grad()
    def update(self, s_taps: dict[str, torch.Tensor], c_taps: dict[str, torch.Tensor]) -> None:
        self.num_images += next(iter(s_taps.values())).shape[0]
        # a map resized to a given grid, and its moments, are computed once per batch however many pairs use it
        flats: dict[tuple[str, str, tuple[int, int]], torch.Tensor] = {}
        memo: _Memo = {}

        def feed(moments: _Moments, side: str, name: str, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            key = (side, name, tuple(size))
            if key not in flats:
                flats[key] = _flat(_resize(x.float(), size))
            return moments.update(flats[key], memo, key)

        for s in self.standalone:
            feed(self.native["s", s], "s", s, s_taps[s], tuple(s_taps[s].shape[-2:]))
        for c in self.clip:
            feed(self.native["c", c], "c", c, c_taps[c], tuple(c_taps[c].shape[-2:]))

        def smaller(moments: _Moments, side: str, name: str, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            """The map on the smaller grid of a pair, centred, as samples (N*h*w, C) of its own grid."""
            weights = _resize_weights(tuple(x.shape[-2:]), size, x.device)
            return _flat(moments.update_resized(x.float(), weights, memo, (side, name, size, "resized")))

        def projected(xc: torch.Tensor, shape: torch.Size, grid: tuple[int, int]) -> torch.Tensor:
            """Centred samples ``xc`` (N*H*W, C) of a map on the larger grid, projected by the resize's adjoint
            onto the smaller ``grid``: (N*h*w, C)."""
            n, ch, h, w = shape
            wh, ww = _resize_weights(grid, (h, w), xc.device)[:2]
            return _flat(wh.T @ xc.view(n, h, w, ch).permute(0, 3, 1, 2) @ ww)

        for s in self.standalone:
            for c in self.clip:
                size = _grid(s_taps[s], c_taps[c])
                s_grid, c_grid = tuple(s_taps[s].shape[-2:]), tuple(c_taps[c].shape[-2:])
                if self.pair_sums == "resize" or s_grid == c_grid:
                    x = feed(self.pair_x[s, c], "s", s, s_taps[s], size)
                    y = feed(self.pair_y[s, c], "c", c, c_taps[c], size)
                elif s_grid == size:  # the CLIP stage is resized up to the tap's grid
                    y = smaller(self.pair_y[s, c], "c", c, c_taps[c], size)
                    x = feed(self.pair_x[s, c], "s", s, s_taps[s], size)
                    x = projected(x, s_taps[s].shape, c_grid)
                else:  # the tap is resized up to the CLIP stage's grid
                    x = smaller(self.pair_x[s, c], "s", s, s_taps[s], size)
                    y = feed(self.pair_y[s, c], "c", c, c_taps[c], size)
                    y = projected(y, c_taps[c].shape, s_grid)
                self.pair_xy[s, c] = self.pair_xy[s, c].to(x.device) + (x.T @ y).double()
        for c in self.stitch_stages:
            size = tuple(c_taps[c].shape[-2:])
            x = torch.cat([_flat(_resize(s_taps[s].float(), size)) for s in self.standalone], 1)
            x = self.stitch_x[c].update(x)
            y = self.stitch_y[c].update(_flat(c_taps[c]))
            self.stitch_xx[c] = self.stitch_xx[c].to(x.device) + (x.T @ x).double()
            self.stitch_xy[c] = self.stitch_xy[c].to(x.device) + (x.T @ y).double()

    def _moments(self) -> list[_Moments]:
        return (list(self.native.values()) + list(self.pair_x.values()) + list(self.pair_y.values())
                + [self.stitch_x[c] for c in self.stitch_stages] + [self.stitch_y[c] for c in self.stitch_stages])

    def sync_shifts(self, broadcast: Callable[[list[torch.Tensor]], None], device: torch.device) -> None:
        """Make every process use rank 0's shifts before it accumulates anything.

        Each moment is shifted by the mean of the first batch it saw, so sums from processes that streamed
        different images only add up once the shifts agree. Protocol: rank 0 updates with its first batch, then
        every rank calls this (``broadcast`` overwrites tensors in place with rank 0's values), then the other
        ranks update with their batches.
        """
        broadcast([m.shift_tensor(device) for m in self._moments()])

    def all_reduce(self, all_reduce_: Callable[[list[torch.Tensor]], None]) -> None:
        """Sum the statistics of all processes in place (``all_reduce_`` sums a list of tensors over ranks)."""
        count = torch.tensor(float(self.num_images), dtype=torch.float64)
        all_reduce_([count] + self.tensors()[1:])
        self.num_images = int(count.item())

    def tensors(self) -> list[torch.Tensor]:
        """Every summed tensor, for ``all_reduce`` across processes (shifts must agree: see ``sync_shifts``)."""
        out: list[torch.Tensor] = [torch.tensor(float(self.num_images), dtype=torch.float64)]
        for m in list(self.native.values()) + list(self.pair_x.values()) + list(self.pair_y.values()):
            out += m.tensors()
        out += list(self.pair_xy.values())
        for c in self.stitch_stages:
            out += self.stitch_x[c].tensors() + self.stitch_y[c].tensors() + [self.stitch_xx[c], self.stitch_xy[c]]
        return out

    def correlation(self, s: str, c: str) -> torch.Tensor:
        """Pearson correlation (Cs, Cc) between the channels of tap ``s`` and stage ``c``; constant channels get 0."""
        mx, my = self.pair_x[s, c], self.pair_y[s, c]
        n = mx.n
        cov = self.pair_xy[s, c] / n - torch.outer(mx.s / n, my.s / n)
        sx, sy = mx.var().sqrt(), my.var().sqrt()
        corr = cov / torch.outer(sx, sy).clamp_min(1e-12)
        corr[(sx < 1e-8)] = 0
        corr[:, (sy < 1e-8)] = 0
        return corr.clamp(-1, 1).float()

    def native_stats(self, side: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.native[side, name]
        return m.mean().float(), m.var().sqrt().float().clamp_min(1e-6)

    def stitch_solution(self, c: str, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form ridge map from all standalone taps (resized to ``c``'s grid) to stage ``c``: W (Cc, Cs), b."""
        mx, my = self.stitch_x[c], self.stitch_y[c]
        n = mx.n
        mean_x, mean_y = mx.s / n, my.s / n
        cxx = self.stitch_xx[c] / n - torch.outer(mean_x, mean_x)
        cxy = self.stitch_xy[c] / n - torch.outer(mean_x, mean_y)
        scale = cxx.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device)
        w = torch.linalg.solve(cxx + ridge * scale * eye, cxy)  # (Cs, Cc)
        mux = mean_x + mx.shift.double().to(mean_x.device)
        muy = mean_y + my.shift.double().to(mean_y.device)
        b = muy - mux @ w
        return w.T.float().contiguous(), b.float()


@dataclass
class StageMatch:
    """For each CLIP channel of one stage: the matched standalone tap (index into ``taps``; -1 = unmatched),
    channel and correlation."""

    tap: torch.Tensor
    channel: torch.Tensor
    corr: torch.Tensor

    @property
    def matched(self) -> torch.Tensor:
        return self.tap >= 0

    def fraction(self) -> float:
        return float(self.matched.float().mean())


@dataclass
class Matching:
    """The selected pairs plus the statistics the graft rescales with."""

    taps: list[str]
    stages: dict[str, StageMatch]
    s_mean: dict[str, torch.Tensor]
    s_std: dict[str, torch.Tensor]
    c_mean: dict[str, torch.Tensor]
    c_std: dict[str, torch.Tensor]
    selection: str = "paper"
    stitch: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per CLIP stage: fraction of channels swapped, mean and median matched correlation, distinct sources."""
        out = {}
        for c, m in self.stages.items():
            r = m.corr[m.matched]
            distinct = len({(int(t), int(ch)) for t, ch in zip(m.tap[m.matched], m.channel[m.matched])})
            out[c] = {"fraction_swapped": m.fraction(), "matched": int(m.matched.sum()),
                      "corr_mean": float(r.mean()) if len(r) else 0.0,
                      "corr_median": float(r.median()) if len(r) else 0.0,
                      "distinct_standalone_channels": distinct}
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-friendly) of everything needed to rebuild the graft."""
        sd: dict[str, torch.Tensor] = {}
        for c, m in self.stages.items():
            sd[f"stage.{c}.tap"], sd[f"stage.{c}.channel"], sd[f"stage.{c}.corr"] = m.tap, m.channel, m.corr
        for k, v in self.s_mean.items():
            sd[f"s_mean.{k}"], sd[f"s_std.{k}"] = v, self.s_std[k]
        for k, v in self.c_mean.items():
            sd[f"c_mean.{k}"], sd[f"c_std.{k}"] = v, self.c_std[k]
        for c, (w, b) in self.stitch.items():
            sd[f"stitch.{c}.w"], sd[f"stitch.{c}.b"] = w, b
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], taps: list[str], selection: str) -> "Matching":
        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

        stage_names = sorted({k.split(".")[1] for k in sd if k.startswith("stage.")})
        stages = {c: StageMatch(sd[f"stage.{c}.tap"], sd[f"stage.{c}.channel"], sd[f"stage.{c}.corr"])
                  for c in stage_names}
        stitch_names = sorted({k.split(".")[1] for k in sd if k.startswith("stitch.")})
        stitch = {c: (sd[f"stitch.{c}.w"], sd[f"stitch.{c}.b"]) for c in stitch_names}
        return cls(taps, stages, group("s_mean."), group("s_std."), group("c_mean."), group("c_std."), selection,
                   stitch)


def select_matches(stats: MatchingStats, selection: str = "paper", threshold: float = 0.0,
                   taps: list[str] | None = None, stages: list[str] | None = None,
                   stitch_ridge: float | None = None) -> Matching:
    """Pick standalone channels for CLIP channels.

    ``paper``: each CLIP channel takes its best standalone channel over all candidate taps (many to one, no
    threshold), as in the paper. ``mutual``: a pair is kept only when each is the other's best (the standalone
    channel's best over the channels of all ``stages``) and the correlation is at least ``threshold``.
    """
    taps = list(taps or stats.standalone)
    for t in taps:
        if t not in stats.standalone:
            raise DebiasError(f"matching.standalone_taps: {t!r} is not a tap of this model; taps: {list(stats.standalone)}")
    stages = list(stages or stats.clip)
    corr = {(s, c): stats.correlation(s, c) for s in taps for c in stages}
    best: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for c in stages:
        per_tap = torch.stack([corr[s, c].max(0).values for s in taps])  # (T, Cc)
        per_tap_idx = torch.stack([corr[s, c].argmax(0) for s in taps])
        val, tap = per_tap.max(0)
        chan = per_tap_idx.gather(0, tap.unsqueeze(0)).squeeze(0)
        best[c] = (tap, chan, val)
    result: dict[str, StageMatch] = {}
    if selection == "paper":
        result = {c: StageMatch(t, ch, v) for c, (t, ch, v) in best.items()}
    elif selection == "mutual":
        # each standalone channel's best CLIP channel over all stages
        s_best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for s in taps:
            vals = torch.cat([corr[s, c] for c in stages], 1)  # (Cs, sum Cc)
            s_best[s] = vals.argmax(1), vals.max(1).values
        offsets, off = {}, 0
        for c in stages:
            offsets[c] = off
            off += stats.clip[c]
        for c in stages:
            t, ch, v = best[c]
            keep = torch.zeros_like(t, dtype=torch.bool)
            for j in range(len(t)):
                s = taps[int(t[j])]
                keep[j] = int(s_best[s][0][int(ch[j])]) == offsets[c] + j and float(v[j]) >= threshold
            result[c] = StageMatch(torch.where(keep, t, -1), torch.where(keep, ch, -1), torch.where(keep, v, 0.0))
    else:
        raise DebiasError(f"matching.selection = {selection!r}: expected 'paper' or 'mutual'")
    s_mean, s_std, c_mean, c_std = {}, {}, {}, {}
    for s in stats.standalone:
        s_mean[s], s_std[s] = stats.native_stats("s", s)
    for c in stats.clip:
        c_mean[c], c_std[c] = stats.native_stats("c", c)
    stitch = {}
    if stitch_ridge is not None:
        stitch = {c: stats.stitch_solution(c, stitch_ridge) for c in stats.stitch_stages}
    return Matching(list(stats.standalone), result, s_mean, s_std, c_mean, c_std, selection, stitch)


def random_matching(matching: Matching, channels: dict[str, int], gen: torch.Generator) -> Matching:
    """The control: per stage the same number of swapped CLIP channels, at random, each fed a random standalone
    channel from the same candidate taps. Rescaling statistics are kept."""
    used_taps = sorted({int(t) for m in matching.stages.values() for t in m.tap[m.matched]})
    if not used_taps:
        used_taps = list(range(len(matching.taps)))
    stages = {}
    for c, m in matching.stages.items():
        k = int(m.matched.sum())
        n = m.tap.shape[0]
        tap = torch.full((n,), -1, dtype=torch.long)
        chan = torch.full((n,), -1, dtype=torch.long)
        where = torch.randperm(n, generator=gen)[:k]
        pick = torch.tensor(used_taps)[torch.randint(len(used_taps), (k,), generator=gen)]
        tap[where] = pick
        chan[where] = torch.stack([torch.randint(channels[matching.taps[int(t)]], (1,), generator=gen)[0]
                                   for t in pick]) if k else chan[where]
        stages[c] = StageMatch(tap, chan, torch.zeros(n))
    return Matching(matching.taps, stages, matching.s_mean, matching.s_std, matching.c_mean, matching.c_std,
                    "random", matching.stitch)
