"""End-to-end fixtures: the real CLI in-process, the real executor, tiny models, input images.

Also a compact builder of UI-format documents (``UiGraph``) that lays nodes and
links out the way the ComfyUI editor saves them, so tests can write realistic
editor workflows without pages of JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffsplit.engine.example_workflows import write_example_inputs
from diffsplit.engine.executor import Executor, RunResult
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry
from diffsplit.engine.store import ModelStore
from PIL import Image

from diffsplit.cli import main
from diffsplit.demo import local_worker

#: Side of every input image (pixels); latents are a eighth of it.
IMAGE_SIDE = 64
#: The transparent square of ``masked.png`` (pixel rows/columns), painted by inpainting.
HOLE = slice(24, 40)


# -- the command line -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliRun:
    """What one in-process ``diffsplit`` call did."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def saved(self) -> tuple[Path, ...]:
        """The image files ``run`` reported on stdout (one path a line)."""
        return tuple(Path(line) for line in self.stdout.splitlines() if line.endswith(".png"))


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliRun]:
    """Call ``diffsplit.cli.main`` with the given arguments and capture what it printed."""

    def run(*argv: str | Path) -> CliRun:
        capsys.readouterr()
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    return run


def write_json(path: Path, document: Any) -> Path:
    """Write ``document`` as JSON to ``path``; returns the path."""
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    return path


def png_pixels(path: Path) -> np.ndarray:
    """The pixels of a PNG as an ``[H, W, C]`` uint8 array."""
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB")).copy()


def png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG."""
    with Image.open(path) as picture:
        return dict(picture.text)


# -- input images and the engine --------------------------------------------------------------------


def _photo() -> np.ndarray:
    """A smooth, deterministic RGB picture (gradients and a disc) as uint8 ``[H, W, 3]``."""
    rows, cols = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float32) / (IMAGE_SIDE - 1)
    disc = ((rows - 0.5) ** 2 + (cols - 0.4) ** 2 < 0.08).astype(np.float32)
    channels = (0.2 + 0.6 * cols, 0.8 - 0.6 * rows, 0.3 + 0.5 * disc)
    return (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def inputs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inputs folder: ``edges.png`` (the ControlNet hint), ``photo.png``, ``masked.png``.

    ``masked.png`` is ``photo.png`` with the ``HOLE`` square transparent (LoadImage's
    mask is ``1 - alpha``, so the hole is what inpainting repaints).
    """
    folder = write_example_inputs(tmp_path_factory.mktemp("inputs"))
    photo = _photo()
    Image.fromarray(photo).save(folder / "photo.png")
    alpha = np.full((IMAGE_SIDE, IMAGE_SIDE, 1), 255, dtype=np.uint8)
    alpha[HOLE, HOLE] = 0
    Image.fromarray(np.concatenate([photo, alpha], axis=-1), mode="RGBA").save(folder / "masked.png")
    return folder


@pytest.fixture(scope="module")
def worker_address(models_dir: Path) -> Iterator[str]:
    """A worker daemon in a child process serving the tiny model set."""
    with local_worker(models_dir) as address:
        yield address


@pytest.fixture(scope="session")
def registry() -> NodeRegistry:
    """The built-in node classes."""
    return default_registry()


@pytest.fixture(scope="session")
def store(models_dir: Path) -> ModelStore:
    """The tiny model set as a model store."""
    return ModelStore(models_dir)


@pytest.fixture
def run_workflow(
    registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path
) -> Callable[..., RunResult]:
    """Run a workflow document (either format) with the real executor, one node at a time.

    Keyword arguments go to ``Executor.run`` (``cache=``, ``targets=``).
    """

    def run(document: Mapping[str, Any], **options: Any) -> RunResult:
        executor = Executor(
            registry, store, inputs_dir=inputs_dir, output_dir=tmp_path / "out", max_workers=1
        )
        return executor.run(load_workflow(document, registry), **options)

    return run


# -- UI-format documents ----------------------------------------------------------------------------


class UiGraph:
    """Builds a UI-format ("workflow") document as the ComfyUI editor saves it.

    ``node`` declares a node's link inputs (``inputs``: name → type, in slot
    order), the widgets it converted to inputs (``converted``: name → type) and
    its output types; ``connect`` draws a link into an input by name and records
    it on both ends, as the editor does.
    """

    def __init__(self) -> None:
        self._nodes: dict[int, dict[str, Any]] = {}
        self._links: list[list[Any]] = []
        self._groups: list[dict[str, Any]] = []

    def node(
        self,
        node_id: int,
        node_type: str,
        widgets: Sequence[Any] | None = None,
        *,
        inputs: Mapping[str, str] | None = None,
        converted: Mapping[str, str] | None = None,
        outputs: Sequence[str] = (),
        mode: int = 0,
        title: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> int:
        """Add a node; returns its id."""
        entries = [{"name": name, "type": kind, "link": None} for name, kind in (inputs or {}).items()]
        entries += [
            {"name": name, "type": kind, "link": None, "widget": {"name": name}}
            for name, kind in (converted or {}).items()
        ]
        raw: dict[str, Any] = {
            "id": node_id,
            "type": node_type,
            "pos": [40 * node_id, 30 * node_id],
            "size": [300, 120],
            "flags": {},
            "order": len(self._nodes),
            "mode": mode,
            "inputs": entries,
            "outputs": [
                {"name": kind, "type": kind, "links": [], "slot_index": slot}
                for slot, kind in enumerate(outputs)
            ],
            "properties": {"Node name for S&R": node_type, **(properties or {})},
        }
        if widgets is not None:
            raw["widgets_values"] = list(widgets)
        if title is not None:
            raw["title"] = title
        self._nodes[node_id] = raw
        return node_id

    def connect(self, origin: int, slot: int, target: int, input_name: str) -> int:
        """Link output ``slot`` of ``origin`` to ``target``'s input ``input_name``; returns the link id."""
        link_id = len(self._links) + 1
        entries = self._nodes[target]["inputs"]
        target_slot = next(index for index, entry in enumerate(entries) if entry["name"] == input_name)
        entries[target_slot]["link"] = link_id
        output = self._nodes[origin]["outputs"][slot]
        output["links"].append(link_id)
        self._links.append([link_id, origin, slot, target, target_slot, output["type"]])
        return link_id

    def primitive(self, node_id: int, kind: str, value: Any, widget_name: str) -> int:
        """A PrimitiveNode holding ``value`` (with its "control after generate" value)."""
        self.node(node_id, "PrimitiveNode", [value, "fixed"], outputs=[kind])
        self._nodes[node_id]["outputs"][0]["widget"] = {"name": widget_name}
        self._nodes[node_id]["properties"] = {"Run widget replace on values": False}
        return node_id

    def reroute(self, node_id: int, kind: str) -> int:
        """A Reroute dot passing a ``kind`` value through."""
        self.node(node_id, "Reroute", inputs={"": "*"}, outputs=[kind])
        self._nodes[node_id]["properties"] = {"showOutputText": False, "horizontal": False}
        return node_id

    def group(self, title: str, bounding: Sequence[int]) -> None:
        """A group box (the engine ignores groups)."""
        self._groups.append({"title": title, "bounding": list(bounding), "color": "#3f789e", "font_size": 24})

    def document(self) -> dict[str, Any]:
        """The document, JSON-ready."""
        return {
            "last_node_id": max(self._nodes, default=0),
            "last_link_id": len(self._links),
            "nodes": list(self._nodes.values()),
            "links": [list(link) for link in self._links],
            "groups": list(self._groups),
            "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "version": 0.4,
        }
