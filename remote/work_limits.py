"""How much work one request may make a worker do, checked before anything is allocated or run.

A peer chooses a node's inputs, so a few bytes could ask for a 65536² latent,
a billion sampling steps or a thousand 2 GiB zero tensors. The worker refuses
such requests with BadRequest, before the node runs:

- memory: the bytes the request's values hold once decoded (frames, every
  ``$ds:zeros`` descriptor, held values referenced) are summed first
  (:func:`check_request_bytes`);
- node inputs: each widget value is checked against the node's declared type,
  range and choices, as a local run checks it (:func:`check_node_inputs`);
- work: any ``steps`` input and the length of any SIGMAS input against
  ``max_steps``; any ``batch_size`` input and the batch of any LATENT, IMAGE or
  MASK input against ``max_batch``; the pixels (width × height × batch, a
  latent counting as the image it decodes to) of every LATENT, IMAGE and MASK
  input, and of what a node that makes latents or images will produce (from
  its ``width``/``height``, ``scale_by``, ``megapixels``, padding inputs or an
  upscale model's scale), against ``max_pixels``.

Inputs are found by name and declared type, not by node class, so new nodes
with such inputs are bounded too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.nodes.base import NodeClass
from diffsplit.engine.nodes.registry import NodeRegistry
from diffsplit.engine.types import UpscaleModel
from diffsplit.engine.validation import check_node_values
from diffsplit.engine.wire_values import ZEROS, WireValueError, decoded_bytes, zeros_spec
from diffsplit.remote.errors import BadRequest

#: A latent cell stands for this many image pixels on each side (the VAE's downscale).
LATENT_SCALE = 8
#: Declared types whose values are pictures (counted against max_pixels and max_batch).
SPATIAL_TYPES = frozenset({"LATENT", "IMAGE", "MASK"})
#: Inputs that grow a picture by a margin on one side.
PADDING_INPUTS = (("left", "right"), ("top", "bottom"))
_GIB = 1 << 30


@dataclass(frozen=True)
class WorkLimits:
    """What one request may ask of the worker (``diffsplit worker --max-*``)."""

    max_request_bytes: int = 4 << 30
    max_steps: int = 10_000
    max_pixels: int = 4096 * 4096
    max_batch: int = 64
    #: steps × pixels of one sampler call (150 steps at 4096², 2,400 at 1024²): each cap alone allows more
    max_step_pixels: int = 150 * 4096 * 4096
    #: characters of any STRING input (a prompt's tokens cost the text encoder time and memory)
    max_text_chars: int = 65_536
    #: tiles one tiled node may run (its tile size and overlap decide how many)
    max_tiles: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_steps", "max_pixels", "max_batch", "max_step_pixels",
                     "max_text_chars", "max_tiles"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"WorkLimits.{name} must be a whole number of at least 1, not {value!r}")


@dataclass(frozen=True)
class Extent:
    """A picture's size: batch (frames folded in) and height and width in image pixels."""

    batch: int
    height: int
    width: int

    @property
    def pixels(self) -> int:
        """Width × height × batch."""
        return self.batch * self.height * self.width

    def describe(self) -> str:
        """``2×1024×768`` (batch × height × width)."""
        return f"{self.batch}×{self.height}×{self.width}"


def check_request_bytes(wire: Any, held: Mapping[str, Any], limits: WorkLimits, *, what: str) -> None:
    """BadRequest when decoding ``wire`` would hold more than ``limits.max_request_bytes``."""
    try:
        needed = decoded_bytes(wire, held)
    except WireValueError as exc:
        raise BadRequest(f"{what}: {exc}") from None
    if needed > limits.max_request_bytes:
        raise BadRequest(
            f"{what}: its values need {needed / _GIB:.2f} GiB on the worker, over its per-request memory "
            f"budget of {limits.max_request_bytes / _GIB:.2f} GiB (--max-request-gb); send smaller tensors, "
            "a smaller batch, or ask the worker's owner to raise the budget"
        )


def check_node_inputs(
    registry: NodeRegistry, node_class: NodeClass, node_id: str, values: Mapping[str, Any], limits: WorkLimits
) -> None:
    """BadRequest for the first input a local run would refuse or that is over the worker's limits.

    ``values`` are the inputs as received (wire values: tensors and zeros
    descriptors are measured by shape, nothing is allocated) or as decoded
    (then an upscale model's scale counts too); call it with both.
    """
    where = f"node {node_id} ({node_class.name})"
    try:
        check_node_values(registry, node_id, node_class.name, values)
    except WorkflowError as exc:
        raise BadRequest(str(exc)) from None
    try:
        _check_work(node_class, values, limits, where)
    except WireValueError as exc:
        raise BadRequest(f"{where}: {exc}") from None


