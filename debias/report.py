"""Plots people would rather look at than read: decision alignment per concept against the random-matching control."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Y_LABEL = "decision alignment\nNMI(CNN's prediction, caption read)\n0 = independent, 1 = one decides the other"


def _save(fig, path: str | Path) -> None:
    from .io import atomic_write_bytes
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _finite(v) -> float:
    return float(v) if v is not None and v == v else float("nan")


def control_range(explanation: dict, name: str) -> tuple[float, float, float]:
    """The control of one concept as plotted: mean and the range its random draws spanned (``control_min``,
    ``control_max``); for an explanation without them, mean ± std clipped to [0, 1], where an alignment lies."""
    mean = _finite(explanation["control"].get(name))
    lo, hi = explanation.get("control_min", {}).get(name), explanation.get("control_max", {}).get(name)
    if lo is None or hi is None:
        std = _finite(explanation.get("control_std", {}).get(name, 0.0))
        std = 0.0 if std != std else std
        lo, hi = mean - std, mean + std
    return mean, min(max(_finite(lo), 0.0), 1.0), min(max(_finite(hi), 0.0), 1.0)


def concept_figure(explanation: dict, title: str = ""):
    """Per concept: the decision alignment through the graft (the verdict's score), the same read by plain CLIP on
    the image (where present), and the random-matching control as a point (mean) with the range of its draws."""
    names = list(explanation["scores"])
    roles = explanation.get("roles", {})
    clip = explanation.get("clip_scores") or explanation.get("clip_alignment") or {}
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(names), 3.6))
    xs = list(range(len(names)))
    width = 0.27 if clip else 0.4
    ax.bar([x - width for x in xs] if clip else [x - 0.2 for x in xs],
           [_finite(explanation["scores"][n]) for n in names], width=width, label="graft (matched)", color="#3b6ea8")
    if clip:
        ax.bar(xs, [_finite(clip.get(n)) for n in names], width=width, label="plain CLIP on the image",
               color="#8fb5dd")
    cx = [x + width for x in xs] if clip else [x + 0.2 for x in xs]
    for i, (x, n) in enumerate(zip(cx, names)):
        mean, lo, hi = control_range(explanation, n)
        ax.vlines(x, lo, hi, color="#777777", linewidth=2)
        ax.plot([x], [mean], "o", color="#444444",
                label=f"random matching ({explanation.get('control_draws', '?')} draws: mean, range)" if i == 0
                else None)
    ax.set_xticks(xs, [f"{n}\n({roles.get(n, '')})" for n in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(Y_LABEL, fontsize=8)
    basis = explanation.get("verdict_basis", "")
    ax.set_title(f"{title}\ndominant: {explanation['dominant_concept']}" + (f" ({basis})" if basis else ""),
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_concept_scores(explanation: dict, path: str | Path, title: str = "") -> None:
    _save(concept_figure(explanation, title), path)
