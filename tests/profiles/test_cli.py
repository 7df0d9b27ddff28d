"""``profile`` and ``plan`` through their argument parsers, what-if mode (no worker)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.profiles.cli import add_plan_arguments, add_profile_arguments, plan_command, profile_command
from diffsplit.profiles.errors import ProfileError
from diffsplit.profiles.link import LinkSpecError
from diffsplit.profiles.report_json import check_profile_json


def _parse(add: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)  # type: ignore[operator]
    return parser.parse_args(argv)


@pytest.fixture
def workflow_file(tmp_path: Path) -> Path:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(sd15_workflow(steps=2)))
    return path


def test_profile_what_if_prints_the_table_and_writes_reports(
    workflow_file: Path, models_dir: Path, inputs_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    report_json, report_html = tmp_path / "report.json", tmp_path / "report.html"
    args = _parse(add_profile_arguments, [
        str(workflow_file), "--models", str(models_dir), "--inputs", str(inputs_dir), "--warmup", "0",
        "--link", "100mbit,20ms", "--remote-speed", "8x",
        "--json", str(report_json), "--html", str(report_html),
    ])
    assert profile_command(args) == 0
    out = capsys.readouterr().out
    assert "link: 100.0 Mbit/s up, 100.0 Mbit/s down, 20.0 ms RTT (given)" in out
    assert "KSampler" in out and "verdict" in out
    document = json.loads(report_json.read_text())
    check_profile_json(document)
    assert document["settings"]["remote_speed"]["default"] == 8.0
    assert report_html.read_text().startswith("<!DOCTYPE html>")


def test_profile_shows_the_condition_plan_for_two_canny_conditions(
    models_dir: Path, inputs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from diffsplit.engine.example_workflows import controlnet_workflow

    document = controlnet_workflow()
    document["20"] = {"class_type": "Canny", "inputs": {"image": ["10", 0], "low_threshold": 0.2,
                                                        "high_threshold": 0.6}}
    document["21"] = {"class_type": "Canny", "inputs": {"image": ["10", 0], "low_threshold": 0.4,
                                                        "high_threshold": 0.8}}
    document["22"] = {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["11", 0], "control_net": ["9", 0], "image": ["21", 0], "strength": 0.5}}
    document["11"]["inputs"]["image"] = ["20", 0]
    document["6"]["inputs"]["positive"] = ["22", 0]
    workflow = tmp_path / "canny.json"
    workflow.write_text(json.dumps(document))
    args = _parse(add_profile_arguments, [
        str(workflow), "--models", str(models_dir), "--inputs", str(inputs_dir), "--warmup", "0",
        "--link", "50mbit,15ms", "--remote-speed", "6x"])
    assert profile_command(args) == 0
    out = capsys.readouterr().out
    assert "condition plan" in out, out
    assert "20 Canny" in out and "21 Canny" in out
    assert "all conditions ready after" in out and "sooner than the better of the two" in out


def test_plan_apply_labels_the_chosen_nodes(
    models_dir: Path, inputs_dir: Path, tmp_path: Path, registry: NodeRegistry,
) -> None:
    # 8 steps: the sampler's saving stays well above what offloading costs here (the loaders' recipes,
    # which vary with the machine's disk and caches)
    workflow_file = tmp_path / "wf8.json"
    workflow_file.write_text(json.dumps(sd15_workflow(steps=8)))
    output = tmp_path / "wf.split.json"
    args = _parse(add_plan_arguments, [
        str(workflow_file), "--models", str(models_dir), "--inputs", str(inputs_dir), "--warmup", "0",
        "--link", "10gbit,0.1ms", "--remote-speed", "KSampler=1000x", "--tolerance", "0",
        "--address", "tcp://gpu:5555",
        "--apply", "-o", str(output), "-q",
    ])
    assert plan_command(args) == 0
    document = json.loads(output.read_text())
    assert document["6"]["_meta"]["remote"] == "tcp://gpu:5555"
    assert "remote" not in document["1"].get("_meta", {}), "loaders are never labelled"
    labelled = load_workflow(document, registry)
    assert labelled.node("6").remote == "tcp://gpu:5555"


@pytest.mark.parametrize(("argv", "error", "message"), [
    (["--link", "fast"], LinkSpecError, "not a number with a unit"),
    (["--emulate-link", "--link", "1gbit"], ProfileError, "--emulate-link needs both --remote and --link"),
    (["--remote", "gpu:5555"], Exception, "must start with one of tcp://"),
    (["--apply"], ProfileError, "--apply needs -o FILE"),
])
def test_bad_options_fail_before_running(
    workflow_file: Path, models_dir: Path, argv: list[str], error: type[Exception], message: str,
) -> None:
    args = _parse(add_plan_arguments, [str(workflow_file), "--models", str(models_dir), *argv])
    with pytest.raises(error, match=message.replace("(", r"\(")):
        plan_command(args)


def test_plan_apply_places_the_preprocessors_where_the_condition_plan_does(
    models_dir: Path, inputs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from diffsplit.engine.example_workflows import multi_condition_workflow

    workflow_file = tmp_path / "multi.json"
    workflow_file.write_text(json.dumps(multi_condition_workflow(steps=8)))
    output = tmp_path / "multi.split.json"
    # the sampler 1000x faster there; the preprocessors as fast there as here, over a link that costs
    # next to nothing: the two paths run at once, so some preprocessing goes to the worker
    args = _parse(add_plan_arguments, [
        str(workflow_file), "--models", str(models_dir), "--inputs", str(inputs_dir), "--warmup", "0",
        "--link", "10gbit,0.1ms", "--remote-speed", "KSampler=1000x", "--remote-speed", "Canny=1x",
        "--remote-speed", "DepthAnythingPreprocessor=1x", "--tolerance", "0", "--no-run-plan",
        "--address", "tcp://gpu:5555", "--apply", "-o", str(output),
    ])
    assert plan_command(args) == 0
    out = capsys.readouterr().out
    planned = {line.split()[0]: line.split()[2] for line in out.splitlines()
               if line.strip().split(" ")[0] in {"20", "21", "23"} and " #" in line}
    assert set(planned) == {"20", "21", "23"}, out
    labelled = json.loads(output.read_text())
    assert labelled["6"]["_meta"]["remote"] == "tcp://gpu:5555"
    on_worker = {node for node in planned if labelled[node].get("_meta", {}).get("remote")}
    assert on_worker == {node for node, where in planned.items() if where == "remote"}
    assert 1 <= len(on_worker) <= 2, out  # neither path takes everything when both are as fast
    # the depth preprocessor reads its network file itself: that goes by sha256, so it may be offloaded
    assert "23 DepthAnythingPreprocessor: stays local: reads" not in out
