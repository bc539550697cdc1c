"""Training curves as one PNG of small panels (curves.png in the run directory), drawn with matplotlib.

matplotlib is optional (the `plots` extra: pip install 'minigrpo[plots]'); it is imported only when a
plot is drawn, through its Agg canvas (no pyplot, no GUI, no global backend switch). Without it a run
still writes metrics.jsonl (and TensorBoard when on); MetricsLogger prints PLOTS_OFF once instead.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from minigrpo.atomic import write_atomic

PLOTS_OFF = (
    "plots are off: matplotlib is not installed (pip install matplotlib, or pip install 'minigrpo[plots]'); "
    "metrics.jsonl (and TensorBoard when on) still record every step"
)
PANEL_HEIGHT = 300  # pixels per row of panels when no height is given
TITLE_HEIGHT = 40  # pixels above the panels for the figure title
DPI = 100
# text drawn as written: matplotlib reads a pair of "$" as math, so a run named "lr$1e-5$" lost its dollars
# and one named "x$_$y" failed to draw (a ValueError from the math parser: no curves.png for the run)
LITERAL = {"parse_math": False}


@dataclass
class Panel:
    """One sub-plot: a title and named series {name: (x steps, y values)}; NaN/None/inf y values are gaps.
    include_zero extends the y axis to 0 (for counts and fractions, where the distance to 0 matters)."""

    title: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    include_zero: bool = False


# the largest magnitude drawn as it is: a span of values near 1.8e308 (the float limit) overflows tick placement
DRAWABLE = 1e300


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (it is then imported, which takes a moment once)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of the panel grid: up to 3 columns; 2 and 4 panels sit in 2 columns."""
    n = max(n, 1)
    cols = 1 if n == 1 else 2 if n in (2, 4) else 3
    return math.ceil(n / cols), cols


def _series(name: str, xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """x and y as float arrays with every non-finite y (None, NaN, inf) turned into NaN (a gap), and finite
    values held within +-DRAWABLE (matplotlib cannot place ticks on a range near the float limit)."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray([math.nan if v is None else v for v in ys], dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"series {name!r}: x {x.shape} and y {y.shape} must be equal 1-D shapes")
    return x, np.where(np.isfinite(y), np.clip(y, -DRAWABLE, DRAWABLE), np.nan)


def _draw_panel(ax, panel: Panel) -> None:
    """Title, one line per series (a finite point between gaps gets a dot), legend, grid; x ticks on whole
    numbers (x is a step: no "step 1.5", and a one-step run gets one tick, not 0.96 ... 1.04). Titles and
    series names are drawn as written (see LITERAL)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(panel.title, fontsize="medium", **LITERAL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn, x_drawn = False, []
    for i, (name, (xs, ys)) in enumerate(panel.series.items()):
        x, y = _series(name, xs, ys)
        color = f"C{i % 10}"
        ax.plot(x, y, color=color, linewidth=1.5, label=name)
        ok = np.isfinite(x) & np.isfinite(y)
        lone = ok & ~np.r_[False, ok[:-1]] & ~np.r_[ok[1:], False]  # no finite neighbour: a line shows nothing
        if lone.any():
            ax.plot(x[lone], y[lone], "o", color=color, markersize=3)
        drawn = drawn or bool(ok.any())
        x_drawn += x[ok].tolist()
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.4")
        return
    if min(x_drawn) == max(x_drawn):  # one step: a step either side, not matplotlib's +-4% (fractional ticks)
        ax.set_xlim(x_drawn[0] - 1, x_drawn[0] + 1)
    if panel.include_zero:
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.0), max(hi, 0.0))
    ax.grid(True, alpha=0.3)
    for text in ax.legend(fontsize="x-small", loc="best").get_texts():
        text.set_parse_math(False)


def draw_figure(panels: list[Panel], *, title: str | None = None, width: int = 1200, height: int | None = None):
    """A matplotlib Figure (on an Agg canvas) of the panels laid out in a grid (see grid_shape),
    `width` x `height` pixels. height=None gives every row of panels PANEL_HEIGHT pixels (plus
    TITLE_HEIGHT for a title)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = grid_shape(len(panels))
    if height is None:
        height = rows * PANEL_HEIGHT + (TITLE_HEIGHT if title else 0)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, **LITERAL)
    for i, panel in enumerate(panels):
        _draw_panel(fig.add_subplot(rows, cols, i + 1), panel)
    return fig


def render_png(panels: list[Panel], *, title: str | None = None, width: int = 1200, height: int | None = None) -> bytes:
    """PNG bytes of `draw_figure(panels, ...)`."""
    buffer = io.BytesIO()
    draw_figure(panels, title=title, width=width, height=height).savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def write_line_plots(
    path: str | os.PathLike,
    panels: list[Panel],
    *,
    title: str | None = None,
    width: int = 1200,
    height: int | None = None,
) -> None:
    """Draw `panels` (see render_png) into the PNG file `path`, atomically: a reader never sees a
    half-written file (minigrpo.atomic). ImportError (saying how to install it) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(PLOTS_OFF) from e
    write_atomic(path, render_png(panels, title=title, width=width, height=height))
