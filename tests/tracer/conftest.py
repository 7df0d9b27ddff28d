"""Fixtures of the tracer tests: the store, a traced SD 1.5 + LoRA run, and a traced ComfyUI graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffsplit.engine.executor import Executor
from diffsplit.engine.nodes.registry import NodeRegistry, default_registry
from diffsplit.engine.store import ModelStore
from diffsplit.engine.trace_workflow import WorkflowTrace, trace_workflow
from diffsplit.tracer.session import Trace, tracing

from tests.tracer.tracer_probes import probe


@pytest.fixture(scope="session")
def store(models_dir: Path) -> ModelStore:
    """The tiny models folder as a model store."""
    return ModelStore(models_dir)


@pytest.fixture(scope="session")
def registry() -> NodeRegistry:
    """The built-in node registry."""
    return default_registry()


@dataclass(frozen=True)
class LoraRun:
    """The issue's example, traced: SD 1.5 from its diffusers folder, a LoRA, set_adapters, one image."""

    trace: Trace
    pipe: Any
    image: torch.Tensor


@pytest.fixture(scope="session")
def sd15_lora_run(models_dir: Path, store: ModelStore) -> LoraRun:
    """The traced run (shared; tests must not change ``pipe``)."""
    from diffusers import StableDiffusionPipeline

    with tracing(store=store) as trace:
        pipe = StableDiffusionPipeline.from_pretrained(str(models_dir / "diffusers" / "tiny-sd15"))
        pipe.load_lora_weights(str(models_dir / "loras" / "tiny-sd15-lora.safetensors"), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.7])
        image = probe(pipe)
    return LoraRun(trace, pipe, image)


def graph_workflow() -> dict[str, Any]:
    """A ComfyUI API workflow with checkpoint, LoRA, CLIP skip, VAE override and ControlNet."""

    def node(class_type: str, **inputs: Any) -> dict[str, Any]:
        return {"class_type": class_type, "inputs": inputs}

    return {
        "1": node("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors"),
        "2": node(
            "LoraLoader",
            model=["1", 0],
            clip=["1", 1],
            lora_name="tiny-sd15-lora.safetensors",
            strength_model=0.8,
            strength_clip=0.8,
        ),
        "3": node("CLIPSetLastLayer", clip=["2", 1], stop_at_clip_layer=-2),
        "4": node("CLIPTextEncode", text="a watercolor fox", clip=["3", 0]),
        "5": node("CLIPTextEncode", text="blurry", clip=["3", 0]),
        "6": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "7": node("VAELoader", vae_name="tiny-vae.safetensors"),
        "8": node("VAEDecode", samples=["6", 0], vae=["1", 2]),
        "9": node("ControlNetLoader", control_net_name="tiny-sd15-controlnet.safetensors"),
        "10": node(
            "ControlNetApply", conditioning=["4", 0], control_net=["9", 0], image=["8", 0], strength=0.9
        ),
        "11": node(
            "KSampler",
            model=["2", 0],
            seed=42,
            steps=3,
            cfg=6.0,
            sampler_name="euler",
            scheduler="normal",
            positive=["10", 0],
            negative=["5", 0],
            latent_image=["6", 0],
            denoise=1.0,
        ),
        "12": node("VAEDecode", samples=["11", 0], vae=["7", 0]),
        "13": node("PreviewImage", images=["12", 0]),
    }


@dataclass(frozen=True)
class GraphRun:
    """The graph workflow traced, and the outputs of a plain run of it (the original objects)."""

    trace: WorkflowTrace
    outputs: dict[str, tuple[Any, ...]]


@pytest.fixture(scope="session")
def graph_run(
    registry: NodeRegistry, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> GraphRun:
    """The traced graph, plus every node's outputs from a separate plain run."""
    traced = trace_workflow(graph_workflow(), registry, store)
    executor = Executor(registry, store, output_dir=tmp_path_factory.mktemp("graph-out"), max_workers=1)
    from diffsplit.engine.formats import load_workflow

    result = executor.run(load_workflow(graph_workflow(), registry))
    return GraphRun(traced, dict(result.outputs))
