"""Small server-side SVG charts: a line chart for the overview, a timeline for an action.

Plain strings built with every label escaped (`markupsafe.escape`), returned as `Markup` so
Jinja inserts them as they are. Colours and strokes are presentation attributes, not `style`,
so the pages' Content-Security-Policy needs no 'unsafe-inline'.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

COLOURS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1")


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2g}"


def line_chart(
    title: str,
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    unit: str = "",
    width: int = 360,
    height: int = 140,
) -> Markup:
    """A chart of equally spaced points (one per minute); None is a gap."""
    left, right, top, bottom = 40, 8, 22, 18
    w, h = width - left - right, height - top - bottom
    values = [v for _, vs in series for v in vs if v is not None]
    peak = max(values, default=0.0) or 1.0
    n = max((len(vs) for _, vs in series), default=0)
    step = w / max(n - 1, 1)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{left}" y="14" font-size="12" fill="#222">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end" '
        f'fill="#555">{escape(_fmt(peak))}{escape(unit)}</text>',
        f'<text x="{left - 4}" y="{top + h}" font-size="10" text-anchor="end" fill="#555">0</text>',
        f'<text x="{left}" y="{height - 4}" font-size="10" fill="#555">-{n} min</text>',
        f'<text x="{left + w}" y="{height - 4}" font-size="10" text-anchor="end" '
        f'fill="#555">now</text>',
    ]
    legend_x = left + w
    for i, (label, vs) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        runs: list[list[str]] = [[]]
        for j, v in enumerate(vs):
            if v is None:
                runs.append([])
                continue
            runs[-1].append(f"{left + j * step:.1f},{top + h - v / peak * h:.1f}")
        for run in runs:
            if len(run) == 1:
                x, y = run[0].split(",")
                out.append(f'<circle cx="{x}" cy="{y}" r="2" fill="{colour}"/>')
            elif run:
                out.append(
                    f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" '
                    'stroke-width="1.5"/>'
                )
        out.append(
            f'<text x="{legend_x}" y="14" font-size="10" text-anchor="end" '
            f'fill="{colour}">{escape(label)}</text>'
        )
        legend_x -= 8 * len(label) + 12
    out.append("</svg>")
    return Markup("".join(out))


def timeline(phases: Sequence[tuple[str, float, float]], *, width: int = 720) -> Markup:
    """Horizontal bars for (label, start, end) in seconds from the first start."""
    phases = [(label, s, e) for label, s, e in phases if e >= s]
    if not phases:
        return Markup("")
    origin = min(s for _, s, _ in phases)
    span = max(e for _, _, e in phases) - origin or 1.0
    label_w, row = 130, 22
    bar_w = width - label_w - 70
    height = row * len(phases) + 8
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="timeline">'
    ]
    for i, (label, s, e) in enumerate(phases):
        y = 4 + i * row
        x = label_w + (s - origin) / span * bar_w
        bw = max((e - s) / span * bar_w, 1.5)
        colour = COLOURS[i % len(COLOURS)]
        out.append(f'<text x="0" y="{y + 14}" font-size="12" fill="#222">{escape(label)}</text>')
        out.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{bw:.1f}" height="14" fill="{colour}"/>')
        out.append(
            f'<text x="{x + bw + 4:.1f}" y="{y + 14}" font-size="11" fill="#555">'
            f"{escape(_duration(e - s))}</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


__all__ = ["line_chart", "timeline"]
