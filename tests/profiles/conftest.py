"""Fixtures for the profiler: measured tiny workflows, a worker, and fixed synthetic profiles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from diffsplit.engine.example_workflows import sd15_workflow, write_example_inputs
from diffsplit.engine.formats import load_workflow
from diffsplit.engine.graph import Workflow
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import output_recipe_source
from diffsplit.profiles.measure import measure_workflow
from diffsplit.profiles.model import InputMeasure, MemoryMeasure, NodeMeasure, WorkflowMeasure
from diffsplit.profiles.remote_runs import RunSetup

from diffsplit.demo import local_worker


@pytest.fixture(scope="session")
def registry() -> NodeRegistry:
    return default_registry()


@pytest.fixture(scope="session")
def store(models_dir: Path) -> ModelStore:
    return ModelStore(models_dir)


@pytest.fixture(scope="session")
def inputs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inputs folder with the control image the ControlNet example loads."""
    return write_example_inputs(tmp_path_factory.mktemp("input"))


@pytest.fixture(scope="module")
def worker_address(models_dir: Path) -> Iterator[str]:
    """A real worker daemon in a child process serving the tiny model set."""
    with local_worker(models_dir) as address:
        yield address


@pytest.fixture
def run_setup(registry: NodeRegistry, store: ModelStore, inputs_dir: Path, tmp_path: Path
              ) -> Callable[[Workflow], RunSetup]:
    """A RunSetup for a workflow (its recipe source, a fresh output folder)."""

    def make(workflow: Workflow) -> RunSetup:
        recipes = output_recipe_source(workflow, registry, store)
        return RunSetup(registry, store, recipes, tmp_path / "out", inputs_dir=inputs_dir)

    return make


@pytest.fixture(scope="session")
def sd15_measure(registry: NodeRegistry, store: ModelStore, inputs_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> WorkflowMeasure:
    """A measured local run of the SD 1.5 + LoRA example (no warm-up: only sanity is checked)."""
    workflow = load_workflow(sd15_workflow(steps=2), registry)
    recipes = output_recipe_source(workflow, registry, store)
    return measure_workflow(workflow, registry, store, recipes, name="sd15",
                            output_dir=tmp_path_factory.mktemp("out"), inputs_dir=inputs_dir, warmup_runs=0)


NodeSpec = tuple[str, str, tuple[str, ...], float, int, int, str | None]


def synthetic(nodes: list[NodeSpec], *, name: str = "synthetic") -> WorkflowMeasure:
    """A fixed measured profile: (id, class, dependencies, local s, request bytes, reply bytes, block)."""
    measures = []
    for node_id, class_type, dependencies, wall_s, up, down, block in nodes:
        role = "loader" if block == "loader" else "output" if block == "output node" else "compute"
        measures.append(NodeMeasure(
            node_id=node_id, class_type=class_type, title=class_type, dependencies=dependencies, role=role,
            cache_hit=False, wall_s=wall_s, cpu_s=wall_s, memory=MemoryMeasure("rss", 0, 0),
            inputs=(InputMeasure("x", "LATENT", "intermediate", None, up, up),) if up else (),
            request_bytes=up, reply_bytes=down, offload_block=block,
        ))
    return WorkflowMeasure(name=name, nodes=tuple(measures), total_s=sum(m.wall_s for m in measures),
                           overhead_s=0.0, device="cpu")


@pytest.fixture
def sd15_like() -> WorkflowMeasure:
    """SD 1.5 shaped: loaders, two text encoders, a 4 s sampler, a decoder, a save."""
    return synthetic([
        ("1", "CheckpointLoaderSimple", (), 0.5, 0, 0, "loader"),
        ("2", "LoraLoader", ("1",), 0.2, 0, 0, "loader"),
        ("3", "CLIPTextEncode", ("2",), 0.05, 600, 60_000, None),
        ("4", "CLIPTextEncode", ("2",), 0.05, 600, 60_000, None),
        ("5", "EmptyLatentImage", (), 0.001, 100, 100, None),
        ("6", "KSampler", ("2", "3", "4", "5"), 4.0, 125_000, 16_500, None),
        ("7", "VAEDecode", ("1", "6"), 0.4, 17_000, 786_500, None),
        ("8", "SaveImage", ("7",), 0.05, 0, 0, "output node"),
    ], name="sd15-like")


@pytest.fixture
def make_synthetic() -> Callable[..., WorkflowMeasure]:
    """The builder of fixed synthetic profiles, for tests that shape their own graph."""
    return synthetic
