"""Dependency-free PNG line plots: small multiples of training curves, rendered with numpy.

The training loop writes `curves.png` into the run directory while it runs; matplotlib is not a
dependency, so this file draws axes, grid, tick labels, polylines, legends and titles onto an RGB
array itself, with a built-in bitmap font, and encodes the PNG with zlib + struct.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from minigrpo.atomic import write_atomic

# A 5x9 bitmap font for ASCII 32..126, one hex number per glyph: 9 rows of 5 bits, top row in the
# highest bits, the leftmost pixel the highest bit of its row. Rows 0-6 hold capitals and digits,
# rows 2-6 the x-height, rows 7-8 the descenders. Characters outside the table render as "?".
_FONT = (
    "0 42108401000 a5000000000 a57d5f52800 47d1c5f1000 18c888898c00 c9511593400 42000000000 22210820800 "
    "82084222000 255d520000 213e420000 31844 3e000000 63000 10888884000 e8ceb98b800 46108423800 e8844447c00 "
    "1f110418b800 232a5f10800 1f878218b800 6443d18b800 1f0888842000 e8c5d18b800 e8c5e113000 6300c60000 6300c61100 "
    "22220820800 7c1f00000 82082222000 e8844401000 e8deb783c00 e8c7f18c400 1e8c7d18f800 e8c2108b800 1c9463197000 "
    "1f843d087c00 1f843d084000 e8c2f18bc00 118c7f18c400 e2108423800 71084293000 119531494400 108421087c00 "
    "11dd6b18c400 118e6b38c400 e8c6318b800 1e8c7d084000 e8c63593400 1e8c7d494400 f841c10f800 1f2108421000 "
    "118c6318b800 118c63151000 118c6b5aa800 118a88a8c400 118a88421000 1f0888887c00 e4210843800 108208208400 "
    "e1084213800 45440000000 3e0 82000000000 382f8bc00 1087a318f800 3a108b800 10be318bc00 3a3f83800 64a38842000 "
    "3e318bc2e 1085b318c400 40308423800 20184210a4c 1084a98a4800 c2108423800 6ab5ad400 5b318c400 3a318b800 "
    "7a318fa10 3e318bc21 5b3084000 3e0e0f800 84710849800 46319b400 463151000 4635aa800 454454400 46318bc2e "
    "7c4447c00 32110420c00 42108421000 182104426000 22a200000"
)
GLYPH_W, GLYPH_H = 5, 9  # one character cell is (GLYPH_W + 1) x GLYPH_H pixels

PALETTE = [(31, 96, 196), (232, 113, 18), (36, 156, 72), (204, 40, 56), (128, 78, 184), (20, 170, 190), (150, 96, 56)]
BG, INK, GRID, BOX, FAINT = (255, 255, 255), (25, 25, 25), (228, 228, 228), (110, 110, 110), (90, 90, 90)


@dataclass
class Panel:
    """One sub-plot: a title and named series {name: (x steps, y values)}; NaN/None y values are gaps.
    include_zero extends the y axis to 0 (for counts and fractions, where the distance to 0 matters)."""

    title: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    include_zero: bool = False


@cache
def _glyph(ch: str) -> np.ndarray:
    """(GLYPH_H, GLYPH_W) bool bitmap of one character."""
    code = ord(ch) if 32 <= ord(ch) <= 126 else ord("?")
    bits = int(_FONT.split()[code - 32], 16)
    return np.array([(bits >> (GLYPH_H * GLYPH_W - 1 - i)) & 1 for i in range(GLYPH_H * GLYPH_W)], bool).reshape(
        GLYPH_H, GLYPH_W
    )


def text_width(s: str, scale: int = 1) -> int:
    """Width in pixels of `s` drawn at `scale` (1 px of spacing after every character)."""
    return len(s) * (GLYPH_W + 1) * scale


def draw_text(img: np.ndarray, x: int, y: int, s: str, color=INK, scale: int = 1) -> None:
    """Draw `s` with its top-left corner at (x, y); pixels outside the canvas are dropped."""
    H, W, _ = img.shape
    for i, ch in enumerate(s):
        g = _glyph(ch)
        if scale > 1:
            g = g.repeat(scale, 0).repeat(scale, 1)
        ys, xs = np.nonzero(g)
        xs, ys = xs + x + i * (GLYPH_W + 1) * scale, ys + y
        keep = (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
        img[ys[keep], xs[keep]] = color


def _stamp(img: np.ndarray, px: np.ndarray, py: np.ndarray, color, radius: int, rect) -> None:
    """Paint a (2*radius)-pixel square brush at each point (px, py), clipped to rect (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = rect
    offs = range(-radius, radius) if radius > 0 else (0,)
    for dx in offs:
        for dy in offs:
            xs, ys = px + dx, py + dy
            keep = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
            img[ys[keep], xs[keep]] = color


def draw_polyline(img: np.ndarray, px: np.ndarray, py: np.ndarray, color, rect, width: int = 2) -> None:
    """Join consecutive finite points with `width`-pixel lines; a finite point with no finite neighbour
    (a single point, or one between gaps) becomes a dot. NaN coordinates break the line."""
    ok = np.isfinite(px) & np.isfinite(py)
    seg = ok[:-1] & ok[1:]  # (n-1,) segments with both ends finite
    if seg.any():
        a = np.stack([px[:-1][seg], py[:-1][seg]], 1)  # (S, 2)
        d = np.stack([px[1:][seg], py[1:][seg]], 1) - a  # (S, 2)
        n = np.ceil(np.abs(d).max(1)).astype(np.int64) + 1  # samples per segment, >= 1 per pixel
        idx = np.repeat(np.arange(len(n)), n)
        t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(np.maximum(n - 1, 1), n)
        pts = np.rint(a[idx] + t[:, None] * d[idx]).astype(np.int64)  # (P, 2)
        _stamp(img, pts[:, 0], pts[:, 1], color, max(width // 2, 1), rect)
    lone = ok & ~np.r_[False, seg] & ~np.r_[seg, False]
    if lone.any():
        _stamp(img, np.rint(px[lone]).astype(np.int64), np.rint(py[lone]).astype(np.int64), color, width + 1, rect)


def nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], float]:
    """About n round tick values (multiples of 1, 2 or 5 x 10^k) within [lo, hi], and their spacing."""
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)], step


