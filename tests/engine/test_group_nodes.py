"""Legacy editor group nodes (``workflow/NAME``, ``extra.groupNodes``) expand as the editor sends them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.format_api import save_api_format
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry

CORPUS = Path(__file__).parents[1] / "data" / "shared_workflows"
NAME = "sdxl_cosxl_edit_groupnode"
#: Inputs the editor of 2024 did not have (current ComfyUI's DualCFGGuider style), or never sends (upload).
NEWER_OR_UI_ONLY = {("DualCFGGuider", "style"), ("LoadImage", "upload")}


@pytest.fixture(scope="module")
def registry() -> NodeRegistry:
    return default_registry()


def _document() -> dict[str, Any]:
    return json.loads((CORPUS / f"{NAME}.json").read_text(encoding="utf-8"))


def _api(document: dict[str, Any], registry: NodeRegistry) -> dict[str, Any]:
    return save_api_format(load_workflow(document, registry))


def _without(graph: dict[str, Any], skipped: set[tuple[str, str]]) -> dict[str, Any]:
    return {
        node_id: (node["class_type"], {k: v for k, v in node["inputs"].items()
                                       if (node["class_type"], k) not in skipped})
        for node_id, node in graph.items()
    }


def _group(document: dict[str, Any], node_id: int = 37) -> dict[str, Any]:
    return next(node for node in document["nodes"] if node["id"] == node_id)


def test_the_corpus_group_node_expands_to_the_graph_the_editor_sent(registry: NodeRegistry) -> None:
    ours = _api(_document(), registry)
    theirs = json.loads((CORPUS / "api" / f"{NAME}.json").read_text(encoding="utf-8"))
    assert _without(ours, NEWER_OR_UI_ONLY) == _without(theirs, NEWER_OR_UI_ONLY)
    assert set(ours) == {"4", "6", "7", "8", "9", "13", "37:0", "37:1", "37:3", "37:6", "37:7", "37:8"}
    # the editor's values, not the inner nodes' own (the inner DualCFGGuider says 3, the group 5)
    assert ours["37:7"]["inputs"]["cfg_conds"] == 5 and ours["37:1"]["inputs"]["noise_seed"] == 11652752290163
    assert ours["37:7"]["inputs"]["style"] == "regular"  # a widget the group's values do not reach: default


def test_the_current_separator_reads_the_same(registry: NodeRegistry) -> None:
    document = _document()
    _group(document)["type"] = "workflow>IP2PSampler"
    assert _api(document, registry) == _api(_document(), registry)


def test_two_uses_of_one_group_get_their_own_ids_and_values(registry: NodeRegistry) -> None:
    document = _document()
    second = copy.deepcopy(_group(document))
    second["id"] = 41
    second["widgets_values"][1] = 7  # its own noise seed
    second["outputs"][0]["links"] = [501]
    document["nodes"].append(second)
    document["nodes"].append({"id": 42, "type": "VAEDecode", "mode": 0, "outputs": [],
                              "inputs": [{"name": "samples", "type": "LATENT", "link": 501},
                                         {"name": "vae", "type": "VAE", "link": 8}]})
    document["links"].append([501, 41, 0, 42, 0, "LATENT"])
    ours = _api(document, registry)
    first_ids = {node_id for node_id in ours if node_id.startswith("37:")}
    second_ids = {node_id for node_id in ours if node_id.startswith("41:")}
    assert {i.removeprefix("37:") for i in first_ids} == {i.removeprefix("41:") for i in second_ids}
    assert ours["41:1"]["inputs"]["noise_seed"] == 7
    assert ours["37:1"]["inputs"]["noise_seed"] == 11652752290163
    assert ours["41:8"]["inputs"]["guider"] == ["41:7", 0] and ours["41:7"]["inputs"]["cond1"] == ["41:6", 0]
    assert ours["42"]["inputs"]["samples"] == ["41:8", 0] and ours["8"]["inputs"]["samples"] == ["37:8", 0]
    assert ours["41:3"]["inputs"]["model"] == ["4", 0]  # through the group's inner Reroute


def test_widget_values_the_group_lacks_take_the_class_defaults(registry: NodeRegistry) -> None:
    document = _document()
    _group(document)["widgets_values"] = ["dpmpp_2m", 99, "fixed"]
    ours = _api(document, registry)
    assert ours["37:0"]["inputs"] == {"sampler_name": "dpmpp_2m"}
    assert ours["37:1"]["inputs"] == {"noise_seed": 99}
    assert ours["37:3"]["inputs"]["steps"] == 20 and ours["37:3"]["inputs"]["denoise"] == 1.0
    # class defaults (8.0), not the inner node's own values (3 and 1.5)
    guider = ours["37:7"]["inputs"]
    assert (guider["cfg_conds"], guider["cfg_cond2_negative"], guider["style"]) == (8.0, 8.0, "regular")


def test_a_group_node_without_its_definition_is_an_error_naming_it(registry: NodeRegistry) -> None:
    document = _document()
    del document["extra"]["groupNodes"]["IP2PSampler"]
    with pytest.raises(WorkflowError, match="group node 'IP2PSampler' has no definition") as caught:
        load_workflow(document, registry)
    assert caught.value.node_id == "37" and caught.value.class_type == "workflow/IP2PSampler"


def test_a_muted_group_node_is_dropped_without_needing_its_definition(registry: NodeRegistry) -> None:
    document = _document()
    del document["extra"]["groupNodes"]
    _group(document)["mode"] = 2
    ours = _api(document, registry)
    assert not any(":" in node_id for node_id in ours) and "samples" not in ours["8"]["inputs"]


def test_an_unknown_class_inside_a_group_is_named(registry: NodeRegistry) -> None:
    document = _document()
    document["extra"]["groupNodes"]["IP2PSampler"]["nodes"][6]["type"] = "InstructPixToPixConditioningX"
    with pytest.raises(WorkflowError, match=r"inside group node 'IP2PSampler'.*PixConditioningX"):
        load_workflow(document, registry)


def _seeded_sampler_group() -> dict[str, Any]:
    """A PrimitiveNode feeding a KSampler's converted seed; the KSampler's cfg converted, unlinked."""
    ksampler = {
        "type": "KSampler", "mode": 0, "properties": {},
        "inputs": [{"name": "model", "type": "MODEL", "link": None},
                   {"name": "positive", "type": "CONDITIONING", "link": None},
                   {"name": "negative", "type": "CONDITIONING", "link": None},
                   {"name": "latent_image", "type": "LATENT", "link": None},
                   {"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}},
                   {"name": "cfg", "type": "FLOAT", "link": None, "widget": {"name": "cfg"}}],
        "outputs": [{"name": "LATENT", "type": "LATENT", "links": []}],
        "widgets_values": [1, "fixed", 30, 2.0, "ddim", "karras", 0.5],
    }
    primitive = {"type": "PrimitiveNode", "mode": 0, "properties": {}, "widgets_values": [5, "fixed"],
                 "outputs": [{"name": "INT", "type": "INT", "links": [], "widget": {"name": "seed"}}]}
    return {"nodes": [primitive, ksampler], "links": [[0, 0, 1, 4, 9, "INT"]], "external": []}


def _seeded_sampler_document(cfg_link: bool) -> dict[str, Any]:
    base = json.loads(json.dumps({
        "nodes": [
            {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "widgets_values": ["m.safetensors"],
             "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}]},
            {"id": 2, "type": "EmptyLatentImage", "mode": 0, "widgets_values": [64, 64, 1],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [2]}]},
            {"id": 3, "type": "CLIPTextEncode", "mode": 0, "widgets_values": ["x"],
             "inputs": [], "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [3, 4]}]},
            {"id": 5, "type": "workflow>Seeded", "mode": 0,
             "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                        {"name": "positive", "type": "CONDITIONING", "link": 3},
                        {"name": "negative", "type": "CONDITIONING", "link": 4},
                        {"name": "latent_image", "type": "LATENT", "link": 2},
                        {"name": "cfg", "type": "FLOAT", "link": 6 if cfg_link else None,
                         "widget": {"name": "cfg"}}],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [5]}],
             # the primitive's value and control, then steps, sampler, scheduler, denoise; converted cfg last
             "widgets_values": [77, "randomize", 12, "euler", "normal", 0.75, 6.5]},
            {"id": 6, "type": "VAEDecode", "mode": 0, "outputs": [],
             "inputs": [{"name": "samples", "type": "LATENT", "link": 5}]},
            {"id": 7, "type": "PrimitiveNode", "mode": 0, "widgets_values": [3.5, "fixed"],
             "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": [6], "widget": {"name": "cfg"}}]},
        ],
        "links": [[1, 1, 0, 5, 0, "MODEL"], [2, 2, 0, 5, 3, "LATENT"], [3, 3, 0, 5, 1, "CONDITIONING"],
                  [4, 3, 0, 5, 2, "CONDITIONING"], [5, 5, 0, 6, 0, "LATENT"], [6, 7, 0, 5, 4, "FLOAT"]],
        "extra": {"groupNodes": {"Seeded": _seeded_sampler_group()}},
    }))
    return base


def test_primitives_and_converted_widgets_inside_a_group(registry: NodeRegistry) -> None:
    ours = _api(_seeded_sampler_document(cfg_link=False), registry)["5:1"]["inputs"]
    assert ours == {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["2", 0],
                    "seed": 77, "steps": 12, "cfg": 6.5, "sampler_name": "euler", "scheduler": "normal",
                    "denoise": 0.75}
    linked = _api(_seeded_sampler_document(cfg_link=True), registry)["5:1"]["inputs"]
    assert linked == {**ours, "cfg": 3.5}  # a link into the group's converted widget wins


def test_a_group_inside_a_group_is_refused(registry: NodeRegistry) -> None:
    document = _seeded_sampler_document(cfg_link=False)
    document["extra"]["groupNodes"]["Seeded"]["nodes"].append({"type": "workflow>Seeded", "mode": 0})
    with pytest.raises(WorkflowError, match="cannot nest group nodes") as caught:
        load_workflow(document, registry)
    assert caught.value.node_id == "5"


def _set(document: dict[str, Any], registry: NodeRegistry, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    from diffsplit.engine.overrides import apply_overrides

    workflow = apply_overrides(load_workflow(document, registry), overrides, registry)
    return workflow, workflow.extra["workflow"]


def test_set_on_an_inner_node_is_written_into_the_group_nodes_values(registry: NodeRegistry) -> None:
    workflow, saved = _set(_document(), registry, **{"37:1.noise_seed": 5, "37:7.cfg_cond2_negative": 2.5})
    assert workflow.nodes["37:1"].inputs["noise_seed"] == 5
    # written out in full, as the editor saves it (the style widget the old file lacked included)
    assert _group(saved)["widgets_values"] == ["euler", 5, "randomize", "normal", 20, 1, 5, 2.5, "regular"]
    assert _group(_document())["widgets_values"][1] == 11652752290163  # the loaded document is untouched
    again = _api(saved, registry)
    assert again["37:1"]["inputs"]["noise_seed"] == 5 and again["37:7"]["inputs"]["cfg_cond2_negative"] == 2.5


def test_set_beyond_short_group_values_fills_the_slots_before_it(registry: NodeRegistry) -> None:
    document = _document()
    _group(document)["widgets_values"] = ["dpmpp_2m"]
    _, saved = _set(document, registry, **{"37:7.style": "nested"})
    assert _group(saved)["widgets_values"] == ["dpmpp_2m", 0, "fixed", "normal", 20, 1.0, 8.0, 8.0, "nested"]
    assert _api(saved, registry) == {**_api(document, registry), "37:7": {
        **_api(document, registry)["37:7"], "inputs": {**_api(document, registry)["37:7"]["inputs"],
                                                       "style": "nested"}}}


def test_set_on_a_value_a_primitive_inside_the_group_feeds(registry: NodeRegistry) -> None:
    _, saved = _set(_seeded_sampler_document(cfg_link=False), registry, **{"5:1.seed": 11})
    assert next(n for n in saved["nodes"] if n["id"] == 5)["widgets_values"][:2] == [11, "randomize"]
    assert _api(saved, registry)["5:1"]["inputs"]["seed"] == 11
