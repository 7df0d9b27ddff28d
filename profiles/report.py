"""The terminal report: a summary, one table row per node, and the reasons in full."""

from __future__ import annotations

from collections.abc import Sequence

from diffsplit.profiles.condition_plan import ConditionReport
from diffsplit.profiles.model import NodeMeasure, WorkflowMeasure
from diffsplit.profiles.planner import Verdict
from diffsplit.profiles.remote_model import NodeCost
from diffsplit.profiles.session import Profile

_COLUMNS = ("node", "class", "local s", "cpu s", "peak mem", "remote s", "up", "down", "naive weights",
            "verdict", "why")


def format_bytes(n: int | float) -> str:
    """``1234567`` → ``"1.2 MB"`` (decimal units)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def summary_lines(profile: Profile) -> list[str]:
    """The lines above the table: workflow, device, link, worker, plan, prediction vs measurement."""
    measure = profile.measure
    lines = [
        f"workflow {measure.name}: {len(measure.nodes)} nodes ran on {measure.device}{_dtypes(measure)}, "
        f"{measure.total_s:.3f} s end-to-end ({measure.warmup_runs} warm-up run(s) before)",
        f"link: {profile.link.describe() if profile.link is not None else 'none given'}",
    ]
    if profile.worker is not None:
        lines.append(f"worker: {profile.worker.address} ({profile.worker.slots} slot(s)), "
                     f"{len(profile.worker.remote)} node(s) measured there")
    plan = profile.plan
    if plan is not None:
        chosen = ", ".join(f"{n} ({_class(profile, n)})" for n in plan.remote) or "nothing (all local)"
        lines.append(f"plan: offload {chosen}")
        lines.append(f"predicted: {plan.predicted_s:.3f} s with the plan, "
                     f"{plan.all_local.total_s:.3f} s all local "
                     f"({plan.speedup:.2f}x; {plan.search} search, {plan.evaluated} placements)")
    if profile.plan_run is not None and plan is not None:
        run = profile.plan_run
        lines.append(f"measured: {run.measured_s:.3f} s running the plan "
                     f"(predicted {plan.predicted_s:.3f} s, "
                     f"measured/predicted {run.measured_s / plan.predicted_s:.2f})")
    lines.extend(f"note: {note}" for note in profile.notes)
    return lines


def _dtypes(measure: WorkflowMeasure) -> str:
    """`` with models in unet=fp16 ...`` where they were placed (as loaded: nothing to say)."""
    if measure.device_memory is None:
        return ""
    kinds = " ".join(f"{kind}={name}" for kind, name in measure.dtypes.items())
    return f" with models in {kinds}"


def node_rows(profile: Profile) -> list[tuple[str, ...]]:
    """One row of cells per node, in topological order (the table's body)."""
    costs = {c.node_id: c for c in profile.costs}
    verdicts = {v.node_id: v for v in profile.plan.verdicts} if profile.plan is not None else {}
    return [_row(node, costs.get(node.node_id), verdicts.get(node.node_id)) for node in profile.measure.nodes]


def _row(node: NodeMeasure, cost: NodeCost | None, verdict: Verdict | None) -> tuple[str, ...]:
    remote = "-"
    if cost is not None and cost.remote_s is not None and node.offloadable:
        remote = f"{cost.remote_s:.3f} ({cost.source})"
    offloadable = node.offloadable
    if verdict is not None:
        decision, why = ("OFFLOAD" if verdict.offload else "local"), verdict.short
    else:
        decision = "candidate" if offloadable else "local"
        why = "" if offloadable else (node.offload_block or "").split(":", 1)[0]
    return (
        node.node_id, node.class_type, f"{node.wall_s:.3f}", f"{node.cpu_s:.3f}",
        format_bytes(node.memory.peak_bytes), remote,
        format_bytes(node.request_bytes) if offloadable else "-",
        format_bytes(node.reply_bytes) if offloadable else "-",
        format_bytes(node.weight_bytes) if node.weight_bytes else "-", decision, why,
    )


def render_table(rows: Sequence[Sequence[str]], header: Sequence[str] = _COLUMNS) -> str:
    """Rows as aligned text columns under ``header`` (numbers right-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    right = {2, 3, 4, 5, 6, 7, 8}

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def render_text(profile: Profile, *, details: bool = True) -> str:
    """The whole terminal report."""
    parts = ["\n".join(summary_lines(profile)), "", render_table(node_rows(profile))]
    if details and profile.plan is not None:
        parts += ["", "why:"]
        parts += [f"  {v.node_id:>4} {v.class_type}: {v.reason}" for v in profile.plan.verdicts]
    if details:
        conditions = _condition_lines(profile)
        if conditions:
            parts += ["", "condition plan (each preprocessing here or on the worker, the link shared):",
                      *conditions]
        byte_lines = _category_lines(profile)
        if byte_lines:
            parts += ["", "input bytes by category (normal / intermediate / model recipe):", *byte_lines]
    return "\n".join(parts) + "\n"


def profile_condition_report(profile: Profile) -> ConditionReport | None:
    """The subtask manager's plan for the workflow's condition preprocessors (``profiles.condition_plan``),
    or None without a link or preprocessors with remote times."""
    if profile.link is None:
        return None
    from diffsplit.engine.nodes.registry import default_registry
    from diffsplit.profiles.condition_plan import condition_report

    registry = default_registry()
    categories = {cost.class_type: registry[cost.class_type].category for cost in profile.costs
                  if cost.class_type in registry}
    return condition_report(profile.costs, categories, profile.link)


def _condition_lines(profile: Profile) -> list[str]:
    report = profile_condition_report(profile)
    return report.lines() if report is not None else []


def _category_lines(profile: Profile) -> list[str]:
    lines = []
    for node in profile.measure.nodes:
        if not node.inputs:
            continue
        totals = node.bytes_by_category()
        zeros = [i.name for i in node.inputs if i.zeros]
        extra = f"; sent as shape only (all zeros): {', '.join(zeros)}" if zeros else ""
        lines.append(f"  {node.node_id:>4} {node.class_type}: {format_bytes(totals['normal'])} / "
                     f"{format_bytes(totals['intermediate'])} / {format_bytes(totals['model'])}{extra}")
    return lines


def _class(profile: Profile, node_id: str) -> str:
    return profile.measure.node(node_id).class_type
