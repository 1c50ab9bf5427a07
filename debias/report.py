"""Plots people would rather look at than read: concept scores against the control."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> None:
    from .io import atomic_write_bytes
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_concept_scores(explanation: dict, path: str | Path, title: str = "") -> None:
    """Bars: each concept's score for the real matching and the random-matching control (with its std)."""
    names = list(explanation["scores"])
    scores = [explanation["scores"][n] for n in names]
    control = [explanation["control"].get(n, float("nan")) for n in names]
    err = [explanation.get("control_std", {}).get(n, 0.0) for n in names]
    roles = explanation.get("roles", {})
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(names), 3.4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], scores, width=0.4, label="matched graft", color="#3b6ea8")
    ax.bar([x + 0.2 for x in xs], control, width=0.4, yerr=err, capsize=3, label="random matching (control)",
           color="#bbbbbb")
    ax.set_xticks(list(xs), [f"{n}\n({roles.get(n, '')})" for n in names])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("concept score\n(0 = chance, 1 = plain CLIP)")
    ax.set_title(f"{title}\ndominant: {explanation['dominant_concept']}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)
