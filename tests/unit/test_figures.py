"""figures.save_png_pdf: the one way the package writes a figure (PNG and PDF), cropped like
matplotlib's own ``bbox_inches="tight"``, drawn once per file, the same bytes every time."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.figure
import matplotlib.pyplot as plt
import pytest
from PIL import Image

import subspace_sweep
from subspace_sweep.figures import save_png_pdf

PACKAGE_DIR = Path(subspace_sweep.__file__).parent


def _figure():
    """Two panels laid out by tight_layout (as every figure of the package is), a title and labels
    reaching past the axes, so that the crop matters."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for i, ax in enumerate(axes):
        ax.plot([1, 2, 3], [3, 1, 2 + i], "-o", label=f"curve {i}")
        ax.set_yticks([1, 2, 3], ["a long tick label", "b", "c"])
        ax.set_xlabel("x")
        ax.legend(loc="best")
    fig.suptitle("a title wider than the figure itself, so that the crop has to reach past its edge" * 2)
    fig.tight_layout()
    return fig


def test_the_crop_is_matplotlibs_tight_crop(tmp_path):
    """The PNG has the size of matplotlib's ``bbox_inches="tight"`` PNG at the same dpi (to a pixel
    of rounding), not the uncropped size."""
    save_png_pdf(_figure(), tmp_path / "a.png", tmp_path / "a.pdf", dpi=120)
    ours = Image.open(tmp_path / "a.png").size
    tight, plain = io.BytesIO(), io.BytesIO()
    fig = _figure()
    fig.savefig(tight, dpi=120, bbox_inches="tight")
    fig.savefig(plain, dpi=120)
    plt.close(fig)
    theirs, uncropped = Image.open(tight).size, Image.open(plain).size
    assert abs(ours[0] - theirs[0]) <= 2 and abs(ours[1] - theirs[1]) <= 2, (ours, theirs)
    assert ours[0] > uncropped[0] + 50, (ours, uncropped)  # the title reaches past the figure's edge
    assert (tmp_path / "a.pdf").read_bytes().startswith(b"%PDF")


def test_each_file_is_drawn_once(tmp_path, monkeypatch):
    """Two draws for the two files: no dry-run draw per save (bbox_inches="tight" or the layout
    engine tight_layout leaves behind would each add one)."""
    draws = []
    real = matplotlib.figure.Figure.draw

    def counted(self, renderer):
        draws.append(type(renderer).__name__)
        return real(self, renderer)

    monkeypatch.setattr(matplotlib.figure.Figure, "draw", counted)
    fig = _figure()
    save_png_pdf(fig, tmp_path / "a.png", tmp_path / "a.pdf", dpi=100)
    assert len(draws) == 2, draws
    assert not plt.fignum_exists(fig.number)  # closed


def test_the_same_figure_gives_the_same_bytes(tmp_path):
    for name in ("a", "b"):
        save_png_pdf(_figure(), tmp_path / f"{name}.png", tmp_path / f"{name}.pdf", dpi=100)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()  # no creation date


def test_a_failed_save_still_closes_the_figure(tmp_path):
    fig = _figure()
    with pytest.raises(OSError):
        save_png_pdf(fig, tmp_path / "missing" / "a.png", tmp_path / "missing" / "a.pdf", dpi=100)
    assert not plt.fignum_exists(fig.number)


def test_no_other_module_saves_a_figure():
    """One way to write a figure: savefig appears in figures.py only."""
    others = [f.name for f in sorted(PACKAGE_DIR.glob("*.py")) if f.name != "figures.py" and "savefig(" in f.read_text()]
    assert others == []
