"""Small arithmetic/string node classes for graph, format and executor tests.

``toy`` builds fresh classes per test whose functions count their calls, so
tests can assert exactly which nodes ran.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec
from diffsplit.engine.nodes.registry import NodeRegistry


@dataclass
class Toy:
    """A registry of toy nodes and the per-class call counts of their functions."""

    registry: NodeRegistry
    calls: Counter[str] = field(default_factory=Counter)


def _toy_nodes(calls: Counter[str]) -> tuple[NodeClass, ...]:
    lock = threading.Lock()

    def counted(name: str, function):
        def wrapper(ctx: NodeContext, **inputs):
            with lock:
                calls[name] += 1
            return function(ctx, **inputs)

        return wrapper

    def make_number(ctx: NodeContext, *, seed: int, value: float) -> tuple[float]:
        return (float(value),)

    def add(ctx: NodeContext, *, a: float, b: float) -> tuple[float]:
        return (a + b,)

    def scale(ctx: NodeContext, *, x: float, factor: float = 1.0) -> tuple[float]:
        return (x * factor,)

    def format_number(ctx: NodeContext, *, x: float, template: str, style: str) -> tuple[str]:
        text = template.format(x=x)
        return (f"*{text}*" if style == "fancy" else text,)

    def show(ctx: NodeContext, *, text: str) -> tuple[str]:
        return (text,)

    def load_model(ctx: NodeContext, *, ckpt_name: str) -> tuple[str]:
        return (ctx.model_path("checkpoints", ckpt_name).read_text(),)

    def toggle(ctx: NodeContext, *, enabled: bool) -> tuple[float]:
        return (1.0 if enabled else 0.0,)

    number = OutputSpec("NUMBER", "NUMBER")
    return (
        NodeClass(
            "MakeNumber",
            (
                InputSpec("seed", "INT", default=0, min=0, max=2**32, control_after_generate=True),
                InputSpec("value", "FLOAT", default=0.0, min=-1000, max=1000),
            ),
            (number,),
            counted("MakeNumber", make_number),
        ),
        NodeClass(
            "Add",
            (InputSpec("a", "NUMBER"), InputSpec("b", "NUMBER")),
            (number,),
            counted("Add", add),
        ),
        NodeClass(
            "Scale",
            (
                InputSpec("x", "NUMBER"),
                InputSpec("factor", "FLOAT", default=1.0, min=0, max=10, optional=True),
            ),
            (number,),
            counted("Scale", scale),
        ),
        NodeClass(
            "Format",
            (
                InputSpec("x", "NUMBER"),
                InputSpec("template", "STRING", default="{x}"),
                InputSpec("style", "COMBO", default="plain", choices=("plain", "fancy")),
            ),
            (OutputSpec("STRING", "STRING"),),
            counted("Format", format_number),
        ),
        NodeClass(
            "Show",
            (InputSpec("text", "STRING"),),
            (OutputSpec("STRING", "STRING"),),
            counted("Show", show),
            output_node=True,
        ),
        NodeClass(
            "LoadModel",
            (InputSpec("ckpt_name", "COMBO", model_folder="checkpoints"),),
            (OutputSpec("MODEL", "MODEL"),),
            counted("LoadModel", load_model),
            is_loader=True,
        ),
        NodeClass(
            "Toggle",
            (InputSpec("enabled", "BOOLEAN", default=True),),
            (number,),
            counted("Toggle", toggle),
        ),
    )


@pytest.fixture
def toy() -> Toy:
    """Fresh toy node classes whose calls are counted per class name."""
    calls: Counter[str] = Counter()
    return Toy(NodeRegistry.from_nodes(_toy_nodes(calls)), calls)


@pytest.fixture
def tiny_store_root(tmp_path: Path) -> Path:
    """A models folder with two small 'checkpoints' (text files with model extensions)."""
    root = tmp_path / "models"
    (root / "checkpoints" / "sd").mkdir(parents=True)
    (root / "checkpoints" / "base.safetensors").write_text("base weights")
    (root / "checkpoints" / "sd" / "v15.ckpt").write_text("v15 weights")
    (root / "loras").mkdir()
    return root


# -- UI-format documents ---------------------------------------------------------------------------


def ui_node(
    node_id: int,
    node_type: str,
    inputs: list[dict] | None = None,
    widgets: Any = None,
    mode: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": node_id,
        "type": node_type,
        "mode": mode,
        "pos": [0, 0],
        "size": [200, 100],
        "inputs": inputs or [],
        "outputs": [],
        "properties": extra.pop("properties", {}),
    }
    if widgets is not None:
        entry["widgets_values"] = widgets
    entry.update(extra)
    return entry


def link_input(name: str, kind: str, link: int | None, widget: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "type": kind, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def _ui_workflow() -> dict[str, Any]:
    """PrimitiveNode → two Scales, a Reroute chain, a bypassed and a muted node, notes and a group."""
    nodes = [
        ui_node(1, "MakeNumber", widgets=[5, "randomize", 2.5]),
        ui_node(2, "PrimitiveNode", widgets=[3.0, "fixed"]),
        ui_node(
            3, "Scale", [link_input("x", "NUMBER", 4), link_input("factor", "FLOAT", 5, widget=True)], [1.0]
        ),
        ui_node(
            4, "Scale", [link_input("x", "NUMBER", 2), link_input("factor", "FLOAT", 6, widget=True)], [1.0]
        ),
        ui_node(5, "Add", [link_input("a", "NUMBER", 7), link_input("b", "NUMBER", 8)]),
        ui_node(6, "Scale", [link_input("x", "NUMBER", 9)], [9.0], mode=4),
        ui_node(
            7,
            "Format",
            [link_input("x", "NUMBER", 10)],
            ["{x}", "plain"],
            title="Pretty",
            properties={"diffsplit.remote": "tcp://gpu:5555", "Node name for S&R": "Format"},
        ),
        ui_node(8, "Show", [link_input("text", "STRING", 11, widget=True)], [""]),
        ui_node(9, "Show", [link_input("text", "STRING", 12, widget=True)], [""], mode=2),
        ui_node(10, "Reroute", [link_input("", "*", 1)]),
        ui_node(11, "Reroute", [link_input("", "*", 3)]),
        ui_node(12, "Note", widgets=["remember the milk"]),
        ui_node(13, "MarkdownNote", widgets=["# heading"]),
    ]
    links = [
        [1, 1, 0, 10, 0, "NUMBER"],
        [2, 1, 0, 4, 0, "NUMBER"],
        [3, 10, 0, 11, 0, "NUMBER"],
        [4, 11, 0, 3, 0, "NUMBER"],
        [5, 2, 0, 3, 1, "FLOAT"],
        [6, 2, 0, 4, 1, "FLOAT"],
        [7, 3, 0, 5, 0, "NUMBER"],
        [8, 4, 0, 5, 1, "NUMBER"],
        [9, 5, 0, 6, 0, "NUMBER"],
        [10, 6, 0, 7, 0, "NUMBER"],
        [11, 7, 0, 8, 0, "STRING"],
        [12, 7, 0, 9, 0, "STRING"],
    ]
    return {
        "last_node_id": 13,
        "last_link_id": 12,
        "nodes": nodes,
        "links": links,
        "groups": [{"title": "Numbers", "bounding": [0, 0, 400, 300]}],
        "extra": {},
        "version": 0.4,
    }


@pytest.fixture
def make_ui() -> Callable[[], dict[str, Any]]:
    """A factory of fresh copies of the toy UI workflow (see ``_ui_workflow``)."""
    return _ui_workflow


def _stock_default_ui(ckpt_name: str) -> dict[str, Any]:
    """ComfyUI's stock default graph (txt2img), as the editor saves it, layout fields left out."""

    def output(name: str, links: list[int], slot: int = 0) -> dict[str, Any]:
        return {"name": name, "type": name, "links": links, "slot_index": slot}

    def linked(name: str, kind: str, link: int) -> dict[str, Any]:
        return {"name": name, "type": kind, "link": link}

    nodes = [
        {
            "id": 7,
            "type": "CLIPTextEncode",
            "mode": 0,
            "inputs": [linked("clip", "CLIP", 5)],
            "outputs": [output("CONDITIONING", [6])],
            "properties": {},
            "widgets_values": ["text, watermark"],
        },
        {
            "id": 6,
            "type": "CLIPTextEncode",
            "mode": 0,
            "inputs": [linked("clip", "CLIP", 3)],
            "outputs": [output("CONDITIONING", [4])],
            "properties": {},
            "widgets_values": ["beautiful scenery nature glass bottle landscape"],
        },
        {
            "id": 5,
            "type": "EmptyLatentImage",
            "mode": 0,
            "inputs": [],
            "outputs": [output("LATENT", [2])],
            "properties": {},
            "widgets_values": [64, 64, 1],
        },
        {
            "id": 3,
            "type": "KSampler",
            "mode": 0,
            "inputs": [
                linked("model", "MODEL", 1),
                linked("positive", "CONDITIONING", 4),
                linked("negative", "CONDITIONING", 6),
                linked("latent_image", "LATENT", 2),
            ],
            "outputs": [output("LATENT", [7])],
            "properties": {},
            "widgets_values": [156680208700286, "randomize", 2, 8, "euler", "normal", 1],
        },
        {
            "id": 8,
            "type": "VAEDecode",
            "mode": 0,
            "inputs": [linked("samples", "LATENT", 7), linked("vae", "VAE", 8)],
            "outputs": [output("IMAGE", [9])],
            "properties": {},
        },
        {
            "id": 9,
            "type": "SaveImage",
            "mode": 0,
            "inputs": [linked("images", "IMAGE", 9)],
            "outputs": [],
            "properties": {},
            "widgets_values": ["ComfyUI"],
        },
        {
            "id": 4,
            "type": "CheckpointLoaderSimple",
            "mode": 0,
            "inputs": [],
            "outputs": [output("MODEL", [1]), output("CLIP", [3, 5], 1), output("VAE", [8], 2)],
            "properties": {},
            "widgets_values": [ckpt_name],
        },
    ]
    links = [
        [1, 4, 0, 3, 0, "MODEL"],
        [2, 5, 0, 3, 3, "LATENT"],
        [3, 4, 1, 6, 0, "CLIP"],
        [4, 6, 0, 3, 1, "CONDITIONING"],
        [5, 4, 1, 7, 0, "CLIP"],
        [6, 7, 0, 3, 2, "CONDITIONING"],
        [7, 3, 0, 8, 0, "LATENT"],
        [8, 4, 2, 8, 1, "VAE"],
        [9, 8, 0, 9, 0, "IMAGE"],
    ]
    return {
        "last_node_id": 9,
        "last_link_id": 9,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


@pytest.fixture
def stock_ui() -> Callable[[str], dict[str, Any]]:
    """A factory of ComfyUI's stock default graph naming the given checkpoint."""
    return _stock_default_ui
