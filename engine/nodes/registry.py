"""The node registry: an immutable mapping from node class name to :class:`NodeClass`.

``default_registry()`` collects the ``NODES`` tuples of the built-in node
modules; ``NodeRegistry.from_nodes`` builds one from any node classes (tests,
custom nodes). ``get`` fails with a :class:`WorkflowError` that lists close
matches, so a typo in a workflow's ``class_type`` is easy to spot.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType

from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.nodes.base import NodeClass

#: The built-in node modules, each exporting ``NODES: tuple[NodeClass, ...]``.
BUILTIN_NODE_MODULES: tuple[str, ...] = (
    "diffsplit.engine.nodes.loaders",
    "diffsplit.engine.nodes.component_loaders",
    "diffsplit.engine.nodes.conditioning",
    "diffsplit.engine.nodes.conditioning_edits",
    "diffsplit.engine.nodes.latent",
    "diffsplit.engine.nodes.vae_tiled",
    "diffsplit.engine.nodes.image",
    "diffsplit.engine.nodes.upscale_model",
    "diffsplit.engine.nodes.compositing",
    "diffsplit.engine.nodes.preprocessors",
    "diffsplit.engine.nodes.depth",
    "diffsplit.engine.nodes.lineart",
    "diffsplit.engine.nodes.pose",
    "diffsplit.engine.nodes.segmentation",
    "diffsplit.engine.nodes.sampling",
    "diffsplit.engine.nodes.custom_sampling",
    "diffsplit.engine.nodes.edit_models",
    "diffsplit.engine.nodes.controlnet",
    "diffsplit.engine.nodes.clip_vision",
    "diffsplit.engine.nodes.gligen",
    "diffsplit.engine.nodes.primitives",
    "diffsplit.engine.nodes.genie_nodes",
)

_MAX_LISTED_NAMES = 40


class NodeRegistry(Mapping[str, NodeClass]):
    """An immutable mapping of node class names to node classes."""

    __slots__ = ("_classes",)

    def __init__(self, classes: Mapping[str, NodeClass]) -> None:
        for name, node_class in classes.items():
            if name != node_class.name:
                raise ValueError(f"registry key {name!r} does not match node class name {node_class.name!r}")
        self._classes = MappingProxyType(dict(sorted(classes.items())))

    @classmethod
    def from_nodes(cls, *groups: NodeClass | Iterable[NodeClass]) -> NodeRegistry:
        """A registry of the given node classes (single classes or iterables of them).

        Two different classes with the same name are an error.
        """
        classes: dict[str, NodeClass] = {}
        for group in groups:
            for node_class in (group,) if isinstance(group, NodeClass) else group:
                known = classes.get(node_class.name)
                if known is not None and known is not node_class:
                    raise ValueError(f"two node classes are named {node_class.name!r}")
                classes[node_class.name] = node_class
        return cls(classes)

    def with_nodes(self, *groups: NodeClass | Iterable[NodeClass]) -> NodeRegistry:
        """A new registry with extra node classes added (a new name may not shadow an old one)."""
        return NodeRegistry.from_nodes(tuple(self._classes.values()), *groups)

    def get(self, name: str, default: object = None) -> NodeClass:  # type: ignore[override]
        """The node class called ``name``; a WorkflowError naming close matches if unknown.

        ``default`` exists only for Mapping compatibility and is never returned:
        an unknown name always raises (use ``name in registry`` to test).
        """
        try:
            return self._classes[name]
        except KeyError:
            raise WorkflowError(self.unknown_class_message(name)) from None

    def unknown_class_message(self, name: str) -> str:
        """The explanation used when ``name`` is not a registered node class."""
        close = difflib.get_close_matches(name, list(self._classes), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = list(self._classes)
        shown = ", ".join(known[:_MAX_LISTED_NAMES])
        if len(known) > _MAX_LISTED_NAMES:
            shown += f", … ({len(known) - _MAX_LISTED_NAMES} more)"
        return f"unknown node class {name!r}{hint}; known: {shown or '(none)'}"

    def __getitem__(self, name: str) -> NodeClass:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"NodeRegistry({len(self._classes)} classes)"


def default_registry() -> NodeRegistry:
    """The registry of every built-in node class (imports the node modules on call)."""
    groups = []
    for module_name in BUILTIN_NODE_MODULES:
        module = importlib.import_module(module_name)
        groups.append(module.NODES)
    return NodeRegistry.from_nodes(*groups)