def check_pipeline_call(kwargs: Mapping[str, Any], limits: WorkLimits) -> None:
    """BadRequest when a pipeline call (op ``call``) asks for more steps, pixels or images than allowed."""
    steps = kwargs.get("num_inference_steps")
    if _whole(steps) and steps > limits.max_steps:
        raise BadRequest(f"call: num_inference_steps {steps} is over this worker's limit of "
                         f"{limits.max_steps} (--max-steps)")
    batch = kwargs.get("num_images_per_prompt", 1)
    batch = batch if _whole(batch) else 1
    if batch > limits.max_batch:
        raise BadRequest(f"call: num_images_per_prompt {batch} is over this worker's limit of "
                         f"{limits.max_batch} (--max-batch)")
    height, width = kwargs.get("height"), kwargs.get("width")
    if _whole(height) and _whole(width):
        _within_pixels(Extent(batch, height, width), limits, "call", "the pipeline's output")


def _check_work(node_class: NodeClass, values: Mapping[str, Any], limits: WorkLimits, where: str) -> None:
    steps = 0
    for spec in node_class.inputs:
        value = values.get(spec.name)
        if value is None:
            continue
        if spec.type == "STRING" and isinstance(value, str) and len(value) > limits.max_text_chars:
            raise BadRequest(f"{where}: input '{spec.name}' has {len(value)} characters, over this worker's "
                             f"limit of {limits.max_text_chars}")
        if spec.type == "INT" and spec.name == "steps" and _whole(value):
            steps = max(steps, value)
        if spec.type == "INT" and spec.name == "steps" and _whole(value) and value > limits.max_steps:
            raise BadRequest(f"{where}: steps {value} is over this worker's limit of {limits.max_steps} "
                             "(--max-steps)")
        if spec.type == "INT" and spec.name == "batch_size" and _whole(value) and value > limits.max_batch:
            raise BadRequest(f"{where}: batch_size {value} is over this worker's limit of {limits.max_batch} "
                             "(--max-batch)")
        if spec.type == "SIGMAS":
            shape = _shape(value)
            sigma_steps = math.prod(shape) - 1 if shape is not None else 0
            if sigma_steps > limits.max_steps:
                raise BadRequest(f"{where}: input '{spec.name}' has {sigma_steps} steps, over this worker's "
                                 f"limit of {limits.max_steps} (--max-steps)")
            steps = max(steps, sigma_steps)
        if spec.type in SPATIAL_TYPES:
            extent = _extent(value, spec.type)
            if extent is not None:
                _within_batch(extent, limits, where, f"input '{spec.name}'")
                _within_pixels(extent, limits, where, f"input '{spec.name}'")
    if any(output.type in SPATIAL_TYPES for output in node_class.outputs):
        made = _output_extent(node_class, values)
        if made is not None:
            _within_batch(made, limits, where, "its output")
            _within_pixels(made, limits, where, "its output")
    source = _source_extent(node_class, values)
    if steps and source is not None and steps * source.pixels > limits.max_step_pixels:
        raise BadRequest(
            f"{where}: {steps} steps on {source.describe()} pixels is {steps * source.pixels} step-pixels, "
            f"over this worker's limit of {limits.max_step_pixels}; use fewer steps or a smaller picture"
        )
    _within_tiles(node_class, values, source, limits, where)


def _within_tiles(
    node_class: NodeClass, values: Mapping[str, Any], source: Extent | None, limits: WorkLimits, where: str
) -> None:
    """A tiled node (``tile_size`` and ``overlap`` inputs, image pixels) runs at most ``max_tiles`` tiles."""
    tile, overlap = values.get("tile_size"), values.get("overlap")
    if source is None or not (_declared(node_class, "tile_size", "INT") and _whole(tile) and tile > 0):
        return
    stride = max(1, tile - (overlap if _declared(node_class, "overlap", "INT") and _whole(overlap) else 0))
    tiles = source.batch * math.ceil(source.height / stride) * math.ceil(source.width / stride)
    if tiles > limits.max_tiles:
        raise BadRequest(
            f"{where}: tile_size {tile} with overlap {overlap} needs about {tiles} tiles for "
            f"{source.describe()} pixels, over this worker's limit of {limits.max_tiles}; use larger tiles "
            "or a smaller overlap"
        )


def _within_batch(extent: Extent, limits: WorkLimits, where: str, what: str) -> None:
    if extent.batch > limits.max_batch:
        raise BadRequest(f"{where}: {what} has a batch of {extent.batch}, over this worker's limit of "
                         f"{limits.max_batch} (--max-batch)")


