"""Editor subgraphs (``definitions.subgraphs``, nested) run as their flat twins, locally and split."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.example_workflows import sd15_workflow
from diffsplit.engine.formats import load_workflow

from .conftest import png_pixels, png_text, write_json


def _link(link_id: int, origin: int, origin_slot: int, target: int, target_slot: int, kind: str) -> dict:
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return dict(zip(keys, (link_id, origin, origin_slot, target, target_slot, kind), strict=True))


def _node(node_id: int, kind: str, inputs: list[dict], outputs: list[str], widgets: Any = None) -> dict:
    node: dict[str, Any] = {
        "id": node_id, "type": kind, "mode": 0, "inputs": inputs,
        "outputs": [{"name": name, "type": name, "links": []} for name in outputs], "properties": {},
    }
    if widgets is not None:
        node["widgets_values"] = widgets
    return node


def _in(name: str, kind: str, link: int | None, widget: bool = False) -> dict:
    entry: dict[str, Any] = {"name": name, "type": kind, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def sampler_subgraph() -> dict[str, Any]:
    """Inner subgraph: a KSampler whose seed is a subgraph input (promoted widget)."""
    return {
        "id": "aaaa-sampler", "name": "Sample", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"name": "model", "type": "MODEL", "linkIds": [1]},
                   {"name": "positive", "type": "CONDITIONING", "linkIds": [2]},
                   {"name": "negative", "type": "CONDITIONING", "linkIds": [3]},
                   {"name": "latent_image", "type": "LATENT", "linkIds": [4]},
                   {"name": "seed", "type": "INT", "linkIds": [5]}],
        "outputs": [{"name": "LATENT", "type": "LATENT", "linkIds": [6]}],
        "nodes": [_node(1, "KSampler", [
            _in("model", "MODEL", 1), _in("positive", "CONDITIONING", 2), _in("negative", "CONDITIONING", 3),
            _in("latent_image", "LATENT", 4), _in("seed", "INT", 5, widget=True)],
            ["LATENT"], [123, "randomize", 4, 6.0, "euler", "normal", 1.0])],
        "links": [_link(1, -10, 0, 1, 0, "MODEL"), _link(2, -10, 1, 1, 1, "CONDITIONING"),
                  _link(3, -10, 2, 1, 2, "CONDITIONING"), _link(4, -10, 3, 1, 3, "LATENT"),
                  _link(5, -10, 4, 1, 4, "INT"), _link(6, 1, 0, -20, 0, "LATENT")],
    }


def render_subgraph() -> dict[str, Any]:
    """Outer subgraph: the nested sampler subgraph, then VAEDecode; seed passes through as a widget."""
    return {
        "id": "bbbb-render", "name": "Render", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"name": "model", "type": "MODEL", "linkIds": [11]},
                   {"name": "positive", "type": "CONDITIONING", "linkIds": [12]},
                   {"name": "negative", "type": "CONDITIONING", "linkIds": [13]},
                   {"name": "latent_image", "type": "LATENT", "linkIds": [14]},
                   {"name": "vae", "type": "VAE", "linkIds": [15]},
                   {"name": "seed", "type": "INT", "linkIds": [16]}],
        "outputs": [{"name": "IMAGE", "type": "IMAGE", "linkIds": [18]}],
        "nodes": [
            _node(2, "aaaa-sampler", [
                _in("model", "MODEL", 11), _in("positive", "CONDITIONING", 12),
                _in("negative", "CONDITIONING", 13), _in("latent_image", "LATENT", 14),
                _in("seed", "INT", 16, widget=True)], ["LATENT"], [999]),
            _node(3, "VAEDecode", [_in("samples", "LATENT", 17), _in("vae", "VAE", 15)], ["IMAGE"]),
        ],
        "links": [_link(11, -10, 0, 2, 0, "MODEL"), _link(12, -10, 1, 2, 1, "CONDITIONING"),
                  _link(13, -10, 2, 2, 2, "CONDITIONING"), _link(14, -10, 3, 2, 3, "LATENT"),
                  _link(15, -10, 4, 3, 1, "VAE"), _link(16, -10, 5, 2, 4, "INT"),
                  _link(17, 2, 0, 3, 0, "LATENT"), _link(18, 3, 0, -20, 0, "IMAGE")],
    }


def sd15_subgraph_ui(seed: int) -> dict[str, Any]:
    """``sd15_workflow(lora=False, seed=seed)`` with sampling and decoding inside nested subgraphs."""
    nodes = [
        _node(1, "CheckpointLoaderSimple", [], ["MODEL", "CLIP", "VAE"], ["tiny-sd15.safetensors"]),
        _node(3, "CLIPTextEncode", [_in("clip", "CLIP", 1)], ["CONDITIONING"], ["a red fox"]),
        _node(4, "CLIPTextEncode", [_in("clip", "CLIP", 2)], ["CONDITIONING"], ["blurry"]),
        _node(5, "EmptyLatentImage", [], ["LATENT"], [64, 64, 1]),
        _node(20, "bbbb-render", [
            _in("model", "MODEL", 3), _in("positive", "CONDITIONING", 4), _in("negative", "CONDITIONING", 5),
            _in("latent_image", "LATENT", 6), _in("vae", "VAE", 7), _in("seed", "INT", None, widget=True)],
            ["IMAGE"], [seed]),
        _node(8, "SaveImage", [_in("images", "IMAGE", 8)], [], ["sd15"]),
    ]
    links = [[1, 1, 1, 3, 0, "CLIP"], [2, 1, 1, 4, 0, "CLIP"], [3, 1, 0, 20, 0, "MODEL"],
             [4, 3, 0, 20, 1, "CONDITIONING"], [5, 4, 0, 20, 2, "CONDITIONING"], [6, 5, 0, 20, 3, "LATENT"],
             [7, 1, 2, 20, 4, "VAE"], [8, 20, 0, 8, 0, "IMAGE"]]
    return {"last_node_id": 20, "last_link_id": 8, "nodes": nodes, "links": links, "groups": [],
            "definitions": {"subgraphs": [render_subgraph(), sampler_subgraph()]}, "version": 0.4}


def test_nested_subgraphs_flatten_to_the_flat_graph(registry) -> None:
    workflow = load_workflow(sd15_subgraph_ui(seed=42), registry)
    sampler = workflow.node("20:2:1")
    assert sampler.class_type == "KSampler"
    assert sampler.inputs["seed"] == 42  # the outer node's promoted widget wins over both inner values
    assert sampler.inputs["steps"] == 4 and sampler.inputs["model"].node_id == "1"
    assert workflow.node("20:3").inputs["samples"].node_id == "20:2:1"
    assert workflow.node("8").inputs["images"].node_id == "20:3"
    assert workflow.extra["workflow"]["definitions"]["subgraphs"][0]["id"] == "bbbb-render"


def test_an_unfed_promoted_input_keeps_the_inner_widget_value(registry) -> None:
    document = sd15_subgraph_ui(seed=42)
    del document["nodes"][4]["widgets_values"]
    document["definitions"]["subgraphs"][0]["nodes"][0].pop("widgets_values")
    assert load_workflow(document, registry).node("20:2:1").inputs["seed"] == 123


def test_a_subgraph_that_contains_itself_is_refused(registry) -> None:
    document = sd15_subgraph_ui(seed=1)
    document["definitions"]["subgraphs"][1]["nodes"][0]["type"] = "bbbb-render"
    with pytest.raises(WorkflowError, match="contains itself"):
        load_workflow(document, registry)


def test_inner_widgets_shown_on_the_subgraph_node_take_its_values(registry) -> None:
    document = sd15_subgraph_ui(seed=42)
    sampler = document["definitions"]["subgraphs"][1]
    document["definitions"]["subgraphs"] = [sampler]
    outer = document["nodes"][4]
    outer["type"] = "aaaa-sampler"
    outer["inputs"] = [*outer["inputs"][:4], _in("seed", "INT", None, widget=True)]
    outer["outputs"] = [{"name": "LATENT", "type": "LATENT", "links": []}]
    outer["properties"] = {"proxyWidgets": [["1", "steps"], ["1", "cfg"]]}
    outer["widgets_values"] = [2, 3.5]
    document["links"] = [link for link in document["links"] if link[0] not in (7, 8)]
    document["nodes"] = document["nodes"][:5]
    inputs = load_workflow(document, registry).node("20:1").inputs
    assert (inputs["steps"], inputs["cfg"], inputs["seed"]) == (2, 3.5, 123)


def test_a_muted_subgraph_node_is_dropped_not_expanded(registry) -> None:
    document = copy.deepcopy(sd15_subgraph_ui(seed=1))
    document["nodes"][4]["mode"] = 2  # muted: its consumer gets nothing
    workflow = load_workflow(document, registry)
    assert not any(node_id.startswith("20:") for node_id in workflow.nodes)


@pytest.mark.parametrize("remote", [False, True], ids=["local", "split"])
def test_subgraph_workflow_gives_the_flat_twins_pixels(
    run_cli, tmp_path, models_dir, inputs_dir, remote: bool, request
) -> None:
    flat = write_json(tmp_path / "flat.json", sd15_workflow(lora=False, seed=42))
    nested = write_json(tmp_path / "nested.json", sd15_subgraph_ui(seed=42))
    extra: list[str] = []
    if remote:
        address = request.getfixturevalue("worker_address")
        extra = ["--remote", f"KSampler={address}", "--remote", f"VAEDecode={address}"]
    runs = [run_cli("run", document, "--models", models_dir, "--inputs", inputs_dir,
                    "--out", tmp_path / name, *extra) for name, document in (("a", flat), ("b", nested))]
    assert [run.exit_code for run in runs] == [0, 0], [run.stderr for run in runs]
    first, second = (png_pixels(run.saved[0]) for run in runs)
    assert torch.equal(torch.from_numpy(first), torch.from_numpy(second))


def test_set_changes_are_in_the_embedded_ui_workflow(run_cli, tmp_path, models_dir, inputs_dir) -> None:
    document = write_json(tmp_path / "nested.json", sd15_subgraph_ui(seed=42))
    run = run_cli("run", document, "--models", models_dir, "--inputs", inputs_dir, "--out", tmp_path / "a",
                  "--set", "20:2:1.steps=3", "--set", "5.width=48")
    assert run.exit_code == 0, run.stderr
    embedded = json.loads(png_text(run.saved[0])["workflow"])
    sampler = embedded["definitions"]["subgraphs"][1]["nodes"][0]
    assert sampler["widgets_values"][:4] == [123, "randomize", 3, 6.0]
    latent = next(node for node in embedded["nodes"] if node["id"] == 5)
    assert latent["widgets_values"] == [48, 64, 1]
    # the edited UI form runs to the same picture as the run that wrote it
    again = run_cli("run", write_json(tmp_path / "again.json", embedded), "--models", models_dir,
                    "--inputs", inputs_dir, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.stderr
    assert (png_pixels(again.saved[0]) == png_pixels(run.saved[0])).all()


def test_primitive_value_nodes_feed_widget_inputs(registry, run_workflow) -> None:
    document = sd15_workflow(lora=False, seed=42, steps=3)
    reference = run_workflow(document).outputs["6"][0]["samples"]
    document["40"] = {"class_type": "PrimitiveInt", "inputs": {"value": 42}}
    document["41"] = {"class_type": "PrimitiveString", "inputs": {"value": "a red fox"}}
    document["6"]["inputs"]["seed"] = ["40", 0]
    document["3"]["inputs"]["text"] = ["41", 0]
    assert torch.equal(run_workflow(document).outputs["6"][0]["samples"], reference)
