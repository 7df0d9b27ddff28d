"""Inline SVG drawings for the HTML report: the workflow graph and a lane timeline.

Plain strings, no scripts, no external resources. Every element a test or a
reader may look for carries a class and a ``data-`` attribute (``data-node``,
``data-lane``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

from diffsplit.engine.graph import node_sort_key
from diffsplit.profiles.simulate import LANES, Timeline

_BOX_W, _BOX_H, _GAP_X, _GAP_Y, _PAD = 168, 44, 56, 16, 12
_LANE_H, _LABEL_W, _AXIS_H = 34, 78, 26


def graph_svg(nodes: Sequence[tuple[str, str, tuple[str, ...]]], status: Mapping[str, str]) -> str:
    """A layered drawing of the DAG; ``nodes``: (id, class, dependencies); ``status``: id → css class."""
    ids = {node_id for node_id, _, _ in nodes}
    depth: dict[str, int] = {}
    for node_id, _, dependencies in nodes:  # topological order
        depth[node_id] = 1 + max((depth[d] for d in dependencies if d in depth), default=-1)
    layers: dict[int, list[str]] = {}
    for node_id, _, _ in nodes:
        layers.setdefault(depth[node_id], []).append(node_id)
    position: dict[str, tuple[float, float]] = {}
    for layer, members in layers.items():
        for row, node_id in enumerate(sorted(members, key=node_sort_key)):
            position[node_id] = (_PAD + layer * (_BOX_W + _GAP_X), _PAD + row * (_BOX_H + _GAP_Y))
    width = _PAD * 2 + (max(layers, default=0) + 1) * (_BOX_W + _GAP_X) - _GAP_X
    height = _PAD * 2 + max((len(m) for m in layers.values()), default=1) * (_BOX_H + _GAP_Y) - _GAP_Y
    parts = [f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="workflow graph">']
    for node_id, _, dependencies in nodes:
        x2, y2 = position[node_id]
        for dependency in dependencies:
            if dependency not in ids:
                continue
            x1, y1 = position[dependency]
            sx, sy, ex, ey = x1 + _BOX_W, y1 + _BOX_H / 2, x2, y2 + _BOX_H / 2
            mid = (sx + ex) / 2
            parts.append(f'<path class="edge" d="M{sx:.1f},{sy:.1f} C{mid:.1f},{sy:.1f} {mid:.1f},{ey:.1f} '
                         f'{ex:.1f},{ey:.1f}"/>')
    for node_id, class_type, _ in nodes:
        x, y = position[node_id]
        css = escape(status.get(node_id, "local"))
        label = class_type if len(class_type) <= 22 else class_type[:21] + "…"
        parts.append(
            f'<g class="node {css}" data-node="{escape(node_id)}">'
            f'<title>{escape(node_id)} {escape(class_type)}'
            f'</title><rect x="{x:.1f}" y="{y:.1f}" width="{_BOX_W}" height="{_BOX_H}" rx="6"/>'
            f'<text x="{x + 8:.1f}" y="{y + 17:.1f}" class="id">#{escape(node_id)}</text>'
            f'<text x="{x + 8:.1f}" y="{y + 34:.1f}">{escape(label)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def timeline_svg(timeline: Timeline, labels: Mapping[str, str], *, title: str, width: int = 1100) -> str:
    """Lanes ``local``, ``up``, ``remote``, ``down`` with one rectangle per segment, and a time axis."""
    span = max(timeline.makespan_s, max((s.end_s for s in timeline.segments), default=0.0), 1e-6)
    scale = (width - _LABEL_W - 20) / span
    height = len(LANES) * _LANE_H + _AXIS_H + 8
    parts = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">']
    for row, lane in enumerate(LANES):
        y = row * _LANE_H + 4
        parts.append(f'<g class="lane" data-lane="{lane}">'
                     f'<text class="lane-label" x="4" y="{y + 21}">{lane}</text>'
                     f'<rect class="lane-bg" x="{_LABEL_W}" y="{y}" width="{width - _LABEL_W - 20}" '
                     f'height="{_LANE_H - 6}"/>')
        for segment in (s for s in timeline.segments if s.lane == lane):
            x = _LABEL_W + segment.start_s * scale
            w = max(1.0, (segment.end_s - segment.start_s) * scale)
            name = labels.get(segment.node_id, segment.node_id)
            detail = f", {segment.nbytes:,} bytes" if segment.nbytes else ""
            tip = (f"node {segment.node_id} {name}: {segment.start_s:.3f}–{segment.end_s:.3f} s "
                   f"({segment.end_s - segment.start_s:.3f} s{detail})")
            parts.append(f'<g class="seg seg-{lane}" data-node="{escape(segment.node_id)}">'
                         f'<title>{escape(tip)}</title>'
                         f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{_LANE_H - 10}" rx="3"/>')
            if w > 26:
                parts.append(f'<text x="{x + 3:.1f}" y="{y + 19}">#{escape(segment.node_id)}</text>')
            parts.append("</g>")
        parts.append("</g>")
    axis_y = len(LANES) * _LANE_H + 6
    parts.append(f'<g class="axis"><line x1="{_LABEL_W}" y1="{axis_y}" x2="{width - 20}" y2="{axis_y}"/>')
    step = _nice_step(span)
    ticks = int(span / step) + 1
    for index in range(ticks + 1):
        t = index * step
        if t > span * 1.0001:
            break
        x = _LABEL_W + t * scale
        parts.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 5}"/>'
                     f'<text x="{x:.1f}" y="{axis_y + 18}" text-anchor="middle">{t:g} s</text>')
    parts.append("</g></svg>")
    return "".join(parts)


def _nice_step(span: float) -> float:
    """A tick step of 1, 2 or 5 times a power of ten giving about 8 ticks."""
    raw = span / 8
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return round(factor * power, 12)
    return 10 * power