def format_tick(v: float, step: float, big: float) -> str:
    """A short label for tick `v` on an axis with tick spacing `step` and largest |tick| `big`:
    3.4k / 1.2M for large values, 1.2e-05 for tiny ones, else just enough decimals to tell ticks apart."""
    if abs(v) < step * 1e-6:
        return "0"
    if big >= 1e4:
        scale, suffix = next((s, x) for s, x in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if big >= s)
        d = min(max(-math.floor(math.log10(step / scale)), 0), 3)
        return f"{v / scale:.{d}f}{suffix}"
    if big < 1e-3:
        d = min(max(math.floor(math.log10(abs(v))) - math.floor(math.log10(step)), 0), 3)
        return f"{v:.{d}e}"
    return f"{v:.{min(max(-math.floor(math.log10(step)), 0), 6)}f}"


def _axis_range(vals: np.ndarray, pad: float) -> tuple[float, float]:
    """[min, max] of the finite values, widened by `pad` of the span; a constant series gets a unit-ish span."""
    lo, hi = float(vals.min()), float(vals.max())
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-300):
        half = abs(lo) * 0.1 if lo != 0 else 1.0
        return lo - half, hi + half
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _draw_panel(img: np.ndarray, panel: Panel, x0: int, y0: int, w: int, h: int) -> None:
    """Draw one panel into the cell whose top-left corner is (x0, y0): title, legend, axes, curves."""
    draw_text(img, x0 + 8, y0 + 6, panel.title, INK, scale=2)
    data = []
    for name, (xs, ys) in panel.series.items():
        x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"series {name!r}: x {x.shape} and y {y.shape} must be equal 1-D shapes")
        data.append((name, x, np.where(np.isfinite(y), y, np.nan)))

    # legend: a colored swatch and the name per series, wrapped over lines
    lx, ly = x0 + 8, y0 + 6 + 2 * GLYPH_H + 6
    for i, (name, _, _) in enumerate(data):
        item = 14 + text_width(name) + 12
        if lx + item > x0 + w - 8 and lx > x0 + 8:
            lx, ly = x0 + 8, ly + GLYPH_H + 4
        color = PALETTE[i % len(PALETTE)]
        img[ly + 3 : ly + 6, lx : lx + 10] = color
        draw_text(img, lx + 14, ly, name, INK)
        lx += item
    top = ly + GLYPH_H + 8 if data else ly

    xs_all = np.concatenate([x[np.isfinite(x) & np.isfinite(y)] for _, x, y in data] or [np.zeros(0)])
    ys_all = np.concatenate([y[np.isfinite(x) & np.isfinite(y)] for _, x, y in data] or [np.zeros(0)])
    if xs_all.size == 0:
        img[top : y0 + h - 24, x0 + 60] = BOX
        draw_text(img, x0 + 70, top + 10, "no data", FAINT)
        return
    ylo, yhi = _axis_range(np.append(ys_all, 0.0) if panel.include_zero else ys_all, 0.05)
    xlo, xhi = _axis_range(xs_all, 0.0)
    yticks, ystep = nice_ticks(ylo, yhi)
    xticks, xstep = nice_ticks(xlo, xhi, n=6)
    if xstep < 1 and np.all(xs_all == np.round(xs_all)):  # integer steps: no fractional tick labels
        xticks, xstep = [float(t) for t in range(math.ceil(xlo), math.floor(xhi) + 1)], 1.0
    ybig = max(abs(t) for t in yticks) if yticks else abs(yhi)
    xbig = max(abs(t) for t in xticks) if xticks else abs(xhi)
    ylabels = [format_tick(t, ystep, ybig) for t in yticks]

    # plot rectangle (inclusive pixel bounds), grid, box and tick labels
    px0 = x0 + 14 + max((text_width(s) for s in ylabels), default=0)
    px1, py0, py1 = x0 + w - 14, top, y0 + h - 24
    if px1 - px0 < 10 or py1 - py0 < 10:
        return
    to_px = lambda v: px0 + (v - xlo) / (xhi - xlo) * (px1 - px0)
    to_py = lambda v: py1 - (v - ylo) / (yhi - ylo) * (py1 - py0)
    for t, s in zip(yticks, ylabels):
        r = round(to_py(t))
        img[r, px0:px1] = GRID
        draw_text(img, px0 - 6 - text_width(s), r - GLYPH_H // 2 + 1, s, FAINT)
    for t in xticks:
        c, s = round(to_px(t)), format_tick(t, xstep, xbig)
        img[py0:py1, c] = GRID
        draw_text(img, c - text_width(s) // 2, py1 + 6, s, FAINT)
    img[[py0, py1], px0 : px1 + 1] = BOX
    img[py0 : py1 + 1, [px0, px1]] = BOX
    rect = (px0 + 1, py0 + 1, px1 - 1, py1 - 1)
    for i, (_, x, y) in enumerate(data):
        draw_polyline(img, to_px(x), to_py(y), PALETTE[i % len(PALETTE)], rect)


def render_line_plots(
    panels: list[Panel], *, title: str | None = None, width: int = 1200, height: int | None = None
) -> np.ndarray:
    """Lay the panels out in a grid (up to 3 columns) and draw them: (height, width, 3) uint8 RGB.
    height=None gives every panel row 300 pixels."""
    n = max(len(panels), 1)
    cols = 1 if n == 1 else 2 if n in (2, 4) else 3
    rows = math.ceil(n / cols)
    head = 2 * GLYPH_H + 14 if title else 0
    height = head + rows * 300 if height is None else height
    img = np.full((height, width, 3), BG, dtype=np.uint8)
    if title:
        draw_text(img, 10, 7, title, INK, scale=2)
    cw, ch = width // cols, (height - head) // rows
    for i, panel in enumerate(panels):
        _draw_panel(img, panel, (i % cols) * cw, head + (i // cols) * ch, cw, ch)
    return img


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image: 8-bit truecolor, every row with the "Up" filter."""
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8, (img.shape, img.dtype)
    H, W, _ = img.shape
    rows = img.reshape(H, W * 3)
    up = np.diff(rows, axis=0, prepend=np.zeros((1, W * 3), np.uint8))  # wraps mod 256, as PNG wants
    raw = np.concatenate([np.full((H, 1), 2, np.uint8), up], axis=1)  # (H, 1 + 3W): filter byte 2 per row

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, adaptive filters, no interlace
    idat = zlib.compress(raw.tobytes(), 6)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_line_plots(
    path: str | os.PathLike,
    panels: list[Panel],
    *,
    title: str | None = None,
    width: int = 1200,
    height: int | None = None,
) -> None:
    """Render `panels` (see render_line_plots) and write them to `path` as a PNG, atomically: a reader
    never sees a half-written file (minigrpo.atomic)."""
    data = encode_png(render_line_plots(panels, title=title, width=width, height=height))
    write_atomic(path, data)
