"""Reports of a real what-if profile: terminal table, JSON schema, HTML rendered in headless Chromium."""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.graph import Workflow
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.profiles.link import parse_link
from diffsplit.profiles.remote_model import parse_remote_speed
from diffsplit.profiles.remote_runs import RunSetup
from diffsplit.profiles.report import render_text
from diffsplit.profiles.report_html import write_html
from diffsplit.profiles.report_json import SCHEMA, ProfileSchemaError, check_profile_json, profile_to_json
from diffsplit.profiles.session import Profile, ProfileSettings, profile_workflow

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium is not installed (Debian: apt-get install -y chromium)"
)


@pytest.fixture
def what_if(registry: NodeRegistry, run_setup: Callable[[Workflow], RunSetup]) -> Profile:
    """SD 1.5 profiled locally; a worker 10x faster over a fast link is assumed (no worker)."""
    workflow = load_workflow(sd15_workflow(steps=8), registry)
    # tolerance 0: the verdict then rests on the sampler (remote 1000x faster, a 3 ms call) against what
    # any offload costs here: the loaders' recipes (hashing their files), which vary with the machine's
    # disk and caches (up to 0.09 s seen on CI); 8 steps keep the sampler several times above that
    settings = ProfileSettings(link=parse_link("1gbit,1ms"), speed=parse_remote_speed(["KSampler=1000x"]),
                               warmup_runs=0, tolerance=0.0)
    return profile_workflow(workflow, run_setup(workflow), settings, name="sd15")


def test_text_report_has_a_row_per_node_with_verdicts(what_if: Profile) -> None:
    text = render_text(what_if)
    assert "link: 1000.0 Mbit/s up, 1000.0 Mbit/s down, 1.0 ms RTT (given)" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line[:1].isdigit()}
    assert set(rows) >= {"1", "2", "3", "4", "5", "6", "7", "8"}
    assert "OFFLOAD" in rows["6"], "a 1000x faster sampler over a fast link is worth offloading"
    assert "loader" in rows["1"] and "output node" in rows["8"]
    assert "sent as shape only (all zeros): latent_image" in text


def test_json_follows_the_schema(what_if: Profile, tmp_path: Path) -> None:
    document = json.loads(json.dumps(profile_to_json(what_if)))
    check_profile_json(document)
    assert document["schema"] == SCHEMA == "diffsplit.profile/1"
    nodes = {node["id"]: node for node in document["nodes"]}
    sampler = nodes["6"]
    assert sampler["verdict"]["offload"] is True and "6" in document["plan"]["remote"]
    assert sampler["remote"]["source"] == "factor"
    assert sampler["bytes_by_category"]["intermediate"] > 0 and sampler["naive_weight_bytes"] > 0
    assert {i["category"] for i in sampler["inputs"]} == {"normal", "intermediate", "model"}
    assert nodes["1"]["offloadable"] is False and nodes["1"]["verdict"]["offload"] is False
    lanes = {segment["lane"] for segment in document["plan"]["timeline"]["segments"]}
    assert {"local", "up", "remote", "down"} <= lanes
    assert document["plan_run"] is None and document["worker"] is None
    del document["nodes"][0]["wall_s"]
    with pytest.raises(ProfileSchemaError, match="lacks wall_s"):
        check_profile_json(document)


def _chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@needs_chromium
def test_html_renders_table_rows_and_timeline_lanes(what_if: Profile, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    write_html(what_if, page)
    assert "http://" not in page.read_text().replace("http://www.w3.org/2000/svg", ""), "no network"
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    for node in what_if.measure.nodes:
        assert f'data-node="{node.node_id}"' in dom
    assert dom.count("<tr class=") == len(what_if.measure.nodes)
    assert '<svg class="timeline"' in dom and '<svg class="graph"' in dom
    for lane in ("local", "up", "remote", "down"):
        assert f'data-lane="{lane}"' in dom
    assert 'class="seg seg-remote" data-node="6"' in dom, "the offloaded sampler is drawn on the remote lane"
    assert 'class="node offload" data-node="6"' in dom


@needs_chromium
def test_html_screenshot_is_a_png_of_the_window(what_if: Profile, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    write_html(what_if, page)
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", page.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000, "a rendered page, not a blank image"
