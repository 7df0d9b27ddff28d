"""How a node class is declared: its inputs, outputs and the function that runs it.

Every module in ``engine/nodes`` exports ``NODES: tuple[NodeClass, ...]``; the
registry (``engine.nodes.registry``) collects them. Node functions are plain
callables ``fn(ctx: NodeContext, **inputs) -> tuple`` (one element per output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class InputSpec:
    """One declared input of a node class.

    ``type`` is a ComfyUI type name (``MODEL``, ``LATENT``, ``INT``, ``COMBO``...).
    For ``COMBO`` inputs, ``choices`` lists the allowed values, or ``model_folder``
    names the store folder whose file names are the choices (``checkpoints``,
    ``loras``, ``vae``, ``controlnet``...). ``control_after_generate`` marks seed
    widgets that the ComfyUI editor follows with an extra widget value.
    """

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    model_folder: str | None = None
    optional: bool = False
    control_after_generate: bool = False
    multiline: bool = False
    #: for a model-file input: the (input, value) pairs that must all hold for the file to be read
    #: (OpenPose's hand model only with ``detect_body`` and ``detect_hand`` enabled); empty: always
    read_when: tuple[tuple[str, str], ...] = ()

    @property
    def is_widget(self) -> bool:
        """Whether the ComfyUI editor shows this input as a widget (a plain value)."""
        return self.type in {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass(frozen=True)
class OutputSpec:
    """One declared output of a node class."""

    name: str
    type: str


class NodeContext(Protocol):
    """What a running node may ask of its surroundings."""

    node_id: str

    def model_path(self, folder: str, name: str) -> Path:
        """The file for ``name`` in the store folder ``folder`` (never outside the store)."""
        ...

    def input_path(self, name: str) -> Path:
        """The file ``name`` in the inputs folder (for LoadImage and friends)."""
        ...

    def output_dir(self) -> Path:
        """Where SaveImage writes; created on demand."""
        ...

    def progress(self, step: int, total: int) -> None:
        """Report progress of a long node (samplers call this once per step)."""
        ...

    def save_image(self, image: Any, filename_prefix: str, *, temporary: bool) -> Path:
        """Save one PIL image with the workflow in its PNG text chunk; returns the path."""
        ...


def master_dtype(ctx: NodeContext, kind: str) -> torch.dtype | None:
    """The dtype a rebuild context asks a loader to keep models of ``kind`` in (a worker computing
    in fp16/bf16: ``engine.rebuild``), or None where models load in float32 as always."""
    asked = getattr(ctx, "master_dtype", None)
    return None if asked is None else asked(kind)


@dataclass(frozen=True)
class OutputLoader:
    """How a loader node builds one of its outputs alone (``engine.lazy_models`` defers loaders with it).

    ``load(ctx, **inputs)`` returns that one output; it reads only the inputs named
    in ``uses`` (the others are given as None, and are never built for it).
    ``fingerprint(ctx, **inputs)``, when given, is the output's weight fingerprint
    computed from its files without building it. ``check(ctx, **inputs)`` is the
    loader's cheap validation (names resolve, file headers fit) run when the node
    is deferred, so a bad file is reported by its loader node, not later.
    """

    load: Callable[..., Any]
    uses: frozenset[str]
    fingerprint: Callable[..., str] | None = None
    check: Callable[..., None] | None = None


@dataclass(frozen=True)
class NodeClass:
    """A node class: name, declared inputs and outputs, and its function."""

    name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    function: Callable[..., tuple[Any, ...]]
    category: str = ""
    output_node: bool = False
    #: loader nodes build models from files; the tracer and partitioner treat them specially
    is_loader: bool = False
    description: str = field(default="", compare=False)
    #: one per output: how a loader builds each output alone; empty: only the whole function
    output_loaders: tuple[OutputLoader, ...] = ()
    #: a sampler that runs the conditioning scale estimator (``--conditions auto``): in a pruned run
    #: it is never taken from the execution cache (its outputs and decisions depend on the settings)
    prunes_conditions: bool = False

    def __post_init__(self) -> None:
        if self.output_loaders and len(self.output_loaders) != len(self.outputs):
            raise ValueError(f"{self.name}: {len(self.output_loaders)} output loaders for "
                             f"{len(self.outputs)} outputs")

    def input(self, name: str) -> InputSpec | None:
        """The declared input called ``name``, or None."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    @property
    def widget_inputs(self) -> tuple[InputSpec, ...]:
        """Inputs shown as widgets, in declaration order (the order of UI ``widgets_values``)."""
        return tuple(spec for spec in self.inputs if spec.is_widget)
