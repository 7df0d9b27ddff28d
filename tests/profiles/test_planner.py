"""The planner on fixed synthetic profiles: deterministic, no timings involved."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from diffsplit.profiles.link import parse_link
from diffsplit.profiles.model import InputMeasure, WorkerInfo, WorkflowMeasure
from diffsplit.profiles.planner import PlanOptions, plan_offload
from diffsplit.profiles.remote_model import (
    RemoteSpeed,
    RemoteSpeedError,
    node_costs,
    parse_remote_speed,
)
from diffsplit.profiles.simulate import simulate


def test_fast_link_and_fast_worker_offload_the_sampler(sd15_like: WorkflowMeasure) -> None:
    costs = node_costs(sd15_like, parse_remote_speed(["10x"]))
    plan = plan_offload(costs, parse_link("1gbit,2ms"))
    assert "6" in plan.remote
    assert plan.predicted_s < plan.all_local.total_s - 3.0, "4 s of sampling become 0.4 s"
    verdict = next(v for v in plan.verdicts if v.node_id == "6")
    assert verdict.offload and verdict.reason.startswith("offload:")
    assert plan.search == "exhaustive" and plan.evaluated == 2 ** 5


def test_a_very_slow_link_keeps_everything_local(sd15_like: WorkflowMeasure) -> None:
    costs = node_costs(sd15_like, parse_remote_speed(["10x"]))
    plan = plan_offload(costs, parse_link("100kbit,800ms"))
    assert plan.remote == ()
    assert plan.predicted_s == pytest.approx(plan.all_local.total_s)
    sampler = next(v for v in plan.verdicts if v.node_id == "6")
    assert not sampler.offload and "keep local" in sampler.reason
    assert sampler.flipped_s > plan.predicted_s


def test_blocked_nodes_stay_local_with_their_reason(sd15_like: WorkflowMeasure) -> None:
    plan = plan_offload(node_costs(sd15_like, RemoteSpeed(default=100.0)), parse_link("10gbit,0.1ms"))
    verdicts = {v.node_id: v for v in plan.verdicts}
    assert not verdicts["1"].offload and verdicts["1"].short == "loader"
    assert not verdicts["8"].offload and verdicts["8"].short == "output node"
    assert {"1", "2", "8"}.isdisjoint(plan.remote)


def test_parallel_branches_use_the_critical_path_not_the_sum(
    make_synthetic: Callable[..., WorkflowMeasure],
) -> None:
    measure = make_synthetic([
        ("1", "Source", (), 0.0, 0, 0, "loader"),
        ("2", "BranchA", ("1",), 2.0, 1000, 1000, None),
        ("3", "BranchB", ("1",), 2.0, 1000, 1000, None),
        ("4", "Join", ("2", "3"), 0.0, 0, 0, "output node"),
    ])
    link = parse_link("1gbit,1ms")
    costs = node_costs(measure, RemoteSpeed(default=1.0))
    both_local = simulate(costs, set(), link)
    assert both_local.total_s == pytest.approx(4.0), "one local lane: the branches queue"
    split = simulate(costs, {"3"}, link)
    assert split.total_s == pytest.approx(2.0 + 0.001 + 2 * 1000 / 1.25e8 + 0.003, abs=1e-6)
    assert split.finish_s["2"] == pytest.approx(2.0), "branch A ran locally while B ran remotely"
    plan = plan_offload(costs, link)
    assert len(plan.remote) == 1, "a worker as fast as this machine still helps: the branches overlap"
    assert plan.predicted_s == pytest.approx(split.total_s)
    both_remote = simulate(costs, {"2", "3"}, link)
    assert both_remote.total_s > 4.0, "one worker slot: two remote branches queue there"
    two_slots = simulate(costs, {"2", "3"}, link, slots=2)
    assert two_slots.total_s == pytest.approx(split.total_s + 8e-6), "only the shared up link waits (8 us)"


def test_transfers_are_charged_on_each_crossing(make_synthetic: Callable[..., WorkflowMeasure]) -> None:
    measure = make_synthetic([("1", "A", (), 1.0, 1_000_000, 2_000_000, None)])
    costs = node_costs(measure, RemoteSpeed(default=2.0))
    timeline = simulate(costs, {"1"}, parse_link("up=8mbit,down=16mbit,rtt=100ms"))
    lanes = {s.lane: s for s in timeline.segments}
    assert lanes["up"].end_s - lanes["up"].start_s == pytest.approx(1.0)
    assert lanes["down"].end_s - lanes["down"].start_s == pytest.approx(1.0)
    assert lanes["remote"].end_s - lanes["remote"].start_s == pytest.approx(0.5)
    assert timeline.total_s == pytest.approx(0.003 + 1.0 + 0.1 + 0.5 + 1.0)


def test_conditioning_the_worker_holds_is_not_sent_again(
    make_synthetic: Callable[..., WorkflowMeasure],
) -> None:
    from dataclasses import replace

    measure = make_synthetic([
        ("1", "KSampler", (), 1.0, 1_010_000, 1000, None),
        ("2", "KSampler", ("1",), 1.0, 1_010_000, 1000, None),
    ])
    held = InputMeasure("positive", "CONDITIONING", "intermediate", None, 1_000_000, 1_000_000, digest="abc")
    measure = replace(measure, nodes=tuple(replace(n, inputs=(held,)) for n in measure.nodes))
    timeline = simulate(node_costs(measure, RemoteSpeed(default=1.0)), {"1", "2"}, parse_link("8mbit,0ms"))
    ups = [s for s in timeline.segments if s.lane == "up"]
    assert ups[0].nbytes == 1_010_000
    assert ups[1].nbytes == 10_000 + 80, "the second request names the conditioning by digest"


def test_many_candidates_use_greedy_search(make_synthetic: Callable[..., WorkflowMeasure]) -> None:
    nodes = [("0", "Source", (), 0.0, 0, 0, "loader")]
    nodes += [(str(i), "Step", ("0",), 1.0, 1000, 1000, None) for i in range(1, 15)]
    costs = node_costs(make_synthetic(nodes), RemoteSpeed(default=4.0))
    plan = plan_offload(costs, parse_link("1gbit,1ms"), options=PlanOptions(slots=1))
    assert plan.search == "greedy"
    assert plan.predicted_s < plan.all_local.total_s * 0.8
    assert plan.evaluated < 2 ** 14


def test_measured_remote_times_win_unless_a_speed_is_named_for_the_node(sd15_like: WorkflowMeasure) -> None:
    from diffsplit.profiles.model import RemoteMeasure

    measured = RemoteMeasure("6", run_s=0.25, queue_s=0.0, rebuild_s=0.0, cold_rebuild_s=1.0, overhead_s=0.01,
                             request_bytes=1, reply_bytes=1, recipe_bytes=1, cache_hits=1, cache_misses=0)
    worker = WorkerInfo("tcp://127.0.0.1:1", 1, {"6": measured})
    costs = {c.node_id: c for c in node_costs(sd15_like, RemoteSpeed(default=2.0), worker)}
    assert costs["6"].remote_s == 0.25 and costs["6"].source == "measured"
    assert costs["7"].remote_s == pytest.approx(0.2) and costs["7"].source == "factor"
    named = {c.node_id: c for c in node_costs(sd15_like, parse_remote_speed(["KSampler=8x"]), worker)}
    assert named["6"].remote_s == pytest.approx(0.5) and named["6"].source == "factor"
    assert named["7"].remote_s is None and "no remote speed" in named["7"].block


def test_remote_speed_forms_and_errors() -> None:
    speed = parse_remote_speed(["8x", "KSampler=10x", "6=4", "VAEDecode=0.5x"])
    assert speed.default == 8.0 and speed.by_node == {"6": 4.0}
    assert speed.by_class == {"KSampler": 10.0, "VAEDecode": 0.5}
    assert speed.factor_for("6", "KSampler") == 4.0 and speed.factor_for("9", "KSampler") == 10.0
    assert speed.factor_for("9", "CLIPTextEncode") == 8.0
    for bad, message in [("fast", "not a positive speed-up"), ("0x", "not a positive"),
                         ("=2x", "name a node id or a class"), ("2x,3x", "not a positive")]:
        with pytest.raises(RemoteSpeedError, match=message):
            parse_remote_speed([bad])
    with pytest.raises(RemoteSpeedError, match="given twice"):
        parse_remote_speed(["2x", "3x"])


def test_a_node_whose_placement_changes_nothing_gets_a_no_gain_reason(
    make_synthetic: Callable[..., WorkflowMeasure],
) -> None:
    measure = make_synthetic([
        ("1", "Source", (), 0.0, 0, 0, "loader"),
        ("2", "Tiny", ("1",), 0.006, 0, 0, None),
        ("3", "Sink", ("2",), 0.0, 0, 0, "output node"),
    ])
    # twice as fast remotely, minus the 3 ms call overhead: the same end-to-end time either way
    plan = plan_offload(node_costs(measure, RemoteSpeed(default=2.0)), parse_link("100gbit,0ms"))
    tiny = next(v for v in plan.verdicts if v.node_id == "2")
    assert not tiny.offload and tiny.short == "no gain" and tiny.reason.startswith("keep local")


def test_a_given_local_order_decides_which_waiting_node_runs_next(
    make_synthetic: Callable[..., WorkflowMeasure],
) -> None:
    measure = make_synthetic([
        ("1", "Busy", (), 1.0, 0, 0, None),
        ("2", "BranchA", (), 1.0, 0, 0, None),
        ("3", "BranchB", (), 2.0, 0, 0, None),
        ("4", "Join", ("1", "2", "3"), 0.0, 0, 0, "output node"),
    ])
    costs = node_costs(measure, RemoteSpeed(default=1.0))
    link = parse_link("1gbit,1ms")
    a_first = simulate(costs, set(), link, local_order=["1", "2", "3", "4"])
    b_first = simulate(costs, set(), link, local_order=["1", "3", "2", "4"])
    assert a_first.finish_s["2"] == pytest.approx(2.0) and a_first.finish_s["3"] == pytest.approx(4.0)
    assert b_first.finish_s["3"] == pytest.approx(3.0) and b_first.finish_s["2"] == pytest.approx(4.0)
    assert a_first.total_s == pytest.approx(b_first.total_s)
