"""A small log-log line plot as a PNG, drawn with Pillow (no plotting library is a dependency)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))
_SIZE = (720, 480)
_MARGIN = (70, 30, 30, 50)  # left, top, right, bottom


def log_log_plot(
    path: Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
) -> Path:
    """Write ``series`` (name -> (x, y) points, all positive) on log axes to ``path``; returns it."""
    points = [point for line in series.values() for point in line if point[0] > 0 and point[1] > 0]
    if not points:
        raise ValueError("nothing to plot: every point needs positive x and y")
    xs = [math.log10(x) for x, _ in points]
    ys = [math.log10(y) for _, y in points]
    x_range = (math.floor(min(xs)), math.ceil(max(xs)) if max(xs) > min(xs) else math.floor(min(xs)) + 1)
    y_range = (math.floor(min(ys)), math.ceil(max(ys)) if max(ys) > min(ys) else math.floor(min(ys)) + 1)
    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN[0], _MARGIN[1], _SIZE[0] - _MARGIN[2], _SIZE[1] - _MARGIN[3]

    def place(x: float, y: float) -> tuple[float, float]:
        fx = (math.log10(x) - x_range[0]) / (x_range[1] - x_range[0])
        fy = (math.log10(y) - y_range[0]) / (y_range[1] - y_range[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for decade in range(x_range[0], x_range[1] + 1):
        px, _ = place(10.0**decade, 10.0 ** y_range[0])
        draw.line([(px, top), (px, bottom)], fill=(225, 225, 225))
        draw.text((px - 12, bottom + 6), f"1e{decade}", fill="black")
    for decade in range(y_range[0], y_range[1] + 1):
        _, py = place(10.0 ** x_range[0], 10.0**decade)
        draw.line([(left, py), (right, py)], fill=(225, 225, 225))
        draw.text((8, py - 6), f"1e{decade}", fill="black")
    draw.rectangle([(left, top), (right, bottom)], outline="black")
    for number, (name, line) in enumerate(series.items()):
        colour = _COLOURS[number % len(_COLOURS)]
        placed = [place(x, y) for x, y in line if x > 0 and y > 0]
        if len(placed) > 1:
            draw.line(placed, fill=colour, width=2)
        for px, py in placed:
            draw.ellipse([(px - 3, py - 3), (px + 3, py + 3)], fill=colour)
        draw.text((left + 10, top + 8 + 14 * number), name, fill=colour)
    draw.text((left, 8), title, fill="black")
    draw.text(((left + right) / 2 - 40, _SIZE[1] - 20), x_label, fill="black")
    draw.text((8, _SIZE[1] - 20), y_label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
