"""Robustness curves: accuracy against ε from minimal perturbations (and the fixed-ε suite), one panel per norm,
one line per checkpoint (`evaluate`'s robustness_curve.png and the `compare` command)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robust_train.figures.base import DPI, figure_to_array, save_png

NORM_LABELS = {"linf": "ε (L∞)", "l2": "ε (L2)"}


def robustness_curve_figure(curves: dict[str, dict], path: str | Path | None = None) -> np.ndarray:
    """curves: {label: {norm: {"eps": [...], "accuracy": [...]}}} -> an RGB array (and a PNG at `path`)."""
    norms = sorted({norm for by_norm in curves.values() for norm in by_norm}, key=lambda n: (n != "linf", n))
    if not norms:
        raise ValueError("no robustness curve to draw: run a minimal-perturbation attack (deepfool, cw_l2, fmn)")
    fig = Figure(figsize=(4.2 * len(norms), 3.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(norms), squeeze=False)[0])
    for ax, norm in zip(axes, norms):
        for label, by_norm in curves.items():
            if norm in by_norm:
                curve = by_norm[norm]
                ax.step(curve["eps"], curve["accuracy"], where="post", label=label)
        ax.set_xlabel(NORM_LABELS.get(norm, norm))
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    array = figure_to_array(fig)
    if path is not None:
        save_png(fig, path)
    return array
