"""Loader outputs that are built only where they are used: a lean client for remote nodes.

When some nodes run on workers, a loader node's models may be needed only
there: the client names them in recipes and never runs them. ``defer_loader``
returns, instead of the loader's outputs, one :class:`LazyModel` per output. A
handle is built the first time a node *here* uses it (``materialised_inputs``,
called by ``executor.run_node_locally`` and the device runner), and never when
only remote nodes use it: they send its recipe, with the weight fingerprint the
loader computes from the file alone (``OutputLoader.fingerprint``: a checkpoint
part is sampled tensor by tensor without building it).

A loader whose class declares ``output_loaders`` builds each output alone
(CheckpointLoaderSimple's CLIP without its UNet and VAE; LoraLoader's CLIP
without its MODEL). Other loaders run whole the first time any of their outputs
is used. A handle's value is the same object every time it is asked for, so
identity (the cache of held values, recipes by object) works as for eager loads.
The loader's cheap checks (names resolve, the checkpoint header fits) run when
it is deferred: a bad file is still reported by its own node.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

from diffsplit.engine.errors import NodeFailed
from diffsplit.engine.nodes.base import NodeClass, NodeContext, OutputLoader
from diffsplit.engine.types import MODEL_TYPES

__all__ = ["LazyModel", "can_defer", "defer_loader", "materialised", "materialised_inputs"]


class _LoaderCall:
    """One deferred loader node call: its inputs as given (handles perhaps), its outputs once built."""

    def __init__(self, node_id: str, node_class: NodeClass, context: NodeContext,
                 inputs: Mapping[str, Any]) -> None:
        self.node_id = node_id
        self.node_class = node_class
        self.context = context
        self.inputs = dict(inputs)
        self._lock = threading.Lock()
        self._whole: tuple[Any, ...] | None = None

    def describe(self) -> str:
        return f"node {self.node_id} ({self.node_class.name})"

    def whole(self) -> tuple[Any, ...]:
        """Every output, from the node's own function (run once)."""
        with self._lock:
            if self._whole is None:
                inputs = {name: materialised(value) for name, value in self.inputs.items()}
                self._whole = tuple(self.node_class.function(self.context, **inputs))
            return self._whole

    def part(self, loader: OutputLoader) -> Any:
        """One output by its own loader, building only the inputs it uses."""
        inputs = {name: materialised(value) if name in loader.uses else None
                  for name, value in self.inputs.items()}
        return loader.load(self.context, **inputs)


def _as_loader_failure(call: _LoaderCall, work: Callable[[], Any]) -> Any:
    """``work()``; any failure is reported as the loader node's."""
    try:
        return work()
    except NodeFailed:
        raise
    except Exception as exc:  # a missing file, a bad header, a library's failure while loading
        raise NodeFailed(call.node_id, call.node_class.name, f"{type(exc).__name__}: {exc}") from exc


class LazyModel:
    """One model output of a deferred loader node: built on first :meth:`value`, then kept.

    Not a dataclass on purpose: value walkers (layout, wire) must take it as one opaque model.
    """

    def __init__(self, call: _LoaderCall, index: int) -> None:
        self._call = call
        self.index = index
        self.type_name = call.node_class.outputs[index].type
        self._lock = threading.Lock()
        self._value: Any = None
        self._loaded = False

    @property
    def node_id(self) -> str:
        return self._call.node_id

    def handle_inputs(self) -> dict[str, LazyModel]:
        """The loader's inputs that are themselves handles (the base model under a LoRA), by input name."""
        return {name: value for name, value in self._call.inputs.items() if isinstance(value, LazyModel)}

    @property
    def loaded(self) -> bool:
        """Whether the model was built (something here used it)."""
        with self._lock:
            return self._loaded

    def holds(self, value: Any) -> bool:
        """Whether ``value`` is the model this handle built."""
        with self._lock:
            return self._loaded and self._value is value

    def value(self) -> Any:
        """The model, built now if it was not yet; a failure is the loader node's NodeFailed."""
        with self._lock:
            if not self._loaded:
                self._value = self._build()
                self._loaded = True
            return self._value

    def file_fingerprint(self) -> str | None:
        """The weight fingerprint without building the model, where the loader can read it from its
        files (and its inputs are files, not other models); else the built model's, if built; else None."""
        with self._lock:
            if self._loaded:
                from diffsplit.engine.rebuild import comparable_fingerprint

                return comparable_fingerprint(self._value)
        loaders = self._call.node_class.output_loaders
        reader = loaders[self.index].fingerprint if loaders else None
        if reader is None or any(isinstance(v, LazyModel) for v in self._call.inputs.values()):
            return None
        return _as_loader_failure(self._call, lambda: reader(self._call.context, **self._call.inputs))

    def _build(self) -> Any:
        loaders = self._call.node_class.output_loaders
        if loaders:
            return _as_loader_failure(self._call, lambda: self._call.part(loaders[self.index]))
        return _as_loader_failure(self._call, lambda: self._call.whole()[self.index])

    def __repr__(self) -> str:
        state = "built" if self.loaded else "not built"
        return f"LazyModel({self._call.describe()} output {self.index} {self.type_name}, {state})"


def can_defer(node_class: NodeClass) -> bool:
    """Whether a node's outputs can wait for their first use: a loader whose outputs are all models."""
    return node_class.is_loader and bool(node_class.outputs) and all(
        output.type in MODEL_TYPES for output in node_class.outputs)


def defer_loader(node_id: str, node_class: NodeClass, context: NodeContext,
                 inputs: Mapping[str, Any]) -> tuple[LazyModel, ...]:
    """One handle per output of the loader node; its cheap checks run now (see the module docstring)."""
    if not can_defer(node_class):
        raise ValueError(f"{node_class.name} is not a loader of models only; it cannot be deferred")
    call = _LoaderCall(node_id, node_class, context, inputs)
    plain = {name: value for name, value in inputs.items() if not isinstance(value, LazyModel)}
    checks = {id(loader.check): loader.check for loader in node_class.output_loaders if loader.check}
    for check in checks.values():
        _as_loader_failure(call, lambda check=check: check(context, **plain))
    return tuple(LazyModel(call, index) for index in range(len(node_class.outputs)))


def materialised(value: Any) -> Any:
    """``value`` itself, or the model a handle stands for (built now if needed)."""
    return value.value() if isinstance(value, LazyModel) else value


def materialised_inputs(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The inputs with every handle built; the same mapping when there is none."""
    if not any(isinstance(value, LazyModel) for value in inputs.values()):
        return inputs
    return {name: materialised(value) for name, value in inputs.items()}


def with_materialised_inputs(call: Any) -> Any:
    """A NodeCall whose handles are built (the same call when it holds none)."""
    inputs = materialised_inputs(call.inputs)
    return call if inputs is call.inputs else dataclasses.replace(call, inputs=inputs)
