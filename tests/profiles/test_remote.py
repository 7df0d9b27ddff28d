"""Profiles against a real worker process: link probe, remote speeds, the plan run for real."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import sd15_workflow, two_branch_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.graph import Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.profiles.cli import add_plan_arguments, plan_command
from diffsplit.profiles.link import parse_link
from diffsplit.profiles.remote_runs import RunSetup, run_plan
from diffsplit.profiles.report_html import render_html
from diffsplit.profiles.report_json import check_profile_json, profile_to_json
from diffsplit.profiles.session import ProfileSettings, profile_workflow


def test_profile_with_a_worker_measures_there_and_runs_the_plan(
    worker_address: str, registry: NodeRegistry, run_setup: Callable[[Workflow], RunSetup],
) -> None:
    workflow = load_workflow(sd15_workflow(steps=2), registry)
    settings = ProfileSettings(address=worker_address, warmup_runs=0, remote_runs=2)
    profile = profile_workflow(workflow, run_setup(workflow), settings, name="sd15")
    assert profile.link is not None and profile.link.source == "measured"
    assert len(profile.link_samples) == 7
    assert profile.worker is not None and profile.worker.slots == 1
    remote = profile.worker.remote
    assert set(remote) == {"3", "4", "5", "6", "7"}, "every candidate ran on the worker"
    sampler = remote["6"]
    assert sampler.run_s > 0
    assert sampler.rebuild_s < sampler.cold_rebuild_s, "the second run found the models cached"
    assert sampler.request_bytes == pytest.approx(profile.measure.node("6").request_bytes, rel=0.05), \
        "the profiler's wire estimate matches what the runner sent"
    costs = {cost.node_id: cost for cost in profile.costs}
    assert costs["6"].source == "measured" and costs["6"].remote_s == sampler.run_s + sampler.rebuild_s
    assert profile.plan is not None and profile.plan_run is not None
    assert profile.plan_run.remote == profile.plan.remote
    assert profile.plan_run.measured_s > 0
    document = profile_to_json(profile)
    check_profile_json(document)
    assert document["plan_run"]["measured_s"] == profile.plan_run.measured_s
    assert document["plan_run"]["predicted_s"] == profile.plan.predicted_s
    assert document["nodes"][5]["remote_measured"]["run_s"] == sampler.run_s
    assert "Measured timeline" in render_html(profile)


def test_forced_plan_over_an_emulated_link_pays_for_the_link(
    worker_address: str, registry: NodeRegistry, run_setup: Callable[[Workflow], RunSetup],
) -> None:
    workflow = load_workflow(two_branch_workflow(), registry)
    link = parse_link("8mbit,100ms")
    run = run_plan(workflow, ("6", "16"), ("1", "2", "3", "4", "5", "7", "17", "8", "18"), worker_address,
                   run_setup(workflow), emulate=link)
    lanes = {(s.lane, s.node_id): s for s in run.timeline.segments}
    for node_id in ("6", "16"):
        up, down = lanes[("up", node_id)], lanes[("down", node_id)]
        assert up.nbytes > 0 and up.end_s - up.start_s >= up.nbytes / 1e6 * 0.99, "8 Mbit/s is 1 MB/s"
        assert down.end_s - down.start_s >= down.nbytes / 1e6 * 0.99
        assert lanes[("remote", node_id)].start_s >= up.end_s + 0.05 * 0.99, "half the round trip later"
    assert set(run.remote_stats) == {"6", "16"}
    assert run.measured_s >= 2 * 0.1


def test_plan_apply_with_a_worker_writes_its_address(
    worker_address: str, models_dir: Path, inputs_dir: Path, tmp_path: Path,
) -> None:
    source, output = tmp_path / "wf.json", tmp_path / "wf.split.json"
    # 8 steps: the sampler's saving stays well above what offloading costs here (the loaders' recipes)
    source.write_text(json.dumps(sd15_workflow(steps=8)))
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args([str(source), "--models", str(models_dir), "--inputs", str(inputs_dir),
                              "--remote", worker_address, "--remote-speed", "KSampler=1000x", "--warmup", "0",
                              "--tolerance", "0",
                              "--no-run-plan", "--apply", "-o", str(output), "-q"])
    assert plan_command(args) == 0
    labelled = json.loads(output.read_text())
    assert labelled["6"]["_meta"]["remote"] == worker_address
