"""The profile as JSON, schema ``diffsplit.profile/1`` (documented in ``profiles/SCHEMA.md``).

:func:`profile_to_json` builds the document; :func:`check_profile_json` checks
that a document has every field the schema promises (for consumers and tests).
Times are seconds, sizes bytes, bandwidths bytes per second.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffsplit.profiles.model import NodeMeasure
from diffsplit.profiles.planner import Plan
from diffsplit.profiles.remote_model import NodeCost
from diffsplit.profiles.session import Profile
from diffsplit.profiles.simulate import Timeline
from diffsplit.transport.errors import DiffsplitError

if TYPE_CHECKING:
    from diffsplit.engine.device_memory import DeviceMemoryStats

SCHEMA = "diffsplit.profile/1"

_TOP_FIELDS = ("schema", "created", "workflow", "device", "settings", "measured_local_s", "run_overhead_s",
               "link", "link_probes", "worker", "nodes", "plan", "plan_run", "notes")
_NODE_FIELDS = ("id", "class_type", "title", "role", "dependencies", "cache_hit", "wall_s", "cpu_s", "memory",
                "inputs", "bytes_by_category", "request_bytes", "reply_bytes", "naive_weight_bytes",
                "naive_weight_files", "offloadable", "offload_block", "remote", "remote_measured", "verdict")
_PLAN_FIELDS = ("remote", "predicted_s", "all_local_predicted_s", "speedup", "search", "evaluated",
                "timeline")


class ProfileSchemaError(DiffsplitError):
    """A document does not follow the ``diffsplit.profile/1`` schema."""


def profile_to_json(profile: Profile) -> dict[str, Any]:
    """The profile as a JSON-ready dict."""
    measure, settings = profile.measure, profile.settings
    costs = {cost.node_id: cost for cost in profile.costs}
    verdicts = {v.node_id: v for v in profile.plan.verdicts} if profile.plan is not None else {}
    remote = profile.worker.remote if profile.worker is not None else {}
    speed = settings.speed
    return {
        "schema": SCHEMA,
        "created": profile.created,
        "workflow": {"name": measure.name, "nodes": len(measure.nodes), "warmup_runs": measure.warmup_runs},
        "device": measure.device,
        "dtypes": dict(measure.dtypes),
        "device_memory": None if measure.device_memory is None else _device_memory(measure.device_memory),
        "settings": {
            "warmup_runs": settings.warmup_runs, "measured_runs": settings.measured_runs,
            "statistic": settings.statistic,
            "remote_runs": settings.remote_runs,
            "tolerance": settings.tolerance, "queue_s": settings.queue_s, "slots": settings.slots,
            "emulate_link": settings.emulate_link,
            "remote_speed": None if speed is None else {
                "default": speed.default, "by_class": dict(speed.by_class), "by_node": dict(speed.by_node)},
        },
        "measured_local_s": measure.total_s,
        "run_overhead_s": measure.overhead_s,
        "link": None if profile.link is None else asdict(profile.link),
        "link_probes": [asdict(sample) for sample in profile.link_samples],
        "worker": None if profile.worker is None else {
            "address": profile.worker.address, "slots": profile.worker.slots},
        "nodes": [
            _node(node, costs.get(node.node_id), remote.get(node.node_id), verdicts.get(node.node_id))
            for node in measure.nodes
        ],
        "plan": None if profile.plan is None else _plan(profile.plan),
        "plan_run": None if profile.plan_run is None or profile.plan is None else {
            "remote": list(profile.plan_run.remote),
            "measured_s": profile.plan_run.measured_s,
            "predicted_s": profile.plan.predicted_s,
            "measured_over_predicted": profile.plan_run.measured_s / profile.plan.predicted_s
            if profile.plan.predicted_s > 0 else None,
            "timeline": _timeline(profile.plan_run.timeline),
            "remote_stats": {node_id: asdict(stats)
                             for node_id, stats in profile.plan_run.remote_stats.items()},
        },
        "notes": list(profile.notes),
    }


def _node(node: NodeMeasure, cost: NodeCost | None, measured: Any, verdict: Any) -> dict[str, Any]:
    return {
        "id": node.node_id, "class_type": node.class_type, "title": node.title, "role": node.role,
        "dependencies": list(node.dependencies), "cache_hit": node.cache_hit,
        "wall_s": node.wall_s, "cpu_s": node.cpu_s, "memory": asdict(node.memory),
        "inputs": [{
            "name": i.name, "type": i.type, "category": i.category, "source": i.source,
            "payload_bytes": i.payload_bytes, "wire_bytes": i.wire_bytes, "zeros": i.zeros,
            "held_digest": i.digest,
        } for i in node.inputs],
        "bytes_by_category": node.bytes_by_category(),
        "request_bytes": node.request_bytes, "reply_bytes": node.reply_bytes,
        "naive_weight_bytes": node.weight_bytes, "naive_weight_files": list(node.weight_files),
        "offloadable": node.offloadable, "offload_block": node.offload_block, "recipe_s": node.recipe_s,
        "remote": None if cost is None or cost.remote_s is None else {
            "estimate_s": cost.remote_s, "source": cost.source,
            "call_overhead_s": cost.call_overhead_s, "queue_s": cost.queue_s},
        "remote_measured": None if measured is None else asdict(measured),
        "verdict": None if verdict is None else {
            "offload": verdict.offload, "short": verdict.short, "reason": verdict.reason,
            "flipped_s": verdict.flipped_s},
    }


def _device_memory(stats: DeviceMemoryStats) -> dict[str, Any]:
    return {
        "device": stats.device, "budget_bytes": stats.budget_bytes, "resident_bytes": stats.resident_bytes,
        "copies": stats.entries, "placed": stats.placed, "reused": stats.reused, "evicted": stats.evicted,
        "oom_retries": stats.oom_retries, "peak_bytes": stats.peak_bytes,
    }


def _plan(plan: Plan) -> dict[str, Any]:
    return {
        "remote": list(plan.remote), "predicted_s": plan.predicted_s,
        "all_local_predicted_s": plan.all_local.total_s, "speedup": plan.speedup,
        "search": plan.search, "evaluated": plan.evaluated, "local_order": list(plan.local_order),
        "timeline": _timeline(plan.timeline),
    }


def _timeline(timeline: Timeline) -> dict[str, Any]:
    return {
        "makespan_s": timeline.makespan_s, "overhead_s": timeline.overhead_s,
        "segments": [{"lane": s.lane, "node": s.node_id, "start_s": s.start_s, "end_s": s.end_s,
                      "bytes": s.nbytes} for s in timeline.segments],
    }


def write_profile_json(profile: Profile, path: Path) -> None:
    """Write the profile's JSON document to ``path``."""
    Path(path).write_text(json.dumps(profile_to_json(profile), indent=2) + "\n")


def check_profile_json(document: Mapping[str, Any]) -> None:
    """Raise ProfileSchemaError naming the first missing field; the schema tag must match."""
    if document.get("schema") != SCHEMA:
        raise ProfileSchemaError(f"schema is {document.get('schema')!r}, expected {SCHEMA!r}")
    _require(document, _TOP_FIELDS, "the document")
    for node in document["nodes"]:
        _require(node, _NODE_FIELDS, f"node {node.get('id', '?')}")
        _require(node["bytes_by_category"], ("normal", "intermediate", "model"), f"node {node['id']} bytes")
    if document["plan"] is not None:
        _require(document["plan"], _PLAN_FIELDS, "the plan")
        timeline_fields = ("makespan_s", "overhead_s", "segments")
        _require(document["plan"]["timeline"], timeline_fields, "the plan's timeline")


def _require(section: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    missing = [name for name in fields if name not in section]
    if missing:
        raise ProfileSchemaError(f"{where} lacks {', '.join(missing)}")
