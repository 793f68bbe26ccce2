"""Figures without pyplot: standalone matplotlib figures saved as PNG and SVG, and the alpha heatmap.

No backend is chosen and no global figure list is kept, so drawing changes
nothing in the process of a user who also uses matplotlib.
"""

import io

import numpy as np
from matplotlib.figure import Figure

FORMATS = ("png", "svg")


def subplots(*args, figsize=None, **kwargs):
    """``pyplot.subplots`` without pyplot: a standalone Figure (no backend chosen, no global figure list)."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*args, **kwargs)


def save(figure, base):
    paths = []
    for extension in FORMATS:
        path = f"{base}.{extension}"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        paths.append(path)
    return paths


def figure_png(figure):
    """The figure as PNG bytes (for TensorBoard images)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return buffer.getvalue()


def heatmap_figure(probabilities, operations, labels, title):
    probabilities = np.asarray(probabilities)
    figure, axes = subplots(figsize=(1.2 + 0.9 * len(operations), 0.8 + 0.28 * len(labels)))
    # The colour scale spans the values shown: early alphas all lie near 1/|ops|.
    image = axes.imshow(probabilities, aspect="auto", cmap="viridis", vmin=float(probabilities.min()),
                        vmax=float(probabilities.max()))
    axes.set_xticks(range(len(operations)), operations, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes)
    return figure
