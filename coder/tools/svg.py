"""Line charts as plain SVG text, for the pictures the docs show (training curves, Fig. 3's recall against batch
size). No plotting library: the project installs none, and a picture is a few lines and error bars."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Series:
    """One line: points (x, y), optional error-bar half-widths per point, drawn in `colour`; `legend` None keeps
    it out of the legend (e.g. one seed's thin curve)."""
    points: Sequence[tuple[float, float]]
    colour: str
    legend: str | None = None
    errors: Sequence[float | None] = field(default_factory=list)
    width: float = 3.0
    opacity: float = 1.0


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.1f}"


def panel(series: Sequence[Series], *, x_label: str, y_label: str, title: str = "",
          x_ticks: Sequence[tuple[float, str]] = (), size: tuple[int, int] = (480, 300),
          origin: tuple[int, int] = (0, 0), y_max: float | None = None) -> list[str]:
    """SVG elements of one chart of `size` placed at `origin`: axes, ticks (x: `x_ticks`, else every distinct x;
    y: low, middle, high), the lines with their error bars, and a legend of the labelled series. `y_max` caps the
    y axis where values cannot go (R@1 at 100): an error bar that passes it is cut there."""
    width, height = size
    ox, oy = origin
    pad = 48
    xs = [x for s in series for x, _ in s.points]
    spans = [(y - (e or 0.0), y + (e or 0.0)) for s in series
             for (_, y), e in zip(s.points, list(s.errors) or [None] * len(s.points))]
    x_lo, x_hi = min(xs), max(xs)
    lo, hi = min(low for low, _ in spans), max(high for _, high in spans)
    margin = 0.05 * (hi - lo) + 0.5
    lo, hi = lo - margin, hi + margin if y_max is None else min(hi + margin, y_max)

    def at(x: float, y: float) -> tuple[float, float]:
        px = ox + pad + (width - 2 * pad) * ((x - x_lo) / (x_hi - x_lo) if x_hi > x_lo else 0.5)
        return px, oy + height - pad - (height - 2 * pad) * (y - lo) / (hi - lo)

    bottom, left = oy + height - pad, ox + pad
    parts = [f'<line x1="{left}" y1="{bottom}" x2="{ox + width - pad}" y2="{bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{oy + pad}" x2="{left}" y2="{bottom}" stroke="black"/>']
    for x, text in x_ticks or [(x, _fmt(x)) for x in sorted(set(xs))]:
        parts.append(f'<text x="{at(x, lo)[0]:.0f}" y="{bottom + 16}" text-anchor="middle">{text}</text>')
    for v in (lo, (lo + hi) / 2, hi):
        parts.append(f'<text x="{left - 4}" y="{at(x_lo, v)[1]:.0f}" text-anchor="end">{_fmt(v)}</text>')
    parts.append(f'<text x="{ox + width / 2}" y="{oy + height - 8}" text-anchor="middle">{x_label}</text>')
    parts.append(f'<text x="{ox + 12}" y="{oy + pad - 16}">{y_label}</text>')
    if title:
        parts.append(f'<text x="{ox + width / 2}" y="{oy + 16}" text-anchor="middle" font-weight="bold">{title}</text>')
    for s in series:
        pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in (at(x, y) for x, y in s.points))
        opacity = f' opacity="{s.opacity}"' if s.opacity < 1 else ""
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{s.colour}" stroke-width="{s.width}"{opacity}/>')
        for (x, y), e in zip(s.points, s.errors):
            if e:
                px, top = at(x, min(y + e, hi))
                _, low = at(x, y - e)
                parts.append(f'<path d="M{px - 4:.1f},{top:.1f}h8M{px:.1f},{top:.1f}V{low:.1f}M{px - 4:.1f},'
                             f'{low:.1f}h8" stroke="{s.colour}" stroke-width="1.5" fill="none"/>')
    for i, s in enumerate(s for s in series if s.legend):
        y = oy + pad + 14 * i
        parts.append(f'<line x1="{left + 10}" y1="{y}" x2="{left + 30}" y2="{y}" stroke="{s.colour}" '
                     f'stroke-width="3"/><text x="{left + 36}" y="{y + 4}">{s.legend}</text>')
    return parts


def document(parts: Sequence[str], width: int, height: int) -> str:
    """A whole SVG file around the elements of one or more panels, on white."""
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
            f'font-size="12"><rect width="100%" height="100%" fill="white"/>')
    return "\n".join([head, *parts]) + "\n</svg>\n"
