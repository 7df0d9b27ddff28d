"""The HTML report: one self-contained page (inline CSS and SVG, no scripts, no network).

Sections: the summary, the workflow graph coloured by verdict, the per-node
table (``<tr data-node=...>``), the predicted timeline of the plan (lanes
local, up, remote, down) and, when the plan ran against a worker, the
measured timeline under it.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from diffsplit.profiles.report import node_rows, summary_lines
from diffsplit.profiles.session import Profile
from diffsplit.profiles.svg import graph_svg, timeline_svg

_HEADER = ("node", "class", "local s", "cpu s", "peak mem", "remote s", "up", "down", "naive weights",
           "verdict", "why")

_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 8px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.summary { background: #f6f6f4; border-radius: 6px; padding: 10px 14px; }
.summary p { margin: 2px 0; font-family: ui-monospace, monospace; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.offload td { background: #fdebd9; } tr.blocked td { color: #777; }
svg.graph { max-width: 100%; height: auto; }
.graph .edge { fill: none; stroke: #999; stroke-width: 1.4; }
.graph rect { stroke: #555; stroke-width: 1; }
.graph .offload rect { fill: #f6b26b; } .graph .candidate rect { fill: #a4c2f4; }
.graph .blocked rect { fill: #e3e3e3; }
.graph text { font-size: 12px; } .graph text.id { font-weight: 600; }
.timeline .lane-bg { fill: #f3f3f3; } .timeline .lane-label { font-size: 12px; fill: #444; }
.timeline text { font-size: 11px; }
.seg-local rect { fill: #4e79a7; } .seg-remote rect { fill: #f28e2b; }
.seg-up rect { fill: #59a14f; } .seg-down rect { fill: #76b7b2; }
.seg rect { stroke: #fff; stroke-width: 1; }
.seg text { fill: #fff; pointer-events: none; }
.axis line { stroke: #666; } .axis text { font-size: 11px; fill: #444; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -1px; }
.why { font-size: 12px; color: #444; }
"""


def render_html(profile: Profile) -> str:
    """The whole page as a string."""
    measure = profile.measure
    plan = profile.plan
    remote = set(plan.remote) if plan is not None else set()
    offloadable = {c.node_id for c in profile.costs if c.offloadable}
    status = {n.node_id: "offload" if n.node_id in remote else "candidate" if n.node_id in offloadable
              else "blocked" for n in measure.nodes}
    labels = {n.node_id: n.class_type for n in measure.nodes}
    graph = graph_svg([(n.node_id, n.class_type, n.dependencies) for n in measure.nodes], status)
    body = [
        f"<h1>diffsplit profile: {escape(measure.name)}</h1>",
        '<div class="summary">' + "".join(f"<p>{escape(line)}</p>" for line in summary_lines(profile))
        + "</div>",
        "<h2>Graph</h2>",
        '<p class="legend"><span><i style="background:#f6b26b"></i>offload</span>'
        '<span><i style="background:#a4c2f4"></i>could be offloaded, stays local</span>'
        '<span><i style="background:#e3e3e3"></i>stays local (loader, output, no recipe…)</span></p>',
        graph,
        "<h2>Nodes</h2>",
        _table(profile, status),
    ]
    if plan is not None:
        body += [
            f"<h2>Predicted timeline: {plan.predicted_s:.3f} s</h2>",
            _legend(),
            timeline_svg(plan.timeline, labels, title="predicted timeline"),
        ]
    if profile.plan_run is not None:
        body += [
            f"<h2>Measured timeline: {profile.plan_run.measured_s:.3f} s</h2>",
            timeline_svg(profile.plan_run.timeline, labels, title="measured timeline"),
        ]
    if plan is not None:
        body += ["<h2>Why</h2>", "<ul class=\"why\">"]
        body += [f"<li><b>#{escape(v.node_id)} {escape(v.class_type)}</b>: {escape(v.reason)}</li>"
                 for v in plan.verdicts]
        body.append("</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>diffsplit profile: {escape(measure.name)}</title><style>{_CSS}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _table(profile: Profile, status: dict[str, str]) -> str:
    rows = node_rows(profile)
    numeric = {2, 3, 4, 5, 6, 7, 8}
    lines = ['<table class="nodes"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in _HEADER)
             + "</tr></thead><tbody>"]
    for row in rows:
        node_id = row[0]
        cells = "".join(f'<td class="num">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>"
                        for i, c in enumerate(row))
        lines.append(f'<tr class="{status.get(node_id, "")}" data-node="{escape(node_id)}">{cells}</tr>')
    lines.append("</tbody></table>")
    return "".join(lines)


def _legend() -> str:
    return ('<p class="legend"><span><i style="background:#4e79a7"></i>local</span>'
            '<span><i style="background:#59a14f"></i>upload</span>'
            '<span><i style="background:#f28e2b"></i>worker</span>'
            '<span><i style="background:#76b7b2"></i>download</span></p>')


def write_html(profile: Profile, path: Path) -> None:
    """Write the page to ``path``."""
    Path(path).write_text(render_html(profile), encoding="utf-8")