def _within_pixels(extent: Extent, limits: WorkLimits, where: str, what: str) -> None:
    if extent.pixels > limits.max_pixels:
        raise BadRequest(
            f"{where}: {what} would be {extent.describe()} = {extent.pixels} pixels "
            f"(batch × height × width), over this worker's limit of {limits.max_pixels} (--max-pixels); "
            "run it locally or smaller"
        )


def _output_extent(node_class: NodeClass, values: Mapping[str, Any]) -> Extent | None:
    """What a node that makes pictures will make, as far as its inputs tell (None: nothing to go by)."""
    made = _source_extent(node_class, values)
    batch = values.get("batch_size")
    if _declared(node_class, "batch_size", "INT") and _whole(batch):
        made = Extent(batch, made.height, made.width) if made is not None else Extent(batch, 0, 0)
    width, height = values.get("width"), values.get("height")
    sized = _declared(node_class, "width", "INT") and _declared(node_class, "height", "INT")
    if sized and _whole(width) and _whole(height):
        made = _resized(made, width, height)
    scale_by = values.get("scale_by")
    if made is not None and _declared(node_class, "scale_by", "FLOAT") and _number(scale_by):
        made = Extent(made.batch, _scaled(made.height, scale_by), _scaled(made.width, scale_by))
    megapixels = values.get("megapixels")
    if _declared(node_class, "megapixels", "FLOAT") and _number(megapixels):
        side = math.ceil(math.sqrt(megapixels * 1024 * 1024))
        made = Extent(made.batch if made is not None else 1, side, side)
    if made is not None:
        margins = [sum(_margin(node_class, values, name) for name in pair) for pair in PADDING_INPUTS]
        made = Extent(made.batch, made.height + margins[1], made.width + margins[0])
    for spec in node_class.inputs:
        model = values.get(spec.name)
        if spec.type == "UPSCALE_MODEL" and isinstance(model, UpscaleModel) and made is not None:
            made = Extent(made.batch, made.height * model.scale, made.width * model.scale)
    return made


def _source_extent(node_class: NodeClass, values: Mapping[str, Any]) -> Extent | None:
    """The first LATENT or IMAGE input's size (the picture a node resizes or decodes)."""
    for spec in node_class.inputs:
        if spec.type in ("LATENT", "IMAGE"):
            extent = _extent(values.get(spec.name), spec.type)
            if extent is not None:
                return extent
    return None


def _resized(source: Extent | None, width: int, height: int) -> Extent | None:
    """ImageScale / LatentUpscale: a side of 0 keeps the aspect ratio, both 0 keep the size."""
    batch = source.batch if source is not None else 1
    if width == 0 and height == 0:
        return source
    if source is not None and source.height > 0 and source.width > 0:
        if width == 0:
            width = math.ceil(source.width * height / source.height)
        elif height == 0:
            height = math.ceil(source.height * width / source.width)
    return Extent(batch, height, width)


def _extent(value: Any, kind: str) -> Extent | None:
    """The size of a LATENT ``{"samples": [B, C, (T,) h, w]}``, IMAGE ``[B, H, W, C]``, MASK ``[B, H, W]``."""
    if kind == "LATENT":
        samples = value.get("samples") if isinstance(value, Mapping) else None
        shape = _shape(samples)
        if shape is None or len(shape) < 4:
            return None
        frames = math.prod(shape[2:-2])
        return Extent(shape[0] * frames, shape[-2] * LATENT_SCALE, shape[-1] * LATENT_SCALE)
    shape = _shape(value)
    if shape is None:
        return None
    if kind == "IMAGE" and len(shape) >= 3:
        return Extent(math.prod(shape[:-3]) if len(shape) > 3 else 1, shape[-3], shape[-2])
    if kind == "MASK" and len(shape) >= 2:
        return Extent(math.prod(shape[:-2]) if len(shape) > 2 else 1, shape[-2], shape[-1])
    return None


def _shape(value: Any) -> Sequence[int] | None:
    """A tensor's shape, or the shape a ``$ds:zeros`` descriptor declares (checked, not allocated)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, Mapping) and len(value) == 1 and ZEROS in value:
        return zeros_spec(value[ZEROS]).shape
    return None


def _margin(node_class: NodeClass, values: Mapping[str, Any], name: str) -> int:
    value = values.get(name)
    return value if _declared(node_class, name, "INT") and _whole(value) and value > 0 else 0


def _declared(node_class: NodeClass, name: str, kind: str) -> bool:
    spec = node_class.input(name)
    return spec is not None and spec.type == kind


def _scaled(side: int, factor: float) -> int:
    return math.ceil(side * factor)


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
