"""curves.png with titles and series names that matplotlib would read as math ("$...$")."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from minigrpo.plot import Panel, draw_figure, write_line_plots

MATH_LOOKING = ["x$_$y", "p$^$", "a$\\x$", "lr$1e-5$"]  # the first three fail to parse, the last loses its "$"


@pytest.mark.parametrize("text", MATH_LOOKING)
def test_titles_and_series_names_are_drawn_as_written(tmp_path, text):
    """A figure title, panel title or series name with a pair of "$" failed to draw (ValueError from the
    math parser) or was drawn as math; every one is now plain text, and the PNG is written."""
    panels = [Panel(text, {text: ([1, 2, 3], [0.5, 0.25, 1.0])})]
    fig = draw_figure(panels, title=text, width=400, height=300)
    ax = fig.axes[0]
    texts = [fig.get_suptitle(), ax.get_title(), *(t.get_text() for t in ax.get_legend().get_texts())]
    assert texts == [text, text, text]
    drawn = [fig._suptitle, ax.title, *ax.get_legend().get_texts()]
    assert [t._preprocess_math(t.get_text()) for t in drawn] == [(text, False)] * 3
    out = tmp_path / "curves.png"
    write_line_plots(out, panels, title=text, width=400, height=300)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_named_with_dollars_gets_its_curves(tmp_path, capsys):
    """python -m minigrpo.train with run.name "x$_$y": the curves' title is the run's name, so the run
    warned `writing curves.png failed` and left no curves.png; now it draws them."""
    from helpers.runs import launch, run_config

    cfg = run_config(tmp_path, train={"steps": 1}, log={"plots": True, "progress": False, "sample_every": 0})
    cfg["run"]["name"] = "x$_$y"
    assert [r["step"] for r in launch(tmp_path, cfg)] == [1]
    assert "curves.png failed" not in capsys.readouterr().err
    assert (tmp_path / "runs" / "x$_$y" / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("values", [[1.7e308, -1.7e308, 0.0], [1e308] * 3, [-1.7e308, 0.0, 1.0]])
def test_values_near_the_float_limit_are_drawn(tmp_path, values):
    """A diverged run's loss spanning +-1.7e308: matplotlib's tick placement overflowed (ValueError) and
    curves.png stopped updating for the rest of the run. Such values are drawn at +-1e300 (plot.DRAWABLE),
    every other value as it is."""
    from minigrpo.plot import DRAWABLE

    panels = [Panel("loss", {"loss": ([1, 2, 3], values), "reward": ([1, 2, 3], [0.5, 0.25, 1.0])})]
    out = tmp_path / "curves.png"
    write_line_plots(out, panels, width=400, height=300)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = draw_figure(panels, width=400, height=300).axes[0].get_lines()
    drawn = {line.get_label(): list(line.get_ydata()) for line in lines if not line.get_label().startswith("_")}
    assert drawn["loss"] == [max(-DRAWABLE, min(DRAWABLE, v)) for v in values]
    assert drawn["reward"] == [0.5, 0.25, 1.0]
