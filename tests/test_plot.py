"""The PNG line-plot writer: a PNG decoder written here checks chunks, CRCs, filters and pixels."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from minigrpo.plot import (
    BG,
    GLYPH_H,
    PALETTE,
    Panel,
    draw_polyline,
    draw_text,
    encode_png,
    format_tick,
    nice_ticks,
    render_line_plots,
    write_line_plots,
)

NAN = float("nan")


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 of an 8-bit RGB, non-interlaced PNG; asserts every chunk CRC and filter byte."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(tag + body), f"bad CRC in {tag!r}"
        chunks.append((tag, body))
        pos += 12 + n
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    W, H, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = np.frombuffer(zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT")), np.uint8)
    assert raw.size == H * (1 + 3 * W)
    raw = raw.reshape(H, 1 + 3 * W)
    out = np.zeros((H, 3 * W), np.int64)
    prev = np.zeros(3 * W, np.int64)
    for r in range(H):
        f, line = raw[r, 0], raw[r, 1:].astype(np.int64)
        assert f in (0, 1, 2, 3, 4), f"row {r}: filter byte {f}"
        if f in (0, 2):
            cur = (line + (prev if f == 2 else 0)) % 256
        else:  # Sub / Average / Paeth need the reconstructed left neighbour: byte by byte
            cur = np.zeros_like(line)
            for i in range(3 * W):
                a = cur[i - 3] if i >= 3 else 0
                b, c = prev[i], prev[i - 3] if i >= 3 else 0
                if f == 1:
                    pred = a
                elif f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                cur[i] = (line[i] + pred) % 256
        out[r], prev = cur, cur
    return out.reshape(H, W, 3).astype(np.uint8)


def color_mask(img: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.all(img == np.array(color, np.uint8), axis=2)


def curve_pixels(img: np.ndarray, color, below: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of pixels of `color` below row `below` (skips the legend swatches)."""
    rows, cols = np.nonzero(color_mask(img, color))
    keep = rows > below
    return rows[keep], cols[keep]


