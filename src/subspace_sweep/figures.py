"""Saving a figure as PNG and PDF: the one way every figure of a run, a comparison and a study is
written (matplotlib's Agg backend, no display needed).

The tight bounding box is measured once and given to both saves: ``bbox_inches="tight"`` (or a
layout engine left on the figure) makes every save draw the figure twice, four draws for the pair
of files where two suffice (a run's five figures were most of its report's time on a small model).
The PDF's creation date is left out so that the same figure gives the same bytes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_png_pdf(fig, path_png: Path, path_pdf: Path, dpi: float) -> None:
    """Write ``fig`` to ``path_png`` (at ``dpi``) and ``path_pdf``, cropped to its tight bounding box
    plus matplotlib's ``savefig.pad_inches``, then close it."""
    try:
        fig.set_dpi(dpi)  # text is measured at the PNG's resolution (hinting makes widths depend on it)
        bbox = fig.get_tightbbox(fig.canvas.get_renderer()).padded(matplotlib.rcParams["savefig.pad_inches"])
        # tight_layout leaves a placeholder engine, and any engine makes every save draw once more
        # first; the subplots stay where the layout put them
        fig.set_layout_engine(None)
        fig.savefig(path_png, dpi=dpi, bbox_inches=bbox)
        fig.savefig(path_pdf, bbox_inches=bbox, metadata={"CreationDate": None})
    finally:
        plt.close(fig)
