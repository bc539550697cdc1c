"""curves.png through matplotlib: the file (PNG header, size), the panels and their series, the drawn
pixels, and the path without matplotlib."""

from __future__ import annotations

import builtins
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from minigrpo.plot import (
    PLOTS_OFF,
    Panel,
    draw_figure,
    grid_shape,
    matplotlib_available,
    render_png,
    write_line_plots,
)

needs_matplotlib = pytest.mark.skipif(not matplotlib_available(), reason="needs matplotlib (the plots extra)")

NAN = float("nan")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature and that IHDR comes first."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def decode(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of a PNG file."""
    from matplotlib.image import imread

    img = imread(path)  # (H, W, 4) float in [0, 1]
    return np.rint(img[..., :3] * 255).astype(np.int64)


def near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    """(H, W) mask of pixels within `tol` of a colour (lines are anti-aliased)."""
    return np.abs(img - np.array(rgb)).sum(axis=2) <= tol


BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1


@needs_matplotlib
def test_write_png_file_header_and_size(tmp_path: Path):
    panels = [
        Panel("reward", {"total": ([1, 2, 3], [0.1, 0.5, 0.4])}),
        Panel("kl", {"kl": ([1, 2, 3], [0, 1e-3, 2e-3])}),
    ]
    path = tmp_path / "curves.png"
    write_line_plots(path, panels, title="run: step 3/10", width=800, height=500)
    data = path.read_bytes()
    assert png_size(data) == (800, 500)
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the file is complete
    assert decode(path).shape == (500, 800, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no temp file left behind
    write_line_plots(path, panels[:1], width=300, height=200)  # redrawn in place
    assert png_size(path.read_bytes()) == (300, 200)


@needs_matplotlib
@pytest.mark.parametrize(("n", "shape"), [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)), (8, (3, 3))])
def test_grid_and_default_height(n, shape):
    assert grid_shape(n) == shape
    panels = [Panel(f"p{i}", {"y": ([0, 1], [0, i])}) for i in range(n)]
    assert png_size(render_png(panels)) == (1200, 300 * shape[0])
    assert png_size(render_png(panels, title="t", width=600)) == (600, 40 + 300 * shape[0])


@needs_matplotlib
def test_one_axes_per_panel_with_its_series():
    panels = [
        Panel("reward", {"total": ([1, 2, 3, 4], [0.5, None, math.inf, 0.7]), "correctness": ([1, 2], [1.0, 2.0])}),
        Panel("truncated", {"frac": ([1, 2, 3], [0.4, 0.5, 0.6])}, include_zero=True),
        Panel("loss", {"loss": ([1, 2, 3], [0.4, 0.5, 0.6])}),
    ]
    fig = draw_figure(panels, title="my run")
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["reward", "truncated", "loss"]
    assert fig.get_suptitle() == "my run"
    reward = axes[0]
    assert [t.get_text() for t in reward.get_legend().get_texts()] == ["total", "correctness"]
    total = reward.get_lines()[0]
    np.testing.assert_array_equal(total.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_array_equal(total.get_ydata(), [0.5, NAN, NAN, 0.7])  # None and inf are gaps
    assert axes[1].get_ylim()[0] == 0.0 < 0.4  # include_zero: the axis reaches down to 0
    assert axes[2].get_ylim()[0] > 0.3  # without it the axis hugs the data


@needs_matplotlib
def test_lone_points_get_a_dot_and_empty_panels_say_no_data():
    fig = draw_figure(
        [
            Panel("gaps", {"y": ([0, 1, 2, 3, 4], [1.0, NAN, 2.0, NAN, 3.0])}),
            Panel("empty", {"nan": ([0, 1], [NAN, NAN]), "none": ([], [])}),
        ]
    )
    gaps, empty = fig.get_axes()
    line, dots = gaps.get_lines()
    assert line.get_marker() == "None" and dots.get_marker() == "o"
    np.testing.assert_array_equal(dots.get_xdata(), [0, 2, 4])  # each finite point is between gaps
    assert [t.get_text() for t in empty.texts] == ["no data"] and empty.get_legend() is None


@needs_matplotlib
def test_rising_and_falling_curves_are_drawn(tmp_path: Path):
    x = list(range(21))
    panel = Panel("trend", {"up": (x, [0.1 * v for v in x]), "down": (x, [2.0 - 0.1 * v for v in x])})
    path = tmp_path / "curves.png"
    write_line_plots(path, [panel], width=600, height=400)
    img = decode(path)
    for color, rising in ((BLUE, True), (ORANGE, False)):
        rows, cols = np.nonzero(near(img, color))
        assert rows.size > 300, "the curve is drawn"
        left = rows[cols < np.percentile(cols, 15)].mean()
        right = rows[cols > np.percentile(cols, 85)].mean()
        # image rows grow downward: a rising curve ends higher (smaller row) on the right
        assert (right < left - 100) if rising else (right > left + 100), (left, right)


@needs_matplotlib
def test_bad_series_shapes_are_refused():
    with pytest.raises(ValueError, match=r"series 'a': x \(2,\) and y \(1,\) must be equal 1-D shapes"):
        render_png([Panel("bad", {"a": ([1, 2], [1])})])


def test_without_matplotlib(tmp_path: Path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert not matplotlib_available()
    with pytest.raises(ImportError) as e:
        write_line_plots(tmp_path / "curves.png", [Panel("p", {"a": ([0], [1.0])})])
    assert str(e.value) == PLOTS_OFF and "pip install matplotlib" in PLOTS_OFF and "minigrpo[plots]" in PLOTS_OFF
    assert not (tmp_path / "curves.png").exists()


@needs_matplotlib
@pytest.mark.parametrize(("steps", "ticks"), [([7], [6, 7, 8]), ([1, 2, 3], [1, 2, 3])])
def test_x_ticks_are_whole_steps(steps, ticks):
    """x is an optimizer step: one step or three get whole-number ticks (not 6.94 ... 7.06, nor 1.5)."""
    fig = draw_figure([Panel("loss", {"loss": (steps, [0.5] * len(steps))})])
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert [float(t) for t in ax.get_xticks() if lo <= t <= hi] == ticks