def test_png_round_trip_exact(tmp_path: Path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    data = encode_png(img)
    assert struct.unpack(">II", data[16:24]) == (11, 7)  # IHDR width, height
    np.testing.assert_array_equal(decode_png(data), img)


def test_rising_and_falling_series(tmp_path: Path):
    x = list(range(21))
    panel = Panel("trend", {"up": (x, [0.1 * v for v in x]), "down": (x, [2.0 - 0.1 * v for v in x])})
    path = tmp_path / "curves.png"
    write_line_plots(path, [panel], title="rising", width=400, height=300)
    img = decode_png(path.read_bytes())
    assert img.shape == (300, 400, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no temp file left behind

    legend_bottom = 72  # title band 32 px, panel title 30 px, legend text rows 62..70, plot box from row 79
    for color, rising in ((PALETTE[0], True), (PALETTE[1], False)):
        rows, cols = curve_pixels(img, color, legend_bottom)
        assert rows.size > 200, "the curve is drawn"
        left, right = rows[cols < np.percentile(cols, 20)].mean(), rows[cols > np.percentile(cols, 80)].mean()
        # image rows grow downward: a rising curve ends higher (smaller row) on the right
        assert (right < left - 100) if rising else (right > left + 100), (left, right)
        # lines are at least 2 px thick: some column holds >= 2 adjacent curve pixels everywhere
        for c in np.unique(cols)[5:-5:20]:
            assert (cols == c).sum() >= 2
    # both curves span the same x range, and cross in the middle
    (r0, c0), (r1, c1) = curve_pixels(img, PALETTE[0], legend_bottom), curve_pixels(img, PALETTE[1], legend_bottom)
    assert abs(int(c0.min()) - int(c1.min())) <= 2 and abs(int(c0.max()) - int(c1.max())) <= 2
    mid = (int(c0.min()) + int(c0.max())) // 2
    assert abs(r0[np.abs(c0 - mid) <= 1].mean() - r1[np.abs(c1 - mid) <= 1].mean()) <= 3
    # legend swatches sit above the plot area
    assert color_mask(img[:legend_bottom], PALETTE[0]).sum() >= 20
    assert color_mask(img[:legend_bottom], PALETTE[1]).sum() >= 20


def test_nan_gap_single_point_and_constant():
    x = list(range(21))
    y = [float(v) if not 8 <= v <= 12 else NAN for v in x]
    panels = [
        Panel("gap", {"y": (x, y)}),
        Panel("dot", {"one": ([5], [3.0])}),
        Panel("flat", {"c": (x, [0.0] * 21), "c2": (x, [7.5] * 21)}),
        Panel("empty", {"nan": (x, [NAN] * 21), "inf": (x, [math.inf] * 21)}),
    ]
    img = render_line_plots(panels, width=800, height=600)  # 2 x 2 grid of 400 x 300 cells
    assert img.shape == (600, 800, 3)
    top = 42  # below the legend (text rows 30..38), above the plot box (row 47)

    gap = img[top:300, :400]
    _, cols = np.nonzero(color_mask(gap, PALETTE[0]))
    lo, hi = cols.min(), cols.max()
    centre = lo + (hi - lo) * np.array([7.6, 12.4]) / 20  # x = 7.6 .. 12.4 must be empty
    assert not ((cols > centre[0]) & (cols < centre[1])).any()
    assert ((cols > lo + (hi - lo) * 6 / 20) & (cols < centre[0])).any()

    dot = color_mask(img[top:300, 400:], PALETTE[0])
    assert 16 <= dot.sum() <= 49  # one square dot, nothing else
    r, c = np.nonzero(dot)
    assert r.max() - r.min() <= 6 and c.max() - c.min() <= 6

    for color in PALETTE[:2]:  # constant series: horizontal lines, 2 px thick
        r, _ = np.nonzero(color_mask(img[300 + top :, :400], color))
        assert r.size > 300 and r.max() - r.min() <= 1

    empty = img[300:, 400:]
    assert not color_mask(empty[top:], PALETTE[0]).any()
    assert (empty[40:120] != np.array(BG, np.uint8)).any()  # "no data" text


def test_title_and_font():
    img = render_line_plots([Panel("p", {"a": ([0, 1], [0, 1])})], title="Reward curve", width=300, height=200)
    title_band = img[: 2 * GLYPH_H + 10, :]
    assert (title_band != np.array(BG, np.uint8)).any(axis=2).sum() > 100
    plain = render_line_plots([Panel("p", {"a": ([0, 1], [0, 1])})], width=300, height=200)
    assert not (plain[:12, 150:] != np.array(BG, np.uint8)).any()

    canvas = np.zeros((GLYPH_H, 12, 3), np.uint8)
    draw_text(canvas, 0, 0, "A7", (255, 255, 255))
    want = [
        ".###.#####",
        "#...#....#",
        "#...#...#.",
        "#####..#..",
        "#...#.#...",
        "#...#.#...",
        "#...#.#...",
        "..........",
        "..........",
    ]
    on = canvas[..., 0] > 0
    got = ["".join("#" if p else "." for p in np.r_[row[:5], row[6:11]]) for row in on]
    assert got == want
    assert not canvas[:, [5, 11]].any()  # one blank column between characters
    draw_text(canvas, -3, -4, "\u00e9~", (9, 9, 9))  # off-canvas and non-ASCII ("?") must not raise


def test_polyline_clipping():
    img = np.zeros((20, 20, 3), np.uint8)
    draw_polyline(img, np.array([-50.0, 70.0]), np.array([10.0, 10.0]), (1, 2, 3), (5, 5, 14, 14))
    r, c = np.nonzero(color_mask(img, (1, 2, 3)))
    assert c.min() == 5 and c.max() == 14 and set(r.tolist()) == {9, 10}


@pytest.mark.parametrize(
    ("lo", "hi", "ticks", "labels"),
    [
        (0.0, 1.0, [0, 0.2, 0.4, 0.6, 0.8, 1.0], ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]),
        (3000.0, 11000.0, [4000, 6000, 8000, 10000], ["4k", "6k", "8k", "10k"]),
        (1.2e-5, 1.5e-5, [1.2e-5, 1.3e-5, 1.4e-5, 1.5e-5], ["1.2e-05", "1.3e-05", "1.4e-05", "1.5e-05"]),
        (1.2e-5, 1.32e-5, [1.2e-5, 1.25e-5, 1.3e-5], ["1.20e-05", "1.25e-05", "1.30e-05"]),
        (-3.0, 3.0, [-2, 0, 2], ["-2", "0", "2"]),
        (2.5e6, 3.5e6, [2.6e6, 2.8e6, 3.0e6, 3.2e6, 3.4e6], ["2.6M", "2.8M", "3.0M", "3.2M", "3.4M"]),
    ],
)
def test_ticks_and_compact_labels(lo, hi, ticks, labels):
    got, step = nice_ticks(lo, hi)
    np.testing.assert_allclose(got, ticks, rtol=1e-9, atol=1e-12)
    big = max(abs(t) for t in got)
    assert [format_tick(t, step, big) for t in got] == labels


def test_extreme_values_render(tmp_path: Path):
    x = list(range(50))
    panels = [
        Panel("tiny", {"kl": (x, [1e-7 * (1 + v) for v in x])}),
        Panel("huge", {"tok/s": (x, [1e6 + 1e4 * v for v in x])}),
        Panel("mixed", {"a": (x, [(-1) ** v * 1e3 for v in x]), "b": ([], [])}),
    ]
    write_line_plots(tmp_path / "x.png", panels)
    img = decode_png((tmp_path / "x.png").read_bytes())
    assert img.shape == (300, 1200, 3)  # 3 panels in one row of 300 px
    for i in range(3):
        assert color_mask(img[42:, 400 * i : 400 * (i + 1)], PALETTE[0]).sum() > 100
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        render_line_plots([Panel("bad", {"a": ([1, 2], [1])})])
