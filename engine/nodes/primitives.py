"""ComfyUI's primitive value nodes: PrimitiveInt, PrimitiveFloat, PrimitiveString,
PrimitiveStringMultiline and PrimitiveBoolean (each outputs its widget's value).

The editor's older ``PrimitiveNode`` is not a node class: the UI converter
substitutes its value into the inputs it feeds.
"""

from __future__ import annotations

from typing import Any

from diffsplit.engine.nodes.base import InputSpec, NodeClass, NodeContext, OutputSpec

#: ComfyUI's integer bounds for PrimitiveInt.
INT_LIMIT = 0x7FFF_FFFF_FFFF_FFFF


def _value(ctx: NodeContext, *, value: Any) -> tuple[Any]:
    """The widget's value, unchanged."""
    return (value,)


def _primitive(name: str, spec: InputSpec, output: str) -> NodeClass:
    return NodeClass(name, (spec,), (OutputSpec(output, output),), _value, category="utils/primitive")


NODES: tuple[NodeClass, ...] = (
    _primitive("PrimitiveInt", InputSpec("value", "INT", default=0, min=-INT_LIMIT, max=INT_LIMIT,
                                         control_after_generate=True), "INT"),
    _primitive("PrimitiveFloat", InputSpec("value", "FLOAT", default=0.0, min=-1e308, max=1e308), "FLOAT"),
    _primitive("PrimitiveString", InputSpec("value", "STRING", default=""), "STRING"),
    _primitive(
        "PrimitiveStringMultiline", InputSpec("value", "STRING", default="", multiline=True), "STRING"
    ),
    _primitive("PrimitiveBoolean", InputSpec("value", "BOOLEAN", default=False), "BOOLEAN"),
)
